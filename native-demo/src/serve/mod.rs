//! `kiln serve`: an OpenAI-compatible HTTP server (axum on tokio).
//!
//! Every loaded model lives on its own worker thread, which takes requests from a queue in the
//! order they came (one at a time per model; a text and an image model work side by side).
//! A request hands the worker a bounded channel; the worker sends chunks or the response back
//! (waiting when the client reads slowly) and checks after every token (or denoising step)
//! whether the client is still there, so a disconnect cancels the generation at the next token
//! or step.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (SSE with `"stream": true`),
//! `POST /v1/images/generations` (`b64_json` PNG), `POST /v1/images/edits` (OpenAI's multipart
//! form: img2img, and inpainting with a mask), `GET /v1/models`, `GET /health`, and
//! llama-server's `POST /tokenize` and `POST /detokenize` (with the text model's tokenizer, on
//! the request's own thread: no queue).
//! The request logic (templates, defaults, response shapes) is the engine's
//! [`kiln::llm::chat`] core; this file only routes, queues and frames. What a request must get
//! right before its body is read is [`guard`]; connections and their deadlines are [`listen`].

mod embeddings;
mod guard;
mod listen;
mod metrics;
mod pool;
pub(crate) mod registry;

use crate::{Stage, EXIT_MODEL, EXIT_USAGE};
use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use kiln::diffusion::models::SdModels;
use kiln::diffusion::pipeline::{ImageOptions, RgbImage, StepReply};
use kiln::diffusion::schedulers::SchedulerKind;
use kiln::llm::{ChatRequest, CompletionRequest, LoadOptions, Prepared, TextModel};
use pool::Worker;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{channel, Sender};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A text model (a folder, a .gguf file or a Hugging Face repo id), loaded at start;
    /// repeatable. With no model flag and no --models-dir, the embedded default text and image
    /// models are served.
    #[arg(short, long)]
    model: Vec<String>,
    /// A diffusers pipeline folder for /v1/images/generations, loaded at start; repeatable.
    #[arg(long)]
    image_model: Vec<String>,
    /// A sentence-transformers folder or Hub repo id for /v1/embeddings, loaded at start;
    /// repeatable.
    #[arg(long)]
    embedding_model: Vec<String>,
    /// A folder of models (pipeline folders, sentence-transformers folders, text model folders
    /// and .gguf files), each offered by its name and loaded when a request names it.
    #[arg(long, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// GPU memory the loaded models may take (bytes, or with K, M or G): loading one unloads
    /// the least recently used idle ones until its estimate fits.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    max_memory: Option<u64>,
    /// The request log's lines: text (key=value pairs) or json (one object per request).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// A LoRA merged into the image model (FILE[:SCALE], repeatable): what requests that name
    /// no `loras` get.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
    /// A folder of LoRA files (`*.safetensors`) that an image request may choose by name (the
    /// file's stem): `"loras": [{"name": "...", "scale": 0.8}]`; the set is merged when it
    /// changes from the previous request's.
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// Address to bind (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on the /v1 endpoints.
    #[arg(long)]
    api_key: Option<String>,
    /// Largest request body accepted, in bytes (a larger declared Content-Length is refused
    /// before the body is read).
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Largest multipart upload accepted (POST /v1/images/edits: an image and a mask), in
    /// bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_upload: usize,
    /// Seconds a client has to send a request's headers, counted from connecting or from the
    /// end of its previous response (so also how long an idle keep-alive connection stays).
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body once its headers arrived.
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    body_timeout: f64,
    /// Open connections at most; more are answered 503 at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// A host name this server answers to besides localhost, IP addresses and --host
    /// (repeatable): requests naming another Host are refused, against DNS rebinding.
    #[arg(long, value_name = "NAME")]
    allowed_host: Vec<String>,
    /// A web page origin allowed to call this server from a browser, e.g.
    /// http://localhost:5173 (repeatable; none by default: other pages are refused).
    #[arg(long, value_name = "ORIGIN")]
    cors_origin: Vec<String>,
    /// Context length of the text model (KV-cache positions).
    #[arg(long, default_value_t = LoadOptions::default().ctx)]
    ctx: usize,
    /// Quantize the text model's float matrices on load: none, q4, q8, q4_k or q6_k.
    #[arg(long, default_value_t = LoadOptions::default().quantize)]
    quantize: kiln::llm::Quantize,
    /// Quantize the image model's U-Net and text encoders on load (as `kiln image --quantize`).
    #[arg(long, default_value_t = kiln::llm::Quantize::None)]
    image_quantize: kiln::llm::Quantize,
    /// Requests each text model runs at once: slots sharing its weights, each with its own KV
    /// cache (and prefix reuse); a request waits only when every slot is busy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    parallel: u32,
    /// KV-cache element type: auto (f16 on GPUs, f32 on software adapters), f32 or f16.
    #[arg(long, default_value_t = LoadOptions::default().kv_cache)]
    kv_cache: kiln::llm::KvCacheType,
}

