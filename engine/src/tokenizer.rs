//! Tokenizers: a Hugging Face `tokenizer.json` as is, or one rebuilt from GGUF metadata
//! (`gpt2` byte-level BPE with llama.cpp's pre-tokenizer names, `llama` SentencePiece BPE with
//! merges derived from the piece scores as transformers' converter does), so both give the same
//! ids. Chat templates are Jinja, rendered with minijinja.

use crate::error::{Error, Result};
use crate::formats::gguf::{Gguf, Value};
use serde_json::{json, Value as Json};
use std::collections::HashMap;

/// A tokenizer with the special tokens and chat template of its model.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding a plain prompt.
    pub add_bos: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub bos_token: String,
    pub eos_token: String,
    pub chat_template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Data {
        name: "tokenizer".into(),
        msg: e.to_string(),
    }
}

/// A `tokenizers` tokenizer from `tokenizer.json` bytes. The JSON is validated first: the
/// library panics (instead of returning an error) on some malformed files, e.g. a syntax error
/// or a lone surrogate escape inside `decoder` (found by fuzzing). Natively a panic left in the library is caught and becomes an error.
pub(crate) fn build_tokenizer(json: &[u8]) -> Result<tokenizers::Tokenizer> {
    serde_json::from_slice::<ValidJson>(json)
        .map_err(|e| tok_err(format!("tokenizer.json is not valid JSON: {e}")))?;
    let tok = guard_panics(|| tokenizers::Tokenizer::from_bytes(json).map_err(tok_err))?;
    // A Strip decoder with `stop` > 0 panics (an integer underflow) whenever a decoded piece is
    // empty, which streaming makes common (found by fuzzing); real files strip at the start
    // only. Refused here, since in the browser a panic cannot be caught.
    let decoder = tok.get_decoder().and_then(|d| serde_json::to_value(d).ok());
    if decoder.as_ref().is_some_and(strips_at_end) {
        return Err(tok_err(
            "tokenizer.json: a Strip decoder with \"stop\" > 0 is not supported (the tokenizers library fails on empty pieces with it)",
        ));
    }
    Ok(tok)
}

/// Whether a decoder (as JSON) holds a Strip step that strips at the end.
fn strips_at_end(v: &Json) -> bool {
    match v {
        Json::Object(o) => {
            (o.get("type").and_then(|t| t.as_str()) == Some("Strip")
                && o.get("stop").and_then(|s| s.as_u64()).unwrap_or(0) > 0)
                || o.values().any(strips_at_end)
        }
        Json::Array(a) => a.iter().any(strips_at_end),
        _ => false,
    }
}

/// Validates JSON without building it: unlike `IgnoredAny`, every string (and key) is decoded,
/// so escapes such as a lone surrogate are caught here rather than inside the library.
struct ValidJson;

impl<'de> serde::Deserialize<'de> for ValidJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ValidJsonVisitor)
    }
}

struct ValidJsonVisitor;

impl<'de> serde::de::Visitor<'de> for ValidJsonVisitor {
    type Value = ValidJson;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_unit<E>(self) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<ValidJson, A::Error> {
        while seq.next_element::<ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<ValidJson, A::Error> {
        while map.next_entry::<ValidJson, ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }
}

/// Runs a call into the tokenizers library; natively a panic inside it becomes an error.
pub(crate) fn guard_panics<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(tok_err(format!(
                "the tokenizers library failed on this file: {msg}"
            )))
        })
    }
    #[cfg(target_arch = "wasm32")]
    f()
}

/// A special-token entry of tokenizer_config.json: a string or `{"content": ...}`.
pub(crate) fn token_str(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        o => o.get("content").and_then(|c| c.as_str()).map(String::from),
    }
}

impl TextTokenizer {
    /// From a Hugging Face folder's files: `tokenizer.json`, optionally `tokenizer_config.json`
    /// and `chat_template.jinja` (where transformers 5 saves the template; it wins over the
    /// config's `chat_template`, as in transformers).
    pub fn from_hf_files(files: &crate::formats::ModelFiles) -> Result<TextTokenizer> {
        use crate::formats::text_file;
        let tj = files.get("tokenizer.json").ok_or_else(|| Error::Data {
            name: "model".into(),
            msg: "no tokenizer.json".into(),
        })?;
        let mut tok = Self::from_hf(tj, text_file(files, "tokenizer_config.json")?.as_deref())?;
        if let Some(t) = text_file(files, "chat_template.jinja")? {
            tok.chat_template = Some(t);
        }
        Ok(tok)
    }

