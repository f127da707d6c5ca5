//! CPU references of the normalization family (f64 statistics).

/// Row softmax over the last dimension `d`.
pub fn softmax(x: &[f32], d: usize) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|r| {
            let m = r.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |v| (v / s) as f32)
        })
        .collect()
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w` per row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|r| {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            r.iter()
                .zip(w)
                .map(move |(&v, &g)| (v as f64 * inv * g as f64) as f32)
        })
        .collect()
}

fn mean_inv_std(v: &[f32], eps: f32) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
    let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// LayerNorm per row with weight and bias.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|r| {
            let (mean, inv) = mean_inv_std(r, eps);
            (0..d).map(move |i| ((r[i] as f64 - mean) * inv * w[i] as f64 + b[i] as f64) as f32)
        })
        .collect()
}

/// GroupNorm over `[batch, c, spatial]` with per-channel affine, then SiLU if asked.
pub fn group_norm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    batch: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let c = w.len();
    let spatial = x.len() / (batch * c);
    let cpg = c / groups;
    let mut y = vec![0f32; x.len()];
    for bi in 0..batch {
        for g in 0..groups {
            let base = (bi * c + g * cpg) * spatial;
            let seg = &x[base..base + cpg * spatial];
            let (mean, inv) = mean_inv_std(seg, eps);
            for (i, &v) in seg.iter().enumerate() {
                let ch = g * cpg + i / spatial;
                let mut o = (v as f64 - mean) * inv * w[ch] as f64 + b[ch] as f64;
                if silu {
                    o /= 1.0 + (-o).exp();
                }
                y[base + i] = o as f32;
            }
        }
    }
    y
}