/// A positive, finite number of seconds.
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "'{s}': a number of seconds, more than 0 and at most 86400"
        )),
    }
}

/// Chunks a worker may run ahead of the client reading them.
const CHUNK_QUEUE: usize = 16;

/// What a worker sends back for one request.
enum Event {
    Chunk(Value),
    Done(Value),
    Failed(ApiError),
}

/// An OpenAI-style error: status and `{"error": {message, type, param, code}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            code: None,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }

    /// The engine's errors: what the request asked for is a 400 (a size past the adapter's
    /// limits included: models are loaded at start-up, so here it is the request's size), the
    /// rest a 500.
    fn from_engine(e: kiln::Error) -> ApiError {
        match e {
            kiln::Error::Data { .. }
            | kiln::Error::Unsupported(_)
            | kiln::Error::Shape { .. }
            | kiln::Error::TooLarge { .. } => Self::bad_request(e.to_string()),
            kiln::Error::Cancelled => Self::new(
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "cancelled",
                "cancelled",
            ),
            e => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A request for a text worker.
enum TextJob {
    Chat(ChatRequest),
    Completion(CompletionRequest),
}

impl TextJob {
    /// What the request starts with, for sending a conversation's next turn to the slot that
    /// holds its history ([`pool::Worker`]): a chat's messages, a prompt in 64-byte pieces.
    fn key(&self) -> pool::Key {
        match self {
            TextJob::Chat(r) => r
                .messages
                .iter()
                .map(|m| pool::part_hash(&format!("{m:?}")))
                .collect(),
            TextJob::Completion(r) => {
                let p = r.prompt.as_ref().map(|p| p.to_string()).unwrap_or_default();
                p.as_bytes()
                    .chunks(64)
                    .map(|c| pool::part_hash(&String::from_utf8_lossy(c)))
                    .collect()
            }
        }
    }
}

/// A request for the image worker (`POST /v1/images/generations`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageRequest {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<u32>,
    /// `"WIDTHxHEIGHT"`.
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    guidance: Option<f32>,
    #[serde(default)]
    scheduler: Option<SchedulerKind>,
    #[serde(default)]
    seed: Option<u32>,
    /// Accepted and ignored (OpenAI's end-user id).
    #[serde(default, rename = "user")]
    _user: Option<String>,
    /// An edit (`/v1/images/edits`): the share of the steps run.
    #[serde(default)]
    strength: Option<f32>,
    /// An edit: encode to a seeded draw from the VAE's distribution instead of its mean.
    #[serde(default)]
    sample_encoding: Option<bool>,
    /// LoRAs from `--lora-dir` by name, each with a scale (default 1), instead of the
    /// server's `--lora` set; `[]` for none.
    #[serde(default)]
    loras: Option<Vec<LoraRef>>,
    /// An edit's image and mask (from the multipart form).
    #[serde(skip)]
    init_image: Option<RgbImage>,
    #[serde(skip)]
    mask: Option<RgbImage>,
}

/// A LoRA a request names: a file of `--lora-dir` by its stem.
#[derive(serde::Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct LoraRef {
    name: String,
    #[serde(default = "one")]
    scale: f32,
}

fn one() -> f32 {
    1.0
}

/// The image worker's state: the pipeline, the LoRA files requests may name, the server's own
/// set, and the set merged now (`(path, scale)` in order).
struct ImageWorker {
    m: SdModels,
    available: std::collections::BTreeMap<String, PathBuf>,
    default_set: Vec<(PathBuf, f32)>,
    merged: Vec<(PathBuf, f32)>,
}

