//! GGUF's block layouts, read back to f32: the CPU reference of every format, as gguf-py and
//! ggml dequantize them.

use super::DType;
use crate::error::{Error, Result};
use half::{bf16, f16};

pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 6-bit scale and min of sub-block `j` from Q4_K's 12 packed bytes (ggml's get_scale_min_k4).
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
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
pub(super) fn q3k_scales(p: &[u8]) -> [i8; 16] {
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
    let block: fn(&[u8], &mut Vec<f32>) = match dtype {
        DType::F32 | DType::U32 | DType::F16 | DType::BF16 => {
            dequantize_plain(dtype, bytes, &mut y);
            return Ok(y);
        }
        DType::Q8_0 => q8_0_block,
        DType::Q4_0 => q4_0_block,
        DType::IQ4_NL => iq4_nl_block,
        DType::IQ4_XS => iq4_xs_block,
        DType::Q4_1 => q4_1_block,
        DType::Q5_0 => |b, y| q5_block(DType::Q5_0, b, y),
        DType::Q5_1 => |b, y| q5_block(DType::Q5_1, b, y),
        DType::Q4_K => q4_k_block,
        DType::Q2_K => q2_k_block,
        DType::Q3_K => q3_k_block,
        DType::Q5_K => q5_k_block,
        DType::Q6_K => q6_k_block,
    };
    for b in bytes.chunks_exact(dtype.block_bytes()) {
        block(b, &mut y);
    }
    Ok(y)
}

/// The one-element-per-value types.
fn dequantize_plain(dtype: DType, bytes: &[u8], y: &mut Vec<f32>) {
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
        _ => unreachable!("{dtype} is a block format"),
    }
}

/// Q8_0: 32 int8 quants times `d`.
fn q8_0_block(b: &[u8], y: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    y.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
}

/// Q4_0: Nibbles minus 8 times `d`: byte `j` holds elements `j` and `j + 16`.
fn q4_0_block(b: &[u8], y: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..];
    y.extend(qs.iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
    y.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
}

/// IQ4_NL: Nibbles through the non-linear table, times `d`.
fn iq4_nl_block(b: &[u8], y: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..];
    y.extend(
        qs.iter()
            .map(|&q| d * IQ4_VALUES[(q & 0xF) as usize] as f32),
    );
    y.extend(qs.iter().map(|&q| d * IQ4_VALUES[(q >> 4) as usize] as f32));
}

/// IQ4_XS: Eight 32-element sub-blocks, each with a 6-bit scale, nibbles through the IQ4 table.
fn iq4_xs_block(b: &[u8], y: &mut Vec<f32>) {
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

/// Q4_1: Nibbles times `d` plus `m`.
fn q4_1_block(b: &[u8], y: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..];
    y.extend(qs.iter().map(|&q| d * (q & 0xF) as f32 + m));
    y.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
}

/// Q4_K: Four 64-element chunks; each half has its 6-bit scale and min.
fn q4_k_block(b: &[u8], y: &mut Vec<f32>) {
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

/// Q2_K: 2-bit quants with a 4-bit scale and min per 16 elements.
fn q2_k_block(b: &[u8], y: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let (scales, qs) = (&b[..16], &b[16..80]);
    for r in 0..256 {
        let sc = scales[r / 16];
        let q = (qs[32 * (r / 128) + r % 32] >> (2 * ((r % 128) / 32))) & 3;
        let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
        y.push(dl * q as f32 - ml);
    }
}

/// Q3_K: 2-bit quants with a high-bit mask (minus 4 where unset) and 6-bit scales.
fn q3_k_block(b: &[u8], y: &mut Vec<f32>) {
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

/// Q5_K: Q4_K with a fifth bit per element from `qh`.
fn q5_k_block(b: &[u8], y: &mut Vec<f32>) {
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

/// Q6_K: Two halves of 128: low 4 bits from `ql`, high 2 from `qh`, minus 32, int8 scales.
fn q6_k_block(b: &[u8], y: &mut Vec<f32>) {
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

/// Q5_0 and Q5_1: nibbles with a fifth bit per element from the 32-bit `qh`; Q5_0 subtracts 16,
/// Q5_1 adds its min `m`.
fn q5_block(dtype: DType, b: &[u8], y: &mut Vec<f32>) {
    let hm = if dtype == DType::Q5_0 { 2 } else { 4 };
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
