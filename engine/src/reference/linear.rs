//! CPU references of the linear family.

/// `y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n])`, f64 accumulation. `w` is already dequantized.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for t in 0..k {
                s += x[i * k + t] as f64 * w[j * k + t] as f64;
            }
            y[i * n + j] = (s + bias.map_or(0.0, |b| b[j] as f64)) as f32;
        }
    }
    y
}

/// Batched `y[b, m, n] = sum_k x[b, m, k] w[b, n, k]`.
pub fn batched_linear(x: &[f32], w: &[f32], b: usize, m: usize, n: usize, k: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|i| {
            linear(
                &x[i * m * k..(i + 1) * m * k],
                &w[i * n * k..(i + 1) * n * k],
                None,
                m,
                n,
                k,
            )
        })
        .collect()
}

/// Rows of `table` (`[v, d]`, dequantized) at `ids`; ids past the table give zeros.
pub fn gather(table: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
    let v = table.len() / d.max(1);
    ids.iter()
        .flat_map(|&i| {
            if (i as usize) < v {
                table[i as usize * d..(i as usize + 1) * d].to_vec()
            } else {
                vec![0.0; d]
            }
        })
        .collect()
}
