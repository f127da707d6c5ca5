//! ggml's reference quantizers, bit for bit: the quantize-on-load path (`--quantize`).

use super::blocks::scale_min_k4;
use super::DType;
use crate::error::{Error, Result};
use half::f16;

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
