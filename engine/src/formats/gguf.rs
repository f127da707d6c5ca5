//! GGUF v3 (llama.cpp): magic, version, tensor count, metadata key/values, tensor infos
//! (name, dims with the fastest-varying first, ggml type, offset), padding to
//! `general.alignment`, then tensor data. Every count and length is checked against the bytes
//! left before anything is allocated for it.

use super::{RawTensor, TensorSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Array),
}

/// A metadata array, stored about as compactly as the file stores it (a tokenizer's 150 000
/// scores stay 600 KB, not 150 000 enum values), so memory follows the bytes actually present.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// Numbers or booleans: the GGUF value type and the little-endian bytes.
    Raw { ty: u32, bytes: Vec<u8> },
    /// Strings, concatenated; string `i` is `text[ends[i - 1]..ends[i]]`.
    Strs { text: String, ends: Vec<usize> },
    /// Arrays of arrays.
    Nested(Vec<Value>),
}

/// Encoded size of a scalar GGUF value type (0 for strings and arrays).
fn scalar_size(t: u32) -> usize {
    match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => 0,
    }
}

/// A scalar of type `t` from its little-endian bytes.
fn scalar(t: u32, b: &[u8]) -> Value {
    let u = |n: usize| {
        b.iter()
            .take(n)
            .rev()
            .fold(0u64, |a, &x| (a << 8) | x as u64)
    };
    match t {
        0 | 2 | 4 | 10 => Value::U64(u(scalar_size(t))),
        1 => Value::I64(u(1) as u8 as i8 as i64),
        3 => Value::I64(u(2) as u16 as i16 as i64),
        5 => Value::I64(u(4) as u32 as i32 as i64),
        11 => Value::I64(u(8) as i64),
        6 => Value::F64(f32::from_bits(u(4) as u32) as f64),
        12 => Value::F64(f64::from_bits(u(8))),
        _ => Value::Bool(u(1) != 0),
    }
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::Raw { ty, bytes } => bytes.len() / scalar_size(*ty).max(1),
            Array::Strs { ends, .. } => ends.len(),
            Array::Nested(v) => v.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// String `i` (`None` past the end or when the elements are not strings).
    pub fn str(&self, i: usize) -> Option<&str> {
        match self {
            Array::Strs { text, ends } => {
                let start = if i == 0 { 0 } else { *ends.get(i - 1)? };
                text.get(start..*ends.get(i)?)
            }
            _ => None,
        }
    }

    /// The strings in order (`None` when the elements are not strings).
    pub fn strs(&self) -> Option<impl Iterator<Item = &str> + '_> {
        matches!(self, Array::Strs { .. })
            .then(|| (0..self.len()).map(|i| self.str(i).unwrap_or_default()))
    }

    /// Element `i` as a value.
    pub fn get(&self, i: usize) -> Option<Value> {
        match self {
            Array::Raw { ty, bytes } => {
                let n = scalar_size(*ty);
                bytes.get(i * n..(i + 1) * n).map(|b| scalar(*ty, b))
            }
            Array::Strs { .. } => self.str(i).map(|s| Value::Str(s.into())),
            Array::Nested(v) => v.get(i).cloned(),
        }
    }

    /// The elements as values, in order.
    pub fn values(&self) -> impl Iterator<Item = Value> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

