//! A kernel-parity smoke test that runs in the browser: a few kernels on the GPU against the
//! engine's CPU references (`kiln::reference`), on random inputs whose sizes are not multiples
//! of the tiles. The full parity suite runs natively (`tests/`); this checks that the same
//! WGSL behaves on the browser's WebGPU implementation.

// The engine's graph takes tensors as `Arc`s; on wasm its GPU handles are not `Send` (there is
// one thread).
#![allow(clippy::arc_with_non_send_sync)]

use crate::device::{js_err, Device};
use kiln::graph::Graph;
use kiln::reference::{elementwise::rope, linear::linear, norm::rms_norm, norm::softmax};
use kiln::{CompileOptions, DType, Gpu, Tensor};
use serde_json::json;
use std::sync::Arc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// Deterministic uniform values in [-1, 1) (xorshift).
fn random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

use kiln::reference::rel_err;

/// Builds `x @ w^T` with x `[m, k]` and w `[n, k]` (uploaded in `dtype`), runs it, returns y.
async fn run_linear(
    gpu: &Arc<Gpu>,
    m: usize,
    n: usize,
    k: usize,
    f16: bool,
) -> kiln::Result<(Vec<f32>, Vec<f32>)> {
    let x = random(m * k, 1);
    let mut w = random(n * k, 2);
    let bytes: Vec<u8> = if f16 {
        // The reference sees the rounded weights, so only the kernel's arithmetic is compared.
        w.iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
        w.iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect()
    } else {
        w.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    let dtype = if f16 { DType::F16 } else { DType::F32 };
    let wt = Arc::new(Tensor::upload(gpu, "w", &[n, k], dtype, &bytes)?);
    let mut g = Graph::new();
    let xv = g.input("x", &[m, k], DType::F32)?;
    let wv = g.tensor(&wt);
    let y = g.linear(xv, wv, None)?;
    g.output(y);
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    plan.write_f32(xv, &x)?;
    let out = plan.run_read(&[y]).await?;
    Ok((bytemuck_f32(&out[0]), linear(&x, &w, None, m, n, k)))
}

async fn run_softmax(gpu: &Arc<Gpu>, rows: usize, d: usize) -> kiln::Result<(Vec<f32>, Vec<f32>)> {
    // Spread of +-8 so that the max subtraction matters.
    let x: Vec<f32> = random(rows * d, 3).iter().map(|v| v * 8.0).collect();
    let mut g = Graph::new();
    let xv = g.input("x", &[rows, d], DType::F32)?;
    let y = g.softmax(xv)?;
    g.output(y);
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    plan.write_f32(xv, &x)?;
    let out = plan.run_read(&[y]).await?;
    Ok((bytemuck_f32(&out[0]), softmax(&x, d)))
}

async fn run_rms_norm(gpu: &Arc<Gpu>, rows: usize, d: usize) -> kiln::Result<(Vec<f32>, Vec<f32>)> {
    let x = random(rows * d, 4);
    let w = random(d, 5);
    let wt = Arc::new(Tensor::from_f32(gpu, "w", &[d], &w)?);
    let mut g = Graph::new();
    let xv = g.input("x", &[rows, d], DType::F32)?;
    let wv = g.tensor(&wt);
    let y = g.rms_norm(xv, wv, 1e-5)?;
    g.output(y);
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    plan.write_f32(xv, &x)?;
    let out = plan.run_read(&[y]).await?;
    Ok((bytemuck_f32(&out[0]), rms_norm(&x, &w, 1e-5)))
}

/// A decode step's residual product, norm and next product (`[1, 64]` -> 96 -> 50): on GPU
/// kernels the norm runs in the second product's prologue from the first product's partial sums
/// of squares, with 16-byte weight loads where the storage-buffer limit allows.
async fn run_fused_norm(gpu: &Arc<Gpu>) -> kiln::Result<(Vec<f32>, Vec<f32>)> {
    let (k0, k, n) = (64, 96, 50);
    let (a, r, nw) = (random(k0, 10), random(k, 11), random(k, 12));
    let (w1, w2) = (random(k * k0, 13), random(n * k, 14));
    let w1t = Arc::new(Tensor::from_f32(gpu, "w1", &[k, k0], &w1)?);
    let w2t = Arc::new(Tensor::from_f32(gpu, "w2", &[n, k], &w2)?);
    let nwt = Arc::new(Tensor::from_f32(gpu, "nw", &[k], &nw)?);
    let mut g = Graph::new();
    let av = g.input("a", &[1, k0], DType::F32)?;
    let rv = g.input("r", &[1, k], DType::F32)?;
    let (w1v, w2v, nwv) = (g.tensor(&w1t), g.tensor(&w2t), g.tensor(&nwt));
    let h = g.linear_add(av, w1v, None, rv)?;
    let hn = g.rms_norm(h, nwv, 1e-5)?;
    let y = g.linear(hn, w2v, None)?;
    g.output(y);
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    plan.write_f32(av, &a)?;
    plan.write_f32(rv, &r)?;
    let out = plan.run_read(&[y]).await?;
    let hw: Vec<f32> = linear(&a, &w1, None, 1, k, k0)
        .iter()
        .zip(&r)
        .map(|(p, r)| p + r)
        .collect();
    let want = linear(&rms_norm(&hw, &nw, 1e-5), &w2, None, 1, n, k);
    Ok((bytemuck_f32(&out[0]), want))
}

async fn run_rope(
    gpu: &Arc<Gpu>,
    seq: usize,
    heads: usize,
    d: usize,
    pos: u32,
) -> kiln::Result<(Vec<f32>, Vec<f32>)> {
    let x = random(seq * heads * d, 6);
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / d as f32))
        .collect();
    let positions = pos as usize + seq;
    let it = Arc::new(Tensor::from_f32(
        gpu,
        "rope_table",
        &[positions, d / 2, 2],
        &kiln::kernels::rope::table(&inv, positions),
    )?);
    let mut g = Graph::new();
    let xv = g.input("x", &[1, seq, heads * d], DType::F32)?;
    let iv = g.tensor(&it);
    let y = g.rope(xv, iv, heads, false, kiln::Dyn::Static(pos))?;
    g.output(y);
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    plan.write_f32(xv, &x)?;
    let out = plan.run_read(&[y]).await?;
    Ok((
        bytemuck_f32(&out[0]),
        rope(&x, seq, heads, d, &inv, false, pos),
    ))
}