    /// From `tokenizer.json` and (optionally) `tokenizer_config.json`.
    pub fn from_hf(tokenizer_json: &[u8], tokenizer_config: Option<&str>) -> Result<TextTokenizer> {
        let inner = build_tokenizer(tokenizer_json)?;
        let cfg: Json = match tokenizer_config {
            Some(s) => serde_json::from_str(s).map_err(|e| Error::Data {
                name: "tokenizer_config.json".into(),
                msg: e.to_string(),
            })?,
            None => json!({}),
        };
        let bos_token = token_str(cfg.get("bos_token")).unwrap_or_default();
        let eos_token = token_str(cfg.get("eos_token")).unwrap_or_default();
        let bos = inner.token_to_id(&bos_token);
        let eos = inner.token_to_id(&eos_token).into_iter().collect();
        // transformers' default: add BOS when the config says so (Llama SPM tokenizers do).
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
            && bos.is_some();
        let chat_template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(String::from)),
            _ => None,
        };
        Ok(TextTokenizer {
            inner,
            add_bos,
            bos,
            eos,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// Rebuilds the tokenizer from GGUF metadata: the vocabulary and its token types, then a
    /// tokenizer.json of the file's model (`gpt2`: byte-level BPE with its pre-tokenizer;
    /// `llama`: SentencePiece BPE with merges from the scores) for the tokenizers library.
    pub fn from_gguf(g: &Gguf) -> Result<TextTokenizer> {
        let model = g
            .require("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or("")
            .to_string();
        let (tokens, types) = gguf_vocab(g)?;
        let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let (bos, eos_id) = (
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
        );
        let name_of = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        // Control (3) and user-defined (4) tokens are matched as whole strings before the model.
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
            .collect();
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let spec = match model.as_str() {
            "gpt2" => gpt2_spec(g, added, vocab)?,
            "llama" => {
                let unk = id("tokenizer.ggml.unknown_token_id").map(|i| name_of(Some(i)));
                spm_spec(g, &tokens, added, vocab, unk)?
            }
            "gemma4" => {
                let unk = id("tokenizer.ggml.unknown_token_id").map(|i| name_of(Some(i)));
                gemma4_spec(g, added, vocab, unk)?
            }
            "bert" => {
                let unk = id("tokenizer.ggml.unknown_token_id").map(|i| name_of(Some(i)));
                bert_spec(&tokens, added, unk)
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "GGUF tokenizer model '{other}' (supported: gpt2, llama, gemma4, bert)"
                )))
            }
        };
        let bytes = serde_json::to_vec(&spec).map_err(tok_err)?;
        let inner = build_tokenizer(&bytes)?;
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .map(|v| *v == Value::Bool(true))
            .unwrap_or(model == "llama")
            && bos.is_some();
        Ok(TextTokenizer {
            inner,
            add_bos,
            bos,
            eos: eos_id.into_iter().collect(),
            bos_token: name_of(bos),
            eos_token: name_of(eos_id),
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(String::from),
        })
    }

    /// Token ids of `text` without adding BOS/EOS; special tokens in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        guard_panics(|| {
            Ok(self
                .inner
                .encode(text, false)
                .map_err(tok_err)?
                .get_ids()
                .to_vec())
        })
    }

    /// Ids of a plain prompt: BOS (when the model adds one) then the text.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = if self.add_bos {
            self.bos.into_iter().collect()
        } else {
            Vec::new()
        };
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guard_panics(|| self.inner.decode(ids, true).map_err(tok_err))
    }

    /// Text of `ids` with special tokens rendered (llama-server's `/detokenize`).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        guard_panics(|| self.inner.decode(ids, false).map_err(tok_err))
    }

    /// The text of one token as a reply shows it (special tokens included; bytes that do not
    /// form whole characters become U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The tokenizer as `tokenizer.json` holds it.
    pub fn to_json(&self) -> Result<Json> {
        serde_json::to_value(&self.inner).map_err(tok_err)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders the chat template for `messages` (`(role, content)` pairs) with the generation
    /// prompt appended.
    pub fn render_chat(&self, messages: &[(String, String)]) -> Result<String> {
        self.render_messages(&pair_messages(messages), None)
    }

    /// Renders the chat template for messages as templates see them (objects with `role`,
    /// `content`, and `tool_calls`, `tool_call_id` or `name` where a message has them) and a
    /// request's `tools` (OpenAI's list, which transformers passes as `tools`; `none` without),
    /// with the generation prompt appended.
    pub fn render_messages(&self, messages: &[Json], tools: Option<&Json>) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Unsupported("this model has no chat template".into()))?;
        render_template(tpl, messages, tools, &self.bos_token, &self.eos_token)
    }
}

