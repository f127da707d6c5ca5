//! Sentence embeddings against sentence-transformers (fixtures in tests/fixtures/embed, made by
//! tools/make_embed_fixtures.py): the tokenizer's ids with truncation, and each model's
//! embeddings (mean, CLS, a Dense layer; normalised) at cosine >= 0.9999 with the maximum absolute
//! error reported, for a batch in one pass and for each input alone; bad inputs are errors
//! naming the input.

use kiln::embed::Embedder;
use kiln::formats::files::{embedding_model, read_dir};
use kiln::llm::Quantize;
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/embed")
}

fn load(model: &str) -> Embedder {
    let files = read_dir(&dir().join(model), &embedding_model()).unwrap();
    pollster::block_on(Embedder::load(&kiln_tests::gpu(), files, Quantize::None))
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// The fixture's sentences.
fn sentences(e: &Value) -> Vec<&str> {
    e["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// Each vector against its row of sentence-transformers' `[n, dim]` array: cosine >= 0.9999
/// asserted, the worst cosine and largest absolute error reported.
fn assert_matches(name: &str, got: &[Vec<f32>], want: &kiln::formats::npy::Npy) {
    let dim = want.shape[1];
    let mut worst = (1.0f64, 0.0f32);
    for (i, v) in got.iter().enumerate() {
        let w = &want.data[i * dim..(i + 1) * dim];
        let c = cosine(v, w);
        let abs = v
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst = (worst.0.min(c), worst.1.max(abs));
        assert!(c >= 0.9999, "{name} input {i}: cosine {c}");
    }
    eprintln!(
        "{name}: {} inputs, worst cosine {:.7}, max abs error {:.2e}",
        got.len(),
        worst.0,
        worst.1
    );
}

/// Alone, each input gets the vector it got in the packed batch.
fn assert_alone_like_batch(m: &Embedder, model: &str, sentences: &[&str], batch: &[Vec<f32>]) {
    for (i, got) in batch.iter().enumerate() {
        let one = pollster::block_on(m.embed_texts(&[sentences[i]])).unwrap();
        let d = one[0]
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{model} input {i}: alone differs by {d}");
    }
}

#[test]
fn embeddings_match_sentence_transformers() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let sentences = sentences(&e);
    for model in ["minilm-tiny", "bge-tiny", "dense-tiny"] {
        let m = load(model);
        if model == "minilm-tiny" {
            for (s, want) in sentences.iter().zip(e["token_ids"].as_array().unwrap()) {
                assert_eq!(m.tokenize(s).unwrap(), kiln_tests::json_ids(want), "{s}");
            }
        }
        let want = kiln_tests::read_npy(&dir().join(format!("{model}.npy")));
        assert_eq!(m.dim(), want.shape[1], "{model}");
        let batch = pollster::block_on(m.embed_texts(&sentences)).unwrap();
        assert_matches(model, &batch, &want);
        assert_alone_like_batch(&m, model, &sentences, &batch);
    }
}

/// Decoder embedders through the text model's own graph: Qwen3-Embedding's layout (causal,
/// last-token pooling, an end-of-text token appended, a `query` instruction prompt) and
/// EmbeddingGemma's (Gemma 3 with bidirectional attention, its sliding layers a window both
/// ways, mean pooling, two Dense modules, `query` and `document` prompts).
#[test]
fn decoder_embeddings_match_sentence_transformers() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let sentences = sentences(&e);
    for (model, ids_key) in [
        ("qwen3-emb-tiny", "qwen3_token_ids"),
        ("gemma-emb-tiny", "gemma_token_ids"),
    ] {
        let m = load(model);
        for (s, want) in sentences.iter().zip(e[ids_key].as_array().unwrap()) {
            assert_eq!(
                m.tokenize(s).unwrap(),
                kiln_tests::json_ids(want),
                "{model}: {s}"
            );
        }
        check_with_prompts(&m, model, &sentences);
    }
    // Text generation refuses a model whose attention looks both ways.
    let files = read_dir(
        &dir().join("gemma-emb-tiny"),
        &kiln::formats::files::text_model(),
    )
    .unwrap();
    let opts = kiln::llm::LoadOptions {
        ctx: 32,
        ..Default::default()
    };
    let mut t = pollster::block_on(kiln::llm::TextModel::load(
        &kiln_tests::gpu(),
        files,
        &opts,
        &mut |_, _| {},
    ))
    .unwrap();
    let err = pollster::block_on(t.generate(&[1, 5], &kiln_tests::greedy(2), &mut |_| true))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("both ways") && err.contains("kiln embed"),
        "{err}"
    );
}

