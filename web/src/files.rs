//! Which files make a model, asked of the engine (`kiln::formats::files`) so that the fetcher
//! in `js/fetch.js` and the native loaders read one list.

use crate::device::js_err;
use wasm_bindgen::prelude::*;

/// The file plan of a model kind (`"text"`: a Hugging Face folder; `"image"`: a diffusers
/// pipeline, fp16 weights first unless `prefer_fp16` is false; `"embedding"`: a
/// sentence-transformers folder) as JSON: `[{ any: [[name,
/// ...], ...], required }]`. See `kiln::formats::files` for how a plan is walked.
#[wasm_bindgen(js_name = modelFiles)]
pub fn model_files(kind: &str, prefer_fp16: bool) -> Result<String, JsValue> {
    let plan = match kind {
        "text" => kiln::formats::files::text_model(),
        "image" => kiln::formats::files::pipeline(prefer_fp16),
        "embedding" => kiln::formats::files::embedding_model(),
        other => {
            return Err(js_err(format!(
                "model kind '{other}': expected text, image or embedding"
            )))
        }
    };
    serde_json::to_string(&plan).map_err(|e| js_err(e.to_string()))
}

/// The shard paths a sharded checkpoint's index (at `index_path`) lists.
#[wasm_bindgen(js_name = shardsOf)]
pub fn shards_of(index_path: &str, index_json: &str) -> Result<Vec<String>, JsValue> {
    kiln::formats::files::shards(index_path, index_json).map_err(js_err)
}

/// What loading a Hugging Face text model will take on the GPU, before loading it: JSON
/// `{ ctx, kvCacheBytes, weightsBytes, totalBytes }` for the folder's `config.json`
/// (and `generation_config.json` when given), the checkpoint's bytes as stored, and the context
/// asked for (capped by the model's maximum, as loading does). Weights are counted as stored;
/// `--quantize`-style conversion on load makes them smaller.
#[wasm_bindgen(js_name = textMemory)]
pub fn text_memory(config_json: &str, weights_bytes: f64, ctx: usize) -> Result<String, JsValue> {
    let cfg = kiln::llm::LlmConfig::from_hf(config_json, None).map_err(js_err)?;
    memory_json(&cfg, weights_bytes, ctx)
}

/// [`text_memory`] for a `.gguf` file from its first bytes (`prefix`) and its size; `undefined`
/// when the prefix ends inside the metadata (fetch more and ask again).
#[wasm_bindgen(js_name = ggufTextMemory)]
pub fn gguf_text_memory(
    name: &str,
    prefix: &[u8],
    file_bytes: f64,
    ctx: usize,
) -> Result<Option<String>, JsValue> {
    let Some(cfg) = kiln::llm::LlmConfig::from_gguf_prefix(name, prefix).map_err(js_err)? else {
        return Ok(None);
    };
    memory_json(&cfg, file_bytes, ctx).map(Some)
}

fn memory_json(
    cfg: &kiln::llm::LlmConfig,
    weights_bytes: f64,
    ctx: usize,
) -> Result<String, JsValue> {
    let ctx = ctx.clamp(2, cfg.max_positions.max(2));
    // At most: an f32 cache (GPUs get the f16 one, half of this).
    let kv = kiln::llm::model::KvCache::bytes(cfg, ctx, false) as f64;
    Ok(serde_json::json!({
        "ctx": ctx,
        "kvCacheBytes": kv,
        "weightsBytes": weights_bytes,
        "totalBytes": kv + weights_bytes,
    })
    .to_string())
}
