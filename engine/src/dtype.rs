//! Element types, GGUF block layouts, and how each is packed on the GPU.
//!
//! GPU packing spec (all in 32-bit words; a matrix is `rows x k`, row `r` starts at word
//! `r * row_words(k)`):
//! - `F32`: one word per element. `U32`: one word per element (token ids).
//! - `F16`, `BF16`: two elements per word, element `2i` in the low half; each row is padded
//!   to an even length so rows start on a word.
//! - `Q8_0` (32 elements): 9 words = scale `d` as f32, then the 32 int8 quants as in GGUF.
//! - `Q4_0` (32 elements): 5 words = scale `d` as f32, then GGUF's 16 nibble bytes
//!   (byte `j`: element `j` in the low nibble, element `j + 16` in the high one).
//!   Q8_0 and Q4_0 rows end with zero words up to a multiple of 4 words (16 bytes).
//! - `Q4_1` (32 elements): 6 words = `d`, `m` as f32, then GGUF's 16 nibble bytes (as Q4_0;
//!   element = q * d + m). Rows end with zero words up to a multiple of 4 words, as Q4_0's.
//! - `Q5_0` (32 elements): 6 words = `d` as f32, the 32 high bits `qh` (bit `j` for element `j`),
//!   then the 16 nibble bytes of the low four bits (as Q4_0); element = d * (q - 16). Rows
//!   padded as Q4_1's.
//! - `Q5_1` (32 elements): 7 words = `d`, `m` as f32, `qh`, the 16 nibble bytes; q * d + m.
//! - `Q4_K` (256 elements): GGUF's 144-byte block unchanged (36 words: `d`,`dmin` as f16
//!   pair, 12 bytes of 6-bit scales/mins, 128 nibble bytes).
//! - `Q2_K` (256 elements): GGUF's 84-byte block unchanged (21 words: 16 scale bytes, low
//!   nibble the scale and high nibble the min of each 16 elements; 64 bytes of 2-bit quants, four
//!   per byte at shifts 0, 2, 4, 6 for elements 32s + l of each 128; `d`,`dmin` as f16 pair).
//! - `Q3_K` (256 elements): 29 words = GGUF's `hmask` (32 B) and `qs` (64 B), then the 16
//!   6-bit scales unpacked to i8 minus 32 (16 B; GGUF packs them into 12), then `d` widened to f32
//!   (GGUF's 110-byte block is not word-aligned). Element 128h + 32s + l: bits 2s..2s + 1 of `qs`
//!   byte 32h + l, minus 4 unless bit 4h + s of `hmask` byte l is set; scale r / 16.
//! - `IQ4_NL` (32 elements): 5 words = `d` as f32, then 16 nibble bytes as Q4_0; element =
//!   d * IQ4_VALUES[q] (a fixed non-linear table).
//! - `IQ4_XS` (256 elements): GGUF's 136-byte block unchanged (34 words: `d` (f16) and the u16
//!   high scale bits, 4 bytes of low scale nibbles, 128 nibble bytes, 16 per 32-element
//!   sub-block as Q4_0); sub-block i's scale is 6 bits minus 32.
//! - `Q5_K` (256 elements): GGUF's 176-byte block unchanged (44 words: `d`,`dmin` as f16 pair,
//!   12 bytes of 6-bit scales/mins, 32 bytes `qh` (bit `i` of byte `l`: the fifth bit of element
//!   `32 i + l`), 128 nibble bytes laid out as Q4_K's).
//! - `Q6_K` (256 elements): 56 words = GGUF's `ql`(128 B) `qh`(64 B) `scales`(16 x i8),
//!   then `d` widened to f32 (GGUF stores it as a trailing f16, which breaks alignment), then 3
//!   zero words, so that blocks are whole 16-byte units for the software matvec.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element type of a tensor (GGUF's names for the block formats).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

