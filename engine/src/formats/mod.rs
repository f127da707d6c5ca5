//! Checkpoint formats: safetensors (single or sharded Hugging Face folders) and GGUF v3.
//! Both parse headers with every size checked against the bytes actually present, so a corrupt
//! or truncated file is an error naming what was wrong, never a panic or a huge allocation.

pub mod config;
pub mod files;
pub mod gguf;
pub mod npy;
pub mod safetensors;

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// A model's files by name (`config.json`, `model.safetensors`, `unet/config.json`, ... or one
/// `.gguf`), however they were fetched (disk natively, HTTP in the browser).
pub type ModelFiles = HashMap<String, Vec<u8>>;

/// A text file of a model's files, if present (an error when it is not UTF-8).
pub fn text_file(files: &ModelFiles, name: &str) -> Result<Option<String>> {
    files
        .get(name)
        .map(|b| {
            String::from_utf8(b.clone()).map_err(|_| Error::Data {
                name: name.into(),
                msg: "not UTF-8".into(),
            })
        })
        .transpose()
}

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
    /// The tensor names, where the format lists them (none by default).
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Checks that no two tensors of file `name` share bytes (`spans`: start, end, tensor name; any
/// order): two tensors over the same bytes would run as a different model than the one saved.
pub(crate) fn check_disjoint(name: &str, spans: &mut [(usize, usize, String)]) -> Result<()> {
    spans.sort();
    let mut reach: Option<(usize, &str)> = None;
    for (start, end, t) in spans.iter() {
        if let Some((r, a)) = reach.filter(|&(r, _)| *start < r && start < end) {
            return Err(Error::Data {
                name: name.into(),
                msg: format!(
                    "tensors '{a}' and '{t}' overlap (bytes {start}..{} belong to both)",
                    r.min(*end)
                ),
            });
        }
        if reach.is_none_or(|(r, _)| *end > r) {
            reach = Some((*end, t));
        }
    }
    Ok(())
}

/// The element count of a checkpoint shape, or `None` when some order of multiplying its
/// dimensions overflows (`[0, 2^40, 2^40]` holds nothing, but code that multiplies from the
/// other end would overflow): such shapes are refused when a file is parsed.
pub(crate) fn checked_count(dims: &[u64]) -> Option<u64> {
    dims.iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d.max(1)))?;
    usize::try_from(dims.iter().product::<u64>())
        .ok()
        .map(|n| n as u64)
}