impl ImageWorker {
    /// The LoRA files of `--lora-dir` by stem.
    fn available(
        dir: Option<&std::path::Path>,
    ) -> Result<std::collections::BTreeMap<String, PathBuf>> {
        let mut out = std::collections::BTreeMap::new();
        let Some(dir) = dir else {
            return Ok(out);
        };
        for e in std::fs::read_dir(dir).with_context(|| format!("--lora-dir {}", dir.display()))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                    out.insert(stem.to_string(), p.clone());
                }
            }
        }
        Ok(out)
    }

    /// Merges the request's LoRAs (or the server's set) when they differ from what is merged.
    fn use_loras(&mut self, wanted: Option<&[LoraRef]>) -> Result<(), ApiError> {
        let set: Vec<(PathBuf, f32)> =
            match wanted {
                None => self.default_set.clone(),
                Some(refs) => {
                    if !refs.is_empty() && self.available.is_empty() {
                        return Err(ApiError::bad_request(
                        "loras: this server takes no LoRAs by name (start it with --lora-dir DIR)",
                    ));
                    }
                    refs.iter()
                        .enumerate()
                        .map(|(i, r)| {
                            if !r.scale.is_finite() {
                                return Err(ApiError::bad_request(format!(
                                    "loras[{i}].scale: {} (expected a finite number)",
                                    r.scale
                                )));
                            }
                            match self.available.get(&r.name) {
                                Some(p) => Ok((p.clone(), r.scale)),
                                None => {
                                    Err(ApiError::bad_request(format!(
                                "loras[{i}].name '{}': no such LoRA in --lora-dir (there: {})",
                                r.name,
                                self.available.keys().cloned().collect::<Vec<_>>().join(", ")
                            )))
                                }
                            }
                        })
                        .collect::<Result<_, _>>()?
                }
            };
        if set == self.merged {
            return Ok(());
        }
        let mut files = Vec::new();
        for (p, scale) in &set {
            let bytes = std::fs::read(p).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("reading {}: {e}", p.display()),
                )
            })?;
            let label = p
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into());
            files.push((label, bytes, *scale));
        }
        // A file that does not fit leaves the previous set merged (set_loras checks every file
        // before changing anything).
        self.m.set_loras(files).map_err(ApiError::from_engine)?;
        self.merged = set;
        Ok(())
    }
}

impl ImageRequest {
    /// An edit request from OpenAI's multipart form: the files `image` (or `image[]`) and
    /// `mask`, every other field a text value parsed as its JSON counterpart.
    async fn from_form(body: Vec<u8>, content_type: &str) -> Result<ImageRequest, ApiError> {
        let bad = |m: String| ApiError::bad_request(m);
        let boundary = multer::parse_boundary(content_type)
            .map_err(|e| bad(format!("multipart form: {e}")))?;
        let stream = futures_util::stream::once(async move {
            Ok::<_, std::convert::Infallible>(Bytes::from(body))
        });
        let mut form = multer::Multipart::new(stream, boundary);
        let mut fields = serde_json::Map::new();
        let (mut image, mut mask) = (None, None);
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| bad(format!("multipart form: {e}")))?
        {
            let name = field.name().unwrap_or("").to_string();
            let data = field
                .bytes()
                .await
                .map_err(|e| bad(format!("multipart form, field '{name}': {e}")))?;
            match name.as_str() {
                "image" | "image[]" if image.is_some() => {
                    return Err(bad("image edit request: one 'image' only (n = 1)".into()))
                }
                "image" | "image[]" => {
                    image = Some(
                        crate::image::decode_png(&data, "image")
                            .map_err(|e| bad(format!("image: {e:#} (upload a PNG)")))?,
                    )
                }
                "mask" => {
                    mask = Some(
                        crate::image::decode_mask_png(&data, "mask")
                            .map_err(|e| bad(format!("mask: {e:#} (upload a PNG)")))?,
                    )
                }
                _ => {
                    let text = String::from_utf8(data.to_vec())
                        .map_err(|_| bad(format!("field '{name}' is not UTF-8 text")))?;
                    // Numbers as numbers, everything else as the string it is.
                    let v = match name.as_str() {
                        "n" | "steps" | "seed" | "guidance" | "strength" | "sample_encoding" => {
                            serde_json::from_str(&text).map_err(|_| {
                                bad(format!("field '{name}': '{text}' is not a number"))
                            })?
                        }
                        // A JSON list, e.g. `[{"name": "style", "scale": 0.8}]`.
                        "loras" => serde_json::from_str(&text).map_err(|e| {
                            bad(format!(
                                "field 'loras': not a JSON list of {{name, scale}}: {e}"
                            ))
                        })?,
                        _ => Value::String(text),
                    };
                    fields.insert(name, v);
                }
            }
        }
        let mut r: ImageRequest = serde_json::from_value(Value::Object(fields))
            .map_err(|e| bad(format!("image edit request: {e}")))?;
        r.init_image =
            Some(image.ok_or_else(|| bad("image edit request: no 'image' file".into()))?);
        r.mask = mask;
        Ok(r)
    }
}

