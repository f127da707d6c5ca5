//! The text front-end contract: what a caller asks for (`TextOptions`, `LoadOptions`) with the
//! defaults every front end uses (`kiln text`, the wasm module, the npm package), and what it
//! gets back (`Generation::to_json`). Front ends only translate: the CLI's flags default to
//! `TextOptions::default()`, the browser sends JSON that deserializes into the same types.
//! Fields are snake_case; the camelCase spelling JavaScript uses is accepted too.

use super::constrain::Grammar;
use super::generate::{GenerateOptions, Generation, StopReason, PREFILL_CHUNK};
use crate::error::{Error, Result};
use crate::kernels::sample::SamplerSettings;
use crate::tokenizer::TextTokenizer;
use crate::weights::Quantize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How to load a text model (JSON: `ctx`, `quantize`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadOptions {
    /// Context length (KV-cache positions); capped by the model's maximum.
    pub ctx: usize,
    pub quantize: Quantize,
    /// Also keep the last logits readable (tests, debugging).
    #[serde(skip)]
    pub keep_logits: bool,
    /// Prompt tokens per prefill run.
    #[serde(skip)]
    pub prefill_chunk: usize,
    /// A chat template to use instead of the model's: a built-in name (see
    /// [`crate::tokenizer::BUILTIN_CHAT_TEMPLATES`]) or Jinja text. Without one, a model whose
    /// files carry no template gets its architecture's (Gemma's turns for Gemma 2/3).
    pub chat_template: Option<String>,
    /// How the KV cache stores keys and values (JSON `kv_cache`: "auto", "f32", "f16").
    #[serde(alias = "kvCache")]
    pub kv_cache: KvCacheType,
}

/// The element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheType {
    /// f16 on GPUs, where decode reads the whole live cache every token and half the bytes
    /// is what counts; f32 on software adapters (their unpacking costs more than the bytes).
    #[default]
    Auto,
    /// f32: exact as computed (the parity tests' choice).
    F32,
    /// f16, two elements to a word (as llama.cpp's default cache).
    F16,
}

impl std::str::FromStr for KvCacheType {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvCacheType> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(KvCacheType::Auto),
            "f32" => Ok(KvCacheType::F32),
            "f16" => Ok(KvCacheType::F16),
            other => Err(Error::Data {
                name: "kv_cache".into(),
                msg: format!("'{other}' is not one of auto, f32, f16"),
            }),
        }
    }
}

impl std::fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvCacheType::Auto => "auto",
            KvCacheType::F32 => "f32",
            KvCacheType::F16 => "f16",
        })
    }
}

impl KvCacheType {
    /// Whether the cache is f16 on `gpu`.
    pub fn is_f16(self, gpu: &crate::device::Gpu) -> bool {
        match self {
            KvCacheType::Auto => !gpu.features.software,
            KvCacheType::F32 => false,
            KvCacheType::F16 => true,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ctx: 2048,
            quantize: Quantize::None,
            keep_logits: false,
            prefill_chunk: PREFILL_CHUNK,
            chat_template: None,
            kv_cache: KvCacheType::Auto,
        }
    }
}

