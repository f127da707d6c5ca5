//! The models a server offers: those given with `--model`/`--image-model`/`--embedding-model`
//! (loaded at start) and every model found in `--models-dir` (loaded when a request names one).
//! Under `--max-memory`, loading a model first unloads the least recently used idle ones until
//! the new one's estimate fits (an estimate made before loading, from file sizes and, for text
//! models, the KV cache of the context asked for).

use super::{ApiError, ImageRequest, TextJob, Worker};
use axum::http::StatusCode;
use kiln::embed::EmbeddingRequest;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a model is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Image,
    Embedding,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Image => "image",
            Kind::Embedding => "embedding",
        }
    }
}

fn article(k: Kind) -> &'static str {
    match k {
        Kind::Text => "a",
        _ => "an",
    }
}

/// Where a model's files are.
#[derive(Clone, Debug)]
pub enum Source {
    /// A folder, a `.gguf` file or a Hugging Face repo id.
    Path(String),
    /// The embedded default text or image model.
    Default,
}

/// A model the server offers.
#[derive(Clone, Debug)]
pub struct Spec {
    pub id: String,
    pub kind: Kind,
    pub source: Source,
}

/// A loaded model: its worker (and a text model's tokenizer, for /tokenize).
#[derive(Clone)]
pub(super) enum Handle {
    Text(Arc<Worker<TextJob>>, Arc<kiln::llm::TextTokenizer>),
    Image(Arc<Worker<ImageRequest>>),
    Embedding(Arc<Worker<EmbeddingRequest>>),
}

impl Handle {
    fn depth(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            Handle::Text(w, _) => w.depth.load(Relaxed),
            Handle::Image(w) => w.depth.load(Relaxed),
            Handle::Embedding(w) => w.depth.load(Relaxed),
        }
    }
}

struct Slot {
    spec: Spec,
    handle: Option<Handle>,
    /// Estimated GPU bytes (known once estimated).
    bytes: u64,
    last_used: Instant,
    /// Held while the model loads, so that two requests load it once.
    loading: Arc<tokio::sync::Mutex<()>>,
}

/// Loads a model (on a blocking thread): its handle.
pub(super) type Loader = dyn Fn(&Spec) -> anyhow::Result<Handle> + Send + Sync;

/// The models and the memory budget.
pub(super) struct Registry {
    slots: Mutex<Vec<Slot>>,
    max_memory: Option<u64>,
    loader: Arc<Loader>,
    ctx: usize,
    /// KV caches per text model (`--parallel`).
    slots_per_text: usize,
}

/// A model as `/v1/models` and `/health` describe it.
pub(super) struct Listed {
    pub id: String,
    pub kind: Kind,
    pub loaded: bool,
    pub queued: usize,
    /// The GPU bytes estimated for it (what `--max-memory` counts).
    pub bytes: u64,
}

impl Registry {
    pub fn new(max_memory: Option<u64>, ctx: usize, slots: usize, loader: Arc<Loader>) -> Registry {
        Registry {
            slots: Mutex::new(Vec::new()),
            max_memory,
            loader,
            ctx,
            slots_per_text: slots,
        }
    }

