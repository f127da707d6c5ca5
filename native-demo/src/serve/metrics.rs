//! `GET /metrics` (Prometheus' text format) and the request log: every HTTP response counted by
//! route and status with its duration (a middleware), and what the workers know (tokens in and
//! out, time to first token and per output token, images, embedded inputs, KV-cache use), queue
//! depths and loaded models read when scraped. Each finished request is one log line with its id,
//! endpoint, model, tokens, timings and finish reason (`--log-format text`: key=value pairs;
//! `json`: one JSON object).

use super::App;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A cumulative histogram with fixed bucket bounds (seconds).
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const PER_TOKEN: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// The server's counters.
pub struct Metrics {
    http: Mutex<BTreeMap<(String, u16), u64>>,
    http_seconds: Histogram,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    images: AtomicU64,
    embedded_inputs: AtomicU64,
    ttft: Histogram,
    per_token: Histogram,
    /// The text model's KV cache: tokens held now, and its capacity.
    kv: Mutex<(u64, u64)>,
    /// How request lines are written.
    json_logs: bool,
}

/// One finished request, as the log prints it.
#[derive(serde::Serialize, Default)]
pub struct RequestLog<'a> {
    pub id: &'a str,
    pub endpoint: &'a str,
    pub model: &'a str,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_ms: f64,
    pub duration_ms: f64,
    /// `stop`, `length`, `tool_calls`, `contextfull`, `cancelled` (the client left), `error`,
    /// or for images and embeddings `done`.
    pub finish_reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl Metrics {
    pub fn new(json_logs: bool) -> Arc<Metrics> {
        Arc::new(Metrics {
            http: Mutex::new(BTreeMap::new()),
            http_seconds: Histogram::new(LATENCY),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            images: AtomicU64::new(0),
            embedded_inputs: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY),
            per_token: Histogram::new(PER_TOKEN),
            kv: Mutex::new((0, 0)),
            json_logs,
        })
    }

    /// A finished text request: its tokens and latencies, and the log line.
    pub fn text_done(&self, log: &RequestLog, decode_ms: f64) {
        self.prompt_tokens
            .fetch_add(log.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(log.cached_tokens as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(log.completion_tokens as u64, Ordering::Relaxed);
        if log.completion_tokens > 0 {
            self.ttft.observe(log.ttft_ms / 1e3);
        }
        if log.completion_tokens > 1 {
            self.per_token
                .observe(decode_ms / 1e3 / (log.completion_tokens - 1) as f64);
        }
        self.log(log);
    }

    /// A finished image request.
    pub fn image_done(&self, log: &RequestLog) {
        if log.error.is_none() && log.finish_reason == "done" {
            self.images.fetch_add(1, Ordering::Relaxed);
        }
        self.log(log);
    }

    /// A finished embeddings request (`inputs` embedded).
    pub fn embeddings_done(&self, log: &RequestLog, inputs: usize) {
        self.embedded_inputs
            .fetch_add(inputs as u64, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(log.prompt_tokens as u64, Ordering::Relaxed);
        self.log(log);
    }

    /// The text model's KV cache after a request.
    pub fn kv_cache(&self, used: usize, capacity: usize) {
        if let Ok(mut kv) = self.kv.lock() {
            *kv = (used as u64, capacity as u64);
        }
    }

    /// Prints one request line to the server's log.
    pub fn log(&self, r: &RequestLog) {
        if self.json_logs {
            eprintln!("{}", serde_json::to_string(r).unwrap_or_default());
            return;
        }
        let mut line = format!(
            "request id={} endpoint={} model={} prompt_tokens={} cached_tokens={} \
             completion_tokens={} ttft_ms={:.1} duration_ms={:.1} finish_reason={}",
            r.id,
            r.endpoint,
            r.model,
            r.prompt_tokens,
            r.cached_tokens,
            r.completion_tokens,
            r.ttft_ms,
            r.duration_ms,
            r.finish_reason
        );
        if let Some(e) = r.error {
            let _ = write!(line, " error={e:?}");
        }
        eprintln!("{line}");
    }

    fn http_done(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(mut m) = self.http.lock() {
            *m.entry((route.to_string(), status)).or_insert(0) += 1;
        }
        self.http_seconds.observe(seconds);
    }

    /// The Prometheus text exposition of everything, with `app`'s queues and models.
    fn render(&self, app: &App) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let _ = writeln!(
            o,
            "# HELP kiln_http_requests_total HTTP responses by route and status.\n# TYPE kiln_http_requests_total counter"
        );
        if let Ok(m) = self.http.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "kiln_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        self.http_seconds.render(&mut o, "kiln_http_request_duration_seconds", "Time from a request's arrival to its response's headers (a stream's whole length is not included).");
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut o,
            "kiln_prompt_tokens_total",
            "Prompt tokens of text requests (and embedded tokens).",
            load(&self.prompt_tokens),
        );
        counter(
            &mut o,
            "kiln_prompt_tokens_cached_total",
            "Prompt tokens whose keys and values were reused from the previous request.",
            load(&self.cached_tokens),
        );
        counter(
            &mut o,
            "kiln_generated_tokens_total",
            "Tokens generated.",
            load(&self.generated_tokens),
        );
        counter(
            &mut o,
            "kiln_images_total",
            "Images generated.",
            load(&self.images),
        );
        counter(
            &mut o,
            "kiln_embedded_inputs_total",
            "Inputs embedded.",
            load(&self.embedded_inputs),
        );
        self.ttft.render(
            &mut o,
            "kiln_time_to_first_token_seconds",
            "Time to the first generated token.",
        );
        self.per_token.render(
            &mut o,
            "kiln_time_per_output_token_seconds",
            "Decode time per generated token after the first.",
        );
        // Each family's samples follow its own HELP and TYPE lines.
        let workers = app.workers();
        let _ = writeln!(o, "# HELP kiln_queue_depth Requests waiting for or running on a model's worker.\n# TYPE kiln_queue_depth gauge");
        for (_, (id, depth)) in &workers {
            let id = label(id);
            let _ = writeln!(o, "kiln_queue_depth{{model=\"{id}\"}} {depth}");
        }
        let _ = writeln!(o, "# HELP kiln_model_loaded A loaded model (1), by id and kind.\n# TYPE kiln_model_loaded gauge");
        for (kind, (id, _)) in &workers {
            let id = label(id);
            let _ = writeln!(o, "kiln_model_loaded{{model=\"{id}\",kind=\"{kind}\"}} 1");
        }
        let (used, cap) = self.kv.lock().map(|k| *k).unwrap_or((0, 0));
        let _ = writeln!(o, "# HELP kiln_kv_cache_tokens The text model's KV cache: positions holding a kept prompt.\n# TYPE kiln_kv_cache_tokens gauge\nkiln_kv_cache_tokens {used}");
        let _ = writeln!(o, "# HELP kiln_kv_cache_capacity_tokens The text model's context length.\n# TYPE kiln_kv_cache_capacity_tokens gauge\nkiln_kv_cache_capacity_tokens {cap}");
        o
    }
}

/// A label value with the text format's escapes (a model id is a folder name).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A number for the ids of requests that carry none of their own (images, embeddings).
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The middleware that counts every response by route and status.
pub async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let route = match req.uri().path() {
        p @ ("/v1/chat/completions"
        | "/v1/completions"
        | "/v1/images/generations"
        | "/v1/images/edits"
        | "/v1/embeddings"
        | "/v1/models"
        | "/tokenize"
        | "/detokenize"
        | "/health"
        | "/metrics") => p.to_string(),
        _ => "other".to_string(),
    };
    let res = next.run(req).await;
    app.metrics
        .http_done(&route, res.status().as_u16(), t0.elapsed().as_secs_f64());
    res
}

/// `GET /metrics`.
pub async fn handler(State(app): State<Arc<App>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(&app),
    )
        .into_response()
}