/// Causal attention of `lq` queries at the end of `lk` keys (GQA, `heads / kv_heads` query
/// heads per KV head): decode with `lq` = 1, a prefill (the FLASH variant on GPUs with
/// subgroups) with more. Where the FLASH tiles are f16, the reference sees the keys and values
/// rounded to f16 as the kernel holds them.
async fn run_attention(
    gpu: &Arc<Gpu>,
    lq: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    lk: usize,
) -> kiln::Result<(Vec<f32>, Vec<f32>)> {
    use kiln::reference::attention::{attention, AttnShape};
    let q: Vec<f32> = random(lq * heads * d, 7).iter().map(|v| v * 2.0).collect();
    let (mut k, mut v) = (random(lk * kv_heads * d, 8), random(lk * kv_heads * d, 9));
    let mut g = Graph::new();
    let qv = g.input("q", &[1, lq, heads * d], DType::F32)?;
    let kv = g.input("k", &[1, lk, kv_heads * d], DType::F32)?;
    let vv = g.input("v", &[1, lk, kv_heads * d], DType::F32)?;
    let pos = kiln::Dyn::Static((lk - lq) as u32);
    let y = g.attention(
        qv,
        kv,
        vv,
        heads,
        kv_heads,
        true,
        pos,
        kiln::Dyn::Static(lk as u32),
    )?;
    g.output(y);
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    plan.write_f32(qv, &q)?;
    plan.write_f32(kv, &k)?;
    plan.write_f32(vv, &v)?;
    let out = plan.run_read(&[y]).await?;
    if gpu.features.half_tiles && kiln::kernels::attention::flash_serves(gpu, lq, d) {
        for x in k.iter_mut().chain(v.iter_mut()) {
            *x = half::f16::from_f32(*x).to_f32();
        }
    }
    let s = AttnShape {
        batch: 1,
        lq,
        lk,
        heads,
        kv_heads,
        d,
        causal: true,
        scale: 1.0 / (d as f32).sqrt(),
        q_pos: lk - lq,
        kv_len: lk,
        window: 0,
        softcap: 0.0,
    };
    Ok((bytemuck_f32(&out[0]), attention(&q, &k, &v, &s)))
}