impl Value {
    /// As an unsigned integer (any integer type).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    /// As a float (any numeric type).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

struct Info {
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    len: usize,
}

/// A parsed GGUF file held in memory.
pub struct Gguf {
    name: String,
    bytes: Vec<u8>,
    /// Metadata key/values.
    pub meta: HashMap<String, Value>,
    tensors: HashMap<String, Info>,
    /// Tensor names in file order.
    pub tensor_names: Vec<String>,
    /// Where the tensor data starts (the header's end, aligned); 0 from
    /// [`Gguf::parse_metadata`], which stops before the tensor list.
    pub data_start: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    name: &'a str,
    /// A read went past the end (a truncated file, or a prefix of one).
    ran_out: bool,
}

/// The most bytes a GGUF header (metadata and tensor infos) may take. Real files hold a few
/// megabytes (a 256k-token vocabulary is about 10 MB); past this the file is refused before the
/// header is copied into memory.
pub const MAX_HEADER_BYTES: usize = 256 << 20;

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Data {
            name: self.name.into(),
            msg: format!("at byte {}: {}", self.pos, msg.into()),
        }
    }
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }
    /// Checks that `n` more bytes (`what`) are present and within the header cap.
    fn room(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<usize> {
        if (self.pos as u64).saturating_add(n) > MAX_HEADER_BYTES as u64 {
            return Err(self.err(format!(
                "{} would take the header past {} MiB; real GGUF headers take a few MB",
                what(),
                MAX_HEADER_BYTES >> 20
            )));
        }
        if n > self.left() as u64 {
            self.ran_out = true;
            return Err(self.err(format!(
                "{} needs {n} bytes, file has {} left",
                what(),
                self.left()
            )));
        }
        Ok(n as usize)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        self.room(n as u64, || "a value".into())?;
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn string(&mut self) -> Result<String> {
        self.str_ref().map(String::from)
    }
    fn str_ref(&mut self) -> Result<&'a str> {
        let n = self.u64()?;
        let n = self.room(n, || format!("a string of {n} bytes"))?;
        let s = self.take(n)?;
        std::str::from_utf8(s).map_err(|_| self.err("string is not UTF-8"))
    }
    /// Smallest encoded size of a value of type `t` (to bound array lengths).
    fn min_size(t: u32) -> usize {
        match scalar_size(t) {
            0 => 8,
            n => n,
        }
    }
    fn value(&mut self, t: u32, depth: usize) -> Result<Value> {
        Ok(match t {
            8 => Value::Str(self.string()?),
            9 => Value::Array(self.array(depth)?),
            t if scalar_size(t) > 0 => scalar(t, self.take(scalar_size(t))?),
            other => return Err(self.err(format!("unknown metadata type {other}"))),
        })
    }
    /// An array (type, count, elements): scalars are copied as one slice, strings into one
    /// buffer; the count is checked against the bytes left before anything is allocated.
    fn array(&mut self, depth: usize) -> Result<Array> {
        if depth > 2 {
            return Err(self.err("arrays nested too deeply"));
        }
        let et = self.u32()?;
        let n = self.u64()?;
        self.room(n.saturating_mul(Self::min_size(et) as u64), || {
            format!("an array of {n} elements of type {et}")
        })?;
        let n = n as usize;
        Ok(match et {
            8 => {
                let mut ends = Vec::with_capacity(n);
                let mut text = String::new();
                for _ in 0..n {
                    text.push_str(self.str_ref()?);
                    ends.push(text.len());
                }
                Array::Strs { text, ends }
            }
            9 => Array::Nested(
                (0..n)
                    .map(|_| Ok(Value::Array(self.array(depth + 1)?)))
                    .collect::<Result<_>>()?,
            ),
            t if scalar_size(t) > 0 => Array::Raw {
                ty: t,
                bytes: self.take(n * scalar_size(t))?.to_vec(),
            },
            other => return Err(self.err(format!("unknown metadata type {other}"))),
        })
    }
}

/// A tensor as a GGUF header lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying first (GGUF's order).
    pub dims: Vec<u64>,
    /// ggml type id (see [`ggml_type_name`]).
    pub ggml_type: u32,
    /// Offset in the data section.
    pub offset: u64,
}

/// The data section's alignment (`general.alignment`, 32 when absent).
fn alignment(meta: &HashMap<String, Value>, name: &str) -> Result<usize> {
    match meta.get("general.alignment") {
        None => Ok(32),
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => Ok(a as usize),
            _ => Err(Error::Data {
                name: name.into(),
                msg: format!("general.alignment {v:?} is not a power of two up to 1 MiB"),
            }),
        },
    }
}

