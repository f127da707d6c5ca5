//! `kiln bench text`: a random-weight model with SmolLM2-135M's shapes, made here (no
//! download), in f16 and quantized to Q4_0 on load: prefill and decode speed, and what one
//! decode token costs in dispatches, submits, readback and objects created.

use anyhow::Result;
use kiln::kernels::sample::SamplerSettings;
use kiln::llm::{GenerateOptions, KvCacheType, LoadOptions, ModelFiles, Quantize, TextModel};
use serde_json::json;

const HIDDEN: usize = 576;
const INTER: usize = 1536;
const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;

/// A safetensors file of random f16 weights with SmolLM2-135M's names and shapes.
fn random_safetensors(seed: u64) -> Vec<u8> {
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
    ];
    for i in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        tensors.push((p("input_layernorm.weight"), vec![HIDDEN]));
        tensors.push((p("post_attention_layernorm.weight"), vec![HIDDEN]));
        tensors.push((p("self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN]));
        tensors.push((
            p("self_attn.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
        ));
        tensors.push((
            p("self_attn.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
        ));
        tensors.push((p("self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM]));
        tensors.push((p("mlp.gate_proj.weight"), vec![INTER, HIDDEN]));
        tensors.push((p("mlp.up_proj.weight"), vec![INTER, HIDDEN]));
        tensors.push((p("mlp.down_proj.weight"), vec![HIDDEN, INTER]));
    }
    super::common::random_f16_safetensors(&tensors, seed)
}

fn files() -> ModelFiles {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": true, "hidden_act": "silu"
    });
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..VOCAB).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
                           "pre_tokenizer": {"type": "Whitespace"}, "decoder": null, "added_tokens": [], "normalizer": null, "post_processor": null});
    let mut f = ModelFiles::new();
    f.insert("config.json".into(), config.to_string().into_bytes());
    f.insert("tokenizer.json".into(), tokenizer.to_string().into_bytes());
    f.insert("model.safetensors".into(), random_safetensors(42));
    f
}

/// Tokens per prefill run (the engine's default chunk).
fn m_chunk() -> usize {
    kiln::llm::generate::PREFILL_CHUNK
}

/// Runs the text benchmark: the random SmolLM2-135M-shaped model with f16 and Q4 weights, or
/// the model `model` names in its own weights.
pub fn text(quick: bool, as_json: bool, model: Option<&str>) -> Result<()> {
    let gpu = crate::gpu()?;
    let (prompt_len, decode_len) = if quick { (32, 16) } else { (128, 128) };
    let auto = KvCacheType::Auto;
    let (mut runs, model_name) = match model {
        None => (
            vec![
                ("f16".to_string(), files(), Quantize::None, auto),
                (
                    "q4_0 (quantized on load)".to_string(),
                    files(),
                    Quantize::Q4,
                    auto,
                ),
            ],
            "random weights, SmolLM2-135M shapes (30 layers, 576 hidden, 9/3 heads, vocab 49152)"
                .to_string(),
        ),
        Some(path) => {
            let (f, name) = crate::text_files(Some(path))?;
            (
                vec![("as stored".to_string(), f, Quantize::None, auto)],
                name,
            )
        }
    };
    // Where the cache is f32 by default (software adapters), the Q4_0 model with the f16
    // cache GPUs get too.
    if model.is_none() && !auto.is_f16(&gpu) {
        let f16 = KvCacheType::F16;
        runs.push(("q4_0, f16 KV cache".to_string(), files(), Quantize::Q4, f16));
    }
    let mut rows = Vec::new();
    for (label, files, q, kv_cache) in runs {
        let t0 = std::time::Instant::now();
        let mut m = pollster::block_on(TextModel::load(
            &gpu,
            files,
            &LoadOptions {
                ctx: 1024,
                quantize: q,
                kv_cache,
                ..Default::default()
            },
            &mut |_, _| {},
        ))?;
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        // Spread-out ids of the model's vocabulary (no tokenizer involved).
        let vocab = m.config.vocab as u32;
        let prompt: Vec<u32> = (0..prompt_len as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .collect();
        let opts = GenerateOptions {
            max_tokens: decode_len + 1,
            sampler: SamplerSettings::neutral(),
            seed: 1,
            stop: vec![],
            pipelined: true,
            grammar: None,
            logit_bias: vec![],
        };
        // Warm-up (first submits page in memory and driver state).
        pollster::block_on(m.generate(
            &prompt[..8],
            &GenerateOptions {
                max_tokens: 2,
                ..opts.clone()
            },
            &mut |_| true,
        ))?;
        // The decode loop serial (each token read back before the next run is submitted),
        // then pipelined (the default): same ids, different host waits.
        let serial = GenerateOptions {
            pipelined: false,
            ..opts.clone()
        };
        let gs = pollster::block_on(m.generate(&prompt, &serial, &mut |_| true))?;
        let g = pollster::block_on(m.generate(&prompt, &opts, &mut |_| true))?;
        let host = |t: &kiln::llm::generate::Timings| {
            json!({"encode_ms": t.encode_ms_per_token, "submit_ms": t.submit_ms_per_token,
                   "wait_ms": t.wait_ms_per_token, "decode_tok_s": t.decode_tok_s})
        };
        // Counters of single decode tokens, driven by hand.
        let steps = 16;
        let before = gpu.counters();
        for i in 0..steps {
            let d = &mut m.decode;
            let pos = (prompt_len + decode_len + i) as u32;
            d.plan.set(d.pos, pos);
            d.plan.set(d.next, pos + 1);
            pollster::block_on(d.plan.run_read_heads(&[(d.out, 8)]))?;
        }
        let c = gpu.counters() - before;
        // Where a decode token's GPU time goes (timestamp queries, where the adapter has them).
        let profile = match super::common::best_profile(&m.decode.plan, 5) {
            Ok(p) => super::common::profile_rows(&p),
            Err(_) => json!(null),
        };
        let profile_prefill = match super::common::best_profile(&m.prefill.plan, 2) {
            Ok(p) => super::common::profile_rows(&p),
            Err(_) => json!(null),
        };
        rows.push(json!({
            "traffic": traffic(&m),
            "profile_decode": profile,
            "profile_prefill": profile_prefill,
            "weights": label, "load_ms": load_ms,
            "prefill_tokens": prompt_len, "prefill_tok_s": g.timings.prefill_tok_s,
            "decode_tokens": g.ids.len().saturating_sub(1), "decode_tok_s": g.timings.decode_tok_s,
            "host_per_token": {"serial": host(&gs.timings), "pipelined": host(&g.timings),
                               "same_ids": gs.ids == g.ids},
            "per_token": {
                "dispatches": c.dispatches / steps as u64, "submits": c.submits as f64 / steps as f64,
                "readback_bytes": c.bytes_read_back / steps as u64, "upload_bytes": c.bytes_uploaded / steps as u64,
                "objects_created": c.objects_created() / steps as u64,
            }
        }));
    }
    if as_json {
        println!(
            "{}",
            json!({"adapter": gpu.describe(), "model": model_name, "rows": rows})
        );
        return Ok(());
    }
    println!("adapter: {}", gpu.describe());
    println!("model: {model_name}\n");
    println!("| weights | prefill tok/s ({prompt_len} tokens) | decode tok/s ({decode_len} tokens) | dispatches/token | submits/token | readback B/token | objects created/token |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let p = &r["per_token"];
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            r["weights"].as_str().unwrap_or(""),
            r["prefill_tok_s"].as_f64().unwrap_or(0.0),
            r["decode_tok_s"].as_f64().unwrap_or(0.0),
            p["dispatches"],
            p["submits"],
            p["readback_bytes"],
            p["objects_created"]
        );
    }
    println!("\nThe decode loop's host cost per token, serial (read each token back before submitting the next run) and pipelined (the default):\n");
    println!("| weights | loop | decode tok/s | encode ms | submit ms | wait ms | same ids |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let h = &r["host_per_token"];
        for mode in ["serial", "pipelined"] {
            let t = &h[mode];
            let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
            println!(
                "| {} | {mode} | {:.1} | {:.3} | {:.3} | {:.2} | {} |",
                r["weights"].as_str().unwrap_or(""),
                f("decode_tok_s"),
                f("encode_ms"),
                f("submit_ms"),
                f("wait_ms"),
                h["same_ids"]
            );
        }
    }
    print_traffic(&rows);
    for r in &rows {
        let w = r["weights"].as_str().unwrap_or("");
        super::common::print_profile(&format!("decode token, {w}"), &r["profile_decode"]);
        super::common::print_profile(
            &format!("prefill chunk of {} tokens, {w}", m_chunk()),
            &r["profile_prefill"],
        );
    }
    Ok(())
}

/// Positions the traffic accounting is printed at.
const TRAFFIC_AT: [usize; 2] = [128, 2048];

/// Bytes a decode token moves, from the decode plan's own accounting ([`kiln::graph::Traffic`]),
/// against the least it could: every weight as stored (a gathered table: its row), the live KV
/// cache at 2 bytes an element, every activation once. At each of [`TRAFFIC_AT`] live positions
/// (the caches' reads scale with the live rows; a token also writes one row of each).
fn traffic(m: &TextModel) -> serde_json::Value {
    let t = m.decode.plan.traffic;
    let cap = m.ctx() as f64;
    let at: Vec<_> = TRAFFIC_AT
        .iter()
        .map(|&pos| {
            let live = pos as f64 / cap;
            let row_bytes = t.cache_bytes as f64 / cap;
            let moved = t.weights_read as f64
                + t.cache_read as f64 * live
                + row_bytes
                + t.activations_moved as f64;
            let min = t.weights_needed as f64
                + 2.0 * t.cache_elems as f64 * live
                + 2.0 * t.cache_elems as f64 / cap
                + t.activations_once as f64;
            json!({"positions": pos, "moved_mb": moved / 1e6, "minimum_mb": min / 1e6, "ratio": moved / min})
        })
        .collect();
    json!({"kv_bytes_per_element": t.cache_bytes as f64 / t.cache_elems.max(1) as f64, "at": at,
           "weights_read": t.weights_read, "weights_needed": t.weights_needed,
           "activations_moved": t.activations_moved, "activations_once": t.activations_once,
           "cache_capacity_bytes": t.cache_bytes})
}

fn print_traffic(rows: &[serde_json::Value]) {
    println!("\nBytes a decode token moves (the decode plan's own accounting) against the least it could (weights as stored, the live KV cache at 2 bytes an element, activations once):\n");
    println!(
        "| weights | KV cache | positions | moved MB/token | minimum MB/token | moved / minimum |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let t = &r["traffic"];
        let kv = match t["kv_bytes_per_element"].as_f64() {
            Some(b) if b < 3.0 => "f16",
            _ => "f32",
        };
        for a in t["at"].as_array().into_iter().flatten() {
            let f = |k: &str| a[k].as_f64().unwrap_or(0.0);
            println!(
                "| {} | {kv} | {} | {:.2} | {:.2} | {:.3} |",
                r["weights"].as_str().unwrap_or(""),
                a["positions"],
                f("moved_mb"),
                f("minimum_mb"),
                f("ratio")
            );
        }
    }
}

/// `kiln bench chat`: a five-turn conversation through the engine's chat-completion core on the
/// same random model (a plain chat template added), with the KV cache reused across turns and
/// without: time to first token and tokens prefilled per turn, and whether the greedy replies
/// are the same.
pub fn chat(quick: bool, as_json: bool) -> Result<()> {
    use kiln::llm::{ChatRequest, Prepared};
    let gpu = crate::gpu()?;
    let (user_len, reply_len) = if quick { (24, 8) } else { (64, 32) };
    let mut f = files();
    f.insert(
        "tokenizer_config.json".into(),
        json!({"chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"})
            .to_string()
            .into_bytes(),
    );
    let load = || {
        pollster::block_on(TextModel::load(
            &gpu,
            f.clone(),
            &LoadOptions {
                ctx: 2048,
                ..Default::default()
            },
            &mut |_, _| {},
        ))
    };
    let (mut with, mut without) = (load()?, load()?);
    // Warm-up (first submits page in memory and driver state), then start from an empty cache.
    for m in [&mut with, &mut without] {
        let warm = ChatRequest::from_json(
            r#"{"messages": [{"role": "user", "content": "t1 t2 t3"}], "max_tokens": 2, "temperature": 0}"#,
        )?;
        let p = Prepared::chat(m, &warm, "bench")?;
        pollster::block_on(p.run(m, &mut |_| true))?;
        m.reset_cache();
    }
    let mut messages: Vec<serde_json::Value> = Vec::new();
    let mut rows = Vec::new();
    for turn in 0..5u32 {
        let words: Vec<String> = (0..user_len as u32)
            .map(|i| format!("t{}", (turn * 1000 + i * 7919 + 13) % VOCAB as u32))
            .collect();
        messages.push(json!({"role": "user", "content": words.join(" ")}));
        let req = ChatRequest::from_json(
            &json!({"messages": messages, "temperature": 0, "max_tokens": reply_len}).to_string(),
        )?;
        let run = |m: &mut TextModel| -> Result<serde_json::Value> {
            let p = Prepared::chat(m, &req, "bench")?;
            Ok(pollster::block_on(p.run(m, &mut |_| true))?)
        };
        let a = run(&mut with)?;
        without.reset_cache();
        let b = run(&mut without)?;
        let k = &a["kiln"];
        let prompt = a["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        let reused = k["reused_tokens"].as_u64().unwrap_or(0);
        rows.push(json!({
            "turn": turn + 1, "prompt_tokens": prompt, "prefilled_with_reuse": prompt - reused,
            "ttft_ms_with_reuse": k["timings"]["ttft_ms"], "ttft_ms_without": b["kiln"]["timings"]["ttft_ms"],
            "same_reply": a["kiln"]["ids"] == b["kiln"]["ids"],
        }));
        let reply = a["choices"][0]["message"]["content"].clone();
        messages.push(json!({"role": "assistant", "content": reply}));
    }
    if as_json {
        println!(
            "{}",
            json!({"adapter": gpu.describe(), "model": "random SmolLM2-135M shapes, f16", "turns": rows})
        );
        return Ok(());
    }
    println!("adapter: {}", gpu.describe());
    println!("model: random weights, SmolLM2-135M shapes, f16; {user_len}-token user turns, {reply_len}-token greedy replies\n");
    println!("| turn | prompt tokens | prefilled (reuse) | TTFT with reuse | TTFT without | same reply |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} ms | {:.0} ms | {} |",
            r["turn"],
            r["prompt_tokens"],
            r["prefilled_with_reuse"],
            r["ttft_ms_with_reuse"].as_f64().unwrap_or(0.0),
            r["ttft_ms_without"].as_f64().unwrap_or(0.0),
            r["same_reply"]
        );
    }
    Ok(())
}
