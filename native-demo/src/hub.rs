//! Models by Hugging Face repo id (`owner/name`, or `owner/name:file.gguf`), downloaded with
//! `hf-hub` into its usual cache, with progress bars. Needs the network, so the test suite
//! cannot exercise it; everything after the download is the same code as for a local folder.

use anyhow::{Context, Result};
use kiln::llm::ModelFiles;

/// `owner/name` or `owner/name:file.gguf`, and not an existing path.
pub fn looks_like_repo_id(s: &str) -> bool {
    let repo = s.split(':').next().unwrap_or("");
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Downloads (or finds in the cache) the files of a model repo.
pub fn fetch(id: &str) -> Result<ModelFiles> {
    let (repo, gguf) = match id.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (id, None),
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .context("Hugging Face Hub client")?;
    let model = api.model(repo.to_string());
    let mut files = ModelFiles::new();
    let get = |files: &mut ModelFiles, name: &str, required: bool| -> Result<()> {
        match model.get(name) {
            Ok(path) => {
                files.insert(
                    name.to_string(),
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                );
                Ok(())
            }
            Err(e) if required => Err(anyhow::anyhow!("{repo}: could not fetch {name}: {e}")),
            Err(_) => Ok(()),
        }
    };
    if let Some(f) = gguf {
        get(&mut files, f, true)?;
        return Ok(files);
    }
    for (name, required) in [
        ("config.json", true),
        ("tokenizer.json", true),
        ("tokenizer_config.json", false),
        ("chat_template.jinja", false),
        ("generation_config.json", false),
    ] {
        get(&mut files, name, required)?;
    }
    get(&mut files, "model.safetensors.index.json", false)?;
    let shards = match files.get("model.safetensors.index.json") {
        Some(idx) => {
            kiln::formats::safetensors::shard_names(std::str::from_utf8(idx).unwrap_or(""))?
        }
        None => vec!["model.safetensors".to_string()],
    };
    for s in shards {
        get(&mut files, &s, true)?;
    }
    Ok(files)
}