/// Draws over `v` ids with top-k/top-p/min-p, greedy and a penalty, several counters: the ids
/// (as f32, exact) and log-probabilities, against the CPU reference.
async fn run_sample(gpu: &Arc<Gpu>, v: usize) -> kiln::Result<(Vec<f32>, Vec<f32>)> {
    use kiln::kernels::sample::{constraint_words, SamplerSettings, SETTINGS_LEN};
    let logits: Vec<f32> = random(v, 11)
        .iter()
        .map(|x| (x * 12.0).round() * 0.5)
        .collect();
    let cap = 16;
    let mut g = Graph::new();
    let lv = g.input("logits", &[v], DType::F32)?;
    let sv = g.input("settings", &[SETTINGS_LEN], DType::F32)?;
    let hist = Arc::new(Tensor::from_u32(gpu, "history", &[cap], &vec![0; cap])?);
    let hv = g.tensor(&hist);
    let cv = g.input("constraint", &[constraint_words(v)], DType::U32)?;
    let counter = g.scalar("counter")?;
    let out = g.sample(
        lv,
        sv,
        hv,
        cv,
        kiln::Dyn::slot(counter),
        kiln::Dyn::Static(5),
    )?;
    g.output(out);
    let mut plan = g.compile(gpu, CompileOptions::default()).await?;
    plan.write_f32(lv, &logits)?;
    let base = SamplerSettings {
        temperature: 0.9,
        ..SamplerSettings::neutral()
    };
    let cases = [
        SamplerSettings::greedy(),
        SamplerSettings { top_k: 40, ..base },
        SamplerSettings { top_p: 0.8, ..base },
        SamplerSettings {
            top_k: 300,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.3,
            ..base
        },
    ];
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut history = vec![0u32; cap];
    for (c, st) in cases.iter().enumerate() {
        plan.write_f32(sv, &st.to_f32s())?;
        plan.set(counter, c as u32);
        let o = plan.run_read(&[out]).await?;
        let w: Vec<u32> = o[0]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        got.extend([w[0] as f32, f32::from_bits(w[1])]);
        let words = vec![0; constraint_words(v)];
        let r = kiln::reference::sample::sample(
            &logits,
            &st.to_f32s(),
            &mut history,
            &words,
            c as u32,
            5,
        );
        want.extend([r.id as f32, r.logprob as f32]);
    }
    Ok((got, want))
}

/// GPU output and CPU reference of one case.
type Outputs = kiln::Result<(Vec<f32>, Vec<f32>)>;

