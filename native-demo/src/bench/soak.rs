//! `kiln bench soak`: many generations in one process on the embedded default models (10 000
//! text tokens over many contexts, then 200 images), sampling resident memory and the GPU
//! allocations the engine holds after each batch. A leak shows as growth between samples; the
//! first sample comes after a warm-up (pipelines compiled, allocator pools filled).

use anyhow::Result;
use kiln::diffusion::models::SdModels;
use kiln::diffusion::pipeline::ImageOptions;
use kiln::llm::{GenerateOptions, LoadOptions, TextModel};
use kiln::Gpu;
use serde_json::json;
use std::sync::Arc;

/// Resident memory of this process in MiB (Linux; 0 elsewhere).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One sample: work done so far, resident memory, live GPU buffers and their bytes.
fn sample(gpu: &Gpu, what: &str, done: usize) -> serde_json::Value {
    gpu.device.poll(wgpu::PollType::wait_indefinitely()).ok();
    let c = gpu.device.get_internal_counters();
    json!({
        "what": what, "done": done, "rss_mib": (rss_mib() * 10.0).round() / 10.0,
        "gpu_buffers": c.hal.buffers.read(), "gpu_buffer_mib": (c.hal.buffer_memory.read() as f64 / 1048576.0 * 10.0).round() / 10.0,
    })
}

/// Runs the soak: `tokens` generated tokens, then `images` images.
pub fn soak(tokens: usize, images: usize, as_json: bool) -> Result<()> {
    let gpu: Arc<Gpu> = crate::gpu()?;
    let mut samples = Vec::new();
    let show = |v: &serde_json::Value| {
        if !as_json {
            eprintln!(
                "{:>6} {:>7}  rss {:>7.1} MiB  gpu {:>5} buffers {:>8.1} MiB",
                v["what"].as_str().unwrap_or(""),
                v["done"],
                v["rss_mib"].as_f64().unwrap_or(0.0),
                v["gpu_buffers"],
                v["gpu_buffer_mib"].as_f64().unwrap_or(0.0)
            );
        }
    };
    let t0 = std::time::Instant::now();
    {
        let mut m = pollster::block_on(TextModel::load(
            &gpu,
            crate::defaults::text(),
            &LoadOptions::default(),
            &mut |_, _| {},
        ))?;
        let ctx = m.kv.ctx;
        // Long generations that run into the end of the context, from prompts that share no
        // prefix with the cache (so each starts a new context) or share one (a reuse).
        let prompts = [
            "In the beginning",
            "And the LORD said unto Moses",
            "Blessed are the",
            "In the beginning God",
        ];
        let (mut done, mut runs, mut next) = (0, 0, 0);
        while done < tokens {
            let prompt = m.tokenizer.encode_prompt(prompts[runs % prompts.len()])?;
            let opts = GenerateOptions {
                max_tokens: ctx,
                seed: runs as u32,
                ..Default::default()
            };
            let g = pollster::block_on(m.generate(&prompt, &opts, &mut |_| true))?;
            done += g.ids.len();
            runs += 1;
            if runs == 1 || done >= next {
                let s = sample(&gpu, "tokens", done);
                show(&s);
                samples.push(s);
                next = done + tokens / 10;
            }
        }
        let s = sample(&gpu, "tokens", done);
        show(&s);
        samples.push(s);
        if !as_json {
            eprintln!("({runs} generations of up to {ctx} tokens)");
        }
    }
    let text_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut sd = SdModels::load(&gpu, crate::defaults::image())?;
    for i in 0..images {
        let opts = ImageOptions {
            prompt: ["a red circle", "a blue square", "a green triangle"][i % 3].into(),
            steps: 4,
            seed: i as u32,
            ..Default::default()
        };
        pollster::block_on(sd.generate(&opts, &mut |_, _, _| false))?;
        if i == 0 || (i + 1) % (images / 10).max(1) == 0 {
            let s = sample(&gpu, "images", i + 1);
            show(&s);
            samples.push(s);
        }
    }
    let v = json!({
        "samples": samples, "text_seconds": text_s, "image_seconds": t1.elapsed().as_secs_f64(),
        "adapter": gpu.describe(),
    });
    if as_json {
        println!("{v}");
    } else {
        eprintln!(
            "text {text_s:.0} s, images {:.0} s on {}",
            t1.elapsed().as_secs_f64(),
            gpu.describe()
        );
    }
    Ok(())
}