struct App {
    /// The models offered, loaded or not.
    models: registry::Registry,
    metrics: Arc<metrics::Metrics>,
    guard: guard::Guard,
    created: u64,
}

/// The text worker's handler: prepare, run, stream.
fn run_text(
    model: &mut TextModel,
    job: TextJob,
    model_id: &str,
    reply: &Sender<Event>,
    metrics: &metrics::Metrics,
) {
    let t0 = std::time::Instant::now();
    let (prepared, what) = match &job {
        TextJob::Chat(r) => (Prepared::chat(model, r, model_id), "chat"),
        TextJob::Completion(r) => (Prepared::completion(model, r, model_id), "completion"),
    };
    let p = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = reply.blocking_send(Event::Failed(ApiError::from_engine(e)));
            return;
        }
    };
    let r = pollster::block_on(p.run(model, &mut |chunk| {
        if chunk.is_null() {
            !reply.is_closed()
        } else {
            reply.blocking_send(Event::Chunk(chunk)).is_ok()
        }
    }));
    let mut log = metrics::RequestLog {
        id: &p.meta.id,
        endpoint: what,
        model: model_id,
        ..Default::default()
    };
    let err;
    match r {
        Ok(v) => {
            let k = &v["kiln"];
            let reason = v["choices"][0]["finish_reason"]
                .as_str()
                .or(k["stop"].as_str())
                .unwrap_or("")
                .to_string();
            log.prompt_tokens = k["prompt_ids"].as_array().map_or(0, Vec::len);
            log.cached_tokens = k["reused_tokens"].as_u64().unwrap_or(0) as usize;
            log.completion_tokens = k["ids"].as_array().map_or(0, Vec::len);
            log.ttft_ms = k["timings"]["ttft_ms"].as_f64().unwrap_or(0.0);
            log.duration_ms = t0.elapsed().as_secs_f64() * 1e3;
            log.finish_reason = if reply.is_closed() {
                "cancelled"
            } else {
                &reason
            };
            metrics.text_done(&log, k["timings"]["decode_ms"].as_f64().unwrap_or(0.0));
            let _ = reply.blocking_send(Event::Done(v));
        }
        Err(e) => {
            err = e.to_string();
            log.finish_reason = "error";
            log.error = Some(&err);
            log.duration_ms = t0.elapsed().as_secs_f64() * 1e3;
            metrics.text_done(&log, 0.0);
            let _ = reply.blocking_send(Event::Failed(ApiError::from_engine(e)));
        }
    }
    metrics.kv_cache(model.cached_tokens(), model.ctx());
}