/// The tensor infos after the metadata.
fn read_tensor_infos(r: &mut Reader<'_>, n: u64) -> Result<Vec<TensorInfo>> {
    // A tensor info takes at least 24 bytes: never reserve more than the bytes could hold.
    let mut out = Vec::with_capacity((n as usize).min(r.left() / 24));
    for _ in 0..n {
        let name = r.string()?;
        let nd = r.u32()?;
        if nd == 0 || nd > 4 {
            return Err(r.err(format!(
                "tensor '{name}' has {nd} dimensions (1 to 4 expected)"
            )));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(r.u64()?);
        }
        let ggml_type = r.u32()?;
        let offset = r.u64()?;
        out.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    Ok(out)
}

/// ggml's name of a type id (as llama.cpp prints it), `type N` for ids it does not define.
pub fn ggml_type_name(t: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "", "", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
        "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
        "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "", "", "", "TQ1_0",
        "TQ2_0", "", "", "", "MXFP4",
    ];
    match NAMES.get(t as usize) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => format!("type {t}"),
    }
}

/// The engine dtype of a ggml type id, `None` when Kiln does not support it.
pub fn ggml_dtype(t: u32) -> Option<DType> {
    ggml_type(t)
}

/// ggml type id → engine dtype.
fn ggml_type(t: u32) -> Option<DType> {
    Some(match t {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2_K,
        11 => DType::Q3_K,
        12 => DType::Q4_K,
        13 => DType::Q5_K,
        14 => DType::Q6_K,
        20 => DType::IQ4_NL,
        23 => DType::IQ4_XS,
        30 => DType::BF16,
        _ => return None,
    })
}

/// The magic, version, counts and metadata; `whole` when `r` holds the whole file (then the
/// tensor count is checked against its length too). Returns the metadata and the tensor count.
fn read_header(r: &mut Reader<'_>, whole: bool) -> Result<(HashMap<String, Value>, u64)> {
    let name = r.name;
    if r.take(4)? != b"GGUF" {
        return Err(r.err("not a GGUF file (magic is not 'GGUF')"));
    }
    let version = r.u32()?;
    if version != 3 {
        return Err(Error::Unsupported(format!(
            "{name}: GGUF version {version} (only version 3 is supported)"
        )));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at
    // least 8 + 4 + 4 + 8.
    if whole
        && (n_kv.saturating_mul(13) > r.left() as u64
            || n_tensors.saturating_mul(24) > r.left() as u64)
    {
        return Err(r.err(format!("header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds")));
    }
    let mut meta = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        let v = r.value(t, 0)?;
        meta.insert(key, v);
    }
    Ok((meta, n_tensors))
}

