//! CPU reference of mixture-of-experts routing (`kernels::moe`), as transformers' Gemma 4 and
//! Qwen MoE routers compute it (softmax, top-k, renormalized, scaled), in f64.

/// Per row of `logits` `[rows, experts]`: the `k` most probable experts (ties to the lower
/// index) and their weights (probabilities, renormalized over the k when `renorm`, times
/// `scale[expert]`), the most probable first.
pub fn route(
    logits: &[f32],
    experts: usize,
    k: usize,
    renorm: bool,
    scale: &[f32],
) -> Vec<Vec<(u32, f32)>> {
    logits
        .chunks(experts)
        .map(|row| {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let total: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top = &order[..k];
            let p = |e: usize| (row[e] as f64 - m).exp() / total;
            let sum: f64 = top.iter().map(|&e| p(e)).sum();
            top.iter()
                .map(|&e| {
                    let w = if renorm { p(e) / sum } else { p(e) };
                    (e as u32, (w * scale[e] as f64) as f32)
                })
                .collect()
        })
        .collect()
}