/// The image worker's handler.
fn run_image(
    w: &mut ImageWorker,
    r: ImageRequest,
    model_id: &str,
    reply: &Sender<Event>,
    metrics: &metrics::Metrics,
) {
    let t0 = std::time::Instant::now();
    let result = (|| -> Result<Value, ApiError> {
        w.use_loras(r.loras.as_deref())?;
        let m = &mut w.m;
        if r.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("n other than 1 is not supported"));
        }
        if let Some(f) = r.response_format.as_deref().filter(|f| *f != "b64_json") {
            return Err(ApiError::bad_request(format!(
                "response_format '{f}': only b64_json is supported (no image hosting)"
            )));
        }
        let (width, height) = match r.size.as_deref() {
            None | Some("auto") => (None, None),
            Some(s) => {
                let parsed = s
                    .split_once('x')
                    .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
                let Some((w, h)) = parsed else {
                    return Err(ApiError::bad_request(format!(
                        "size '{s}': expected WIDTHxHEIGHT, e.g. 512x512"
                    )));
                };
                (Some(w), Some(h))
            }
        };
        let d = ImageOptions::default();
        // A few-step model's own steps and guidance where the request leaves them out.
        let (steps, guidance, _) = m.defaults();
        let seed = r.seed.unwrap_or_else(kiln::llm::options::random_seed);
        let opts = ImageOptions {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone().unwrap_or(d.negative_prompt),
            steps: r.steps.unwrap_or(steps),
            guidance: r.guidance.unwrap_or(guidance),
            scheduler: r.scheduler,
            seed,
            width,
            height,
            init_image: r.init_image.clone(),
            mask: r.mask.clone(),
            strength: r.strength,
            sample_encoding: r.sample_encoding.unwrap_or(false),
            ..ImageOptions::default()
        };
        let img = pollster::block_on(m.generate_with(&opts, &mut |_, _, _| {
            if reply.is_closed() {
                StepReply::Stop
            } else {
                StepReply::Continue
            }
        }))
        .map_err(ApiError::from_engine)?;
        let png_bytes = crate::image::png_bytes(img.width, img.height, &img.rgb).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            )
        })?;
        Ok(json!({
            "created": kiln::llm::chat::unix_seconds(),
            "data": [{"b64_json": base64::engine::general_purpose::STANDARD.encode(&png_bytes)}],
            "kiln": {"model": model_id, "seed": seed, "width": img.width, "height": img.height,
                     "steps": img.steps, "notes": img.notes},
        }))
    })();
    let id = format!("img-{}", metrics::next_id());
    let mut log = metrics::RequestLog {
        id: &id,
        endpoint: "image",
        model: model_id,
        finish_reason: "done",
        ..Default::default()
    };
    let msg;
    log.duration_ms = t0.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(v) => {
            metrics.image_done(&log);
            let _ = reply.blocking_send(Event::Done(v));
        }
        Err(e) => {
            msg = e.message.clone();
            log.finish_reason = if reply.is_closed() {
                "cancelled"
            } else {
                "error"
            };
            log.error = Some(&msg);
            metrics.image_done(&log);
            if !reply.is_closed() {
                let _ = reply.blocking_send(Event::Failed(e));
            }
        }
    }
}

impl App {
    /// Each loaded model's kind, id and queue depth.
    fn workers(&self) -> Vec<(&'static str, (String, usize))> {
        self.models
            .list()
            .into_iter()
            .filter(|m| m.loaded)
            .map(|m| (m.kind.name(), (m.id, m.queued)))
            .collect()
    }

    /// The text model a request's `model` names (`default` or nothing: the one in use), loaded
    /// if it is not, with its tokenizer.
    async fn text(
        &self,
        model: Option<&str>,
    ) -> Result<(Arc<Worker<TextJob>>, Arc<kiln::llm::TextTokenizer>), ApiError> {
        match self.models.pick(registry::Kind::Text, model).await? {
            registry::Handle::Text(w, t) => Ok((w, t)),
            _ => Err(ApiError::bad_request("not a text model")),
        }
    }

    async fn image(&self, model: Option<&str>) -> Result<Arc<Worker<ImageRequest>>, ApiError> {
        match self.models.pick(registry::Kind::Image, model).await? {
            registry::Handle::Image(w) => Ok(w),
            _ => Err(ApiError::bad_request("not an image model")),
        }
    }

    async fn embedding(
        &self,
        model: Option<&str>,
    ) -> Result<Arc<Worker<kiln::embed::EmbeddingRequest>>, ApiError> {
        match self.models.pick(registry::Kind::Embedding, model).await? {
            registry::Handle::Embedding(w) => Ok(w),
            _ => Err(ApiError::bad_request("not an embedding model")),
        }
    }
}