impl DType {
    /// All weight dtypes the matvec/matmul/gather kernels accept.
    pub const WEIGHTS: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::IQ4_NL,
        DType::IQ4_XS,
    ];

    /// Elements per block (1 for plain types).
    pub fn block_elems(self) -> usize {
        match self {
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => {
                32
            }
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
                256
            }
            _ => 1,
        }
    }

    /// Bytes of one block in the file (GGUF / safetensors) layout.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::IQ4_NL => 18,
            DType::IQ4_XS => 136,
        }
    }

    /// Words of one block on the GPU (quantized types only).
    pub fn gpu_block_words(self) -> usize {
        match self {
            DType::Q8_0 => 9,
            DType::Q4_0 | DType::IQ4_NL => 5,
            DType::Q4_1 | DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q2_K => 21,
            DType::Q3_K => 29,
            DType::Q4_K => 36,
            DType::Q5_K => 44,
            DType::Q6_K => 56,
            DType::IQ4_XS => 34,
            _ => 0,
        }
    }

    /// Byte offsets of the f16 scale fields (`d`, and the min where there is one) in one file
    /// block; empty for plain types.
    pub fn scale_offsets(self) -> &'static [usize] {
        match self {
            DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL | DType::IQ4_XS => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
            DType::Q2_K => &[80, 82],
            DType::Q3_K => &[108],
            DType::Q6_K => &[208],
            DType::F32 | DType::F16 | DType::BF16 | DType::U32 => &[],
        }
    }

    /// Is this a block-quantized type?
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Name used in shader variants and messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q2_K => "q2_k",
            DType::Q3_K => "q3_k",
            DType::Q4_K => "q4_k",
            DType::Q5_K => "q5_k",
            DType::Q6_K => "q6_k",
            DType::IQ4_NL => "iq4_nl",
            DType::IQ4_XS => "iq4_xs",
        }
    }

    /// GPU words for one row of `k` elements.
    pub fn row_words(self, k: usize) -> usize {
        match self {
            DType::F32 | DType::U32 => k,
            DType::F16 | DType::BF16 => k.div_ceil(2),
            // Rows padded to whole 16-byte units, so that the software matvec reads them with
            // 16-byte loads (matvec.wgsl, ROWS_V4); at most 3 words a row.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 => {
                (k / 32 * self.gpu_block_words()).next_multiple_of(4)
            }
            q => k / q.block_elems() * q.gpu_block_words(),
        }
    }

    /// File bytes for `n` elements; errors when `n` is not a whole number of blocks.
    pub fn file_bytes(self, n: usize) -> Result<usize> {
        let b = self.block_elems();
        if !n.is_multiple_of(b) {
            return Err(Error::Data {
                name: self.name().into(),
                msg: format!("{n} elements is not a multiple of the block size {b}"),
            });
        }
        Ok(n / b * self.block_bytes())
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 6-bit scale and min of sub-block `j` from Q4_K's 12 packed bytes (ggml's get_scale_min_k4).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The non-linear 4-bit values of IQ4_NL and IQ4_XS (llama.cpp's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Q3_K's 16 scales (minus 32) from their 12 packed bytes: low nibbles in bytes 0..8 (scale i
/// at shift 4 (i / 8) of byte i % 8), high two bits in bytes 8..12 (shift 2 (i / 4) of byte
/// 8 + i % 4).
fn q3k_scales(p: &[u8]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let lo = (p[i % 8] >> (4 * (i / 8))) & 0xF;
        let hi = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        (lo | hi << 4) as i8 - 32
    })
}

