//! CPU reference of the sampling family: Philox4x32-10, the token sampler with the semantics of
//! [`crate::kernels::sample::SamplerSettings`] (same f32 scalings and integer weights as the
//! shader, f64 for the log-probability) and the normal noise of `noise.wgsl`.

use crate::kernels::sample::{NON_FINITE_ID, SETTINGS_LEN};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Random123's `philox4x32`).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// Order-preserving key of an f32 (the shader's `key_of`).
fn key_of(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// NaN counts as -inf, as in the shader (a draw over non-finite logits is refused first).
fn clean(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// The result of one draw.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The chosen token id.
    pub id: u32,
    /// Its log-probability under the raw logits (f64 accumulation).
    pub logprob: f64,
    /// The `top_logprobs` (settings word 8) most likely ids under the raw logits, highest
    /// first and the lower index first on ties, with their log-probabilities.
    pub top: Vec<(u32, f64)>,
}

/// Samples one token exactly as `sample.wgsl` does (any NaN or infinite logit makes the draw
/// [`NON_FINITE_ID`] with the count of such logits as its `logprob`), given the settings words
/// ([`crate::kernels::sample::SamplerSettings::to_f32s`]), the history, the `constraint` input
/// (bitmask and logit biases, [`crate::kernels::sample::constraint_words`]; read only as the
/// settings say), the counter `c` and the seed. Writes the id into `history[c]` when
/// `c < history.len()`.
pub fn sample(
    logits: &[f32],
    settings: &[f32; SETTINGS_LEN],
    history: &mut [u32],
    constraint: &[u32],
    c: u32,
    seed: u32,
) -> Sampled {
    let v = logits.len();
    let bad = logits.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Sampled {
            id: NON_FINITE_ID,
            logprob: bad as f64,
            top: Vec::new(),
        };
    }
    let raw: Vec<f32> = logits.iter().map(|&x| clean(x)).collect();
    let greedy = settings[0].is_nan() || settings[0] <= 0.0;
    let scale = if greedy { 1.0 } else { settings[6] };
    let (r, inv_r) = (settings[4], settings[7]);
    let base = v.div_ceil(32);
    let allowed = |i: usize| settings[9] == 0.0 || (constraint[i / 32] >> (i % 32)) & 1 != 0;
    let sampled = |i: usize, x: f32| {
        if allowed(i) {
            x * scale
        } else {
            f32::NEG_INFINITY
        }
    };
    let mut biased = raw.clone();
    for pair in constraint[base..]
        .chunks_exact(2)
        .take(settings[10].max(0.0) as usize)
    {
        biased[pair[0] as usize] += f32::from_bits(pair[1]);
    }
    let mut s: Vec<f32> = biased
        .iter()
        .enumerate()
        .map(|(i, &x)| sampled(i, x))
        .collect();
    let win = settings[5].max(0.0) as u32;
    let (lo, hi) = (c - c.min(win), c.min(history.len() as u32));
    for j in lo..hi {
        let id = history[j as usize] as usize;
        if id < v {
            let x = biased[id];
            s[id] = sampled(id, if x > 0.0 { x * inv_r } else { x * r });
        }
    }
    let keys: Vec<u32> = s.iter().map(|&x| key_of(x)).collect();
    let kmax = keys.iter().copied().max().unwrap_or(0);

    let id = if greedy {
        keys.iter().position(|&k| k == kmax).unwrap_or(0)
    } else {
        let k = settings[1].max(0.0) as usize;
        let tk = if k > 0 && k < v {
            let mut sorted = keys.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            sorted[k - 1]
        } else {
            0
        };
        let m = s[keys.iter().position(|&k| k == kmax).unwrap_or(0)];
        let w: Vec<u64> = s
            .iter()
            .map(|&x| {
                if x == f32::NEG_INFINITY {
                    0
                } else {
                    ((x - m).exp().min(1.0) * 2f32.powi(31)) as u64
                }
            })
            .collect();
        let mass_k: u64 = (0..v).filter(|&i| keys[i] >= tk).map(|i| w[i]).sum();
        let mut t = tk;
        if settings[2] < 1.0 {
            let pf = (settings[2].max(0.0) as f64 * 2f64.powi(32)) as u128;
            let need = ((pf * mass_k as u128).div_ceil(1 << 32) as u64).max(1);
            // The highest cut whose mass reaches `need`: walk the distinct keys downwards.
            let mut order: Vec<usize> = (0..v).filter(|&i| keys[i] >= tk).collect();
            order.sort_unstable_by(|&a, &b| keys[b].cmp(&keys[a]));
            let mut acc = 0u64;
            for (n, &i) in order.iter().enumerate() {
                acc += w[i];
                let last_of_key = order.get(n + 1).is_none_or(|&j| keys[j] != keys[i]);
                if last_of_key && acc >= need {
                    t = keys[i];
                    break;
                }
            }
        }
        let mp = (settings[3].clamp(0.0, 1.0) as f64 * 2f64.powi(31)).ceil() as u64;
        let kept = |i: usize| keys[i] >= t && w[i] >= mp;
        let total: u64 = (0..v).filter(|&i| kept(i)).map(|i| w[i]).sum();
        let u = philox4x32_10([c, 0, 1, 0], [seed, 0])[0];
        let target = ((u as u128 * total as u128) >> 32) as u64;
        let mut run = 0u64;
        (0..v)
            .find(|&i| {
                if kept(i) {
                    run += w[i];
                }
                run > target
            })
            .unwrap_or(v - 1)
    };

    if (c as usize) < history.len() {
        history[c as usize] = id as u32;
    }
    let mx = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = raw.iter().map(|&x| (x as f64 - mx).exp()).sum();
    let logprob = |i: usize| raw[i] as f64 - mx - z.ln();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(key_of(raw[i])), i));
    let n = (settings[8].max(0.0) as usize).min(crate::kernels::sample::TOP_LOGPROBS_MAX);
    Sampled {
        id: id as u32,
        logprob: logprob(id),
        top: order
            .into_iter()
            .take(n)
            .map(|i| (i as u32, logprob(i)))
            .collect(),
    }
}

/// The uniform in (0, 1] the noise kernel derives from a Philox word (top 24 bits, exact).
pub fn unit_open0(x: u32) -> f64 {
    ((x >> 8) as f64 + 1.0) / (1u64 << 24) as f64
}

/// Standard normal noise of `noise.wgsl`: element `i` from Philox counter `(i / 4, stream, 0, 0)`,
/// key `(seed, 0)`, Box-Muller on `(u0, u1)` and `(u2, u3)` with angle `pi (2 u - 1)`; in f64.
pub fn randn(n: usize, seed: u32, stream: u32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    for t in 0..n.div_ceil(4) {
        let x = philox4x32_10([t as u32, stream, 0, 0], [seed, 0]);
        for pair in [(x[0], x[1]), (x[2], x[3])] {
            let r = (-2.0 * unit_open0(pair.0).ln()).sqrt();
            let a = std::f64::consts::PI * (2.0 * unit_open0(pair.1) - 1.0);
            out.push((r * a.cos()) as f32);
            out.push((r * a.sin()) as f32);
        }
    }
    out.truncate(n);
    out
}