/// Sends a job and answers with the response, or an SSE stream of chunks.
async fn respond<J: Send + 'static>(worker: &Worker<J>, job: J, stream: bool) -> Response {
    // A bounded queue: a client that reads slowly holds the worker back (instead of chunks
    // piling up in memory), and one that leaves fails the worker's next send.
    let (tx, mut rx) = channel(CHUNK_QUEUE);
    if let Err(e) = worker.submit(job, tx) {
        return e.into_response();
    }
    if !stream {
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Done(v) => return axum::Json(v).into_response(),
                Event::Failed(e) => return e.into_response(),
                Event::Chunk(_) => {}
            }
        }
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "no response",
        )
        .into_response();
    }
    // The first event decides the status: an error before any chunk is a plain error response.
    let first = match rx.recv().await {
        Some(Event::Failed(e)) => return e.into_response(),
        Some(ev) => ev,
        None => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "no response",
            )
            .into_response()
        }
    };
    let frame = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    let events = futures_util::stream::unfold(
        (Some(first), rx, false),
        move |(pending, mut rx, done)| async move {
            if done {
                return None;
            }
            let ev = match pending {
                Some(ev) => Some(ev),
                None => rx.recv().await,
            };
            let bytes = match ev {
                Some(Event::Chunk(v)) => frame(&v),
                Some(Event::Failed(e)) => {
                    let mut b = frame(&e.body()).to_vec();
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    return Some((
                        Ok::<_, std::convert::Infallible>(Bytes::from(b)),
                        (None, rx, true),
                    ));
                }
                Some(Event::Done(_)) | None => {
                    return Some((
                        Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                        (None, rx, true),
                    ))
                }
            };
            Some((Ok(bytes), (None, rx, false)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A text request: parsed into a [`TextJob`] and queued on the text model it names.
async fn text_request(app: &App, body: Body, parse: fn(&str) -> kiln::Result<TextJob>) -> Response {
    let r = async {
        let job = parse(&app.guard.read_body(body).await?).map_err(ApiError::from_engine)?;
        let sampling = match &job {
            TextJob::Chat(r) => &r.sampling,
            TextJob::Completion(r) => &r.sampling,
        };
        let (w, _) = app.text(sampling.model.as_deref()).await?;
        let stream = sampling.stream();
        Ok::<_, ApiError>(respond(&w, job, stream).await)
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(app): State<Arc<App>>, body: Body) -> Response {
    text_request(&app, body, |s| ChatRequest::from_json(s).map(TextJob::Chat)).await
}

async fn completions(State(app): State<Arc<App>>, body: Body) -> Response {
    text_request(&app, body, |s| {
        CompletionRequest::from_json(s).map(TextJob::Completion)
    })
    .await
}

async fn images(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let req: ImageRequest = serde_json::from_str(&app.guard.read_body(body).await?)
            .map_err(|e| ApiError::bad_request(format!("image request: {e}")))?;
        let w = app.image(req.model.as_deref()).await?;
        Ok::<_, ApiError>(respond(&w, req, false).await)
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/images/edits`: OpenAI's multipart form, queued on the image model like a
/// generation.
async fn image_edits(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let ctype = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = app.guard.read_bytes(body, true).await?;
        let req = ImageRequest::from_form(bytes, &ctype).await?;
        let w = app.image(req.model.as_deref()).await?;
        Ok::<_, ApiError>(respond(&w, req, false).await)
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// llama-server's `/tokenize` request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    content: String,
    /// Add the model's BOS as a prompt gets it.
    #[serde(default)]
    add_special: bool,
    /// Each token as `{ id, piece }`.
    #[serde(default)]
    with_pieces: bool,
}

/// llama-server's `/detokenize` request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

/// A JSON body as `T`, a 400 naming what is wrong otherwise.
async fn json_body<T: serde::de::DeserializeOwned>(
    app: &App,
    body: Body,
    what: &str,
) -> Result<T, ApiError> {
    serde_json::from_str(&app.guard.read_body(body).await?)
        .map_err(|e| ApiError::bad_request(format!("{what} request: {e}")))
}

/// `POST /tokenize`: `{ content, add_special, with_pieces }` -> `{ tokens }` (ids, or `{ id,
/// piece }` objects).
async fn tokenize(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let req: TokenizeRequest = json_body(&app, body, "tokenize").await?;
        let (_, tok) = app.text(None).await?;
        let ids = if req.add_special {
            tok.encode_prompt(&req.content)
        } else {
            tok.encode(&req.content)
        }
        .map_err(ApiError::from_engine)?;
        let tokens: Vec<Value> = if req.with_pieces {
            ids.iter()
                .map(|&id| json!({"id": id, "piece": tok.token_text(id)}))
                .collect()
        } else {
            ids.iter().map(|&id| json!(id)).collect()
        };
        Ok::<_, ApiError>(axum::Json(json!({ "tokens": tokens })).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /detokenize`: `{ tokens }` -> `{ content }` (special tokens rendered).
async fn detokenize(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let req: DetokenizeRequest = json_body(&app, body, "detokenize").await?;
        let (_, tok) = app.text(None).await?;
        let n = tok.vocab_size();
        if let Some(bad) = req.tokens.iter().find(|&&id| id as usize >= n) {
            return Err(ApiError::bad_request(format!(
                "tokens: id {bad} is outside the vocabulary (0 to {})",
                n - 1
            )));
        }
        let content = tok
            .decode_with_special(&req.tokens)
            .map_err(ApiError::from_engine)?;
        Ok::<_, ApiError>(axum::Json(json!({ "content": content })).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/models`: every model offered, loaded or not (`kiln.loaded`), with its kind.
async fn list_models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<Value> = app
        .models
        .list()
        .iter()
        .map(|m| {
            json!({"id": m.id, "object": "model", "created": app.created, "owned_by": "kiln",
                   "kiln": {"kind": m.kind.name(), "loaded": m.loaded, "estimated_bytes": m.bytes}})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /health`: `{ status: "ok", models: [{ id, kind, loaded, queued }] }`.
async fn health(State(app): State<Arc<App>>) -> Response {
    let models: Vec<Value> = app
        .models
        .list()
        .iter()
        .map(|m| json!({"id": m.id, "kind": m.kind.name(), "loaded": m.loaded, "queued": m.queued}))
        .collect();
    axum::Json(json!({"status": "ok", "models": models})).into_response()
}

async fn not_found() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint (POST /v1/chat/completions, /v1/completions, /v1/images/generations, /v1/images/edits, /v1/embeddings, /tokenize, /detokenize; GET /v1/models, /health, /metrics)",
    )
    .into_response()
}

/// `BYTES` with an optional K, M or G suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("'{s}': expected bytes, or a number with K, M or G");
    let (num, mul) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(bad()),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| (v * mul as f64) as u64)
        .ok_or_else(bad)
}

/// The id of a model path: its last component (a file without its extension).
fn model_id(path: &str) -> String {
    let p = std::path::Path::new(path.trim_end_matches('/'));
    let name = if p.extension().is_some_and(|e| e == "gguf") {
        p.file_stem()
    } else {
        p.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| path.to_string())
}

/// What loading a model needs beside its spec: the device and the load flags.
struct LoadContext {
    gpu: Arc<kiln::Gpu>,
    text: LoadOptions,
    parallel: usize,
    image_quantize: kiln::llm::Quantize,
    embedding_quantize: kiln::llm::Quantize,
    loras: Vec<String>,
    lora_dir: Option<PathBuf>,
    metrics: Arc<metrics::Metrics>,
}

/// Loads a model and starts its worker.
fn load_model(c: &LoadContext, spec: &registry::Spec) -> Result<registry::Handle> {
    use registry::{Handle, Kind, Source};
    let path = match &spec.source {
        Source::Path(p) => Some(p.as_str()),
        Source::Default => None,
    };
    let id = spec.id.clone();
    let what = format!("loading the {} model {id}", spec.kind.name());
    let mt = c.metrics.clone();
    Ok(match spec.kind {
        Kind::Text => {
            let (files, _) = crate::text_files(path).context(what.clone())?;
            let model = pollster::block_on(TextModel::load(&c.gpu, files, &c.text, &mut |_, _| {}))
                .context(what)?;
            eprintln!(
                "text model: {id} (context {}, {} slot{})",
                model.ctx(),
                c.parallel,
                if c.parallel == 1 { "" } else { "s" }
            );
            let tokenizer = model.tokenizer.clone();
            // Slots decoding at once run together (continuous batching).
            let slots =
                pollster::block_on(model.into_slots(c.parallel)).context("the parallel slots")?;
            let w = Worker::start_pool(id, slots, TextJob::key, move |m, job, id, reply| {
                run_text(m, job, id, reply, &mt)
            });
            Handle::Text(Arc::new(w), tokenizer)
        }
        Kind::Image => {
            let files = match path {
                Some(p) => crate::image::pipeline_files(p).context(what.clone())?,
                None => crate::defaults::image(),
            };
            let mut m =
                SdModels::load_with(&c.gpu, files, c.image_quantize).context(what.clone())?;
            let loras = crate::image::read_loras(&c.loras)?;
            let default_set: Vec<(PathBuf, f32)> = loras
                .iter()
                .map(|(p, _, s)| (PathBuf::from(p), *s))
                .collect();
            if !loras.is_empty() {
                let n = m.set_loras(loras).context(what)?;
                eprintln!("LoRA: {n} modules merged from {}", c.loras.join(", "));
            }
            let available = ImageWorker::available(c.lora_dir.as_deref())?;
            if !available.is_empty() {
                let names: Vec<&str> = available.keys().map(String::as_str).collect();
                eprintln!("LoRAs requests may name: {}", names.join(", "));
            }
            eprintln!("image model: {id}");
            let w = ImageWorker {
                m,
                available,
                merged: default_set.clone(),
                default_set,
            };
            Handle::Image(Arc::new(Worker::start(id, w, move |m, job, id, reply| {
                run_image(m, job, id, reply, &mt)
            })))
        }
        Kind::Embedding => {
            let p = path.ok_or_else(|| anyhow::anyhow!("there is no default embedding model"))?;
            let files = crate::embed::embedding_files(p).context(what.clone())?;
            let m = pollster::block_on(kiln::embed::Embedder::load(
                &c.gpu,
                files,
                c.embedding_quantize,
            ))
            .context(what)?;
            eprintln!("embedding model: {id} ({} dimensions)", m.dim());
            Handle::Embedding(Arc::new(Worker::start(id, m, move |m, job, id, reply| {
                embeddings::run(m, job, id, reply, &mt)
            })))
        }
    })
}

pub fn run(a: ServeArgs) -> Result<()> {
    use registry::{Kind, Source, Spec};
    let gpu = crate::gpu()?;
    let metrics = metrics::Metrics::new(a.log_format == "json");
    let ctx = LoadContext {
        gpu: gpu.clone(),
        text: LoadOptions {
            ctx: a.ctx,
            quantize: a.quantize,
            kv_cache: a.kv_cache,
            ..Default::default()
        },
        parallel: a.parallel as usize,
        image_quantize: a.image_quantize,
        embedding_quantize: a.quantize,
        loras: a.loras.clone(),
        lora_dir: a.lora_dir.clone(),
        metrics: metrics.clone(),
    };
    let models = registry::Registry::new(
        a.max_memory,
        a.ctx,
        a.parallel as usize,
        Arc::new(move |spec: &Spec| load_model(&ctx, spec)),
    );
    // Models named by flags (or the embedded defaults) load now; --models-dir's on demand.
    let defaults = a.model.is_empty()
        && a.image_model.is_empty()
        && a.embedding_model.is_empty()
        && a.models_dir.is_none();
    let mut now = Vec::new();
    let mut add = |spec: Spec, load: bool| -> Result<()> {
        if load {
            now.push(spec.id.clone());
        }
        models.add(spec).stage(EXIT_USAGE)
    };
    if defaults {
        add(
            Spec {
                id: "text-kjv".into(),
                kind: Kind::Text,
                source: Source::Default,
            },
            true,
        )?;
        add(
            Spec {
                id: "image-shapes".into(),
                kind: Kind::Image,
                source: Source::Default,
            },
            true,
        )?;
    }
    for (list, kind) in [
        (&a.model, Kind::Text),
        (&a.image_model, Kind::Image),
        (&a.embedding_model, Kind::Embedding),
    ] {
        for m in list {
            add(
                Spec {
                    id: model_id(m),
                    kind,
                    source: Source::Path(m.clone()),
                },
                true,
            )?;
        }
    }
    if let Some(dir) = &a.models_dir {
        let (found, skipped) = registry::scan(dir).stage(EXIT_USAGE)?;
        for (p, why) in skipped {
            eprintln!("--models-dir: skipping {}: {why}", p.display());
        }
        for spec in found {
            eprintln!("offered on demand: {} model {}", spec.kind.name(), spec.id);
            add(spec, false)?;
        }
    }
    for id in now {
        models.load_now(&id).stage(EXIT_MODEL)?;
    }
    let app = Arc::new(App {
        models,
        metrics,
        guard: guard::Guard::new(
            &a.host,
            &a.allowed_host,
            &a.cors_origin,
            a.api_key.clone(),
            a.max_body,
            a.max_upload,
            Duration::from_secs_f64(a.body_timeout),
        ),
        created: kiln::llm::chat::unix_seconds(),
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/images/generations", post(images))
        .route("/v1/embeddings", post(embeddings::handler))
        .route(guard::UPLOAD_PATH, post(image_edits))
        .route("/v1/models", get(list_models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics::handler))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            guard::check,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            metrics::track,
        ))
        .with_state(app);
    let limits = listen::Limits {
        max_connections: a.max_connections as usize,
        header_timeout: Duration::from_secs_f64(a.header_timeout),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))
            .stage(EXIT_USAGE)?;
        let addr = listener.local_addr()?;
        eprintln!("listening on http://{addr}");
        if a.host != "127.0.0.1" && a.host != "localhost" && a.api_key.is_none() {
            eprintln!("warning: bound to {} without --api-key: anyone who can reach this address can use the models", a.host);
        }
        listen::serve(listener, router, limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}