/// Chat templates by name, for files that carry none (a base model's GGUF) or to override one
/// (`kiln chat --chat-template NAME`): the turn formats of the model families Kiln runs.
pub const BUILTIN_CHAT_TEMPLATES: &[(&str, &str)] = &[
    (
        "chatml",
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ),
    (
        // Gemma 2/3: a system message is folded into the first user turn; the assistant is
        // "model".
        "gemma",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}\
         {% set msgs = messages[1:] %}{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}\
         {% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}\
         {{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}\
         {% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    ),
    (
        // Gemma 4: `<|turn>role ... <turn|>` turns, a system turn of its own, "model".
        "gemma4",
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}\
         {{ '<|turn>' + role + '\n' + m['content'] | trim + '<turn|>\n' }}\
         {% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}",
    ),
    (
        "llama3",
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    (
        "phi3",
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
    ),
];

/// The built-in template `name`, or `name` itself (Jinja text).
pub fn chat_template_named(name: &str) -> &str {
    BUILTIN_CHAT_TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(name, |(_, t)| t)
}

/// Instructions a chat template may run per rendering: a real template spends a few hundred
/// per message, so this bounds a looping (hostile) template to a fraction of a second.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// `(role, content)` pairs as template messages.
fn pair_messages(messages: &[(String, String)]) -> Vec<Json> {
    messages
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect()
}

/// Renders a Jinja chat template for `(role, content)` pairs (see [`render_template`]).
pub fn render_chat_template(
    tpl: &str,
    messages: &[(String, String)],
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    render_template(tpl, &pair_messages(messages), None, bos_token, eos_token)
}

/// Renders a Jinja chat template as transformers does (`messages`, `tools`,
/// `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, Python string
/// methods) within [`TEMPLATE_FUEL`].
pub fn render_template(
    tpl: &str,
    messages: &[Json],
    tools: Option<&Json>,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_filter("tojson", tojson);
    let err = |e: minijinja::Error| Error::Data {
        name: "chat_template".into(),
        msg: e.to_string(),
    };
    env.add_template("chat", tpl).map_err(err)?;
    env.get_template("chat")
        .and_then(|t| t.render(minijinja::context! { messages => messages, tools => tools, add_generation_prompt => true, bos_token => bos_token, eos_token => eos_token }))
        .map_err(err)
}

/// transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, keys in their order (tool schemas render as
/// the client sent them).
fn tojson(
    v: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([i, k]) => (i.clone(), k.clone()),
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let json: Json = serde_json::to_value(&v).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    py_dumps(
        &json,
        indent,
        sort_keys.unwrap_or(false),
        (&item, &key),
        0,
        &mut out,
    );
    Ok(out)
}

/// One value as Python's `json.dumps` writes it (see [`tojson`]).
fn py_dumps(
    v: &Json,
    indent: Option<usize>,
    sort: bool,
    sep: (&str, &str),
    level: usize,
    out: &mut String,
) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Json::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep.0);
                }
                newline(out, level + 1);
                py_dumps(x, indent, sort, sep, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Json::Object(o) if !o.is_empty() => {
            let mut entries: Vec<(&String, &Json)> = o.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(sep.0);
                }
                newline(out, level + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(sep.1);
                py_dumps(x, indent, sort, sep, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A GGUF file's tokens and their types (1 normal, 3 control, 4 user-defined; all normal
/// when the file lists none), the vocabulary's size checked first.
fn gguf_vocab(g: &Gguf) -> Result<(Vec<String>, Vec<u64>)> {
    // The largest real vocabularies hold about 260 000 tokens; a list far past that is a
    // damaged or hostile file, and building a tokenizer from it costs many times its bytes.
    const MAX_VOCAB: usize = 1 << 22;
    let n = g
        .require("tokenizer.ggml.tokens")?
        .as_array()
        .and_then(|a| a.strs().map(|_| a.len()));
    if !n.is_some_and(|n| (1..=MAX_VOCAB).contains(&n)) {
        return Err(Error::Data {
            name: "tokenizer.ggml.tokens".into(),
            msg: match n {
                Some(n) => format!("{n} strings (a vocabulary holds 1 to {MAX_VOCAB})"),
                None => "not a list of strings".into(),
            },
        });
    }
    let tokens = gguf_strs(g, "tokenizer.ggml.tokens")?;
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.values().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    Ok((tokens, types))
}

/// A required GGUF list of strings (empty when it holds other values).
fn gguf_strs(g: &Gguf, key: &str) -> Result<Vec<String>> {
    let a = g.require(key)?.as_array();
    Ok(a.and_then(|a| a.strs())
        .map(|s| s.map(String::from).collect())
        .unwrap_or_default())
}

/// tokenizer.json of a `gpt2` GGUF vocabulary: byte-level BPE with the file's merges and the
/// pre-tokenizer its `tokenizer.ggml.pre` names.
fn gpt2_spec(g: &Gguf, added: Vec<Json>, vocab: serde_json::Map<String, Json>) -> Result<Json> {
    let merges = gguf_strs(g, "tokenizer.ggml.merges")?;
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = bpe_pre_tokenizer(pre)?;
    Ok(json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges}
    }))
}

