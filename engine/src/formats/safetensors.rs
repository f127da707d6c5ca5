//! safetensors: an 8-byte little-endian header length, a JSON header mapping names to
//! `{dtype, shape, data_offsets}`, then the data. Sharded checkpoints list their shards in
//! `model.safetensors.index.json`.

use super::{RawTensor, TensorSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One or more safetensors files held in memory.
pub struct SafeTensors {
    names: Vec<String>,
    files: Vec<Vec<u8>>,
    data_start: Vec<usize>,
    entries: HashMap<String, Entry>,
}

fn bad(name: &str, msg: impl Into<String>) -> Error {
    Error::Data {
        name: name.into(),
        msg: msg.into(),
    }
}

impl SafeTensors {
    /// An empty set; add files with [`SafeTensors::add_file`].
    pub fn new() -> Self {
        SafeTensors {
            names: Vec::new(),
            files: Vec::new(),
            data_start: Vec::new(),
            entries: HashMap::new(),
        }
    }

    /// Parses one file's bytes (named `name` in errors) and adds its tensors.
    pub fn add_file(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        if bytes.len() < 8 {
            return Err(bad(
                name,
                format!(
                    "{} bytes is too short for a safetensors header",
                    bytes.len()
                ),
            ));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
        if n > (bytes.len() - 8) as u64 {
            return Err(bad(
                name,
                format!("header length {n} exceeds the file size {}", bytes.len()),
            ));
        }
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n as usize])
            .map_err(|e| bad(name, format!("header is not valid JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad(name, "header is not a JSON object"))?;
        let data_start = 8 + n as usize;
        let data_len = bytes.len() - data_start;
        let file = self.files.len();
        for (tname, v) in obj {
            if tname == "__metadata__" {
                continue;
            }
            let what = format!("{name}: tensor '{tname}'");
            let dt = v
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad(&what, "missing dtype"))?;
            let dtype = match dt {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                other => {
                    return Err(Error::Unsupported(format!(
                        "{what}: dtype {other} (supported: F32, F16, BF16)"
                    )))
                }
            };
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad(&what, "missing shape"))?
                .iter()
                .map(|d| {
                    d.as_u64()
                        .map(|d| d as usize)
                        .ok_or_else(|| bad(&what, "shape entries must be integers"))
                })
                .collect::<Result<_>>()?;
            let offs = v
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .ok_or_else(|| bad(&what, "missing data_offsets"))?;
            let (start, end) = match offs.as_slice() {
                [a, b] => (
                    a.as_u64().unwrap_or(u64::MAX) as usize,
                    b.as_u64().unwrap_or(0) as usize,
                ),
                _ => return Err(bad(&what, "data_offsets must be [begin, end]")),
            };
            let count = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(&what, "shape overflows"))?;
            let need = count
                .checked_mul(dtype.block_bytes())
                .ok_or_else(|| bad(&what, "size overflows"))?;
            if start > end || end > data_len || end - start != need {
                return Err(bad(
                    &what,
                    format!("data_offsets [{start}, {end}) do not hold shape {shape:?} of {dt} ({need} bytes) within {data_len} data bytes"),
                ));
            }
            self.entries.insert(
                tname.clone(),
                Entry {
                    file,
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        self.names.push(name.to_string());
        self.files.push(bytes);
        self.data_start.push(data_start);
        Ok(())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no tensor was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Default for SafeTensors {
    fn default() -> Self {
        Self::new()
    }
}

/// The shard file names listed in a `model.safetensors.index.json`.
pub fn shard_names(index_json: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(index_json).map_err(|e| {
        bad(
            "model.safetensors.index.json",
            format!("not valid JSON: {e}"),
        )
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("model.safetensors.index.json", "missing weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains('/') || f.contains("..")) {
        return Err(bad(
            "model.safetensors.index.json",
            "shard names must be plain file names",
        ));
    }
    Ok(files)
}

impl TensorSource for SafeTensors {
    fn tensor(&self, name: &str) -> Option<RawTensor<'_>> {
        let e = self.entries.get(name)?;
        let base = self.data_start[e.file];
        Some(RawTensor {
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.files[e.file][base + e.start..base + e.end],
        })
    }
    fn describe(&self) -> String {
        self.names.join(", ")
    }
}

/// The safetensors of one checkpoint in a model's files, taken out of `files` (no copy):
/// `{dir}/{stem}.safetensors`, its `.fp16` variant, or the shards a
/// `{stem}.safetensors.index.json` (or `.index.fp16.json`) lists. `dir` is "" for a model at
/// the root (`model.safetensors`), a component folder otherwise (`unet`).
pub fn take_checkpoint(
    files: &mut super::ModelFiles,
    dir: &str,
    stem: &str,
) -> Result<SafeTensors> {
    let path = |f: &str| {
        if dir.is_empty() {
            f.to_string()
        } else {
            format!("{dir}/{f}")
        }
    };
    let mut st = SafeTensors::new();
    for index in [
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
    ] {
        let Some(idx) = files.get(&path(&index)) else {
            continue;
        };
        let idx = std::str::from_utf8(idx).map_err(|_| bad(&path(&index), "not UTF-8"))?;
        for shard in shard_names(idx)? {
            let bytes = files
                .remove(&path(&shard))
                .ok_or_else(|| bad(&path(&shard), format!("shard listed in {index} is missing")))?;
            st.add_file(&path(&shard), bytes)?;
        }
        return Ok(st);
    }
    for file in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        if let Some(bytes) = files.remove(&path(&file)) {
            st.add_file(&path(&file), bytes)?;
            return Ok(st);
        }
    }
    Err(bad(
        if dir.is_empty() { "model" } else { dir },
        format!("no {stem}.safetensors (nor its .fp16 variant or a sharded index)"),
    ))
}
