//! Which files make a model, asked of the engine (`kiln::formats::files`) so that the fetcher
//! in `js/fetch.js` and the native loaders read one list.

use crate::device::js_err;
use wasm_bindgen::prelude::*;

/// The file plan of a model kind (`"text"`: a Hugging Face folder; `"image"`: a diffusers
/// pipeline, fp16 weights first unless `prefer_fp16` is false) as JSON: `[{ any: [[name,
/// ...], ...], required }]`. See `kiln::formats::files` for how a plan is walked.
#[wasm_bindgen(js_name = modelFiles)]
pub fn model_files(kind: &str, prefer_fp16: bool) -> Result<String, JsValue> {
    let plan = match kind {
        "text" => kiln::formats::files::text_model(),
        "image" => kiln::formats::files::pipeline(prefer_fp16),
        other => {
            return Err(js_err(format!(
                "model kind '{other}': expected text or image"
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
