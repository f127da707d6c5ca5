//! `kiln bench gguf`: random-weight GGUF files for speed comparisons, where a model's values do
//! not matter and only its shapes and block types do (a matvec reads every byte whatever they
//! hold). Two sources:
//!
//! - `--like FILE`: another GGUF's header (metadata, tokenizer, tensor names, shapes, types and
//!   offsets) copied byte for byte, the data random. FILE may be the whole file or only its
//!   header (`--header-only` writes one), so a device without the checkpoint can rebuild a file
//!   of its exact layout from a few megabytes.
//! - `--llama-1b`: Llama-3.2-1B's shapes (16 layers, 2048 hidden, 32/8 heads, 8192 FFN, a tied
//!   128256-token embedding) in llama.cpp's Q4_K_M mix (Q4_K, with Q6_K for the embedding and
//!   for `attn_v`/`ffn_down` of the layers llama.cpp's `use_more_bits` picks), a SentencePiece
//!   vocabulary of placeholder pieces.
//!
//! Random data is valid for its type: every block's f16 scales are small positive values (the
//! other bytes are random), floats are uniform in +-0.05 (1-D tensors, the norms, around 1).

use super::common::{random_bytes, random_f32};
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use kiln::dtype::DType;
use kiln::formats::gguf::{ggml_dtype, ggml_type_name, Gguf, TensorInfo};
use std::io::Write;
use std::path::Path;

/// What to write.
pub struct GgufArgs<'a> {
    pub like: Option<&'a Path>,
    pub llama_1b: bool,
    pub header_only: bool,
    pub out: &'a Path,
}

/// Writes the file `a` asks for.
pub fn make(a: GgufArgs) -> Result<()> {
    let (header, infos) = match (a.like, a.llama_1b) {
        (Some(src), false) => read_header(src)?,
        (None, true) => llama_1b_header(),
        _ => bail!("kiln bench gguf needs one of --like FILE and --llama-1b"),
    };
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(a.out).with_context(|| format!("creating {}", a.out.display()))?,
    );
    f.write_all(&header)?;
    let mut data = 0u64;
    if !a.header_only {
        let mut infos = infos.clone();
        infos.sort_by_key(|t| t.offset);
        for (i, t) in infos.iter().enumerate() {
            if t.offset < data {
                bail!("tensor '{}' overlaps the one before it", t.name);
            }
            f.write_all(&vec![0u8; (t.offset - data) as usize])?;
            let bytes = random_tensor(t, 0x9e37_79b9 + i as u64)?;
            f.write_all(&bytes)?;
            data = t.offset + bytes.len() as u64;
        }
    }
    f.flush()?;
    let mb = (header.len() as u64 + data) as f64 / 1e6;
    println!("{}: {} tensors, {mb:.1} MB", a.out.display(), infos.len());
    Ok(())
}

/// The header bytes (up to the aligned start of the data) and tensor list of a GGUF file.
fn read_header(path: &Path) -> Result<(Vec<u8>, Vec<TensorInfo>)> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("reading {name}"))?;
    let Some((g, infos)) = Gguf::parse_header(&name, &bytes)? else {
        bail!("{name}: the file ends inside its header");
    };
    let mut header = bytes[..g.data_start.min(bytes.len())].to_vec();
    header.resize(g.data_start, 0);
    Ok((header, infos))
}

/// Where a block type keeps its f16 scale fields (byte offsets in a block, from
/// ggml-common.h); the other bytes of a block may be anything.
fn scale_offsets(d: DType) -> &'static [usize] {
    match d {
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        _ => &[0], // Q4_0, Q5_0, Q8_0, IQ4_NL, IQ4_XS: d first
    }
}

/// Random data of a tensor's type and size (`seed` varies it between tensors).
fn random_tensor(t: &TensorInfo, seed: u64) -> Result<Vec<u8>> {
    let n = t.dims.iter().product::<u64>() as usize;
    let Some(dtype) = ggml_dtype(t.ggml_type) else {
        bail!(
            "tensor '{}': type {} has no random generator",
            t.name,
            ggml_type_name(t.ggml_type)
        );
    };
    // Floats in +-0.05 (around 1 for the 1-D norms).
    let around = if t.dims.len() == 1 { 1.0 } else { 0.0 };
    let floats = || {
        random_f32(n, seed)
            .into_iter()
            .map(move |v| around + v * 0.1)
    };
    Ok(match dtype {
        DType::F32 => floats().flat_map(f32::to_le_bytes).collect(),
        DType::F16 => floats()
            .flat_map(|v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => floats()
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => {
            let mut out = random_bytes(dtype.file_bytes(n)?, seed);
            let size = dtype.block_bytes();
            let scales = random_f32(out.len() / size, seed ^ 1);
            for (block, r) in out.chunks_exact_mut(size).zip(scales) {
                for &o in scale_offsets(dtype) {
                    let d = f16::from_f32(0.001 + 0.003 * (r + 0.5));
                    block[o..o + 2].copy_from_slice(&d.to_le_bytes());
                }
            }
            out
        }
    })
}

/// A GGUF header under construction (version 3).
#[derive(Default)]
struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
}

