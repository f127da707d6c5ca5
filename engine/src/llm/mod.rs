//! Llama-family text generation: configs, weights, the decoder graph, tokenizers and chat
//! templates, and the decode loop.

pub mod config;
pub mod generate;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, LlmConfig};
pub use generate::{GenerateOptions, Generation, LoadOptions, ModelFiles, StopReason, TextModel};
pub use tokenizer::TextTokenizer;
pub use weights::Quantize;
