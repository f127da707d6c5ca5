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

/// The largest header the safetensors format allows (its reference implementation's limit).
pub const MAX_HEADER_BYTES: usize = 100_000_000;

/// A tensor's header entry.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderEntry {
    dtype: String,
    #[serde(deserialize_with = "shape")]
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// A shape of at most 8 dimensions (refused while parsing, before a long list is built).
fn shape<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u64>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of at most 8 dimensions")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Vec<u64>, A::Error> {
            let mut v = Vec::new();
            while let Some(d) = seq.next_element()? {
                if v.len() == 8 {
                    return Err(serde::de::Error::custom("more than 8 dimensions"));
                }
                v.push(d);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V)
}

/// The header's tensor entries in file order; `__metadata__` is skipped without being built
/// (its size is bounded only by the header's), so memory follows the tensors, not the header.
struct Header(Vec<(String, HeaderEntry)>);

impl Header {
    fn parse(json: &[u8]) -> serde_json::Result<Header> {
        serde_json::from_slice(json)
    }
}

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Header, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Header, A::Error> {
                let mut v = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    let e = map
                        .next_value::<HeaderEntry>()
                        .map_err(|e| serde::de::Error::custom(format!("tensor '{key}': {e}")))?;
                    v.push((key, e));
                }
                Ok(Header(v))
            }
        }
        d.deserialize_map(V)
    }
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
        if n > MAX_HEADER_BYTES as u64 {
            return Err(bad(
                name,
                format!(
                    "header of {n} bytes is over the {MAX_HEADER_BYTES}-byte limit of the safetensors format"
                ),
            ));
        }
        let header = Header::parse(&bytes[8..8 + n as usize])
            .map_err(|e| bad(name, format!("header: {e}")))?;
        let data_start = 8 + n as usize;
        let data_len = bytes.len() - data_start;
        let file = self.files.len();
        let mut spans = Vec::with_capacity(header.0.len());
        for (tname, h) in header.0 {
            let what = format!("{name}: tensor '{tname}'");
            let dtype = match h.dtype.as_str() {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                other => {
                    return Err(Error::Unsupported(format!(
                        "{what}: dtype {other} (supported: F32, F16, BF16)"
                    )))
                }
            };
            let shape: Vec<usize> = h.shape.iter().map(|&d| d as usize).collect();
            let [start, end] = h.data_offsets.map(|o| o as usize);
            let count = super::checked_count(&h.shape)
                .ok_or_else(|| bad(&what, "shape overflows"))? as usize;
            let need = count
                .checked_mul(dtype.block_bytes())
                .ok_or_else(|| bad(&what, "size overflows"))?;
            if start > end || end > data_len || end - start != need {
                return Err(bad(
                    &what,
                    format!("data_offsets [{start}, {end}) do not hold shape {shape:?} of {} ({need} bytes) within {data_len} data bytes", h.dtype),
                ));
            }
            if self.entries.contains_key(&tname) {
                return Err(bad(
                    &what,
                    "is stored twice (in this file or an earlier shard)",
                ));
            }
            spans.push((start, end, tname.clone()));
            self.entries.insert(
                tname,
                Entry {
                    file,
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        super::check_disjoint(name, &mut spans)?;
        self.names.push(name.to_string());
        self.files.push(bytes);
        self.data_start.push(data_start);
        Ok(())
    }

    /// The tensor names (in no particular order).
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
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
    fn names(&self) -> Vec<String> {
        SafeTensors::names(self)
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
