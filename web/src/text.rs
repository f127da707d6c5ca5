//! Text generation: load a Llama-family model, stream pieces to a JavaScript callback.

use crate::device::{js_err, parse, Device, Files};
use kiln::llm::{LoadOptions, TextOptions};
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

type Shared = Rc<RefCell<Option<kiln::llm::TextModel>>>;

/// A loaded text model. One generation at a time.
#[wasm_bindgen]
pub struct TextModel {
    model: Shared,
    info: String,
}

/// Takes the model out for the length of an async call (so no borrow spans an await).
fn take(model: &Shared) -> Result<kiln::llm::TextModel, JsValue> {
    model
        .borrow_mut()
        .take()
        .ok_or_else(|| js_err("the text model is busy with another generation (or disposed)"))
}

#[wasm_bindgen]
impl Device {
    /// Loads a text model from its files (`options`: JSON `{ ctx, quantize }`).
    /// `on_progress(done, total)` reports weight uploads. Resolves to a [`TextModel`].
    #[wasm_bindgen(js_name = loadText)]
    pub fn load_text(
        &self,
        files: Files,
        options: String,
        on_progress: js_sys::Function,
    ) -> js_sys::Promise {
        let gpu = self.gpu.clone();
        future_to_promise(async move {
            let opts = LoadOptions::from_json(&options).map_err(js_err)?;
            let m = kiln::llm::TextModel::load(&gpu, files.map, &opts, &mut |done, total| {
                let _ = on_progress.call2(&JsValue::NULL, &done.into(), &total.into());
            })
            .await
            .map_err(js_err)?;
            let c = &m.config;
            let info = json!({
                "arch": format!("{:?}", c.arch),
                "layers": c.layers,
                "hidden": c.hidden,
                "heads": c.heads,
                "kvHeads": c.kv_heads,
                "vocab": c.vocab,
                "ctx": m.ctx(),
                "chatTemplate": m.tokenizer.chat_template.is_some(),
            })
            .to_string();
            Ok(TextModel {
                model: Rc::new(RefCell::new(Some(m))),
                info,
            }
            .into())
        })
    }
}

#[wasm_bindgen]
impl TextModel {
    /// Architecture, sizes and context length, as JSON.
    pub fn info(&self) -> String {
        self.info.clone()
    }

    /// Token ids of a prompt as the generator would see it (BOS added when the model wants it).
    #[wasm_bindgen(js_name = encodePrompt)]
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, JsValue> {
        let m = self.model.borrow();
        let m = m.as_ref().ok_or_else(|| js_err("the text model is busy"))?;
        m.tokenizer.encode_prompt(text).map_err(js_err)
    }

    /// Text of token ids.
    pub fn decode(&self, ids: Vec<u32>) -> Result<String, JsValue> {
        let m = self.model.borrow();
        let m = m.as_ref().ok_or_else(|| js_err("the text model is busy"))?;
        m.tokenizer.decode(&ids).map_err(js_err)
    }

    /// Renders chat messages (JSON `[[role, content], ...]`) with the model's chat template.
    #[wasm_bindgen(js_name = renderChat)]
    pub fn render_chat(&self, messages: &str) -> Result<String, JsValue> {
        let msgs: Vec<(String, String)> = parse("chat", messages)?;
        let m = self.model.borrow();
        let m = m.as_ref().ok_or_else(|| js_err("the text model is busy"))?;
        m.tokenizer.render_chat(&msgs).map_err(js_err)
    }

    /// Generates (`options`: the engine's `TextOptions` as JSON: `prompt` or `promptIds` and
    /// the sampler settings). `on_piece(text)` receives each new piece; returning `false`
    /// stops. Resolves to the result as JSON (`Generation::to_json`: `prompt_ids`, `ids`,
    /// `logprobs`, `text`, `stop`, `timings`).
    pub fn generate(&self, options: String, on_piece: js_sys::Function) -> js_sys::Promise {
        let shared = self.model.clone();
        future_to_promise(async move {
            let o = TextOptions::from_json(&options).map_err(js_err)?;
            let mut m = take(&shared)?;
            let r = run(&mut m, &o, &on_piece).await;
            *shared.borrow_mut() = Some(m);
            r
        })
    }
}

#[wasm_bindgen]
impl TextModel {
    /// An OpenAI-shaped request through the engine's chat-completion core: `kind` is "chat"
    /// (`/v1/chat/completions`) or "completion" (`/v1/completions`), `request` its JSON body,
    /// `model_id` the name responses carry. When streaming, `on_chunk(json)` receives each chunk;
    /// otherwise `on_chunk(null)` is called once per piece. Returning `false` cancels. Resolves
    /// to the whole response as JSON.
    pub fn openai(
        &self,
        kind: String,
        request: String,
        model_id: String,
        on_chunk: js_sys::Function,
    ) -> js_sys::Promise {
        use kiln::llm::{ChatRequest, CompletionRequest, Prepared};
        let shared = self.model.clone();
        future_to_promise(async move {
            let mut m = take(&shared)?;
            let prepared = match kind.as_str() {
                "chat" => {
                    ChatRequest::from_json(&request).and_then(|r| Prepared::chat(&m, &r, &model_id))
                }
                _ => CompletionRequest::from_json(&request)
                    .and_then(|r| Prepared::completion(&m, &r, &model_id)),
            };
            let mut failed = None;
            let r = match prepared {
                Ok(p) => {
                    p.run(&mut m, &mut |chunk| {
                        let arg = if chunk.is_null() {
                            JsValue::NULL
                        } else {
                            JsValue::from_str(&chunk.to_string())
                        };
                        match on_chunk.call1(&JsValue::NULL, &arg) {
                            Ok(v) => v.as_bool() != Some(false),
                            Err(e) => {
                                failed = Some(e);
                                false
                            }
                        }
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            *shared.borrow_mut() = Some(m);
            if let Some(e) = failed {
                return Err(e);
            }
            Ok(JsValue::from_str(&r.map_err(js_err)?.to_string()))
        })
    }
}

async fn run(
    m: &mut kiln::llm::TextModel,
    o: &TextOptions,
    on_piece: &js_sys::Function,
) -> Result<JsValue, JsValue> {
    let prompt = o.prompt_ids(&m.tokenizer).map_err(js_err)?;
    let mut failed = None;
    let g = m
        .generate(&prompt, &o.generate_options(), &mut |piece| match on_piece
            .call1(&JsValue::NULL, &JsValue::from_str(piece))
        {
            Ok(v) => v.as_bool() != Some(false),
            Err(e) => {
                failed = Some(e);
                false
            }
        })
        .await
        .map_err(js_err)?;
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(JsValue::from_str(&g.to_json().to_string()))
}
