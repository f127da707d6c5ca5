//! `POST /v1/embeddings` on the embedding model's worker: the engine's OpenAI embeddings core
//! (`kiln::embed::EmbeddingRequest`), all inputs of a request in one batched pass.

use super::{ApiError, App, Event, Sender};
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use kiln::embed::{Embedder, EmbeddingRequest};
use std::sync::Arc;

/// The worker's handler.
pub fn run(
    m: &mut Embedder,
    r: EmbeddingRequest,
    model_id: &str,
    reply: &Sender<Event>,
    metrics: &super::metrics::Metrics,
) {
    let t0 = std::time::Instant::now();
    let result = pollster::block_on(m.openai(&r, model_id)).map_err(ApiError::from_engine);
    let id = format!("emb-{}", super::metrics::next_id());
    let mut log = super::metrics::RequestLog {
        id: &id,
        endpoint: "embeddings",
        model: model_id,
        finish_reason: "done",
        duration_ms: t0.elapsed().as_secs_f64() * 1e3,
        ..Default::default()
    };
    let msg;
    let inputs = match &result {
        Ok(v) => {
            log.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            v["data"].as_array().map_or(0, Vec::len)
        }
        Err(e) => {
            msg = e.message.clone();
            log.finish_reason = "error";
            log.error = Some(&msg);
            0
        }
    };
    metrics.embeddings_done(&log, inputs);
    let _ = reply.blocking_send(match result {
        Ok(v) => Event::Done(v),
        Err(e) => Event::Failed(e),
    });
}

/// `POST /v1/embeddings`.
pub async fn handler(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let req = EmbeddingRequest::from_json(&app.guard.read_body(body).await?)
            .map_err(ApiError::from_engine)?;
        let w = app.embedding(req.model.as_deref()).await?;
        Ok::<_, ApiError>(super::respond(&w, req, false).await)
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}