/// One generation request: the prompt and the sampler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextOptions {
    /// Prompt text (BOS added when the model wants it); `prompt_ids` wins when both are given.
    pub prompt: Option<String>,
    #[serde(alias = "promptIds")]
    pub prompt_ids: Option<Vec<u32>>,
    /// Maximum new tokens (at least 1).
    #[serde(alias = "maxTokens")]
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    #[serde(alias = "topK")]
    pub top_k: u32,
    /// Nucleus mass in (0, 1]; 1 disables.
    #[serde(alias = "topP")]
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in [0, 1]; 0 disables.
    #[serde(alias = "minP")]
    pub min_p: f32,
    /// Repetition penalty (> 0); 1 disables.
    #[serde(alias = "repeatPenalty")]
    pub repeat_penalty: f32,
    /// Previous tokens the penalty looks at.
    #[serde(alias = "repeatWindow")]
    pub repeat_window: u32,
    /// Also report this many most likely alternatives per token (0 ..= 20).
    #[serde(alias = "topLogprobs")]
    pub top_logprobs: u32,
    /// Sampler seed; a random one when absent (the result says which).
    pub seed: Option<u32>,
    /// Generation stops when the text contains one of these (cut before it).
    pub stop: Vec<String>,
    /// What the output must match (a JSON schema, any JSON object or a Lark grammar).
    pub grammar: Option<Grammar>,
    /// Added to the logits of these token ids before sampling (-100 bans, 100 forces).
    #[serde(alias = "logitBias")]
    pub logit_bias: BTreeMap<u32, f32>,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            prompt: None,
            prompt_ids: None,
            max_tokens: 128,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_window: 64,
            top_logprobs: 0,
            seed: None,
            stop: Vec::new(),
            grammar: None,
            logit_bias: BTreeMap::new(),
        }
    }
}

impl TextOptions {
    /// Parses JSON options (unknown fields are errors naming them).
    pub fn from_json(s: &str) -> Result<TextOptions> {
        serde_json::from_str(s).map_err(|e| Error::Data {
            name: "text options".into(),
            msg: e.to_string(),
        })
    }

    /// The sampler part.
    pub fn sampler(&self) -> SamplerSettings {
        SamplerSettings {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_window: self.repeat_window,
            top_logprobs: self.top_logprobs,
            mask: false,
            biases: 0,
        }
    }

    /// What the decode loop takes.
    pub fn generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.max_tokens,
            sampler: self.sampler(),
            seed: self.seed.unwrap_or_else(random_seed),
            stop: self.stop.clone(),
            pipelined: true,
            grammar: self.grammar.clone(),
            logit_bias: self.logit_bias.iter().map(|(&id, &b)| (id, b)).collect(),
        }
    }

    /// The prompt's token ids (`prompt_ids`, or `prompt` encoded).
    pub fn prompt_ids(&self, tok: &TextTokenizer) -> Result<Vec<u32>> {
        match (&self.prompt_ids, &self.prompt) {
            (Some(ids), _) => Ok(ids.clone()),
            (None, Some(p)) => tok.encode_prompt(p),
            (None, None) => Err(Error::Data {
                name: "prompt".into(),
                msg: "give a prompt (text) or prompt ids".into(),
            }),
        }
    }
}

/// A fresh random seed (from the OS-seeded hasher natively, `Math.random` in the browser).
pub fn random_seed() -> u32 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(super::generate::now_ms().to_bits());
        h.finish() as u32
    }
    #[cfg(target_arch = "wasm32")]
    {
        (js_sys::Math::random() * 4294967296.0) as u32
    }
}

impl LoadOptions {
    /// Parses JSON load options (`ctx`, `quantize`).
    pub fn from_json(s: &str) -> Result<LoadOptions> {
        serde_json::from_str(s).map_err(|e| Error::Data {
            name: "load options".into(),
            msg: e.to_string(),
        })
    }
}

impl StopReason {
    /// The name in results and messages.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::StopString => "stopstring",
            StopReason::MaxTokens => "maxtokens",
            StopReason::ContextFull => "contextfull",
            StopReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for StopReason {
    type Err = Error;
    fn from_str(s: &str) -> Result<StopReason> {
        [
            StopReason::Eos,
            StopReason::StopString,
            StopReason::MaxTokens,
            StopReason::ContextFull,
            StopReason::Cancelled,
        ]
        .into_iter()
        .find(|r| r.name() == s)
        .ok_or_else(|| Error::Data {
            name: "stop reason".into(),
            msg: format!("'{s}' is not one of eos, stopstring, maxtokens, contextfull, cancelled"),
        })
    }
}

impl Generation {
    /// The result as every front end prints it: `prompt_ids`, `ids`, `logprobs`, `text`,
    /// `stop`, `timings` (`ttft_ms`, `prefill_ms`, `decode_ms`, `prefill_tok_s`,
    /// `decode_tok_s`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