/// Dequantizes file-layout bytes of `n` elements to f32 (the CPU reference of every format).
pub fn dequantize(dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = dtype.file_bytes(n)?;
    if bytes.len() != need {
        return Err(Error::Data {
            name: dtype.name().into(),
            msg: format!("{n} elements need {need} bytes, found {}", bytes.len()),
        });
    }
    let mut y = Vec::with_capacity(n);
    match dtype {
        DType::F32 => y.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::U32 => y.extend(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32),
        ),
        DType::F16 => y.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        DType::BF16 => y.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        DType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16_at(b, 0);
                y.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        DType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                y.extend(qs.iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
                y.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        DType::IQ4_NL => {
            for b in bytes.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                y.extend(
                    qs.iter()
                        .map(|&q| d * IQ4_VALUES[(q & 0xF) as usize] as f32),
                );
                y.extend(qs.iter().map(|&q| d * IQ4_VALUES[(q >> 4) as usize] as f32));
            }
        }
        DType::IQ4_XS => {
            for b in bytes.chunks_exact(136) {
                let d = f16_at(b, 0);
                let sh = u16::from_le_bytes([b[2], b[3]]);
                for i in 0..8 {
                    let lo = (b[4 + i / 2] >> (4 * (i % 2))) & 0xF;
                    let hi = ((sh >> (2 * i)) & 3) as u8;
                    let dl = d * ((lo | hi << 4) as i32 - 32) as f32;
                    let qs = &b[8 + 16 * i..24 + 16 * i];
                    y.extend(
                        qs.iter()
                            .map(|&q| dl * IQ4_VALUES[(q & 0xF) as usize] as f32),
                    );
                    y.extend(
                        qs.iter()
                            .map(|&q| dl * IQ4_VALUES[(q >> 4) as usize] as f32),
                    );
                }
            }
        }
        DType::Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..];
                y.extend(qs.iter().map(|&q| d * (q & 0xF) as f32 + m));
                y.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            let (fb, hm) = if dtype == DType::Q5_0 {
                (22, 2)
            } else {
                (24, 4)
            };
            for b in bytes.chunks_exact(fb) {
                let d = f16_at(b, 0);
                let m = if dtype == DType::Q5_1 {
                    f16_at(b, 2)
                } else {
                    0.0
                };
                let qh = u32::from_le_bytes([b[hm], b[hm + 1], b[hm + 2], b[hm + 3]]);
                let qs = &b[hm + 4..];
                for j in 0..32 {
                    let nib = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
                    let q = (nib as u32 | ((qh >> j) & 1) << 4) as i32;
                    y.push(if dtype == DType::Q5_0 {
                        d * (q - 16) as f32
                    } else {
                        d * q as f32 + m
                    });
                }
            }
        }
        DType::Q4_K => {
            for b in bytes.chunks_exact(144) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..];
                for c in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * c, scales);
                    let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                    let q = &qs[32 * c..32 * c + 32];
                    y.extend(
                        q.iter()
                            .map(|&v| d * s1 as f32 * (v & 0xF) as f32 - dmin * m1 as f32),
                    );
                    y.extend(
                        q.iter()
                            .map(|&v| d * s2 as f32 * (v >> 4) as f32 - dmin * m2 as f32),
                    );
                }
            }
        }
        DType::Q2_K => {
            for b in bytes.chunks_exact(84) {
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                let (scales, qs) = (&b[..16], &b[16..80]);
                for r in 0..256 {
                    let sc = scales[r / 16];
                    let q = (qs[32 * (r / 128) + r % 32] >> (2 * ((r % 128) / 32))) & 3;
                    let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                    y.push(dl * q as f32 - ml);
                }
            }
        }
        DType::Q3_K => {
            for b in bytes.chunks_exact(110) {
                let d = f16_at(b, 108);
                let (hm, qs) = (&b[..32], &b[32..96]);
                let sc = q3k_scales(&b[96..108]);
                for r in 0..256 {
                    let (h, s, l) = (r / 128, (r % 128) / 32, r % 32);
                    let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
                    let q = low
                        - if (hm[l] >> (4 * h + s)) & 1 == 1 {
                            0
                        } else {
                            4
                        };
                    y.push(d * sc[r / 16] as f32 * q as f32);
                }
            }
        }
        DType::Q5_K => {
            for b in bytes.chunks_exact(176) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..];
                for c in 0..4 {
                    let q = &qs[32 * c..32 * c + 32];
                    for half in 0..2 {
                        let j = 2 * c + half;
                        let (s, m) = scale_min_k4(j, scales);
                        let (ds, dm) = (d * s as f32, dmin * m as f32);
                        y.extend(q.iter().zip(qh).map(|(&v, &h)| {
                            let lo = if half == 0 { v & 0xF } else { v >> 4 };
                            ds * (lo | ((h >> j) & 1) << 4) as f32 - dm
                        }));
                    }
                }
            }
        }
        DType::Q6_K => {
            for b in bytes.chunks_exact(210) {
                let d = f16_at(b, 208);
                let mut out = [0f32; 256];
                for half in 0..2 {
                    let ql = &b[64 * half..];
                    let qh = &b[128 + 32 * half..];
                    let sc = &b[192 + 8 * half..];
                    let o = &mut out[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
                y.extend_from_slice(&out);
            }
        }
    }
    Ok(y)
}

