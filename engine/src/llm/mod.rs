//! Text generation for the decoder families Kiln reads (Llama, Mistral, Qwen2/3, Gemma 2/3,
//! Phi-3): `config` (HF and GGUF configs), `weights` (checkpoint names to tensors), `model` (the
//! decoder graph and KV cache), `generate` (`TextModel`: load, prefill, the decode loop), `batch`
//! (parallel slots decoding together),
//! `chat` (the OpenAI-shaped request core), `constrain` (grammars: the tokens allowed next),
//! `tools` (tool calls: templates, parsing, forced calls) and `options` (the front-end contract).

pub mod batch;
pub mod chat;
pub mod config;
pub mod constrain;
pub mod generate;
pub mod model;
pub mod options;
pub mod tools;
pub mod weights;

pub use crate::formats::ModelFiles;
pub use crate::tokenizer::{TextTokenizer, BUILTIN_CHAT_TEMPLATES};
pub use crate::weights::Quantize;
pub use chat::{ChatRequest, CompletionRequest, Message, Prepared, ResponseMeta};
pub use config::{Arch, LlmConfig};
pub use constrain::Grammar;
pub use generate::{GenerateOptions, Generation, StopReason, TextModel};
pub use options::{KvCacheType, LoadOptions, TextOptions};
