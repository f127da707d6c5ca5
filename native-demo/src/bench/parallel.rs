//! `kiln bench parallel`: one stream against four at once on parallel slots (forks of one model
//! sharing its weights, each with its own KV cache, on their own threads: what `kiln serve
//! --parallel 4` runs), aggregate decode tokens per second.

use anyhow::Result;
use kiln::llm::{GenerateOptions, LoadOptions, TextModel};
use serde_json::json;
use std::time::Instant;

/// Decode tokens per second of `models` generating `tokens` each at once (one thread each).
fn run(models: &mut [TextModel], prompt: &[u32], opts: &GenerateOptions) -> Result<f64> {
    let t0 = Instant::now();
    let n = std::thread::scope(|s| -> Result<usize> {
        let handles: Vec<_> = models
            .iter_mut()
            .map(|m| s.spawn(|| pollster::block_on(m.generate(prompt, opts, &mut |_| true))))
            .collect();
        let mut n = 0;
        for h in handles {
            let g = h.join().map_err(|_| anyhow::anyhow!("a slot panicked"))??;
            n += g.ids.len();
        }
        Ok(n)
    })?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

pub fn parallel(quick: bool, as_json: bool, model: Option<&str>) -> Result<()> {
    let gpu = crate::gpu()?;
    let (files, name) = crate::text_files(model)?;
    let base = pollster::block_on(TextModel::load(
        &gpu,
        files,
        &LoadOptions {
            ctx: 512,
            ..Default::default()
        },
        &mut |_, _| {},
    ))?;
    let tokens = if quick { 32 } else { 128 };
    let prompt = base.tokenizer.encode_prompt("And God said")?;
    // Every stream runs to its length: the end-of-text tokens are forbidden.
    let opts = GenerateOptions {
        max_tokens: tokens,
        logit_bias: base.config.eos.iter().map(|&e| (e, -100.0)).collect(),
        ..Default::default()
    };
    let mut slots = vec![base];
    for _ in 1..4 {
        let f = pollster::block_on(slots[0].fork())?;
        slots.push(f);
    }
    run(&mut slots[..1], &prompt, &opts)?; // warm-up
    let one = run(&mut slots[..1], &prompt, &opts)?;
    run(&mut slots, &prompt, &opts)?;
    let four = run(&mut slots, &prompt, &opts)?;
    if as_json {
        println!(
            "{}",
            json!({"model": name, "adapter": gpu.describe(), "tokens_per_stream": tokens,
                   "one_stream_tok_s": one, "four_streams_tok_s": four, "ratio": four / one})
        );
    } else {
        println!("parallel slots: {name} on {}", gpu.describe());
        println!("  1 stream:  {one:7.1} tok/s");
        println!(
            "  4 streams: {four:7.1} tok/s aggregate ({:.2}x)",
            four / one
        );
    }
    Ok(())
}