impl Gguf {
    /// The metadata of a GGUF file from its first bytes (no tensors): enough for
    /// [`crate::llm::LlmConfig::from_gguf`] before the file is downloaded. `Ok(None)` when
    /// `prefix` ends inside the metadata (read more and try again).
    pub fn parse_metadata(name: &str, prefix: &[u8]) -> Result<Option<Gguf>> {
        let mut r = Reader {
            b: prefix,
            pos: 0,
            name,
            ran_out: false,
        };
        match read_header(&mut r, false) {
            Ok((meta, _)) => Ok(Some(Gguf {
                name: name.into(),
                bytes: Vec::new(),
                data_start: 0,
                meta,
                tensors: HashMap::new(),
                tensor_names: Vec::new(),
            })),
            // Truncation shows up as a read past the end; anything else is a real error.
            Err(_) if r.ran_out => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The metadata and the tensor list of a GGUF file from its first bytes (no tensor data):
    /// what `kiln info` shows before anything is loaded. `Ok(None)` when `prefix` ends inside
    /// the header (read more and try again).
    pub fn parse_header(name: &str, prefix: &[u8]) -> Result<Option<(Gguf, Vec<TensorInfo>)>> {
        let mut r = Reader {
            b: prefix,
            pos: 0,
            name,
            ran_out: false,
        };
        let header = read_header(&mut r, false)
            .and_then(|(meta, n)| Ok((meta, read_tensor_infos(&mut r, n)?)));
        match header {
            Ok((meta, infos)) => Ok(Some((
                Gguf {
                    name: name.into(),
                    bytes: Vec::new(),
                    data_start: r.pos.next_multiple_of(alignment(&meta, name)?),
                    meta,
                    tensors: HashMap::new(),
                    tensor_names: Vec::new(),
                },
                infos,
            ))),
            Err(_) if r.ran_out => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Parses a whole GGUF file (named `name` in errors).
    pub fn parse(name: &str, bytes: Vec<u8>) -> Result<Gguf> {
        let mut r = Reader {
            b: &bytes,
            pos: 0,
            name,
            ran_out: false,
        };
        let (meta, n_tensors) = read_header(&mut r, true)?;
        let raw = read_tensor_infos(&mut r, n_tensors)?;
        let align = alignment(&meta, name)?;
        let data_start = r.pos.next_multiple_of(align);
        if data_start > bytes.len() && !raw.is_empty() {
            return Err(Error::Data {
                name: name.into(),
                msg: format!(
                    "the file ends at byte {} before its tensor data (byte {data_start})",
                    bytes.len()
                ),
            });
        }
        let data_len = bytes.len().saturating_sub(data_start);
        let mut tensors = HashMap::new();
        let mut tensor_names = Vec::new();
        let mut spans = Vec::with_capacity(raw.len());
        for TensorInfo {
            name: tname,
            dims,
            ggml_type: t,
            offset: off,
        } in raw
        {
            let what = format!("{name}: tensor '{tname}'");
            let dtype = ggml_type(t).ok_or_else(|| {
                Error::Unsupported(format!(
                    "{what}: ggml type {t} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)"
                ))
            })?;
            // GGUF lists ne[0] (contiguous) first; engine shapes are outermost first.
            let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
            let count = super::checked_count(&dims).ok_or_else(|| Error::Data {
                name: what.clone(),
                msg: "shape overflows".into(),
            })?;
            if !(dims[0] as usize).is_multiple_of(dtype.block_elems()) {
                return Err(Error::Data {
                    name: what,
                    msg: format!(
                        "row length {} is not a multiple of the {dtype} block size {}",
                        dims[0],
                        dtype.block_elems()
                    ),
                });
            }
            let len = (count as usize / dtype.block_elems()).saturating_mul(dtype.block_bytes());
            let start = off as usize;
            if off % align as u64 != 0 || start.checked_add(len).is_none_or(|e| e > data_len) {
                return Err(Error::Data {
                    name: what,
                    msg: format!("data at offset {off} ({len} bytes of {dtype} {shape:?}) is outside the {data_len} data bytes or misaligned"),
                });
            }
            if tensors.contains_key(&tname) {
                return Err(Error::Data {
                    name: what,
                    msg: "is listed twice".into(),
                });
            }
            spans.push((start, start + len, tname.clone()));
            tensor_names.push(tname.clone());
            tensors.insert(
                tname,
                Info {
                    dtype,
                    shape,
                    start: data_start + start,
                    len,
                },
            );
        }
        super::check_disjoint(name, &mut spans)?;
        Ok(Gguf {
            name: name.into(),
            bytes,
            meta,
            tensors,
            tensor_names,
            data_start,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// Tensor `name`'s shape (rows first), when the tensor infos were read.
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }

    /// Where tensor `name`'s bytes are in the file.
    pub fn data_range(&self, name: &str) -> Option<std::ops::Range<usize>> {
        self.tensors.get(name).map(|i| i.start..i.start + i.len)
    }

    /// A required metadata value, with an error naming the key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.meta.get(key).ok_or_else(|| Error::Data {
            name: self.name.clone(),
            msg: format!("missing metadata key '{key}'"),
        })
    }
}

impl TensorSource for Gguf {
    fn tensor(&self, name: &str) -> Option<RawTensor<'_>> {
        let i = self.tensors.get(name)?;
        Some(RawTensor {
            dtype: i.dtype,
            shape: &i.shape,
            data: &self.bytes[i.start..i.start + i.len],
        })
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}
