//! A diffusers pipeline folder loaded onto the GPU: tokenizer, text encoder, U-Net and VAE
//! weights and configs, with one-shot entry points for each component (used by the tests and
//! by the denoising loop's setup).

use super::clip::{ClipConfig, ClipTokenizer, TextEncoder};
use super::taesd::{TinyConfig, TinyDecoder};
use super::unet::{Unet, UnetConfig};
use super::vae::{Vae, VaeConfig};
use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::safetensors::take_checkpoint;
use crate::formats::ModelFiles;
use crate::graph::Graph;
use crate::weights::{Quantize, Weights};
use crate::CompileOptions;
use std::sync::Arc;

/// The loaded components of a Stable Diffusion pipeline.
pub struct SdModels {
    pub gpu: Arc<Gpu>,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: TextEncoder,
    /// SDXL's second text encoder, with its tokenizer.
    pub xl: Option<XlText>,
    pub unet: Unet,
    pub vae: Vae,
    /// `scheduler/scheduler_config.json` as text.
    pub scheduler_config: String,
    /// A tiny decoder (TAESD) for previews and, when asked, the final image.
    pub taesd: Option<TinyDecoder>,
}

/// SDXL's second text encoder (OpenCLIP ViT-bigG with its projection in the real model) and
/// what the pipeline does with it: the U-Net attends to both encoders' penultimate hidden states
/// side by side, and takes this one's projected pooled output as an added embedding.
pub struct XlText {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: TextEncoder,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (true for SDXL): without a negative
    /// prompt, classifier-free guidance's unconditional embeddings are zeros, not the encoding
    /// of "".
    pub force_zeros_for_empty_prompt: bool,
}

fn text(files: &ModelFiles, name: &str) -> Result<String> {
    crate::formats::text_file(files, name)?.ok_or_else(|| Error::Data {
        name: "pipeline".into(),
        msg: format!("missing {name}"),
    })
}

#[cfg(not(target_arch = "wasm32"))]
pub use crate::formats::files::read_pipeline_dir;

/// A CLIP tokenizer folder (`tokenizer`, `tokenizer_2`): `vocab.json` and `merges.txt`, or a
/// `tokenizer.json` (what transformers 5 saves), with `tokenizer_config.json`.
fn clip_tokenizer(files: &ModelFiles, dir: &str) -> Result<ClipTokenizer> {
    let tc = files
        .get(&format!("{dir}/tokenizer_config.json"))
        .map(|b| String::from_utf8_lossy(b).to_string());
    match (
        files.get(&format!("{dir}/vocab.json")),
        files.get(&format!("{dir}/tokenizer.json")),
    ) {
        (None, Some(tj)) => ClipTokenizer::from_tokenizer_json(tj, tc.as_deref()),
        _ => ClipTokenizer::from_vocab_merges(
            &text(files, &format!("{dir}/vocab.json"))?,
            &text(files, &format!("{dir}/merges.txt"))?,
            tc.as_deref(),
        ),
    }
}

/// A component's weights (`unet/diffusion_pytorch_model.safetensors`, ...), taken out of the files.
fn component(gpu: &Arc<Gpu>, files: &mut ModelFiles, dir: &str, stem: &str) -> Result<Weights> {
    let st = take_checkpoint(files, dir, stem)?;
    Ok(Weights::new(gpu, dir, Box::new(st)))
}

impl SdModels {
    /// Parses configs and weights (uploads happen as graphs are built).
    pub fn load(gpu: &Arc<Gpu>, files: ModelFiles) -> Result<SdModels> {
        Self::load_with(gpu, files, Quantize::None)
    }

