//! `kiln bench kernels`: each kernel's rate next to the copy bandwidth measured in the same run.

use super::common::{random_bytes, random_f32, time};
use anyhow::Result;
use kiln::kernels::sample::{constraint_words, SamplerSettings, SETTINGS_LEN};
use kiln::{CompileOptions, DType, Dyn, Gpu, Graph, Tensor};
use std::sync::Arc;

/// Copies of the measured op in one graph (one submit), so per-submit overhead is amortized.
const REPS: usize = 8;

struct Row {
    name: String,
    rate: String,
    ms: f64,
    bytes: f64,
}

/// Weight bytes in file layout with small scales, so results stay finite.
fn weight_bytes(dtype: DType, rows: usize, k: usize) -> Vec<u8> {
    let n = rows * k;
    let mut b = random_bytes(dtype.file_bytes(n).unwrap_or(0), 7);
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let bb = dtype.block_bytes();
    if !dtype.is_quantized() {
        return kiln::dtype::encode_plain(dtype, &random_f32(n, 3)).unwrap_or_default();
    }
    // Random quants; every f16 scale (and min) field small.
    for blk in b.chunks_mut(bb) {
        for &o in dtype.scale_offsets() {
            blk[o..o + 2].copy_from_slice(&scale);
        }
    }
    b
}

fn compile(gpu: &Arc<Gpu>, g: &Graph) -> Result<kiln::Plan> {
    Ok(pollster::block_on(
        g.compile(gpu, CompileOptions::default()),
    )?)
}