    /// Adds a model (not loaded). An id already offered is an error naming both sources.
    pub fn add(&self, spec: Spec) -> anyhow::Result<()> {
        let mut slots = self.lock();
        if let Some(s) = slots.iter().find(|s| s.spec.id == spec.id) {
            anyhow::bail!(
                "two models have the id '{}' ({:?} and {:?}): rename one folder",
                spec.id,
                s.spec.source,
                spec.source
            );
        }
        slots.push(Slot {
            bytes: estimate(&spec, self.ctx, self.slots_per_text),
            spec,
            handle: None,
            last_used: Instant::now(),
            loading: Arc::new(tokio::sync::Mutex::new(())),
        });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every model offered, in the order added.
    pub fn list(&self) -> Vec<Listed> {
        self.lock()
            .iter()
            .map(|s| Listed {
                id: s.spec.id.clone(),
                kind: s.spec.kind,
                loaded: s.handle.is_some(),
                queued: s.handle.as_ref().map_or(0, Handle::depth),
                bytes: s.bytes,
            })
            .collect()
    }

    /// The model a request names (`None` or "default": the most recently used loaded model of
    /// that kind, else the first offered), loaded if it is not.
    pub async fn pick(&self, kind: Kind, model: Option<&str>) -> Result<Handle, ApiError> {
        let (index, loading) = {
            let mut slots = self.lock();
            let i = self.find(&slots, kind, model)?;
            let s = &mut slots[i];
            s.last_used = Instant::now();
            if let Some(h) = &s.handle {
                return Ok(h.clone());
            }
            (i, s.loading.clone())
        };
        let _guard = loading.lock().await;
        if let Some(h) = self.lock()[index].handle.clone() {
            return Ok(h); // another request loaded it meanwhile
        }
        let spec = self.make_room(index)?;
        let loader = self.loader.clone();
        let t0 = Instant::now();
        let handle = tokio::task::spawn_blocking(move || loader(&spec))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    e.to_string(),
                )
            })?
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("loading the model: {e:#}"),
                )
            })?;
        let mut slots = self.lock();
        let s = &mut slots[index];
        eprintln!(
            "loaded {} model {} on demand in {:.1} s",
            s.spec.kind.name(),
            s.spec.id,
            t0.elapsed().as_secs_f64()
        );
        s.handle = Some(handle.clone());
        s.last_used = Instant::now();
        Ok(handle)
    }

    /// Loads a model now (at start).
    pub fn load_now(&self, id: &str) -> anyhow::Result<()> {
        let index = self
            .lock()
            .iter()
            .position(|s| s.spec.id == id)
            .ok_or_else(|| anyhow::anyhow!("no model '{id}'"))?;
        let spec = self
            .make_room(index)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let h = (self.loader)(&spec)?;
        self.lock()[index].handle = Some(h);
        Ok(())
    }

    /// The slot a request names.
    fn find(&self, slots: &[Slot], kind: Kind, model: Option<&str>) -> Result<usize, ApiError> {
        let not_found = |msg: String| {
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", msg)
                .code("model_not_found")
        };
        let of_kind = |s: &&Slot| s.spec.kind == kind;
        match model {
            None | Some("default") => slots
                .iter()
                .enumerate()
                .filter(|(_, s)| of_kind(s) && s.handle.is_some())
                .max_by_key(|(_, s)| s.last_used)
                .or_else(|| slots.iter().enumerate().find(|(_, s)| of_kind(s)))
                .map(|(i, _)| i)
                .ok_or_else(|| not_found(format!("this server has no {} model", kind.name()))),
            Some(m) => match slots.iter().position(|s| s.spec.id == m) {
                Some(i) if slots[i].spec.kind == kind => Ok(i),
                Some(i) => Err(ApiError::bad_request(format!(
                    "the model '{m}' is {} {} model, not {} {} model (see GET /v1/models)",
                    article(slots[i].spec.kind),
                    slots[i].spec.kind.name(),
                    article(kind),
                    kind.name()
                ))),
                None => {
                    let ids: Vec<&str> = slots
                        .iter()
                        .filter(|s| of_kind(s))
                        .map(|s| s.spec.id.as_str())
                        .collect();
                    Err(not_found(format!(
                        "The model '{m}' does not exist: this server's {} models are {} ('default' names one; see GET /v1/models).",
                        kind.name(),
                        if ids.is_empty() { "none".to_string() } else { ids.join(", ") }
                    )))
                }
            },
        }
    }

    /// Unloads least recently used idle models until the one at `index` fits the budget.
    fn make_room(&self, index: usize) -> Result<Spec, ApiError> {
        let mut slots = self.lock();
        let need = slots[index].bytes;
        if let Some(max) = self.max_memory {
            if need > max {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    format!(
                        "the model '{}' needs about {} MB, more than --max-memory ({} MB)",
                        slots[index].spec.id,
                        need >> 20,
                        max >> 20
                    ),
                ));
            }
            loop {
                let used: u64 = slots
                    .iter()
                    .filter(|s| s.handle.is_some())
                    .map(|s| s.bytes)
                    .sum();
                if used + need <= max {
                    break;
                }
                let victim = slots
                    .iter()
                    .enumerate()
                    .filter(|(i, s)| {
                        *i != index && s.handle.as_ref().is_some_and(|h| h.depth() == 0)
                    })
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(i, _)| i);
                let Some(v) = victim else {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        format!(
                            "the model '{}' needs about {} MB; {} MB of --max-memory ({} MB) are held by models busy with requests: try again",
                            slots[index].spec.id,
                            need >> 20,
                            used >> 20,
                            max >> 20
                        ),
                    ));
                };
                eprintln!(
                    "unloading {} model {} (least recently used) to make room for {}",
                    slots[v].spec.kind.name(),
                    slots[v].spec.id,
                    slots[index].spec.id
                );
                // The worker ends once the requests holding it are answered.
                slots[v].handle = None;
            }
        }
        Ok(slots[index].spec.clone())
    }
}