    /// [`SdModels::load`] with the U-Net's and text encoders' float matrices quantized as they
    /// are uploaded (`--quantize`, as for text models; convolutions and the VAE stay as stored).
    pub fn load_with(gpu: &Arc<Gpu>, mut files: ModelFiles, q: Quantize) -> Result<SdModels> {
        let tokenizer = clip_tokenizer(&files, "tokenizer")?;
        let text_encoder = TextEncoder {
            cfg: ClipConfig::from_json(&text(&files, "text_encoder/config.json")?)?,
            weights: component(gpu, &mut files, "text_encoder", "model")?.with_quantize(q),
        };
        let xl = match files.get("text_encoder_2/config.json") {
            None => None,
            Some(_) => {
                let index: serde_json::Value =
                    serde_json::from_str(&text(&files, "model_index.json")?).map_err(|e| {
                        Error::Data {
                            name: "model_index.json".into(),
                            msg: e.to_string(),
                        }
                    })?;
                Some(XlText {
                    tokenizer: clip_tokenizer(&files, "tokenizer_2")?,
                    text_encoder: TextEncoder {
                        cfg: ClipConfig::from_json(&text(&files, "text_encoder_2/config.json")?)?,
                        weights: component(gpu, &mut files, "text_encoder_2", "model")?
                            .with_quantize(q),
                    },
                    force_zeros_for_empty_prompt: index
                        .get("force_zeros_for_empty_prompt")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false),
                })
            }
        };
        let m = SdModels {
            gpu: gpu.clone(),
            tokenizer,
            text_encoder,
            xl,
            unet: Unet {
                cfg: UnetConfig::from_json(&text(&files, "unet/config.json")?)?,
                weights: component(gpu, &mut files, "unet", "diffusion_pytorch_model")?
                    .with_quantize(q),
            },
            vae: Vae {
                cfg: VaeConfig::from_json(&text(&files, "vae/config.json")?)?,
                weights: component(gpu, &mut files, "vae", "diffusion_pytorch_model")?,
            },
            scheduler_config: text(&files, "scheduler/scheduler_config.json")?,
            taesd: None,
        };
        m.check_text_fits_unet()?;
        Ok(m)
    }

    /// The width of the text states the U-Net attends to: the text encoder's hidden size, or
    /// with SDXL's second encoder both side by side.
    pub fn context_dim(&self) -> usize {
        self.text_encoder.cfg.hidden + self.xl.as_ref().map_or(0, |x| x.text_encoder.cfg.hidden)
    }

    /// The text encoders' widths against the U-Net's `cross_attention_dim` and added
    /// conditioning, so that a mismatched folder fails at load, naming both.
    fn check_text_fits_unet(&self) -> Result<()> {
        let u = &self.unet.cfg;
        let bad = |msg: String| Error::Data {
            name: "unet/config.json".into(),
            msg,
        };
        if let Some(xl) = self
            .xl
            .as_ref()
            .filter(|x| x.tokenizer.max_len != self.tokenizer.max_len)
        {
            return Err(Error::Data {
                name: "tokenizer_2".into(),
                msg: format!(
                    "pads to {} tokens, the first tokenizer to {}: the encoders' states go side \
                     by side, so they must be equally long",
                    xl.tokenizer.max_len, self.tokenizer.max_len
                ),
            });
        }
        let parts = match (&u.text_time, &self.xl) {
            (None, None) => Ok(()),
            (Some(tt), Some(xl)) => match xl.text_encoder.cfg.projection_dim {
                Some(p) if p == tt.pooled_dim => Ok(()),
                p => Err(bad(format!(
                    "the added embedding takes a pooled text embedding {} wide, but \
                     text_encoder_2 gives {}",
                    tt.pooled_dim,
                    p.map_or("none (not a CLIPTextModelWithProjection)".into(), |p| {
                        format!("{p}")
                    })
                ))),
            },
            (Some(_), None) => Err(bad(
                "an SDXL U-Net (addition_embed_type \"text_time\") without text_encoder_2 \
                 (the pipeline's second text encoder)"
                    .into(),
            )),
            (None, Some(_)) => Err(bad(
                "a second text encoder (text_encoder_2) beside a U-Net without SDXL's added \
                 conditioning"
                    .into(),
            )),
        };
        parts?;
        if self.context_dim() != u.cross_attention_dim {
            return Err(bad(format!(
                "cross_attention_dim is {}, but the text encoder{} give{} {} wide states",
                u.cross_attention_dim,
                if self.xl.is_some() { "s" } else { "" },
                if self.xl.is_some() { "" } else { "s" },
                self.context_dim()
            )));
        }
        Ok(())
    }

    /// Loads a tiny decoder (diffusers' `AutoencoderTiny` folder: `config.json` and
    /// `diffusion_pytorch_model.safetensors`, e.g. madebyollin/taesd) for previews and the
    /// option of decoding the final image with it. Its latent channels and scale must match.
    pub fn set_tiny_decoder(&mut self, mut files: ModelFiles) -> Result<()> {
        let cfg = TinyConfig::from_json(&text(&files, "config.json")?)?;
        let (lat, f) = (self.vae.cfg.latent_channels, self.vae.cfg.scale_factor());
        if cfg.latent_channels != lat || cfg.scale_factor() != f {
            return Err(Error::Data {
                name: "tiny decoder".into(),
                msg: format!(
                    "{} latent channels and a factor of {} do not fit this pipeline's VAE ({lat}, {f}): \
                     taesd is for SD 1.x/2.x, taesdxl for SDXL",
                    cfg.latent_channels,
                    cfg.scale_factor()
                ),
            });
        }
        let st = take_checkpoint(&mut files, "", "diffusion_pytorch_model")?;
        self.taesd = Some(TinyDecoder {
            cfg,
            weights: Weights::new(&self.gpu, "taesd", Box::new(st)),
        });
        Ok(())
    }

    /// The tiny decoder's image `[b, 3, h, w]` for latents `z` `[b, c, h/f, w/f]`.
    pub async fn tiny_decode(&self, z: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
        let t = self.taesd.as_ref().ok_or_else(|| Error::Data {
            name: "tiny decoder".into(),
            msg: "none loaded".into(),
        })?;
        let mut g = Graph::new();
        let zv = g.input("z", &shape, DType::F32)?;
        let y = t.decode(&mut g, zv)?;
        g.output(y);
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.write_f32(zv, z)?;
        plan.run()?;
        plan.read_f32(y).await
    }

    /// Merges LoRA files (`(label, bytes, scale)`, in order; several add up) into the U-Net's
    /// and the text encoders' weights, replacing the previous set: tensors they change are
    /// uploaded again with the updates merged, those they no longer change from the checkpoint.
    /// A scale of 0 leaves a file out. Returns the number of modules merged. Errors name the
    /// file and the key when one fits no tensor of the model.
    pub fn set_loras(&mut self, loras: Vec<(String, Vec<u8>, f32)>) -> Result<usize> {
        use super::lora::{deltas, Deltas, Part};
        let mut all = Deltas::new();
        let mut n = 0;
        for (label, bytes, scale) in loras {
            // Read even at scale 0, so a file that does not fit the model is still an error.
            let mut one = Deltas::new();
            let mut parts = vec![
                (Part::Unet, &self.unet.weights),
                (Part::TextEncoder, &self.text_encoder.weights),
            ];
            if let Some(xl) = &self.xl {
                parts.push((Part::TextEncoder2, &xl.text_encoder.weights));
            }
            let layout = super::lora::UnetLayout {
                layers_per_block: self.unet.cfg.layers_per_block,
                up_cross: self
                    .unet
                    .cfg
                    .up_blocks
                    .iter()
                    .map(|b| b.starts_with("CrossAttn"))
                    .collect(),
            };
            let k = deltas(&label, bytes, scale, &parts, Some(&layout), &mut one)?;
            if scale == 0.0 {
                continue;
            }
            n += k;
            for (part, map) in one {
                let dst = all.entry(part).or_default();
                for (name, mut ds) in map {
                    dst.entry(name).or_default().append(&mut ds);
                }
            }
        }
        self.unet
            .weights
            .set_deltas(all.remove(&Part::Unet).unwrap_or_default());
        self.text_encoder
            .weights
            .set_deltas(all.remove(&Part::TextEncoder).unwrap_or_default());
        if let Some(xl) = &self.xl {
            xl.text_encoder
                .weights
                .set_deltas(all.remove(&Part::TextEncoder2).unwrap_or_default());
        }
        Ok(n)
    }

    /// Last hidden states `[batch, 77, hidden]` of the text encoder for token ids `[batch * 77]`.
    pub async fn encode_text(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let len = self.tokenizer.max_len;
        let batch = ids.len() / len;
        let mut g = Graph::new();
        let iv = g.input("ids", &[ids.len()], DType::U32)?;
        let h = self.text_encoder.forward(&mut g, iv, batch, len)?;
        g.output(h);
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.write_u32(iv, ids)?;
        plan.run()?;
        plan.read_f32(h).await
    }

    /// One U-Net evaluation: sample `[b, c, h, w]`, timestep `t`, text states `[b, n, d]`.
    pub async fn unet_eval(
        &self,
        sample: &[f32],
        shape: [usize; 4],
        t: f32,
        context: &[f32],
        ctx_len: usize,
    ) -> Result<Vec<f32>> {
        let mut g = Graph::new();
        let xs = g.input("sample", &shape, DType::F32)?;
        let tv = g.input("t", &[1], DType::F32)?;
        let cd = self.unet.cfg.cross_attention_dim;
        let cv = g.input("context", &[shape[0], ctx_len, cd], DType::F32)?;
        let y = self.unet.forward(&mut g, xs, tv, cv)?;
        g.output(y);
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.write_f32(xs, sample)?;
        plan.write_f32(tv, &[t])?;
        plan.write_f32(cv, context)?;
        plan.run()?;
        plan.read_f32(y).await
    }

    /// The VAE encoder's latent mean `[1, latent, h/f, w/f]` of an image `[1, 3, h, w]` in
    /// [-1, 1] (not multiplied by the scaling factor).
    pub async fn vae_encode(&self, image: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
        let mut g = Graph::new();
        let iv = g.input("image", &shape, DType::F32)?;
        let y = self.vae.encode_mean(&mut g, iv)?;
        g.output(y);
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.write_f32(iv, image)?;
        plan.run()?;
        plan.read_f32(y).await
    }

    /// VAE decode of `z` `[b, latent, h, w]` (already divided by the scaling factor).
    pub async fn vae_decode(&self, z: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
        let mut g = Graph::new();
        let zv = g.input("z", &shape, DType::F32)?;
        let y = self.vae.decode(&mut g, zv)?;
        g.output(y);
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.write_f32(zv, z)?;
        plan.run()?;
        plan.read_f32(y).await
    }
}