/// `kiln bench kernels`: kernel rates next to the measured copy bandwidth.
pub fn kernels(quick: bool) -> Result<()> {
    let gpu = crate::gpu()?;
    println!("adapter: {}", gpu.describe());
    let iters = if quick { 1 } else { 10 };
    let mut rows: Vec<Row> = Vec::new();

    // Memory copy: 64 MiB through the copy kernel (read + write).
    let n = 16 << 20;
    let dst = Arc::new(Tensor::zeros(&gpu, "dst", &[n], DType::F32)?);
    let mut g = Graph::new();
    let src = g.input("src", &[n], DType::F32)?;
    let d = g.tensor(&dst);
    for _ in 0..REPS {
        g.copy_into(src, d, Dyn::Static(0))?;
    }
    let ms = time(&gpu, &compile(&gpu, &g)?, iters)? / REPS as f64;
    let copy_gbs = 2.0 * n as f64 * 4.0 / ms / 1e6;
    rows.push(Row {
        name: "memory copy 64 MiB".into(),
        rate: format!("{copy_gbs:.1} GB/s"),
        ms,
        bytes: 2.0 * n as f64 * 4.0,
    });

    // GEMM 1024^3, f32, f16 and Q4_K weights.
    let s = 1024;
    for dt in [DType::F32, DType::F16, DType::Q4_K] {
        let w = Arc::new(Tensor::upload(
            &gpu,
            "w",
            &[s, s],
            dt,
            &weight_bytes(dt, s, s),
        )?);
        let mut g = Graph::new();
        let x = g.input("x", &[s, s], DType::F32)?;
        let wv = g.tensor(&w);
        for _ in 0..REPS {
            g.linear(x, wv, None)?;
        }
        let ms = time(&gpu, &compile(&gpu, &g)?, iters)? / REPS as f64;
        let flops = 2.0 * (s * s * s) as f64;
        let bytes = (s * s * 4 * 2) as f64 + (dt.row_words(s) * s * 4) as f64;
        rows.push(Row {
            name: format!("GEMM 1024^3, {dt} weights"),
            rate: format!("{:.1} GFLOP/s", flops / ms / 1e6),
            ms,
            bytes,
        });
    }

    // Decode matvec 4096 x 4096.
    let (nn, k) = (4096, 4096);
    for dt in [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_K] {
        let w = Arc::new(Tensor::upload(
            &gpu,
            "w",
            &[nn, k],
            dt,
            &weight_bytes(dt, nn, k),
        )?);
        let mut g = Graph::new();
        let x = g.input("x", &[1, k], DType::F32)?;
        let wv = g.tensor(&w);
        for _ in 0..REPS {
            g.linear(x, wv, None)?;
        }
        let ms = time(&gpu, &compile(&gpu, &g)?, iters * 5)? / REPS as f64;
        let bytes = (dt.row_words(k) * nn * 4) as f64;
        rows.push(Row {
            name: format!("matvec 4096x4096 {dt}"),
            rate: format!("{:.1} GB/s", bytes / ms / 1e6),
            ms,
            bytes,
        });
    }

    // Decode attention: 32 heads (8 kv heads) of 128 over a 2048-token cache.
    let (heads, kvh, hd, kv) = (32, 8, 128, 2048);
    let cache = Arc::new(Tensor::from_f32(
        &gpu,
        "k",
        &[1, kv, kvh * hd],
        &random_f32(kv * kvh * hd, 5),
    )?);
    let mut g = Graph::new();
    let q = g.input("q", &[1, 1, heads * hd], DType::F32)?;
    let kc = g.tensor(&cache);
    let pos = g.scalar("pos")?;
    for _ in 0..REPS {
        g.attention(
            q,
            kc,
            kc,
            heads,
            kvh,
            true,
            Dyn::slot(pos),
            Dyn::affine(pos, 1, 1),
        )?;
    }
    let mut plan = compile(&gpu, &g)?;
    plan.set(pos, (kv - 1) as u32);
    let ms = time(&gpu, &plan, iters * 5)? / REPS as f64;
    let bytes = (2 * kv * kvh * hd * 4) as f64;
    rows.push(Row {
        name: "decode attention, KV 2048, 32/8 heads x 128".into(),
        rate: format!("{:.3} ms", ms),
        ms,
        bytes,
    });

    // Prefill attention (an LLM's causal prompt, and a U-Net's self-attention at 32 x 32
    // latents): FLOPs of the score and value products, half of them masked when causal.
    let reps = if gpu.features.software { 1 } else { REPS };
    for (name, lq, heads, kvh, hd, causal) in [
        (
            "prefill attention, 512 tokens causal, 32/8 heads x 128",
            512,
            32,
            8,
            128,
            true,
        ),
        (
            "U-Net self-attention, 1024 tokens, 8 heads x 40",
            1024,
            8,
            8,
            40,
            false,
        ),
    ] {
        let mut g = Graph::new();
        let q = g.input("q", &[1, lq, heads * hd], DType::F32)?;
        let k = g.input("k", &[1, lq, kvh * hd], DType::F32)?;
        let len = Dyn::Static(lq as u32);
        for _ in 0..reps {
            g.attention(q, k, k, heads, kvh, causal, Dyn::Static(0), len)?;
        }
        let plan = compile(&gpu, &g)?;
        plan.write_f32(q, &random_f32(lq * heads * hd, 6))?;
        plan.write_f32(k, &random_f32(lq * kvh * hd, 7))?;
        let ms = time(&gpu, &plan, iters)? / reps as f64;
        let flops = 4.0 * (lq * lq * hd * heads) as f64 / if causal { 2.0 } else { 1.0 };
        rows.push(Row {
            name: name.into(),
            rate: format!("{:.1} GFLOP/s", flops / ms / 1e6),
            ms,
            bytes: (4 * lq * (heads + kvh) * hd * 4) as f64,
        });
    }

    // 3x3 convolution 64 -> 64 channels on 64 x 64.
    let (c, hw) = (64, 64);
    let w = Arc::new(Tensor::upload(
        &gpu,
        "w",
        &[c, c, 3, 3],
        DType::F16,
        &weight_bytes(DType::F16, c, c * 9),
    )?);
    let mut g = Graph::new();
    let x = g.input("x", &[1, c, hw, hw], DType::F32)?;
    let wv = g.tensor(&w);
    for _ in 0..REPS {
        g.conv2d(x, wv, None, 1, 1)?;
    }
    let ms = time(&gpu, &compile(&gpu, &g)?, iters)? / REPS as f64;
    let flops = 2.0 * (c * c * 9 * hw * hw) as f64;
    let bytes = (2 * c * hw * hw * 4 + c * c * 9 * 2) as f64;
    rows.push(Row {
        name: "conv 3x3 64->64, 64x64, f16 weights".into(),
        rate: format!("{:.1} GFLOP/s", flops / ms / 1e6),
        ms,
        bytes,
    });

    // The sampler over a 262k vocabulary (Gemma 3's), greedy and with top-k/top-p.
    let v = 262_144;
    for (what, st) in [
        ("greedy", SamplerSettings::greedy()),
        (
            "T 0.8, top-k 40, top-p 0.95",
            SamplerSettings {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                ..SamplerSettings::neutral()
            },
        ),
    ] {
        let hist = Arc::new(Tensor::from_u32(&gpu, "history", &[64], &[0; 64])?);
        let mut g = Graph::new();
        let logits = g.input("logits", &[v], DType::F32)?;
        let settings = g.input("settings", &[SETTINGS_LEN], DType::F32)?;
        let h = g.tensor(&hist);
        let constraint = g.input("constraint", &[constraint_words(v)], DType::U32)?;
        for r in 0..REPS {
            g.sample(
                logits,
                settings,
                h,
                constraint,
                Dyn::Static(r as u32),
                Dyn::Static(1),
            )?;
        }
        let plan = compile(&gpu, &g)?;
        let spread: Vec<f32> = random_f32(v, 9).iter().map(|x| x * 20.0).collect();
        plan.write_f32(logits, &spread)?;
        plan.write_f32(settings, &st.to_f32s())?;
        let ms = time(&gpu, &plan, iters * 5)? / REPS as f64;
        rows.push(Row {
            name: format!("sampler V=262144, {what}"),
            rate: format!("{:.3} ms", ms),
            ms,
            bytes: (v * 4) as f64,
        });
    }

    println!();
    println!("| kernel | rate | ms | fraction of copy bandwidth |");
    println!("|---|---|---|---|");
    for r in &rows {
        let frac = r.bytes / r.ms / 1e6 / copy_gbs;
        println!("| {} | {} | {:.3} | {:.2} |", r.name, r.rate, r.ms, frac);
    }
    println!();
    println!("fraction = minimal bytes the kernel must move / time, over the measured copy bandwidth ({copy_gbs:.1} GB/s).");
    Ok(())
}
