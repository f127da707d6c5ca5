//! `kiln embed`: sentence embeddings from a sentence-transformers folder or Hub repo.

use crate::{Stage, EXIT_GENERATION, EXIT_MODEL};
use anyhow::{bail, Context, Result};
use clap::Args;
use kiln::embed::Embedder;
use kiln::llm::{ModelFiles, Quantize};

#[derive(Args)]
pub struct EmbedArgs {
    /// A sentence-transformers folder (modules.json, config.json, model.safetensors,
    /// tokenizer.json, 1_Pooling/...), a BERT .gguf file (llama.cpp's converter's), or a
    /// Hugging Face repo id, e.g. sentence-transformers/all-MiniLM-L6-v2.
    #[arg(short, long)]
    pub model: String,
    /// The texts; `-` reads one text per line from standard input.
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Keep the first N dimensions (for Matryoshka-trained models), renormalised.
    #[arg(long)]
    pub dimensions: Option<usize>,
    /// Put the model's named prompt before each text (e.g. Qwen3-Embedding's `query`
    /// instruction; see its config_sentence_transformers.json).
    #[arg(long)]
    pub prompt_name: Option<String>,
    /// Quantize the encoder's matrices on load: none, q4, q8, q4_k or q6_k.
    #[arg(long, default_value_t = Quantize::None)]
    pub quantize: Quantize,
    /// Print JSON: the model, the width, each input's token count and embedding.
    #[arg(long)]
    pub json: bool,
}

/// The files of an embedding model: a folder, or a Hub repo id.
pub fn embedding_files(model: &str) -> Result<ModelFiles> {
    let p = std::path::Path::new(model);
    if p.is_file() && model.ends_with(".gguf") {
        let bytes = std::fs::read(p).with_context(|| format!("reading {model}"))?;
        let name = p
            .file_name()
            .map_or(model.to_string(), |n| n.to_string_lossy().to_string());
        return Ok(ModelFiles::from([(name, bytes)]));
    }
    if p.is_dir() {
        return kiln::formats::files::read_dir(p, &kiln::formats::files::embedding_model())
            .with_context(|| format!("reading {model}"));
    }
    if crate::hub::looks_like_repo_id(model) {
        return crate::hub::fetch_kind(model, crate::hub::Kind::Embedding);
    }
    bail!("model '{model}' not found: pass a sentence-transformers folder, a .gguf file or a Hugging Face repo id (owner/name, or owner/name:file.gguf)")
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let mut texts = Vec::new();
    for t in &a.texts {
        if t == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading standard input")?;
            texts.extend(
                s.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string),
            );
        } else {
            texts.push(t.clone());
        }
    }
    let files = embedding_files(&a.model).stage(EXIT_MODEL)?;
    let gpu = crate::gpu()?;
    let m = pollster::block_on(Embedder::load(&gpu, files, a.quantize)).stage(EXIT_MODEL)?;
    let prefix = match a.prompt_name.as_ref().or(m.default_prompt.as_ref()) {
        Some(name) => m.prompt(name).stage(EXIT_GENERATION)?.to_string(),
        None => String::new(),
    };
    let texts: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens: Vec<usize> = refs
        .iter()
        .map(|t| m.tokenize(t).map(|ids| ids.len()))
        .collect::<kiln::Result<_>>()
        .stage(EXIT_GENERATION)?;
    let t0 = std::time::Instant::now();
    let mut vs = pollster::block_on(m.embed_texts(&refs)).stage(EXIT_GENERATION)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(d) = a.dimensions {
        for v in &mut vs {
            kiln::embed::shorten(v, d).stage(EXIT_GENERATION)?;
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.model, "dim": vs.first().map_or(m.dim(), Vec::len),
                "pooling": m.pooling, "normalized": m.normalize,
                "tokens": tokens, "ms": ms, "embeddings": vs,
            })
        );
    } else {
        for v in &vs {
            let s: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
            println!("{}", s.join(" "));
        }
        eprintln!(
            "{} embeddings of {} values in {ms:.0} ms ({} tokens)",
            vs.len(),
            vs.first().map_or(0, Vec::len),
            tokens.iter().sum::<usize>()
        );
    }
    Ok(())
}
