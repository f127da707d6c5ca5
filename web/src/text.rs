//! Text generation: load a Llama-family model, stream pieces to a JavaScript callback.

use crate::device::{js_err, parse, Device, Files};
use kiln::kernels::sample::SamplerSettings;
use kiln::llm::{GenerateOptions, LoadOptions, Quantize, StopReason};
use serde::Deserialize;
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

#[derive(Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct LoadOpts {
    ctx: usize,
    /// "q4", "q8" or absent.
    quantize: Option<String>,
}

impl Default for LoadOpts {
    fn default() -> Self {
        LoadOpts {
            ctx: LoadOptions::default().ctx,
            quantize: None,
        }
    }
}

/// The sampler defaults are the CLI's (`kiln text`), so both give the same output.
#[derive(Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct GenOpts {
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    max_tokens: usize,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_window: u32,
    seed: u32,
    stop: Vec<String>,
}

impl Default for GenOpts {
    fn default() -> Self {
        GenOpts {
            prompt: None,
            prompt_ids: None,
            max_tokens: 128,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_window: 64,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

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
            let o: LoadOpts = parse("loadText", &options)?;
            let quantize = match o.quantize.as_deref() {
                None | Some("none") => Quantize::None,
                Some("q4") => Quantize::Q4,
                Some("q8") => Quantize::Q8,
                Some(q) => return Err(js_err(format!("quantize '{q}': expected q4 or q8"))),
            };
            let opts = LoadOptions {
                ctx: o.ctx,
                quantize,
                ..Default::default()
            };
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

fn stop_name(s: StopReason) -> &'static str {
    match s {
        StopReason::Eos => "eos",
        StopReason::StopString => "stopstring",
        StopReason::MaxTokens => "maxtokens",
        StopReason::ContextFull => "contextfull",
        StopReason::Cancelled => "cancelled",
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

    /// Generates (`options`: JSON with `prompt` or `promptIds` and the sampler settings).
    /// `on_piece(text)` receives each new piece; returning `false` stops. Resolves to the
    /// result as JSON (`promptIds`, `ids`, `logprobs`, `text`, `stop`, `timings`).
    pub fn generate(&self, options: String, on_piece: js_sys::Function) -> js_sys::Promise {
        let shared = self.model.clone();
        future_to_promise(async move {
            let o: GenOpts = parse("generate", &options)?;
            let mut m = take(&shared)?;
            let r = run(&mut m, &o, &on_piece).await;
            *shared.borrow_mut() = Some(m);
            r
        })
    }
}

async fn run(
    m: &mut kiln::llm::TextModel,
    o: &GenOpts,
    on_piece: &js_sys::Function,
) -> Result<JsValue, JsValue> {
    let prompt = match (&o.prompt, &o.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(p), None) => m.tokenizer.encode_prompt(p).map_err(js_err)?,
        (None, None) => return Err(js_err("generate: give a prompt or promptIds")),
    };
    let opts = GenerateOptions {
        max_tokens: o.max_tokens,
        sampler: SamplerSettings {
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            min_p: o.min_p,
            repeat_penalty: o.repeat_penalty,
            repeat_window: o.repeat_window,
        },
        seed: o.seed,
        stop: o.stop.clone(),
    };
    let mut failed = None;
    let g = m
        .generate(&prompt, &opts, &mut |piece| match on_piece
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
    let t = &g.timings;
    Ok(JsValue::from_str(
        &json!({
            "promptIds": g.prompt_ids,
            "ids": g.ids,
            "logprobs": g.logprobs,
            "text": g.text,
            "stop": stop_name(g.stop),
            "timings": {
                "ttftMs": t.ttft_ms,
                "prefillMs": t.prefill_ms,
                "decodeMs": t.decode_ms,
                "prefillTokS": t.prefill_tok_s,
                "decodeTokS": t.decode_tok_s,
            },
        })
        .to_string(),
    ))
}
