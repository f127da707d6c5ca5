//! `kiln bench grammar`: what a JSON-schema constraint costs per token, side by side with the
//! same requests unconstrained, on a model with a real tokenizer (its vocabulary is what the
//! mask covers): the mask's computation, decode rates (constrained decoding is serial: each
//! token's mask needs the token before it), and the first request's one-time setup.

use anyhow::Result;
use kiln::llm::{ChatRequest, LoadOptions, Prepared, TextModel};
use serde_json::json;

/// A form-filling schema of the kind apps send.
fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}
        },
        "required": ["name", "age", "email", "tags"],
        "additionalProperties": false
    })
}

/// `kiln bench grammar --model FILE`: runs `n` seeded chat requests with and without the
/// schema and prints per-token costs.
pub fn grammar(quick: bool, as_json: bool, model: Option<&str>) -> Result<()> {
    let gpu = crate::gpu()?;
    let (files, name) = crate::text_files(model)?;
    let mut m = pollster::block_on(TextModel::load(
        &gpu,
        files,
        &LoadOptions::default(),
        &mut |_, _| {},
    ))?;
    let runs = if quick { 2 } else { 6 };
    let request = |seed: u32, constrained: bool| -> Result<ChatRequest> {
        let mut r = json!({
            "messages": [{"role": "user", "content": "Make up a customer record as JSON."}],
            "max_tokens": 96, "seed": seed,
        });
        if constrained {
            r["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "customer", "schema": schema()}});
        }
        Ok(ChatRequest::from_json(&r.to_string())?)
    };
    let run = |req: &ChatRequest, m: &mut TextModel| -> Result<serde_json::Value> {
        let p = Prepared::chat(m, req, "bench")?;
        Ok(pollster::block_on(p.run(m, &mut |_| true))?)
    };
    // The first constrained request builds the model's token trie and lexer slices: its time
    // to first token against the later ones'.
    let first = run(&request(0, true)?, &mut m)?;
    let first_ms = first["kiln"]["timings"]["ttft_ms"].as_f64().unwrap_or(0.0);
    let mut rows = Vec::new();
    for constrained in [false, true] {
        let (mut tokens, mut decode_ms, mut mask_ms, mut valid, mut ttft) =
            (0u64, 0f64, 0f64, 0, 0f64);
        for seed in 1..=runs {
            m.reset_cache();
            let r = run(&request(seed, constrained)?, &mut m)?;
            let t = &r["kiln"]["timings"];
            let n = r["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            tokens += n;
            decode_ms += t["decode_ms"].as_f64().unwrap_or(0.0);
            ttft += t["ttft_ms"].as_f64().unwrap_or(0.0);
            mask_ms += t["mask_ms_per_token"].as_f64().unwrap_or(0.0) * n as f64;
            let text = r["choices"][0]["message"]["content"].as_str().unwrap_or("");
            valid += serde_json::from_str::<serde_json::Value>(text).is_ok() as u32;
        }
        rows.push(json!({
            "constrained": constrained, "runs": runs, "tokens": tokens,
            "decode_tok_s": tokens as f64 / (decode_ms / 1e3).max(1e-9),
            "mask_ms_per_token": mask_ms / tokens.max(1) as f64,
            "valid_json": valid, "ttft_ms": ttft / runs as f64,
        }));
    }
    let vocab = m.config.vocab;
    if as_json {
        println!(
            "{}",
            json!({"adapter": gpu.describe(), "model": name, "vocab": vocab, "first_request_ms": first_ms, "rows": rows})
        );
        return Ok(());
    }
    println!("adapter: {}", gpu.describe());
    println!("model: {name} (vocabulary {vocab}); {runs} seeded requests each, up to 96 tokens, from an empty cache; the first constrained request (which builds the token trie and lexer slices) took {first_ms:.0} ms to its first token\n");
    println!("| requests | tokens | time to first token | decode tok/s | mask ms/token | replies that parse as JSON |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} ms | {:.1} | {:.3} | {}/{} |",
            if r["constrained"] == true {
                "JSON schema"
            } else {
                "unconstrained"
            },
            r["tokens"],
            r["ttft_ms"].as_f64().unwrap_or(0.0),
            r["decode_tok_s"].as_f64().unwrap_or(0.0),
            r["mask_ms_per_token"].as_f64().unwrap_or(0.0),
            r["valid_json"],
            r["runs"]
        );
    }
    Ok(())
}