/// An embedder's vectors with and without its `query` prompt, per-length passes replayed, and an
/// unknown prompt name refused.
fn check_with_prompts(m: &Embedder, model: &str, sentences: &[&str]) {
    for (name, prompt) in [
        (model.to_string(), None),
        (format!("{model}_query"), Some("query")),
    ] {
        let want = kiln_tests::read_npy(&dir().join(format!("{name}.npy")));
        let req = kiln::embed::EmbeddingRequest::from_json(
            &serde_json::json!({"input": sentences, "prompt_name": prompt}).to_string(),
        )
        .unwrap();
        let r = pollster::block_on(m.openai(&req, "x")).unwrap();
        let got: Vec<Vec<f32>> = r["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let e = d["embedding"].as_array().unwrap();
                e.iter().map(|v| v.as_f64().unwrap() as f32).collect()
            })
            .collect();
        assert_matches(&name, &got, &want);
    }
    // Passes are compiled once per input length and replayed: inputs of one length give their
    // own vectors, the same input the same vector.
    let one = |ids: Vec<u32>| pollster::block_on(m.embed_ids(&[ids])).unwrap().remove(0);
    let (d1, a, d2) = (one(vec![5, 6, 7]), one(vec![8, 9, 10]), one(vec![5, 6, 7]));
    assert_eq!(d1, d2);
    assert_ne!(a, d1);
    let bad = kiln::embed::EmbeddingRequest::from_json(r#"{"input": "x", "prompt_name": "nope"}"#)
        .unwrap();
    let err = pollster::block_on(m.openai(&bad, "x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("'nope'") && err.contains("query"), "{err}");
}

/// nomic-embed-text's encoder (nomic-bert: rotary positions, a fused Wqkv, a SwiGLU
/// feed-forward, no biases) as transformers 5.25 saves it (nomic's own tensor names), mean
/// pooling, normalised, with its `search_query: ` / `search_document: ` prompts: ids,
/// embeddings with and without the query prompt, a packed batch and each input alone.
#[test]
fn nomic_bert_embeddings_match_sentence_transformers() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let sentences = sentences(&e);
    let m = load("nomic-tiny");
    for (s, want) in sentences
        .iter()
        .zip(e["nomic_token_ids"].as_array().unwrap())
    {
        assert_eq!(m.tokenize(s).unwrap(), kiln_tests::json_ids(want), "{s}");
    }
    check_with_prompts(&m, "nomic-tiny", &sentences);
    let batch = pollster::block_on(m.embed_texts(&sentences)).unwrap();
    assert_alone_like_batch(&m, "nomic-tiny", &sentences, &batch);
}

/// The GGUFs llama.cpp's converter makes of minilm-tiny (`bert`) and nomic-tiny (`nomic-bert`,
/// from the folder with nomic's published config): mean pooling, WordPiece, normalised; the same
/// ids and embeddings as sentence-transformers' (the GGUF truncates at its context instead of
/// the folder's 24 tokens, as llama.cpp does, so the long sentences are encoded whole:
/// `*_gguf.npy`).
#[test]
fn gguf_embedding_files_match_sentence_transformers() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let sentences = sentences(&e);
    for model in ["minilm-tiny", "nomic-tiny"] {
        let name = format!("{model}.gguf");
        let bytes = std::fs::read(dir().join(&name)).unwrap();
        let files = kiln::formats::ModelFiles::from([(name.clone(), bytes)]);
        let m = pollster::block_on(Embedder::load(&kiln_tests::gpu(), files, Quantize::None))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (s, ids) in sentences
            .iter()
            .zip(e["gguf_token_ids"].as_array().unwrap())
        {
            assert_eq!(
                m.tokenize(s).unwrap(),
                kiln_tests::json_ids(ids),
                "{name}: {s}"
            );
        }
        let want = kiln_tests::read_npy(&dir().join(format!("{model}_gguf.npy")));
        let got = pollster::block_on(m.embed_texts(&sentences)).unwrap();
        assert_matches(&name, &got, &want);
    }
}

/// nomic-tiny with the config.json nomic's own code writes (as nomic-embed-text-v1.5 was
/// published: `n_embd`, `rotary_emb_base`, ...) instead of transformers 5's: the same model.
#[test]
fn nomic_bert_published_config_format() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let sentences = sentences(&e);
    let mut files = read_dir(&dir().join("nomic-tiny"), &embedding_model()).unwrap();
    let hub = std::fs::read(dir().join("nomic-tiny-hub-config.json")).unwrap();
    files.insert("config.json".into(), hub);
    let m = pollster::block_on(Embedder::load(&kiln_tests::gpu(), files, Quantize::None)).unwrap();
    let want = kiln_tests::read_npy(&dir().join("nomic-tiny.npy"));
    let got = pollster::block_on(m.embed_texts(&sentences)).unwrap();
    assert_matches("nomic-tiny (published config)", &got, &want);
}

#[test]
fn bad_inputs_are_errors_naming_the_input() {
    let m = load("minilm-tiny");
    let cases: [(Vec<Vec<u32>>, &str); 3] = [
        (vec![vec![2, 5, 3], vec![]], "input 1: no tokens"),
        (vec![vec![2, 100_000, 3]], "outside the vocabulary"),
        (vec![vec![2; 25]], "more than the model's 24"),
    ];
    for (ids, want) in cases {
        let err = pollster::block_on(m.embed_ids(&ids))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    // A position table too short for an input is a config error, not a panic.
    let mut files = read_dir(&dir().join("minilm-tiny"), &embedding_model()).unwrap();
    let cfg = String::from_utf8(files["config.json"].clone()).unwrap();
    files.insert(
        "config.json".into(),
        cfg.replace(
            "\"max_position_embeddings\": 64",
            "\"max_position_embeddings\": 1",
        )
        .into_bytes(),
    );
    let err = pollster::block_on(Embedder::load(&kiln_tests::gpu(), files, Quantize::None))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("max_position_embeddings 1"), "{err}");
    // A module Kiln does not run is refused naming it.
    let mut files = read_dir(&dir().join("minilm-tiny"), &embedding_model()).unwrap();
    let mods = String::from_utf8(files["modules.json"].clone()).unwrap();
    files.insert(
        "modules.json".into(),
        mods.replace("normalize.Normalize", "layer_norm.LayerNorm")
            .into_bytes(),
    );
    let err = pollster::block_on(Embedder::load(&kiln_tests::gpu(), files, Quantize::None))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("LayerNorm"), "{err}");
}