impl Writer {
    fn key(&mut self, k: &str, ty: u32) {
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        put_str(&mut self.kv, v);
    }
    fn array(&mut self, k: &str, elem: u32, n: usize, body: Vec<u8>) {
        self.key(k, 9);
        self.kv.extend(elem.to_le_bytes());
        self.kv.extend((n as u64).to_le_bytes());
        self.kv.extend(body);
    }
    /// The header: magic, counts, metadata, tensor infos (offsets laid out 32-aligned in
    /// order), padding to the data.
    fn finish(self, tensors: &[(String, Vec<u64>, u32)]) -> (Vec<u8>, Vec<TensorInfo>) {
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend((tensors.len() as u64).to_le_bytes());
        h.extend(self.n_kv.to_le_bytes());
        h.extend(self.kv);
        let mut infos = Vec::new();
        let mut offset = 0u64;
        for (name, dims, ty) in tensors {
            put_str(&mut h, name);
            h.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| h.extend(d.to_le_bytes()));
            h.extend(ty.to_le_bytes());
            h.extend(offset.to_le_bytes());
            infos.push(TensorInfo {
                name: name.clone(),
                dims: dims.clone(),
                ggml_type: *ty,
                offset,
            });
            offset = (offset + tensor_bytes(dims, *ty)).next_multiple_of(32);
        }
        h.resize(h.len().next_multiple_of(32), 0);
        (h, infos)
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// Bytes of a tensor of `dims` in ggml type `ty` (a type Kiln knows: the header is Kiln's own).
fn tensor_bytes(dims: &[u64], ty: u32) -> u64 {
    let n = dims.iter().product::<u64>() as usize;
    ggml_dtype(ty)
        .and_then(|d| d.file_bytes(n).ok())
        .unwrap_or(0) as u64
}

/// Llama-3.2-1B's header in llama.cpp's Q4_K_M mix (see the module notes).
fn llama_1b_header() -> (Vec<u8>, Vec<TensorInfo>) {
    const Q4_K: u32 = 12;
    const Q6_K: u32 = 14;
    let (layers, hidden, heads, kv_heads, ffn, vocab) =
        (16u64, 2048u64, 32u64, 8u64, 8192u64, 128_256usize);
    let d = hidden / heads;
    let mut w = Writer::default();
    w.str("general.architecture", "llama");
    w.str("general.name", "random Llama-3.2-1B-shaped Q4_K_M");
    w.u32("general.file_type", 15); // MOSTLY_Q4_K_M
    w.u32("llama.block_count", layers as u32);
    w.u32("llama.context_length", 131_072);
    w.u32("llama.embedding_length", hidden as u32);
    w.u32("llama.feed_forward_length", ffn as u32);
    w.u32("llama.attention.head_count", heads as u32);
    w.u32("llama.attention.head_count_kv", kv_heads as u32);
    w.u32("llama.rope.dimension_count", d as u32);
    w.f32("llama.rope.freq_base", 500_000.0);
    w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.u32("llama.vocab_size", vocab as u32);
    // A SentencePiece vocabulary: <unk> <s> </s>, the 256 byte pieces, then placeholders.
    w.str("tokenizer.ggml.model", "llama");
    let mut pieces: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    pieces.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    let named = pieces.len();
    pieces.extend((named..vocab).map(|i| format!("\u{2581}t{i}")));
    let mut body = Vec::new();
    pieces.iter().for_each(|p| put_str(&mut body, p));
    w.array("tokenizer.ggml.tokens", 8, vocab, body);
    let scores: Vec<u8> = (0..vocab)
        .flat_map(|i| (-(i as f32)).to_le_bytes())
        .collect();
    w.array("tokenizer.ggml.scores", 6, vocab, scores);
    let kind = |i: usize| match i {
        0 => 2i32,    // unknown
        1 | 2 => 3,   // control
        3..=258 => 6, // byte
        _ => 1,       // normal
    };
    let types: Vec<u8> = (0..vocab).flat_map(|i| kind(i).to_le_bytes()).collect();
    w.array("tokenizer.ggml.token_type", 5, vocab, types);
    w.u32("tokenizer.ggml.bos_token_id", 1);
    w.u32("tokenizer.ggml.eos_token_id", 2);
    w.u32("tokenizer.ggml.unknown_token_id", 0);
    // llama.cpp's use_more_bits: the first and last eighth of the layers and every third
    // between get Q6_K for attn_v and ffn_down.
    let more = |i: u64| i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2;
    let mut t: Vec<(String, Vec<u64>, u32)> =
        vec![("token_embd.weight".into(), vec![hidden, vocab as u64], Q6_K)];
    for i in 0..layers {
        let big = if more(i) { Q6_K } else { Q4_K };
        let l = |n: &str| format!("blk.{i}.{n}");
        t.extend([
            (l("attn_norm.weight"), vec![hidden], 0),
            (l("attn_q.weight"), vec![hidden, hidden], Q4_K),
            (l("attn_k.weight"), vec![hidden, kv_heads * d], Q4_K),
            (l("attn_v.weight"), vec![hidden, kv_heads * d], big),
            (l("attn_output.weight"), vec![hidden, hidden], Q4_K),
            (l("ffn_norm.weight"), vec![hidden], 0),
            (l("ffn_gate.weight"), vec![hidden, ffn], Q4_K),
            (l("ffn_up.weight"), vec![hidden, ffn], Q4_K),
            (l("ffn_down.weight"), vec![ffn, hidden], big),
        ]);
    }
    t.push(("output_norm.weight".into(), vec![hidden], 0));
    w.finish(&t)
}
