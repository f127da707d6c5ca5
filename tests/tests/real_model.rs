//! Real, published checkpoints (fetched by tools/fetch-real-model.sh into $KILN_MODEL_CACHE or
//! ~/.cache/kiln/models) against transformers on the same GGUF files
//! (tools/make_real_model_reference.py, references in tests/fixtures/real): tokenizer ids of
//! tricky strings, greedy ids and log-probabilities of raw prompts, and a chat question through
//! the file's chat template whose answer must name the right city.
//!
//! A model file that is not in the cache is reported and not run; with KILN_REQUIRE_REAL_MODELS=1
//! (set by .ci/run once the fetch succeeded) its absence fails the test instead.

use kiln::formats::gguf::Gguf;
use kiln::llm::{KvCacheType, LoadOptions, StopReason, TextModel, TextTokenizer};
use serde_json::Value;
use std::path::PathBuf;

fn cache() -> PathBuf {
    match std::env::var_os("KILN_MODEL_CACHE") {
        Some(p) => PathBuf::from(p),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models")
        }
    }
}

/// The reference and the model file, or `None` (reported) when the file is not in the cache.
fn find(reference: &str) -> Option<(Value, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/real");
    let r = kiln_tests::read_json(&dir.join(reference));
    let path = cache().join(r["file"].as_str().unwrap());
    if path.is_file() {
        return Some((r, path));
    }
    let msg = format!(
        "{} is not in {}: run tools/fetch-real-model.sh to fetch it",
        r["file"],
        cache().display()
    );
    assert!(
        std::env::var("KILN_REQUIRE_REAL_MODELS").as_deref() != Ok("1"),
        "{msg} (KILN_REQUIRE_REAL_MODELS=1)"
    );
    eprintln!("NOT RUN: {msg}");
    None
}

fn ids(v: &Value) -> Vec<u32> {
    kiln_tests::json_ids(v)
}

/// Tokenizer ids, then every greedy run: ids equal up to the first near-tie (top-2 margin under
/// 0.01, where f32 rounding may flip the argmax), log-probabilities within 2e-3.
fn check(reference: &str) -> Option<(TextModel, Value)> {
    let (r, path) = find(reference)?;
    let bytes = std::fs::read(&path).unwrap();
    let g = Gguf::parse(&path.to_string_lossy(), bytes).unwrap();
    let tok = TextTokenizer::from_gguf(&g).unwrap();
    drop(g);
    for case in r["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "{reference}: tokenizing {text:?}"
        );
    }
    let files = kiln::formats::files::read_model_path(&path).unwrap();
    // The f32 cache: the reference comparison's contract (GPUs default to f16).
    let opts = LoadOptions {
        ctx: 256,
        kv_cache: KvCacheType::F32,
        ..Default::default()
    };
    let mut m = pollster::block_on(TextModel::load(
        &kiln_tests::gpu(),
        files,
        &opts,
        &mut |_, _| {},
    ))
    .unwrap_or_else(|e| panic!("{reference}: {e}"));
    for run in r["runs"].as_array().unwrap() {
        let prompt = ids(&run["prompt_ids"]);
        let want = ids(&run["ids"]);
        let opts = kiln_tests::greedy(want.len());
        let gen = pollster::block_on(m.generate(&prompt, &opts, &mut |_| true)).unwrap();
        let what = format!("{reference} {:?}", run["prompt"]);
        let (n, worst) = kiln_tests::check_greedy_run(&what, &gen.ids, &gen.logprobs, run, 2e-3);
        // transformers runs on past the end of turn; Kiln stops there.
        let eos = gen.stop == StopReason::Eos && gen.ids.len() < want.len();
        assert!(
            n >= want.len().min(8) || eos,
            "{what}: only {n} steps compared"
        );
        eprintln!(
            "{what}: {n} ids equal, max logprob err {worst:.2e}: {:?}",
            gen.text
        );
    }
    Some((m, r))
}

#[test]
fn smollm2_135m_instruct_q4_1() {
    let Some((mut m, r)) = check("SmolLM2-135M-Instruct.Q4_1.json") else {
        return;
    };
    // The chat run: Kiln renders the file's template as transformers did, and the model answers.
    let chat = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["prompt"].is_object())
        .unwrap();
    let messages: Vec<(String, String)> = chat["prompt"]["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["role"].as_str().unwrap().into(),
                x["content"].as_str().unwrap().into(),
            )
        })
        .collect();
    let rendered = m.tokenizer.render_chat(&messages).unwrap();
    assert_eq!(rendered, chat["prompt"]["rendered"].as_str().unwrap());
    assert_eq!(
        m.tokenizer.encode(&rendered).unwrap(),
        ids(&chat["prompt_ids"])
    );
    let opts = kiln_tests::greedy(24);
    let g =
        pollster::block_on(m.generate(&ids(&chat["prompt_ids"]), &opts, &mut |_| true)).unwrap();
    assert!(g.text.contains("Paris"), "answer: {:?}", g.text);
}

#[test]
fn gemma3_270m_q4_k_m() {
    check("gemma-3-270m-q4_k_m.json");
}
