//! Llama-family text generation: configs, weights, the decoder graph, tokenizers and chat
//! templates, and the decode loop.

pub mod chat;
pub mod config;
pub mod generate;
pub mod model;
pub mod options;
pub mod weights;

pub use crate::formats::ModelFiles;
pub use crate::tokenizer::{TextTokenizer, BUILTIN_CHAT_TEMPLATES};
pub use crate::weights::Quantize;
pub use chat::{ChatRequest, CompletionRequest, Message, Prepared, ResponseMeta};
pub use config::{Arch, LlmConfig};
pub use generate::{GenerateOptions, Generation, LoadOptions, StopReason, TextModel};
pub use options::TextOptions;
