//! Sentence embeddings: load a sentence-transformers model, answer OpenAI embeddings requests.

use crate::device::{js_err, Device, Files};
use kiln::embed::{Embedder, EmbeddingRequest};
use kiln::llm::Quantize;
use serde_json::json;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// A loaded embedding model. Requests may overlap (each is one batched pass).
#[wasm_bindgen]
pub struct EmbeddingModel {
    model: Option<Rc<Embedder>>,
    info: String,
}

#[wasm_bindgen]
impl Device {
    /// Loads a sentence-transformers folder's files. Resolves to an [`EmbeddingModel`].
    #[wasm_bindgen(js_name = loadEmbedding)]
    pub fn load_embedding(&self, files: Files) -> js_sys::Promise {
        let gpu = self.gpu.clone();
        future_to_promise(async move {
            let m = Embedder::load(&gpu, files.map, Quantize::None)
                .await
                .map_err(js_err)?;
            let info = json!({
                "dim": m.dim(),
                "maxTokens": m.max_len,
                "pooling": m.pooling,
                "normalized": m.normalize,
                "layers": m.layers(),
                "hidden": m.hidden(),
            })
            .to_string();
            Ok(EmbeddingModel {
                model: Some(Rc::new(m)),
                info,
            }
            .into())
        })
    }
}

#[wasm_bindgen]
impl EmbeddingModel {
    /// `{ dim, maxTokens, pooling, normalized, layers, hidden }` as JSON.
    pub fn info(&self) -> String {
        self.info.clone()
    }

    /// Answers an OpenAI embeddings request (JSON `{ input, encoding_format, dimensions }`):
    /// resolves to the response as JSON, `model_id` as its model.
    pub fn openai(&self, request: String, model_id: String) -> js_sys::Promise {
        let m = self.model.clone();
        future_to_promise(async move {
            let m = m.ok_or_else(|| js_err("the embedding model was disposed"))?;
            let req = EmbeddingRequest::from_json(&request).map_err(js_err)?;
            let v = m.openai(&req, &model_id).await.map_err(js_err)?;
            Ok(JsValue::from_str(&v.to_string()))
        })
    }

    /// An input's token ids (with the start and end tokens, truncated as embedding does).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, JsValue> {
        let m = self
            .model
            .as_ref()
            .ok_or_else(|| js_err("the embedding model was disposed"))?;
        m.tokenize(text).map_err(js_err)
    }
}