fn bytemuck_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[wasm_bindgen]
impl Device {
    /// Runs the kernel smoke test. Resolves to JSON: `[{ name, relErr, tol, ok }]`.
    #[wasm_bindgen(js_name = kernelParity)]
    pub fn kernel_parity(&self) -> js_sys::Promise {
        let gpu = self.gpu.clone();
        future_to_promise(async move {
            // Tolerances are relative to the largest reference value. The references accumulate
            // in f64; the kernels in f32, so the error grows with the reduction length (k <= 300
            // here: a few 1e-7 per term at worst); 1e-4 leaves room for a different summation
            // order (subgroups, tiles) without hiding a wrong index, which gives errors near 1.
            let mut report = Vec::new();
            let cases: Vec<(&str, Outputs, f64)> = vec![
                (
                    "gemm f32 37x70 @ 45x70",
                    run_linear(&gpu, 37, 45, 70, false).await,
                    1e-4,
                ),
                (
                    "matvec f32 1x300 @ 129x300",
                    run_linear(&gpu, 1, 129, 300, false).await,
                    1e-4,
                ),
                (
                    "matvec f16 1x256 @ 77x256 (packed, no shader-f16)",
                    run_linear(&gpu, 1, 77, 256, true).await,
                    1e-4,
                ),
                (
                    "gemm f16 9x96 @ 50x96",
                    run_linear(&gpu, 9, 50, 96, true).await,
                    1e-4,
                ),
                // The GEMM core's 128 x 128 tiles (64 workgroups and more); with f16 tiles the
                // operands are rounded to f16 (2^-11 relative each).
                (
                    "gemm f32 1030x24 @ 1030x24 (128 x 128 tiles)",
                    run_linear(&gpu, 1030, 1030, 24, false).await,
                    if gpu.features.half_tiles { 3e-3 } else { 1e-4 },
                ),
                // Rows that are not whole 16-byte units: with the software kernels, one row per
                // subgroup where the browser has subgroups (`enable subgroups;` in the source),
                // one per invocation without.
                (
                    "matvec f16 1x90 @ 77x90 (rows not of whole 16-byte units)",
                    run_linear(&gpu, 1, 77, 90, true).await,
                    1e-4,
                ),
                // Softmax-weighted sums of values in [-1, 1]: f32 rounding over 300 keys.
                (
                    "decode attention 8/2 heads x 64, 300 keys",
                    run_attention(&gpu, 1, 8, 2, 64, 300).await,
                    1e-5,
                ),
                (
                    if kiln::kernels::attention::flash_serves(&gpu, 70, 64) {
                        "prefill attention 70 queries, 4/2 heads x 64, 300 keys (FLASH)"
                    } else {
                        "prefill attention 70 queries, 4/2 heads x 64, 300 keys"
                    },
                    run_attention(&gpu, 70, 4, 2, 64, 300).await,
                    1e-5,
                ),
                // Ids exact (a wrong one is off by at least 1 in 5000: 2e-4 relative), the
                // log-probabilities to f32 rounding of log Z.
                (
                    "sampler, 5000 ids (5 chunks), greedy/top-k/top-p/min-p/penalty",
                    run_sample(&gpu, 5000).await,
                    1e-6,
                ),
                // exp/division in f32: a few ulp of the largest probability.
                ("softmax 7x333", run_softmax(&gpu, 7, 333).await, 1e-5),
                ("rms_norm 5x96", run_rms_norm(&gpu, 5, 96).await, 1e-5),
                // Two products of k <= 96 and a norm: f32 rounding, a few 1e-7 per term.
                (
                    "residual product, RMSNorm, product (fused, partial sums)",
                    run_fused_norm(&gpu).await,
                    1e-4,
                ),
                // cos/sin come from the CPU table, not the backend's sin/cos (which WGSL lets be
                // off by 2^-11; SwiftShader's were, 1.5e-4 here): only f32 rounding of
                // x0 * c - x1 * s is left, a few ulp.
                (
                    "rope 5 tokens x 2 heads x 64 at position 0",
                    run_rope(&gpu, 5, 2, 64, 0).await,
                    1e-6,
                ),
                (
                    "rope 5 tokens x 2 heads x 64 at position 300",
                    run_rope(&gpu, 5, 2, 64, 300).await,
                    1e-6,
                ),
            ];
            for (name, r, tol) in cases {
                let (got, want) = r.map_err(|e| js_err(format!("{name}: {e}")))?;
                let err = rel_err(&got, &want);
                report.push(json!({ "name": name, "relErr": err, "tol": tol, "ok": err <= tol, "n": want.len() }));
            }
            Ok(JsValue::from_str(
                &serde_json::Value::Array(report).to_string(),
            ))
        })
    }
}
