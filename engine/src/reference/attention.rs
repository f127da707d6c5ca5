//! CPU reference of attention (f64 scores, softmax and sums).

/// Shapes and masking of one attention call (see `Graph::attention`).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Batch size.
    pub batch: usize,
    /// Queries per batch.
    pub lq: usize,
    /// Key rows per batch (a cache's capacity).
    pub lk: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Head dimension.
    pub d: usize,
    /// Mask keys past each query's position.
    pub causal: bool,
    /// Score scale, usually `1 / sqrt(d)`.
    pub scale: f32,
    /// Position of query 0 (causal masking: query `i` sees keys `j <= q_pos + i`).
    pub q_pos: usize,
    /// Valid keys: `j < min(kv_len, lk)`.
    pub kv_len: usize,
    /// Sliding window (0: none): query `i` sees only keys `j > q_pos + i - window`, and when
    /// not causal also `j < q_pos + i + window` (a bidirectional window).
    pub window: usize,
    /// Score soft-cap (0: none): each scaled score `s` becomes `softcap * tanh(s / softcap)`.
    pub softcap: f32,
}

/// Attention: q `[batch, lq, heads*d]`, k and v `[batch, lk, kv_heads*d]`, output
/// `[batch, lq, heads*d]`; head `h` reads kv head `h / (heads / kv_heads)`. A query with no
/// valid key outputs zeros.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> Vec<f32> {
    let (d, g) = (s.d, s.heads / s.kv_heads);
    let (qw, kw) = (s.heads * d, s.kv_heads * d);
    let kv_end = s.kv_len.min(s.lk);
    let mut out = vec![0f32; s.batch * s.lq * qw];
    for b in 0..s.batch {
        for i in 0..s.lq {
            // Causal: keys up to the query; a bidirectional window (not causal, W > 0): the
            // keys within W on either side, |q - j| < W.
            let end = if s.causal {
                kv_end.min(s.q_pos + i + 1)
            } else if s.window > 0 {
                kv_end.min(s.q_pos + i + s.window)
            } else {
                kv_end
            };
            let start = if s.window > 0 {
                (s.q_pos + i + 1).saturating_sub(s.window).min(end)
            } else {
                0
            };
            for h in 0..s.heads {
                let hk = h / g;
                let qo = (b * s.lq + i) * qw + h * d;
                let qv = &q[qo..qo + d];
                let krow = |j: usize| (b * s.lk + j) * kw + hk * d;
                let scores: Vec<f64> = (start..end)
                    .map(|j| {
                        let kr = &k[krow(j)..krow(j) + d];
                        let x = s.scale as f64
                            * qv.iter()
                                .zip(kr)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>();
                        if s.softcap > 0.0 {
                            let c = s.softcap as f64;
                            c * (x / c).tanh()
                        } else {
                            x
                        }
                    })
                    .collect();
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (c, o) in out[qo..qo + d].iter_mut().enumerate() {
                    let acc: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, &w)| w * v[krow(start + j) + c] as f64)
                        .sum();
                    *o = if end == start {
                        0.0
                    } else {
                        (acc / sum) as f32
                    };
                }
            }
        }
    }
    out
}