/// Quantizes f32 values to GGUF Q8_0 or Q4_0 blocks exactly as ggml's reference quantizers
/// (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) do. This is the quantize-on-load path.
pub fn quantize(dtype: DType, x: &[f32]) -> Result<Vec<u8>> {
    let nb = dtype.file_bytes(x.len())?;
    let mut out = Vec::with_capacity(nb);
    match dtype {
        DType::Q8_0 => {
            for blk in x.chunks_exact(32) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        DType::Q4_0 => {
            for blk in x.chunks_exact(32) {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in blk {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q0 = ((blk[j] * id + 8.5) as i8).min(15) as u8;
                    let q1 = ((blk[j + 16] * id + 8.5) as i8).min(15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        DType::Q4_K => x.chunks_exact(256).for_each(|b| quantize_q4_k(b, &mut out)),
        DType::Q6_K => x.chunks_exact(256).for_each(|b| quantize_q6_k(b, &mut out)),
        other => {
            return Err(Error::Unsupported(format!(
                "quantizing to {other} (use q8_0, q4_0, q4_k or q6_k)"
            )))
        }
    }
    Ok(out)
}

// The K-quant encoders are llama.cpp's reference quantizers (quantize_row_q4_K_ref and
// quantize_row_q6_K_ref in ggml-quants.c, what llama-quantize runs without an importance
// matrix), step for step in f32, so that the bytes are llama.cpp's.

/// ggml's `nearest_int`: round half to even through the float mantissa.
fn nearest_int(v: f32) -> i32 {
    ((v + 12582912.0f32).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants`: levels `l[i]` in 0..=nmax with `x ~ scale * l - min`, the scale
/// and min searched for the least weighted squared error. Returns (scale, min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    w: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if err < best {
                l[..n].copy_from_slice(&aux[..n]);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One Q4_K block (256 values): `d`, `dmin`, 12 bytes of 6-bit sub-block scales and mins, 128
/// bytes of nibbles.
fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0u8; 256];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().fold(0.0, |a, v| a + v * v);
        let av = (sum_x2 / 32.0).sqrt();
        let w: Vec<f32> = xs.iter().map(|v| av + v.abs()).collect();
        let (sc, mn) =
            make_qkx2_quants(15, xs, &w, &mut levels[32 * j..32 * j + 32], -1.0, 0.1, 20);
        scales[j] = sc;
        mins[j] = mn;
        max_scale = max_scale.max(sc);
        max_min = max_min.max(mn);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    for j in (0..256).step_by(64) {
        out.extend((0..32).map(|i| levels[j + i] | (levels[j + i + 32] << 4)));
    }
}

/// ggml's `make_qx_quants` with rmse_type 1 (weights x^2): signed levels in -nmax..nmax-1
/// stored as `l + nmax`; returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = level(iscale, v);
        l[i] = (q + nmax) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut sx, mut s2) = (0f32, 0f32);
        for &v in x {
            let q = level(iscale, v) as f32;
            let w = v * v;
            sx += w * v * q;
            s2 += w * q * q;
        }
        if s2 > 0.0 && sx * sx > best * s2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (level(iscale, v) + nmax) as i8;
            }
            scale = sx / s2;
            best = scale * sx;
        }
    }
    scale
}

/// One Q6_K block (256 values): 128 bytes of low nibbles, 64 of high bit pairs, 16 signed
/// sub-block scales, `d`.
fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut levels[16 * ib..16 * ib + 16],
        );
        scales[ib] = s;
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    if max_abs < 1e-15 {
        out.extend(std::iter::repeat_n(0u8, 210));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let sc: Vec<i8> = scales
        .iter()
        .map(|&s| nearest_int(iscale * s).min(127) as i8)
        .collect();
    for j in 0..16 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            levels[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (h, j) in (0..256).step_by(128).enumerate() {
        for l in 0..32 {
            let q = |o: usize| levels[j + l + o] as u8;
            ql[64 * h + l] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
            ql[64 * h + l + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
            qh[32 * h + l] =
                (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&v| v as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

/// Repacks `rows x k` elements from file layout to the GPU words of the packing spec.
pub fn pack_for_gpu(
    dtype: DType,
    bytes: &[u8],
    rows: usize,
    k: usize,
    check_finite: bool,
) -> Result<Vec<u32>> {
    let file_row = dtype.file_bytes(k)?;
    if bytes.len() != file_row * rows {
        return Err(Error::Data {
            name: dtype.name().into(),
            msg: format!(
                "{rows}x{k} elements need {} bytes, found {}",
                file_row * rows,
                bytes.len()
            ),
        });
    }
    let rw = dtype.row_words(k);
    if rw == 0 || rows == 0 {
        // Empty rows: nothing to pack (however many a shape like [10^12, 0] claims).
        return Ok(Vec::new());
    }
    let mut out = vec![0u32; rw * rows];
    let (scale_words, block_words) = scale_words(dtype);
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    for r in 0..rows {
        let src = &bytes[r * file_row..(r + 1) * file_row];
        let dst = &mut out[r * rw..(r + 1) * rw];
        match dtype {
            DType::F32 | DType::U32 | DType::Q2_K | DType::Q4_K | DType::Q5_K | DType::IQ4_XS => {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = word(src, 4 * i);
                }
            }
            DType::F16 | DType::BF16 => {
                for (i, d) in dst.iter_mut().enumerate() {
                    let lo = u16::from_le_bytes([src[4 * i], src[4 * i + 1]]) as u32;
                    let hi = if 4 * i + 2 < src.len() {
                        u16::from_le_bytes([src[4 * i + 2], src[4 * i + 3]]) as u32
                    } else {
                        0
                    };
                    *d = lo | (hi << 16);
                }
            }
            DType::Q8_0 | DType::Q4_0 | DType::IQ4_NL => {
                let (fb, gw) = (dtype.block_bytes(), dtype.gpu_block_words());
                for (b, blk) in src.chunks_exact(fb).enumerate() {
                    let g = &mut dst[b * gw..(b + 1) * gw];
                    g[0] = f16_at(blk, 0).to_bits();
                    for w in 1..gw {
                        g[w] = word(blk, 2 + 4 * (w - 1));
                    }
                }
            }
            DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => {
                // Scales widened to f32 words, then the (unaligned in the file) words as they come.
                let (fb, gw) = (dtype.block_bytes(), dtype.gpu_block_words());
                let scales = if dtype == DType::Q5_0 { 1 } else { 2 };
                for (b, blk) in src.chunks_exact(fb).enumerate() {
                    let g = &mut dst[b * gw..(b + 1) * gw];
                    for (i, gs) in g.iter_mut().take(scales).enumerate() {
                        *gs = f16_at(blk, 2 * i).to_bits();
                    }
                    for w in scales..gw {
                        g[w] = word(blk, 2 * scales + 4 * (w - scales));
                    }
                }
            }
            DType::Q3_K => {
                for (b, blk) in src.chunks_exact(110).enumerate() {
                    let g = &mut dst[b * 29..(b + 1) * 29];
                    for (w, gw) in g.iter_mut().take(24).enumerate() {
                        *gw = word(blk, 4 * w);
                    }
                    let sc = q3k_scales(&blk[96..108]).map(|v| v as u8);
                    for (w, gw) in g[24..28].iter_mut().enumerate() {
                        *gw = word(&sc, 4 * w);
                    }
                    g[28] = f16_at(blk, 108).to_bits();
                }
            }
            DType::Q6_K => {
                for (b, blk) in src.chunks_exact(210).enumerate() {
                    let g = &mut dst[b * 56..(b + 1) * 56];
                    for (w, gw) in g.iter_mut().take(52).enumerate() {
                        *gw = word(blk, 4 * w);
                    }
                    g[52] = f16_at(blk, 208).to_bits();
                }
            }
        }
        // While the row is in cache: its floats (the scales of block formats) must be finite.
        let non_finite = match dtype {
            _ if !check_finite => false,
            DType::U32 => false,
            DType::F32 => dst.iter().any(|&w| f32_special(w)),
            DType::F16 => dst.iter().any(|&w| f16_special(w) || f16_special(w >> 16)),
            DType::BF16 => dst
                .iter()
                .any(|&w| bf16_special(w) || bf16_special(w >> 16)),
            // d and dmin as an f16 pair: word 0 of the K-quant blocks kept as GGUF stores them
            // (the last word for Q2_K).
            DType::Q4_K | DType::Q5_K | DType::Q2_K => {
                let at = if dtype == DType::Q2_K { 20 } else { 0 };
                dst.chunks_exact(block_words)
                    .any(|b| f16_special(b[at]) || f16_special(b[at] >> 16))
            }
            // d alone in the low half of word 0 (the high half holds scale bits).
            DType::IQ4_XS => dst.chunks_exact(block_words).any(|b| f16_special(b[0])),
            _ => dst
                .chunks_exact(block_words)
                .any(|b| scale_words.clone().any(|i| f32_special(b[i]))),
        };
        if non_finite {
            return Err(Error::NonFinite {
                what: dtype.name().into(),
                row: r,
            });
        }
    }
    Ok(out)
}

/// The words of a GPU block that hold f32 scales, and the block's size in words.
fn scale_words(dtype: DType) -> (std::ops::Range<usize>, usize) {
    let gw = dtype.gpu_block_words().max(1);
    match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL => (0..1, gw),
        DType::Q4_1 | DType::Q5_1 => (0..2, gw),
        DType::Q6_K => (52..53, gw),
        DType::Q3_K => (28..29, gw),
        _ => (0..0, gw),
    }
}

fn f32_special(w: u32) -> bool {
    w & 0x7f80_0000 == 0x7f80_0000
}

fn f16_special(w: u32) -> bool {
    w & 0x7c00 == 0x7c00
}

fn bf16_special(w: u32) -> bool {
    w & 0x7f80 == 0x7f80
}

/// f32 values as file-layout bytes of a plain dtype (F32/F16/BF16), rounding to nearest.
pub fn encode_plain(dtype: DType, x: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(x).to_vec(),
        DType::F16 => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::Q8_0 | DType::Q4_0 => quantize(dtype, x)?,
        other => {
            return Err(Error::Unsupported(format!(
                "encoding f32 values as {other}"
            )))
        }
    })
}
