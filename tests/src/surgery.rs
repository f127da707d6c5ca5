//! File surgery for the robustness tests: damage a real fixture the way a bad download, a buggy
//! converter or a hostile file would (a value poked into a tensor, a header edited), or write a
//! small GGUF from scratch. Everything works on bytes, so each test builds its bad file itself.

use serde_json::{Map, Value};
use std::ops::Range;

/// A safetensors file's header (tensor entries and `__metadata__`) and its data section.
pub fn st_split(bytes: &[u8]) -> (Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// A safetensors file from a header and a data section.
pub fn st_join(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(data);
    out
}

/// The dtype and absolute byte range of tensor `name` in a safetensors file.
pub fn st_tensor(bytes: &[u8], name: &str) -> (String, Range<usize>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let (header, _) = st_split(bytes);
    let e = header
        .get(name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    let off = e["data_offsets"].as_array().unwrap();
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    (
        e["dtype"].as_str().unwrap().to_string(),
        8 + n + a..8 + n + b,
    )
}

/// Writes `v` into element `i` of tensor `name` (F32, F16 or BF16) of a safetensors file.
pub fn st_poke(bytes: &mut [u8], name: &str, i: usize, v: f32) {
    let (dtype, r) = st_tensor(bytes, name);
    let enc: Vec<u8> = match dtype.as_str() {
        "F32" => v.to_le_bytes().to_vec(),
        "F16" => half::f16::from_f32(v).to_le_bytes().to_vec(),
        "BF16" => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        other => panic!("{other}"),
    };
    let at = r.start + i * enc.len();
    assert!(at + enc.len() <= r.end, "{name}: element {i} out of range");
    bytes[at..at + enc.len()].copy_from_slice(&enc);
}

/// Writes `v` into every element of tensor `name` of a safetensors file.
pub fn st_fill(bytes: &mut [u8], name: &str, v: f32) {
    let (dtype, r) = st_tensor(bytes, name);
    let size = if dtype == "F32" { 4 } else { 2 };
    for i in 0..(r.end - r.start) / size {
        st_poke(bytes, name, i, v);
    }
}

/// The absolute byte range of tensor `name` in a GGUF file (parsed by the engine).
pub fn gguf_tensor(bytes: &[u8], name: &str) -> Range<usize> {
    let g = kiln::formats::gguf::Gguf::parse("x.gguf", bytes.to_vec()).unwrap();
    g.data_range(name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// A GGUF metadata value to write.
pub enum Meta<'a> {
    U32(u32),
    F32(f32),
    Str(&'a str),
    Strs(&'a [&'a str]),
    /// An array of u8 with `n` elements (all `fill`).
    Bytes(usize, u8),
    /// A raw array header claiming `n` elements of type `ty`, followed by nothing.
    Claim(u32, u64),
}

/// A GGUF v3 file: metadata, then tensors `(name, dims fastest first, ggml type, offset)` over
/// `data` (aligned to 32).
pub fn gguf_file(
    meta: &[(&str, Meta)],
    tensors: &[(&str, &[u64], u32, u64)],
    data: &[u8],
) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
            Meta::Strs(xs) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((xs.len() as u64).to_le_bytes());
                for x in *xs {
                    s(&mut b, x);
                }
            }
            Meta::Bytes(n, fill) => {
                b.extend(9u32.to_le_bytes());
                b.extend(0u32.to_le_bytes());
                b.extend((*n as u64).to_le_bytes());
                b.resize(b.len() + n, *fill);
            }
            Meta::Claim(ty, n) => {
                b.extend(9u32.to_le_bytes());
                b.extend(ty.to_le_bytes());
                b.extend(n.to_le_bytes());
            }
        }
    }
    for (name, dims, ty, off) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.extend_from_slice(data);
    b
}
