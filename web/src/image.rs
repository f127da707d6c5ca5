//! Image generation: load a diffusers pipeline, run the denoising loop with live previews.

use crate::device::{js_err, Device, Files};
use kiln::diffusion::models::SdModels;
use kiln::diffusion::pipeline::{ImageOptions, StepReply};
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

type Shared = Rc<RefCell<Option<SdModels>>>;

/// A loaded Stable Diffusion pipeline. One generation at a time.
#[wasm_bindgen]
pub struct ImageModel {
    model: Shared,
    info: String,
}

#[wasm_bindgen]
impl Device {
    /// Loads a diffusers pipeline from its files. Resolves to an [`ImageModel`].
    #[wasm_bindgen(js_name = loadImage)]
    pub fn load_image(&self, files: Files) -> js_sys::Promise {
        let gpu = self.gpu.clone();
        future_to_promise(async move {
            let m = SdModels::load(&gpu, files.map).map_err(js_err)?;
            let size = m.unet.cfg.sample_size * m.vae.cfg.scale_factor();
            let info = json!({
                "width": size,
                "height": size,
                "sizeMultiple": m.size_multiple(),
                "latentChannels": m.unet.cfg.in_channels,
            })
            .to_string();
            Ok(ImageModel {
                model: Rc::new(RefCell::new(Some(m))),
                info,
            }
            .into())
        })
    }
}

/// `{ width, height, data }` with RGBA bytes (what `ImageData` takes).
fn rgba_object(width: usize, height: usize, rgb: &[u8]) -> js_sys::Object {
    let rgba: Vec<u8> = rgb
        .chunks_exact(3)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect();
    let o = js_sys::Object::new();
    let set = |k: &str, v: JsValue| {
        let _ = js_sys::Reflect::set(&o, &JsValue::from_str(k), &v);
    };
    set("width", width.into());
    set("height", height.into());
    set("data", js_sys::Uint8Array::from(rgba.as_slice()).into());
    o
}

#[wasm_bindgen]
impl ImageModel {
    /// Default size and size multiple, as JSON.
    pub fn info(&self) -> String {
        self.info.clone()
    }

    /// Generates an image (`options`: JSON `{ prompt, negativePrompt, steps, guidance,
    /// scheduler, seed, width, height }`). After each step `on_step(done, total, preview)` is
    /// called with a latent preview (`{ width, height, data }`, RGBA; `null` after the first
    /// step); returning `false` stops with an error. Resolves to `{ width, height, data,
    /// notes, steps }`.
    pub fn generate(&self, options: String, on_step: js_sys::Function) -> js_sys::Promise {
        let shared = self.model.clone();
        future_to_promise(async move {
            let o = ImageOptions::from_json(&options).map_err(js_err)?;
            let mut m = shared.borrow_mut().take().ok_or_else(|| {
                js_err("the image model is busy with another generation (or disposed)")
            })?;
            let r = run(&mut m, o, &on_step).await;
            *shared.borrow_mut() = Some(m);
            r
        })
    }
}

async fn run(
    m: &mut SdModels,
    opts: ImageOptions,
    on_step: &js_sys::Function,
) -> Result<JsValue, JsValue> {
    let mut failed = None;
    // Every step asks for a preview: the readback waits for the step, so progress is real, the
    // page's event loop runs between steps, and an abort is seen within one step.
    let r = m
        .generate_with(&opts, &mut |done, total, preview| {
            let p = match preview {
                Some(p) => rgba_object(p.width, p.height, &p.rgb).into(),
                None => JsValue::NULL,
            };
            match on_step.call3(&JsValue::NULL, &done.into(), &total.into(), &p) {
                Ok(v) if v.as_bool() == Some(false) => StepReply::Stop,
                Ok(_) => StepReply::Preview,
                Err(e) => {
                    failed = Some(e);
                    StepReply::Stop
                }
            }
        })
        .await;
    if let Some(e) = failed {
        return Err(e);
    }
    let img = r.map_err(js_err)?;
    let o = rgba_object(img.width, img.height, &img.rgb);
    let notes = js_sys::Array::new();
    for n in &img.notes {
        notes.push(&JsValue::from_str(n));
    }
    let _ = js_sys::Reflect::set(&o, &"notes".into(), &notes);
    let _ = js_sys::Reflect::set(&o, &"steps".into(), &img.steps.into());
    Ok(o.into())
}