/// tokenizer.json of a `llama` (SentencePiece) GGUF vocabulary: BPE with merges ordered by the
/// tokens' scores, byte fallback, and SentencePiece's dummy prefix unless the file turns it off.
fn spm_spec(
    g: &Gguf,
    tokens: &[String],
    added: Vec<Json>,
    vocab: serde_json::Map<String, Json>,
    unk: Option<String>,
) -> Result<Json> {
    let scores: Vec<f64> = g
        .require("tokenizer.ggml.scores")?
        .as_array()
        .map(|a| a.values().map(|v| v.as_f64().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    // The merge order sorts by score: a NaN has no place in it (found by fuzzing).
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::Data {
            name: "tokenizer.ggml.scores".into(),
            msg: format!("score {i} is NaN"),
        });
    }
    let merges = spm_merges(tokens, &scores);
    spm_like_spec(g, added, vocab, unk, merges, Json::Null)
}

/// tokenizer.json of a `gemma4` GGUF vocabulary: SentencePiece-style BPE (spaces as "▁", byte
/// fallback) with the file's own merges, run on each line and each run of newlines whole, as
/// llama.cpp's `gemma4` pre-tokenizer does.
fn gemma4_spec(
    g: &Gguf,
    added: Vec<Json>,
    vocab: serde_json::Map<String, Json>,
    unk: Option<String>,
) -> Result<Json> {
    // "left right", split at the first space after the first byte (llama.cpp's reading).
    let merges: Vec<Json> = gguf_strs(g, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| match m.bytes().skip(1).position(|b| b == b' ') {
            Some(p) => json!([&m[..p + 1], &m[p + 2..]]),
            None => json!([m, ""]),
        })
        .collect();
    let pre = json!({"type": "Split", "pattern": {"Regex": "[^\n]+|[\n]+"}, "behavior": "Isolated", "invert": false});
    spm_like_spec(g, added, vocab, unk, merges, pre)
}

/// tokenizer.json of a `bert` GGUF vocabulary (WordPiece, as embedding models have it):
/// llama.cpp's converter writes word-initial pieces with a leading "▁" and continuations bare,
/// so these become WordPiece's bare and "##" pieces again; text is lowercased, accents
/// stripped, and split at whitespace and punctuation, as BERT's normalizer and pre-tokenizer
/// (and llama.cpp's WPM tokenizer) do.
fn bert_spec(tokens: &[String], added: Vec<Json>, unk: Option<String>) -> Json {
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let piece = if t.starts_with('[') && t.ends_with(']') {
                t.clone()
            } else if let Some(w) = t.strip_prefix('\u{2581}') {
                w.to_string()
            } else {
                format!("##{t}")
            };
            (piece, json!(i))
        })
        .collect();
    json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": unk.unwrap_or_else(|| "[UNK]".into()),
                  "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// The SentencePiece-style BPE tokenizer.json shared by `llama` and `gemma4` vocabularies.