/// A model's GPU bytes, estimated before loading: its files' sizes (weights as stored) and for
/// a text model `slots` f32 KV caches of `ctx` positions (capped by the model).
pub fn estimate(spec: &Spec, ctx: usize, slots: usize) -> u64 {
    let Source::Path(p) = &spec.source else {
        return 0;
    };
    let path = Path::new(p);
    let files = size_of(path);
    if spec.kind != Kind::Text {
        return files;
    }
    let cfg = if path.is_dir() {
        std::fs::read_to_string(path.join("config.json"))
            .ok()
            .and_then(|c| kiln::llm::LlmConfig::from_hf(&c, None).ok())
    } else {
        let mut prefix = vec![0u8; 16 << 20];
        std::fs::File::open(path)
            .ok()
            .and_then(|mut f| std::io::Read::read(&mut f, &mut prefix).ok())
            .and_then(|n| {
                kiln::llm::LlmConfig::from_gguf_prefix(p, &prefix[..n])
                    .ok()
                    .flatten()
            })
    };
    files
        + cfg.map_or(0, |c| {
            let ctx = ctx.clamp(2, c.max_positions.max(2));
            slots as u64 * kiln::llm::model::KvCache::bytes(&c, ctx, false)
        })
}

/// Bytes of the weights a model loads: a file's size, or under a folder its `.safetensors`
/// files (a component's fp16 variant only where it has no full-precision file, as the loaders
/// pick them), else its `.gguf` file.
fn size_of(p: &Path) -> u64 {
    if p.is_file() {
        return p.metadata().map_or(0, |m| m.len());
    }
    let mut files = Vec::new();
    walk(p, &mut files);
    let size = |f: &PathBuf| f.metadata().map_or(0, |m| m.len());
    let name = |f: &PathBuf| f.to_string_lossy().to_string();
    let st: u64 = files
        .iter()
        .filter(|f| name(f).ends_with(".safetensors"))
        .filter(|f| {
            let n = name(f);
            !n.ends_with(".fp16.safetensors")
                || !Path::new(&n.replace(".fp16.safetensors", ".safetensors")).is_file()
        })
        .map(size)
        .sum();
    if st > 0 {
        return st;
    }
    files
        .iter()
        .filter(|f| name(f).ends_with(".gguf"))
        .map(size)
        .min()
        .unwrap_or(0)
}

fn walk(p: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let q = e.path();
        if q.is_dir() {
            walk(&q, out);
        } else {
            out.push(q);
        }
    }
}

/// What a folder entry is, from the files that mark each kind: `model_index.json` (a diffusers
/// pipeline), `modules.json` (sentence-transformers), `config.json` or a `.gguf` (a text model).
pub fn classify(p: &Path) -> Option<Kind> {
    if p.is_file() {
        if !p.extension().is_some_and(|e| e == "gguf") {
            return None;
        }
        // A BERT GGUF (llama.cpp's converter's embedding files) is an embedder.
        return Some(match gguf_architecture(p).as_deref() {
            Some("bert") => Kind::Embedding,
            _ => Kind::Text,
        });
    }
    if p.join("model_index.json").is_file() {
        Some(Kind::Image)
    } else if p.join("modules.json").is_file() {
        Some(Kind::Embedding)
    } else if p.join("config.json").is_file()
        || std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "gguf"))
            })
            .unwrap_or(false)
    {
        Some(Kind::Text)
    } else {
        None
    }
}

/// A GGUF's `general.architecture`, from the metadata in the file's first MiB.
fn gguf_architecture(p: &Path) -> Option<String> {
    let mut head = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(p).ok()?, 1 << 20),
        &mut head,
    )
    .ok()?;
    kiln::formats::files::gguf_architecture(&p.to_string_lossy(), &head)
}

/// The models in a folder: every entry [`classify`] recognises, sorted by name, with its id
/// (the folder's name, a file's stem); the rest with why not.
pub fn scan(dir: &Path) -> anyhow::Result<(Vec<Spec>, Vec<(PathBuf, String)>)> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("--models-dir {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        match classify(&p) {
            Some(kind) => found.push(Spec {
                id: super::model_id(&p.to_string_lossy()),
                kind,
                source: Source::Path(p.to_string_lossy().to_string()),
            }),
            None => skipped.push((
                p,
                "no model_index.json, modules.json, config.json or .gguf file".to_string(),
            )),
        }
    }
    Ok((found, skipped))
}
