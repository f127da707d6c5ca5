//! Checkpoint formats: safetensors (single or sharded Hugging Face folders) and GGUF v3.
//! Both parse headers with every size checked against the bytes actually present, so a corrupt
//! or truncated file is an error naming what was wrong, never a panic or a huge allocation.

pub mod gguf;
pub mod npy;
pub mod safetensors;

use crate::dtype::DType;

/// One tensor of a checkpoint: dtype, shape (row-major, outermost first) and file-layout bytes.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Anything that can hand out tensors by name.
pub trait TensorSource {
    /// The tensor called `name`, if present.
    fn tensor(&self, name: &str) -> Option<RawTensor<'_>>;
    /// A description for error messages (e.g. the file path).
    fn describe(&self) -> String;
}
