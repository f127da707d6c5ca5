//! `kiln bench embed`: 64 short inputs embedded in one batched pass against 64 single calls, on
//! a random-weight all-MiniLM-L6-v2-shaped BERT (or `--model`, a sentence-transformers folder).

use super::common::random_f16_safetensors;
use anyhow::Result;
use kiln::embed::Embedder;
use kiln::llm::{ModelFiles, Quantize};
use serde_json::json;
use std::time::Instant;

/// all-MiniLM-L6-v2's shapes.
const HIDDEN: usize = 384;
const LAYERS: usize = 6;
const FFN: usize = 1536;
const VOCAB: usize = 30522;
const POSITIONS: usize = 512;

/// A sentence-transformers folder in memory: the shapes above, random f16 weights, mean
/// pooling, Normalize, and a WordPiece tokenizer of a few tokens (the benchmark feeds ids).
fn minilm_files() -> ModelFiles {
    let mut p: Vec<(String, Vec<usize>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![VOCAB, HIDDEN],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![POSITIONS, HIDDEN],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![2, HIDDEN],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![HIDDEN]),
        ("embeddings.LayerNorm.bias".into(), vec![HIDDEN]),
    ];
    for i in 0..LAYERS {
        let l = format!("encoder.layer.{i}");
        for (name, out, inp) in [
            ("attention.self.query", HIDDEN, HIDDEN),
            ("attention.self.key", HIDDEN, HIDDEN),
            ("attention.self.value", HIDDEN, HIDDEN),
            ("attention.output.dense", HIDDEN, HIDDEN),
            ("intermediate.dense", FFN, HIDDEN),
            ("output.dense", HIDDEN, FFN),
        ] {
            p.push((format!("{l}.{name}.weight"), vec![out, inp]));
            p.push((format!("{l}.{name}.bias"), vec![out]));
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            p.push((format!("{l}.{n}.weight"), vec![HIDDEN]));
            p.push((format!("{l}.{n}.bias"), vec![HIDDEN]));
        }
    }
    let config = json!({"model_type": "bert", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": 12, "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS, "type_vocab_size": 2, "hidden_act": "gelu"});
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]);
    let tokenizer = json!({"version": "1.0", "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                  "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}}});
    let bytes = |v: serde_json::Value| v.to_string().into_bytes();
    ModelFiles::from([
        ("config.json".to_string(), bytes(config)),
        ("modules.json".to_string(), bytes(modules)),
        (
            "1_Pooling/config.json".to_string(),
            bytes(json!({"pooling_mode": "mean"})),
        ),
        (
            "sentence_bert_config.json".to_string(),
            bytes(json!({"max_seq_length": 256})),
        ),
        ("tokenizer.json".to_string(), bytes(tokenizer)),
        (
            "model.safetensors".to_string(),
            random_f16_safetensors(&p, 7),
        ),
    ])
}

pub fn embed(quick: bool, as_json: bool, model: Option<&str>) -> Result<()> {
    let gpu = crate::gpu()?;
    let (files, label) = match model {
        Some(m) => (crate::embed::embedding_files(m)?, m.to_string()),
        None => (
            minilm_files(),
            "random all-MiniLM-L6-v2-shaped BERT (f16)".to_string(),
        ),
    };
    let m = pollster::block_on(Embedder::load(&gpu, files, Quantize::None))?;
    // 64 inputs of 10 to 17 tokens: [CLS], words, [SEP].
    let inputs: Vec<Vec<u32>> = (0..64u32)
        .map(|i| {
            let n = 8 + (i as usize * 7) % 8;
            let words = (0..n as u32).map(|j| 5 + (i * 131 + j * 17) % (m.vocab() as u32 - 5));
            std::iter::once(2).chain(words).chain([3]).collect()
        })
        .collect();
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let rounds = if quick { 1 } else { 3 };
    let best = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up: shaders compiled, weights uploaded
        let mut best = f64::MAX;
        for _ in 0..rounds {
            let t0 = Instant::now();
            f()?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let batched = best(&mut || {
        pollster::block_on(m.embed_ids(&inputs))
            .map(drop)
            .map_err(Into::into)
    })?;
    let single = best(&mut || {
        for one in &inputs {
            pollster::block_on(m.embed_ids(std::slice::from_ref(one)))?;
        }
        Ok(())
    })?;
    let ratio = single / batched;
    let profile = super::common::profile_rows(&pollster::block_on(m.profile(&inputs))?);
    if as_json {
        println!(
            "{}",
            json!({"model": label, "adapter": gpu.describe(), "inputs": 64, "tokens": tokens,
                   "batched_s": batched, "single_calls_s": single, "speedup": ratio,
                   "batched_inputs_per_s": 64.0 / batched, "single_inputs_per_s": 64.0 / single,
                   "batched_profile": profile})
        );
    } else {
        println!("embed: {label} on {}", gpu.describe());
        println!(
            "  64 inputs ({tokens} tokens) in one batched pass: {:8.1} ms ({:7.1} inputs/s)",
            batched * 1e3,
            64.0 / batched
        );
        println!(
            "  64 single calls:                               {:8.1} ms ({:7.1} inputs/s)",
            single * 1e3,
            64.0 / single
        );
        println!("  batched / single throughput: {ratio:.1}x");
        super::common::print_profile("the batched pass", &profile);
    }
    Ok(())
}
