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

use super::blocks::{f16_at, q3k_scales};
use super::quantize::quantize;
use super::DType;
use crate::error::{Error, Result};
use half::{bf16, f16};

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
    for r in 0..rows {
        let src = &bytes[r * file_row..(r + 1) * file_row];
        let dst = &mut out[r * rw..(r + 1) * rw];
        pack_row(dtype, src, dst);
        // While the row is in cache: its floats (the scales of block formats) must be finite.
        if check_finite && !row_finite(dtype, dst) {
            return Err(Error::NonFinite {
                what: dtype.name().into(),
                row: r,
            });
        }
    }
    Ok(out)
}

fn word(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// One row from file layout (`src`) to GPU words (`dst`, zero-padded).
fn pack_row(dtype: DType, src: &[u8], dst: &mut [u32]) {
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
}

/// Whether a packed row's floats (every value, or the scales of a block format) are finite.
fn row_finite(dtype: DType, dst: &[u32]) -> bool {
    let (scale_words, block_words) = scale_words(dtype);
    let non_finite = match dtype {
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
    !non_finite
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