fn spm_like_spec(
    g: &Gguf,
    added: Vec<Json>,
    vocab: serde_json::Map<String, Json>,
    unk: Option<String>,
    merges: Vec<Json>,
    pre_tokenizer: Json,
) -> Result<Json> {
    // SentencePiece's dummy prefix ("▁" before the text, stripped again when decoding): on
    // unless the file says otherwise (Gemma's vocabularies).
    let prefix = g
        .get("tokenizer.ggml.add_space_prefix")
        .map(|v| *v == Value::Bool(true))
        .unwrap_or(true);
    let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"}, space]})
    } else {
        space
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

/// The pre-tokenizer of a `gpt2`-type GGUF vocabulary, by llama.cpp's `tokenizer.ggml.pre` name
/// (the aliases llama.cpp groups together share one entry), with the regexes of the models'
/// own `tokenizer.json` files. Also whether BPE skips the merges for whole-vocabulary words
/// (`ignore_merges`, as llama.cpp sets it).
fn bpe_pre_tokenizer(pre: &str) -> Result<(Json, bool)> {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    // Several regexes in turn, each splitting the pieces the one before left (llama.cpp's
    // `regex_exprs` lists), then the byte-level mapping.
    let splits = |res: &[&str]| {
        let mut seq: Vec<Json> = res
            .iter()
            .map(|re| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}))
            .collect();
        seq.push(byte_level(false));
        json!({"type": "Sequence", "pretokenizers": seq})
    };
    let split = |re: &str| splits(&[re]);
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" => (byte_level(true), false),
        // StarCoder, Refact, Command-R: single digits, then GPT-2's pattern (as SmolLM).
        "starcoder" | "refact" | "command-r" => (splits(&[r"\p{N}", GPT2]), false),
        "falcon" => (
            splits(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"]),
            false,
        ),
        "deepseek-coder" => (
            splits(&[
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
                r"\p{N}",
            ]),
            false,
        ),
        "deepseek-llm" => (
            splits(&[
                r"[\r\n]",
                r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
                r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
                r"\s+$",
                r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
                r"\p{N}+",
            ]),
            false,
        ),
        // Qwen 3.5: Qwen 2's pattern with marks joining letters.
        "qwen35" => (
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            false,
        ),
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        // Llama 3, Falcon 3, Pixtral.
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" => (
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            true,
        ),
        // Qwen 2/2.5/3, DeepSeek-R1 distills of Qwen, StableLM 2.
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            false,
        ),
        // Mistral Nemo and later Mistral models.
        "tekken" => (
            split(r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            true,
        ),
        // Phi-4, Llama 4 (GPT-4o's o200k pattern).
        "gpt-4o" | "llama4" => (
            split(r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            false,
        ),
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF BPE pre-tokenizer '{other}' (supported: default/gpt-2/phi-2/mpt/olmo, smollm, starcoder/refact/command-r, falcon, deepseek-coder, deepseek-llm, llama-bpe/llama3/falcon3/pixtral, qwen2/deepseek-r1-qwen/stablelm2, qwen35, tekken, gpt-4o/llama4)"
            )))
        }
    })
}

/// BPE merges of a SentencePiece vocabulary, as transformers' `SentencePieceExtractor`: every
/// split of a piece into two known pieces, ordered by the merged piece's score (stable, ties by
/// the ids of the halves).
fn spm_merges(tokens: &[String], scores: &[f64]) -> Vec<Json> {
    let vocab: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f64)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let chars: Vec<(usize, char)> = piece.char_indices().collect();
        let mut local: Vec<(usize, usize, f64)> = Vec::new();
        for &(b, _) in chars.iter().skip(1) {
            let (l, r) = (&piece[..b], &piece[b..]);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, scores.get(i).copied().unwrap_or(0.0)));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    // Pairs, not "left right" strings: SentencePiece pieces may hold spaces (Gemma's do).
    merges
        .into_iter()
        .map(|(l, r, _)| json!([tokens[l], tokens[r]]))
        .collect()
}

/// Incremental detokenization for streaming, in constant work per token (the approach of
/// Hugging Face's text-generation-inference): each step decodes only the ids since the last
/// emitted piece plus one piece of context, and emits the new text once it is complete UTF-8
/// (no trailing U+FFFD) and extends what the context decoded to.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    text: String,
}

impl StreamDecoder {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            self.text.push_str(&piece);
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// The text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
