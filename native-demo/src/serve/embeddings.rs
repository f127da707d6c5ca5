//! `POST /v1/embeddings`: OpenAI's request (`input` a string, a list of strings, a list of token
//! ids or a list of such lists; `encoding_format` float or base64; `dimensions`) on the
//! embedding model's worker, all inputs of a request in one batched pass.

use super::{ApiError, App, Event, Sender};
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use kiln::embed::Embedder;
use serde_json::{json, Value};
use std::sync::Arc;

/// Inputs per request at most (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    input: Input,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    /// Accepted and ignored (OpenAI's end-user id).
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

/// The worker's handler: tokenize, embed in one pass, answer in OpenAI's shape.
pub fn run(m: &mut Embedder, r: EmbeddingRequest, model_id: &str, reply: &Sender<Event>) {
    let result = (|| -> Result<Value, ApiError> {
        let ids: Vec<Vec<u32>> = match r.input {
            Input::One(s) => vec![m.tokenize(&s).map_err(ApiError::from_engine)?],
            Input::Many(v) => v
                .iter()
                .map(|s| m.tokenize(s))
                .collect::<kiln::Result<_>>()
                .map_err(ApiError::from_engine)?,
            Input::Ids(v) => vec![v],
            Input::IdLists(v) => v,
        };
        if ids.is_empty() || ids.len() > MAX_INPUTS {
            return Err(ApiError::bad_request(format!(
                "input: {} inputs (1 to {MAX_INPUTS})",
                ids.len()
            )));
        }
        let base64 = match r.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(f) => {
                return Err(ApiError::bad_request(format!(
                    "encoding_format '{f}': float or base64"
                )))
            }
        };
        let t0 = std::time::Instant::now();
        let mut vs = pollster::block_on(m.embed_ids(&ids)).map_err(ApiError::from_engine)?;
        if let Some(d) = r.dimensions {
            for v in &mut vs {
                crate::embed::shorten(v, d).map_err(|e| ApiError::bad_request(e))?;
            }
        }
        let tokens: usize = ids.iter().map(Vec::len).sum();
        eprintln!(
            "embeddings: {} inputs, {tokens} tokens, {:.0} ms",
            ids.len(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        let data: Vec<Value> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let e = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": e})
            })
            .collect();
        Ok(json!({
            "object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    })();
    let _ = reply.blocking_send(match result {
        Ok(v) => Event::Done(v),
        Err(e) => Event::Failed(e),
    });
}

/// `POST /v1/embeddings`.
pub async fn handler(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let req: EmbeddingRequest = serde_json::from_str(&app.guard.read_body(body).await?)
            .map_err(|e| ApiError::bad_request(format!("embedding request: {e}")))?;
        let w = App::pick(&app.embedding, "embedding", req.model.as_deref())?;
        Ok::<_, ApiError>(super::respond(w, req, false).await)
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}
