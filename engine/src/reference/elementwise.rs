//! CPU references of the elementwise family and rotary embeddings (f64 math).

/// SiLU.
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// GELU with the exact erf.
pub fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// GELU, tanh approximation.
pub fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + (0.7978845608028654 * (x + 0.044715 * x * x * x)).tanh())
}

/// ReLU.
pub fn relu(x: f64) -> f64 {
    x.max(0.0)
}

/// The logistic sigmoid.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// CLIP's quick GELU.
pub fn quick_gelu(x: f64) -> f64 {
    x / (1.0 + (-1.702 * x).exp())
}

/// erf to ~1e-15 (series for small |x|, continued fraction for large).
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // Maclaurin series: 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let x2 = a * a;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), accurate for a >= 2.5.
        let mut f = a;
        let (mut c, mut d) = (a, 0.0);
        for k in 1..200 {
            let an = k as f64 / 2.0;
            d = a + an * d;
            d = 1.0 / d;
            c = a + an / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    };
    r.copysign(x)
}

/// Broadcast binary op over numpy-broadcast shapes.
pub fn broadcast_binary(
    a: &[f32],
    sa: &[usize],
    b: &[f32],
    sb: &[usize],
    f: impl Fn(f64, f64) -> f64,
) -> (Vec<f32>, Vec<usize>) {
    let n = sa.len().max(sb.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, n - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (pa, pb) = (pad(sa), pad(sb));
    let out: Vec<usize> = pa.iter().zip(&pb).map(|(x, y)| *x.max(y)).collect();
    let total: usize = out.iter().product();
    let idx = |shape: &[usize], coord: &[usize]| {
        coord
            .iter()
            .zip(shape)
            .fold(0, |acc, (c, d)| acc * d + if *d == 1 { 0 } else { *c })
    };
    let mut y = Vec::with_capacity(total);
    let mut coord = vec![0; n];
    for _ in 0..total {
        y.push(f(a[idx(&pa, &coord)] as f64, b[idx(&pb, &coord)] as f64) as f32);
        for d in (0..n).rev() {
            coord[d] += 1;
            if coord[d] < out[d] {
                break;
            }
            coord[d] = 0;
        }
    }
    (y, out)
}

/// diffusers' `get_timestep_embedding` (argument formed in f32 as torch does).
pub fn timestep_embedding(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f32,
    max_period: f32,
) -> Vec<f32> {
    let half = dim / 2;
    let mut y = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let args: Vec<f64> = (0..half)
            .map(|j| {
                let freq = (-(max_period.ln()) * j as f32 / (half as f32 - shift)).exp();
                (tv * freq) as f64
            })
            .collect();
        let (s, c): (Vec<f32>, Vec<f32>) = args
            .iter()
            .map(|a| (a.sin() as f32, a.cos() as f32))
            .unzip();
        if flip_sin_to_cos {
            y.extend(c.iter().chain(&s));
        } else {
            y.extend(s.iter().chain(&c));
        }
    }
    y
}

/// Rotary embedding of `x` `[rows, heads*d]`, row `r` at position `pos + r % seq`.
pub fn rope(
    x: &[f32],
    seq: usize,
    heads: usize,
    d: usize,
    inv_freq: &[f32],
    interleaved: bool,
    pos: u32,
) -> Vec<f32> {
    let half = inv_freq.len();
    let mut y = x.to_vec();
    for (r, row) in x.chunks(heads * d).enumerate() {
        let p = (pos + (r % seq) as u32) as f32;
        for h in 0..heads {
            let base = r * heads * d + h * d;
            for i in 0..half {
                let a = (p * inv_freq[i]) as f64;
                let (s, c) = a.sin_cos();
                let (i0, i1) = if interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (row[h * d + i0] as f64, row[h * d + i1] as f64);
                y[base + i0] = (x0 * c - x1 * s) as f32;
                y[base + i1] = (x1 * c + x0 * s) as f32;
            }
        }
    }
    y
}

/// Nearest 2x upsampling of `[bc, h, w]`.
pub fn upsample2x(x: &[f32], bc: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0f32; bc * 4 * h * w];
    for c in 0..bc {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                y[(c * 2 * h + oy) * 2 * w + ox] = x[(c * h + oy / 2) * w + ox / 2];
            }
        }
    }
    y
}

/// Concatenation along `axis` of two row-major tensors.
pub fn concat(a: &[f32], sa: &[usize], b: &[f32], axis: usize) -> Vec<f32> {
    let outer: usize = sa[..axis].iter().product();
    let (ra, rb) = (a.len() / outer.max(1), b.len() / outer.max(1));
    (0..outer)
        .flat_map(|o| {
            a[o * ra..(o + 1) * ra]
                .iter()
                .chain(&b[o * rb..(o + 1) * rb])
                .copied()
                .collect::<Vec<_>>()
        })
        .collect()
}
