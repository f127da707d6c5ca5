//! Image generation: load a diffusers pipeline, run the denoising loop with live previews.

use crate::device::{js_err, Device, Files};
use kiln::diffusion::models::SdModels;
use kiln::diffusion::pipeline::{ImageOptions, RgbImage, StepReply, UnetKind};
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
                "latentChannels": m.vae.cfg.latent_channels,
                "inpainting": m.unet_kind().ok() == Some(UnetKind::Inpainting),
                "sdxl": m.xl.is_some(),
                "steps": m.defaults().0,
                "guidance": m.defaults().1,
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

    /// Loads a tiny decoder (an `AutoencoderTiny` folder's `config.json` text and
    /// `diffusion_pytorch_model.safetensors` bytes) for previews and `tinyDecoder`.
    #[wasm_bindgen(js_name = setTinyDecoder)]
    pub fn set_tiny_decoder(&self, config: String, weights: Vec<u8>) -> Result<(), JsValue> {
        let mut guard = self.model.borrow_mut();
        let m = guard
            .as_mut()
            .ok_or_else(|| js_err("the image model is busy with a generation (or disposed)"))?;
        let mut files = kiln::formats::ModelFiles::new();
        files.insert("config.json".into(), config.into_bytes());
        files.insert("diffusion_pytorch_model.safetensors".into(), weights);
        m.set_tiny_decoder(files).map_err(js_err)
    }

    /// Merges LoRA files into the U-Net and text encoder, replacing the previous set (an
    /// empty list removes them): `loras` is an array of `{ name, data: Uint8Array, scale }`.
    /// Resolves to the number of modules merged.
    #[wasm_bindgen(js_name = setLoras)]
    pub fn set_loras(&self, loras: js_sys::Array) -> js_sys::Promise {
        let shared = self.model.clone();
        future_to_promise(async move {
            let mut list = Vec::new();
            for l in loras.iter() {
                let get = |k: &str| js_sys::Reflect::get(&l, &k.into());
                let name = get("name")?.as_string().unwrap_or_else(|| "LoRA".into());
                let data = js_sys::Uint8Array::new(&get("data")?).to_vec();
                let scale = get("scale")?.as_f64().unwrap_or(1.0) as f32;
                list.push((name, data, scale));
            }
            let mut guard = shared.borrow_mut();
            let m = guard
                .as_mut()
                .ok_or_else(|| js_err("the image model is busy with a generation (or disposed)"))?;
            let n = m.set_loras(list).map_err(js_err)?;
            Ok(JsValue::from(n as u32))
        })
    }

    /// Generates an image (`options`: JSON `{ prompt, negativePrompt, steps, guidance,
    /// scheduler, seed, width, height }`). After each step `on_step(done, total, preview)` is
    /// called with a latent preview (`{ width, height, data }`, RGBA; `null` after the first
    /// step); returning `false` stops with an error. Resolves to `{ width, height, data,
    /// notes, steps }`.
    ///
    /// `images`: `null`, or `{ init, mask }` for img2img and inpainting, each `null` or `{ width,
    /// height, data }` with RGBA bytes (the init image's alpha is ignored; the mask is taken
    /// over black, white = repaint).
    pub fn generate(
        &self,
        options: String,
        on_step: js_sys::Function,
        images: JsValue,
    ) -> js_sys::Promise {
        let shared = self.model.clone();
        future_to_promise(async move {
            let mut o = ImageOptions::from_json(&options).map_err(js_err)?;
            // A few-step model's own steps and guidance where the options leave them out.
            let given: serde_json::Value = serde_json::from_str(&options).map_err(js_err)?;
            if let Some(m) = shared.borrow().as_ref() {
                let (steps, guidance, _) = m.defaults();
                if given.get("steps").is_none() {
                    o.steps = steps;
                }
                if given.get("guidance").is_none() {
                    o.guidance = guidance;
                }
            }
            if !images.is_null() && !images.is_undefined() {
                o.init_image = rgb_image(&images, "init", false)?;
                o.mask = rgb_image(&images, "mask", true)?;
            }
            let mut m = shared.borrow_mut().take().ok_or_else(|| {
                js_err("the image model is busy with another generation (or disposed)")
            })?;
            let r = run(&mut m, o, &on_step).await;
            *shared.borrow_mut() = Some(m);
            r
        })
    }
}

/// The RGB image in field `key` of `images` (`{ width, height, data }`, RGBA), `None` when
/// absent; `over_black`: alpha multiplies the colour (a mask drawn on a transparent canvas).
fn rgb_image(images: &JsValue, key: &str, over_black: bool) -> Result<Option<RgbImage>, JsValue> {
    let v = js_sys::Reflect::get(images, &key.into())?;
    if v.is_null() || v.is_undefined() {
        return Ok(None);
    }
    let what = if key == "init" { "initImage" } else { "mask" };
    let num = |k: &str| -> Result<usize, JsValue> {
        js_sys::Reflect::get(&v, &k.into())?
            .as_f64()
            .filter(|n| *n >= 0.0 && n.fract() == 0.0)
            .map(|n| n as usize)
            .ok_or_else(|| js_err(format!("{what}: '{k}' must be a whole number")))
    };
    let (w, h) = (num("width")?, num("height")?);
    let data = js_sys::Uint8Array::new(&js_sys::Reflect::get(&v, &"data".into())?).to_vec();
    if data.len() != w * h * 4 {
        return Err(js_err(format!(
            "{what}: {} bytes of RGBA for {w}x{h} (expected {})",
            data.len(),
            w * h * 4
        )));
    }
    let rgb = data
        .chunks_exact(4)
        .flat_map(|p| {
            let a = if over_black { p[3] as u32 } else { 255 };
            [0, 1, 2].map(|c| ((p[c] as u32 * a + 127) / 255) as u8)
        })
        .collect();
    RgbImage::new(w, h, rgb, what).map(Some).map_err(js_err)
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
