//! CPU references of the Gated DeltaNet kernels (`kernels::delta`), in f64, one token after
//! the other as transformers' `torch_recurrent_gated_delta_rule` and `causal_conv1d_update`
//! compute them.

use super::elementwise::silu;

/// The causal convolution with SiLU of one sequence's run: x `[t, width]` (the first `c`
/// columns convolved), w `[c, k]`, state `[k - 1, c]` (previous inputs, oldest first). Returns
/// y `[t, c]` and the state after the first `valid` tokens.
pub fn causal_conv(
    x: &[f32],
    width: usize,
    c: usize,
    w: &[f32],
    k: usize,
    state: &[f32],
    valid: usize,
) -> (Vec<f32>, Vec<f32>) {
    let t = x.len() / width;
    // The inputs in time order: the state's, then the run's.
    let mut seq: Vec<Vec<f64>> = (0..k - 1)
        .map(|j| (0..c).map(|ch| state[j * c + ch] as f64).collect())
        .collect();
    seq.extend((0..t).map(|i| (0..c).map(|ch| x[i * width + ch] as f64).collect()));
    let mut y = vec![0f32; t * c];
    for i in 0..t {
        for ch in 0..c {
            let acc: f64 = (0..k).map(|j| w[ch * k + j] as f64 * seq[i + j][ch]).sum();
            y[i * c + ch] = silu(acc) as f32;
        }
    }
    let new_state = (0..k - 1)
        .flat_map(|j| seq[valid + j].iter().map(|&v| v as f32).collect::<Vec<_>>())
        .collect();
    (y, new_state)
}

/// Sizes of a linear-attention layer.
#[derive(Clone, Copy, Debug)]
pub struct DeltaShape {
    pub k_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
    pub eps: f32,
    /// Value head h reads key head h % k_heads (else h / (v_heads / k_heads)).
    pub tiled: bool,
}

fn l2_normalized(x: &[f32]) -> Vec<f64> {
    let inv = 1.0 / (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() + 1e-6).sqrt();
    x.iter().map(|&v| v as f64 * inv).collect()
}

/// The gated delta rule and gated RMSNorm of one sequence's run of `t` tokens (see
/// `kernels::delta::GatedDelta` for the layouts): qkv `[t, 2 kd + vd]`, proj `[t, 2 kd + 2 vd +
/// 2 vh]`, a `[vh]` (-exp(A_log)), dt `[vh]`, norm_w `[dv]`, state `[vh, dk, dv]`. Rows from
/// `valid` on are padding: zeros out, no state update. Returns y `[t, vd]` and the new state.
#[allow(clippy::too_many_arguments)]
pub fn gated_delta(
    s: &DeltaShape,
    qkv: &[f32],
    proj: &[f32],
    a: &[f32],
    dt: &[f32],
    norm_w: &[f32],
    state: &[f32],
    valid: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (kh, vh, dk, dv) = (s.k_heads, s.v_heads, s.dk, s.dv);
    let (kd, vd) = (kh * dk, vh * dv);
    let (qw, pw) = (2 * kd + vd, 2 * kd + 2 * vd + 2 * vh);
    let t = qkv.len() / qw;
    let mut st: Vec<f64> = state.iter().map(|&v| v as f64).collect();
    let mut y = vec![0f32; t * vd];
    for i in 0..valid.min(t) {
        let row = &qkv[i * qw..(i + 1) * qw];
        let pr = &proj[i * pw..(i + 1) * pw];
        for h in 0..vh {
            let g = if s.tiled { h % kh } else { h / (vh / kh) };
            let q = l2_normalized(&row[g * dk..(g + 1) * dk]);
            let k = l2_normalized(&row[kd + g * dk..kd + (g + 1) * dk]);
            let v = &row[2 * kd + h * dv..2 * kd + (h + 1) * dv];
            let z = &pr[2 * kd + vd + h * dv..2 * kd + vd + (h + 1) * dv];
            let xb = pr[2 * kd + 2 * vd + h] as f64;
            let xa = pr[2 * kd + 2 * vd + vh + h] as f64 + dt[h] as f64;
            let softplus = if xa > 20.0 { xa } else { xa.exp().ln_1p() };
            let decay = (a[h] as f64 * softplus).exp();
            let beta = 1.0 / (1.0 + (-xb).exp());
            let scale = 1.0 / (dk as f64).sqrt();
            let sh = &mut st[h * dk * dv..(h + 1) * dk * dv];
            sh.iter_mut().for_each(|x| *x *= decay);
            let mut o = vec![0f64; dv];
            for j in 0..dv {
                let kv: f64 = (0..dk).map(|d| sh[d * dv + j] * k[d]).sum();
                let delta = (v[j] as f64 - kv) * beta;
                for d in 0..dk {
                    sh[d * dv + j] += k[d] * delta;
                }
                o[j] = (0..dk).map(|d| sh[d * dv + j] * q[d] * scale).sum();
            }
            let ms = o.iter().map(|x| x * x).sum::<f64>() / dv as f64;
            let inv = 1.0 / (ms + s.eps as f64).sqrt();
            for j in 0..dv {
                y[i * vd + h * dv + j] = (o[j] * inv * norm_w[j] as f64 * silu(z[j] as f64)) as f32;
            }
        }
    }
    (y, st.iter().map(|&v| v as f32).collect())
}
