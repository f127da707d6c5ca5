//! Models by Hugging Face repo id (`owner/name`, or `owner/name:file.gguf`; image pipelines
//! and tiny autoencoders too), downloaded with `hf-hub` into its usual cache, with progress
//! bars. Needs the network, so the test suite
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

/// What a repo holds: a text model (or one GGUF file of it), a diffusers pipeline, or one
/// diffusers model folder (a tiny autoencoder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Pipeline,
    DiffusersModel,
    /// A sentence-transformers model.
    Embedding,
}

/// Downloads (or finds in the cache) the files of a text model repo.
pub fn fetch(id: &str) -> Result<ModelFiles> {
    fetch_kind(id, Kind::Text)
}

/// Downloads (or finds in the cache) the files a model of `kind` needs from a repo: the
/// engine's list for that kind (a pipeline's fp16 variant files first, as the browser fetches
/// them).
pub fn fetch_kind(id: &str, kind: Kind) -> Result<ModelFiles> {
    let (repo, gguf) = match id.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (id, None),
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .context("Hugging Face Hub client")?;
    let model = api.model(repo.to_string());
    if let Some(f) = gguf {
        let path = model
            .get(f)
            .with_context(|| format!("{repo}: could not fetch {f}"))?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(ModelFiles::from([(f.to_string(), bytes)]));
    }
    // The engine's list of a model's files; a file the Hub does not give counts as absent, and
    // the last Hub error is added to the message when a required one is missing.
    let mut last_err = None;
    let plan = match kind {
        Kind::Text => kiln::formats::files::text_model(),
        Kind::Pipeline => kiln::formats::files::pipeline(true),
        Kind::DiffusersModel => kiln::formats::files::diffusers_model(true),
        Kind::Embedding => kiln::formats::files::embedding_model(),
    };
    let files = kiln::formats::files::collect(&plan, &mut |name| match model.get(name) {
        Ok(path) => std::fs::read(&path)
            .map(Some)
            .map_err(|e| kiln::Error::Data {
                name: path.display().to_string(),
                msg: e.to_string(),
            }),
        Err(e) => {
            last_err = Some(format!("{name}: {e}"));
            Ok(None)
        }
    });
    files.map_err(|e| match last_err {
        Some(h) => anyhow::anyhow!("{repo}: {e} (last Hub error: {h})"),
        None => anyhow::anyhow!("{repo}: {e}"),
    })
}
