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

/// A mixture-of-experts layer's experts, in f64: per row of `x` `[rows, k]`, with its `routes`
/// (`(expert, weight)` per choice, as [`route`] gives them), `sum_j weight_j down_e
/// (act(gate_e x) * up_e x)` for `gate_up` `[experts, 2 n, k]` (gate rows first) and `down`
/// `[experts, h, n]`. `act` maps f64 to f64.
pub fn experts(
    x: &[f32],
    routes: &[Vec<(u32, f32)>],
    gate_up: &[f32],
    down: &[f32],
    (n, k, h): (usize, usize, usize),
    act: impl Fn(f64) -> f64,
) -> Vec<f32> {
    let dot = |a: &[f32], b: &[f64]| a.iter().zip(b).map(|(&p, &q)| p as f64 * q).sum::<f64>();
    let mut out = Vec::with_capacity(routes.len() * h);
    for (r, row) in routes.iter().enumerate() {
        let xr: Vec<f64> = x[r * k..(r + 1) * k].iter().map(|&v| v as f64).collect();
        let mut acc = vec![0f64; h];
        for &(e, w) in row {
            let gu = &gate_up[e as usize * 2 * n * k..(e as usize + 1) * 2 * n * k];
            let m: Vec<f64> = (0..n)
                .map(|i| {
                    act(dot(&gu[i * k..(i + 1) * k], &xr))
                        * dot(&gu[(n + i) * k..(n + i + 1) * k], &xr)
                })
                .collect();
            let d = &down[e as usize * h * n..(e as usize + 1) * h * n];
            for (c, a) in acc.iter_mut().enumerate() {
                *a += w as f64 * dot(&d[c * n..(c + 1) * n], &m);
            }
        }
        out.extend(acc.iter().map(|&v| v as f32));
    }
    out
}
