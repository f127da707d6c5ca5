//! Constrained decoding: a grammar (a JSON schema, any JSON object or a Lark grammar) compiled by llguidance into the set of tokens allowed next, which the GPU sampler
//! applies as a bitmask (`kernels::sample`, the `constraint` input: `vocab / 32` words a token).
//!
//! The per-model part ([`Grammars`]: the token trie and llguidance's precomputed lexer slices)
//! is built on the first constrained request and kept; each request gets its own
//! [`Constraint`], which computes the mask before every draw and follows the drawn tokens. When
//! the grammar is complete only the end-of-sequence ids stay allowed, so the model ends the
//! reply itself.

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// What the output must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under a JSON schema (OpenAI's `json_schema`; llguidance's support of the
    /// schema keywords: types, properties and `required`, `additionalProperties`, arrays with
    /// `minItems`/`maxItems`, `enum`/`const`, numeric bounds, string `pattern`/`format`/lengths,
    /// `anyOf`/`oneOf`/`allOf`, local `$ref`s).
    JsonSchema { schema: Value },
    /// A grammar in llguidance's Lark dialect (<https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md>):
    /// `start: ...` rules, `/regex/` and `"literal"` terminals, `%json {...}` for a JSON schema
    /// inside the grammar.
    Lark { grammar: String },
}

/// Whitespace a JSON output may hold between two tokens of its syntax, as llama.cpp's
/// JSON-schema grammars allow it: one space, or a line break and up to 20 blanks of indent;
/// enough for pretty-printing, and no run of blanks that lasts to the token limit. A schema's own
/// `x-guidance` options (llguidance's) replace this.
const JSON_WHITESPACE: &str = r"\x20|\x0A[\x20\x09]{0,20}";

/// The schema with Kiln's JSON options where it has none of its own.
fn with_json_options(mut schema: Value) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({ "whitespace_pattern": JSON_WHITESPACE }));
    }
    schema
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(with_json_options(
                serde_json::json!({"type": "object"}),
            )),
            Grammar::JsonSchema { schema } => {
                TopLevelGrammar::from_json_schema(with_json_options(schema.clone()))
            }
            Grammar::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
        }
    }

    /// What the errors call it.
    fn name(&self) -> &'static str {
        match self {
            Grammar::JsonObject | Grammar::JsonSchema { .. } => "response_format",
            Grammar::Lark { .. } => "grammar",
        }
    }
}

/// A grammar's error, named by the request field that carried it.
fn grammar_err(what: &str, e: impl std::fmt::Display) -> Error {
    super::chat::bad(what, e.to_string())
}

/// A model's tokens as llguidance sees them, and its parser factory.
pub struct Grammars {
    factory: ParserFactory,
    /// Words of the mask over the model's vocabulary (its logits, which may outnumber the
    /// tokenizer's ids).
    words: usize,
}

impl Grammars {
    /// From the model's tokenizer (every id's bytes, read from its tokenizer.json form), its
    /// end-of-sequence ids and its vocabulary size (the logits).
    pub fn new(tok: &TextTokenizer, eos: &[u32], vocab: usize) -> Result<Grammars> {
        let unsupported = |e: &dyn std::fmt::Display| {
            Error::Unsupported(format!(
                "constrained decoding with this tokenizer: {e} (byte-level BPE and SentencePiece tokenizers with byte fallback are supported)"
            ))
        };
        let json = tok.to_json().map_err(|e| unsupported(&e))?;
        let bytes = crate::tokenizer::guard_panics(|| {
            llguidance::token_bytes_from_tokenizer_json(&json)
                .map_err(|e| Error::Unsupported(e.to_string()))
        })
        .map_err(|e| unsupported(&e))?;
        let n = bytes.len() as u32;
        let eos: Vec<u32> = eos.iter().copied().filter(|&e| e < n).collect();
        let Some(&first) = eos.first() else {
            return Err(Error::Unsupported(
                "constrained decoding for a model without an end-of-sequence token".into(),
            ));
        };
        let trie = TokTrie::from(&TokRxInfo::new(n, first), &bytes).with_eos_tokens(&eos);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&(env as _)).map_err(|e| unsupported(&e))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            words: vocab.div_ceil(32),
        })
    }

    /// A new constraint for one request: errors name what is wrong with the grammar.
    pub fn constraint(&self, g: &Grammar) -> Result<Constraint> {
        let what = g.name();
        let parser = self
            .factory
            .create_parser(g.top_level())
            .map_err(|e| grammar_err(what, e))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(grammar_err(what, e));
        }
        Ok(Constraint {
            m,
            words: self.words,
            what,
            mask_ms: 0.0,
            masks: 0,
            buf: Vec::new(),
        })
    }
}

/// One request's grammar state.
pub struct Constraint {
    m: Matcher,
    words: usize,
    what: &'static str,
    /// Time spent computing masks, and how many.
    pub mask_ms: f64,
    pub masks: usize,
    /// The last mask (reused from token to token).
    buf: Vec<u32>,
}

impl Constraint {
    /// The allowed-id bitmask for the next token (bit `i % 32` of word `i / 32`, over the
    /// model's vocabulary); only the end-of-sequence ids once the grammar is complete.
    pub fn mask(&mut self) -> Result<&[u32]> {
        let t0 = crate::device::now_ms();
        let v = self
            .m
            .compute_mask_or_eos()
            .map_err(|e| grammar_err(self.what, e))?;
        self.buf.clear();
        self.buf.extend_from_slice(v.as_slice());
        self.buf.resize(self.words, 0);
        if self.buf.iter().all(|&w| w == 0) {
            return Err(grammar_err(self.what, "no token can continue the output"));
        }
        self.mask_ms += crate::device::now_ms() - t0;
        self.masks += 1;
        Ok(&self.buf)
    }

    /// Follows a drawn token (one the last mask allowed).
    pub fn commit(&mut self, id: u32) -> Result<()> {
        if self.m.is_stopped() {
            return Ok(());
        }
        self.m
            .consume_token(id)
            .map_err(|e| grammar_err(self.what, e))
    }
}
