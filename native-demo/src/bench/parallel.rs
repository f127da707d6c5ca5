//! `kiln bench parallel`: one stream against four at once on parallel slots (one model's slots,
//! each its own sequence of shared KV caches and its own thread, decoding together in one run
//! per token: what `kiln serve --parallel 4` runs), aggregate decode tokens per second.

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
    // Four slots decoding together (continuous batching: one run per token of each).
    let mut slots = pollster::block_on(base.into_slots(4))?;
    run(&mut slots[..1], &prompt, &opts)?; // warm-up
    let one = run(&mut slots[..1], &prompt, &opts)?;
    run(&mut slots, &prompt, &opts)?;
    let four = run(&mut slots, &prompt, &opts)?;
    // Where a four-token run's time goes (timestamp queries, one pass per dispatch).
    let profile = match slots[0].batch() {
        Some(b) => match pollster::block_on(b.profile(4, 64)) {
            Ok(p) => super::common::profile_rows(&p),
            Err(e) => json!(e.to_string()),
        },
        None => json!("the slots decode apart (the shared caches exceed one binding)"),
    };
    if as_json {
        println!(
            "{}",
            json!({"model": name, "adapter": gpu.describe(), "tokens_per_stream": tokens,
                   "one_stream_tok_s": one, "four_streams_tok_s": four, "ratio": four / one,
                   "profile_batch_of_4": profile})
        );
    } else {
        println!("parallel slots: {name} on {}", gpu.describe());
        println!("  1 stream:  {one:7.1} tok/s");
        println!(
            "  4 streams: {four:7.1} tok/s aggregate ({:.2}x)",
            four / one
        );
        if profile.is_array() {
            super::common::print_profile("a run of the four slots' tokens", &profile);
        }
    }
    Ok(())
}
