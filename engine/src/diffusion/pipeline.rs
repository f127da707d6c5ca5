//! The denoising loop on the GPU: text encoder once (its states stay on the GPU), then one
//! compiled graph replayed per step (U-Net on the CFG batch + the scheduler update, noise from
//! the seeded GPU RNG), then the VAE decode. Nothing is read back until the image but a
//! 4-byte NaN flag every second step, so that a diverged run stops early.

pub use super::edit::RgbImage;
use super::limits::{Checked, Edit};
pub use super::limits::{UnetKind, DEFAULT_STRENGTH, MAX_GUIDANCE, MAX_STEPS};
use super::models::SdModels;
use super::schedulers::{Schedule, SchedulerKind, COEFFS};
use super::unet::{guidance_embedding, UnetExtra, TIME_IDS};
use crate::device::{CounterSnapshot, Counters, Fence, Gpu};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{Graph, StepValues, Value};
use crate::tensor::Tensor;
use crate::{CompileOptions, Dyn};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// What to generate: the image front-end contract. `kiln image` and the wasm module take these
/// (JSON fields snake_case, or the camelCase JavaScript uses) with these defaults.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageOptions {
    pub prompt: String,
    #[serde(alias = "negativePrompt")]
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale, 0 to [`MAX_GUIDANCE`]; at most 1 disables guidance
    /// (diffusers' rule).
    pub guidance: f32,
    /// `None`: the scheduler named by the pipeline (Euler when it is not supported).
    pub scheduler: Option<SchedulerKind>,
    pub seed: u32,
    /// Image size; `None`: the U-Net's sample size times the VAE factor.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Initial latents `[1, c, h/8, w/8]` with diffusers' `latents=` meaning (unscaled standard
    /// normal); `None` draws them from the GPU RNG.
    #[serde(skip)]
    pub latents: Option<Vec<f32>>,
    /// Noise per step for the ancestral/LCM schedulers instead of the GPU RNG (to replay a
    /// reference run exactly).
    #[serde(skip)]
    pub step_noise: Option<Vec<Vec<f32>>>,
    /// img2img and inpainting: the image to start from (its size is the default size; another
    /// size resizes it). With an init image, `latents` is the noise added to its latents.
    #[serde(skip)]
    pub init_image: Option<RgbImage>,
    /// Inpainting: the mask (white = repaint), the init image's size.
    #[serde(skip)]
    pub mask: Option<RgbImage>,
    /// How much of the init image is repainted, 0 to 1: the share of the steps run, from
    /// the noise level they start at (default [`DEFAULT_STRENGTH`], 1 with a mask).
    pub strength: Option<f32>,
    /// Encode the init image (and the masked image) to a seeded draw from the VAE's latent
    /// distribution instead of its mean (diffusers' default `sample_mode`; the mean is
    /// deterministic and what Kiln does by default).
    #[serde(alias = "sampleEncoding")]
    pub sample_encoding: bool,
    /// The standard normal noise of that draw `[c, h, w]` instead of the GPU RNG's (to replay a
    /// reference run exactly).
    #[serde(skip)]
    pub encoding_noise: Option<Vec<f32>>,
    /// Decode the final image with the tiny decoder (TAESD, [`SdModels::set_tiny_decoder`])
    /// instead of the VAE: faster, a little less detailed.
    #[serde(alias = "tinyDecoder")]
    pub tiny_decoder: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            width: None,
            height: None,
            latents: None,
            step_noise: None,
            init_image: None,
            mask: None,
            strength: None,
            sample_encoding: false,
            encoding_noise: None,
            tiny_decoder: false,
        }
    }
}

impl ImageOptions {
    /// Parses JSON options (unknown fields are errors naming them).
    pub fn from_json(s: &str) -> Result<ImageOptions> {
        serde_json::from_str(s).map_err(|e| Error::Data {
            name: "image options".into(),
            msg: e.to_string(),
        })
    }
}

/// A generated image.
#[derive(Clone, Debug)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB, 8 bits per channel.
    pub rgb: Vec<u8>,
    /// The decoder's raw output `[3, h, w]` in [-1, 1].
    pub raw: Vec<f32>,
    /// Messages for the user (e.g. a scheduler substitution).
    pub notes: Vec<String>,
    /// What the denoising loop cost in total (submits, dispatches, readback, objects created).
    pub loop_counters: CounterSnapshot,
    /// Denoising steps run.
    pub steps: usize,
}

/// A cheap live preview: the latents projected to RGB (one pixel per latent).
#[derive(Clone, Debug)]
pub struct Preview {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB, 8 bits per channel.
    pub rgb: Vec<u8>,
}

/// A linear map from latents to RGB in [-1, 1] for previews (the usual approximations).
#[derive(Clone, Copy, Debug)]
pub struct LatentRgb {
    pub factors: [[f32; 3]; 4],
    pub bias: [f32; 3],
}

/// Stable Diffusion 1.x/2.x's latent space.
pub const SD_LATENT_RGB: LatentRgb = LatentRgb {
    factors: [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ],
    bias: [0.0; 3],
};

/// SDXL's latent space (its VAE's; ComfyUI's factors).
pub const SDXL_LATENT_RGB: LatentRgb = LatentRgb {
    factors: [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    bias: [0.1084, -0.0175, -0.0011],
};

/// Projects latents `[c, h, w]` to an RGB preview.
pub fn preview_from_latents(x: &[f32], c: usize, h: usize, w: usize, map: &LatentRgb) -> Preview {
    let mut rgb = vec![0u8; 3 * h * w];
    for p in 0..h * w {
        for k in 0..3 {
            let v: f32 = (0..c.min(4))
                .map(|ch| x[ch * h * w + p] * map.factors[ch][k])
                .sum::<f32>()
                + map.bias[k];
            rgb[p * 3 + k] = ((v + 1.0) * 127.5).clamp(0.0, 255.0) as u8;
        }
    }
    Preview {
        width: w,
        height: h,
        rgb,
    }
}

/// Per-step seed of the noise stream: distinct per step, fixed by the user's seed.
fn step_seed(seed: u32, step: usize) -> u32 {
    seed.wrapping_mul(0x9E37_79B9)
        .wrapping_add((step as u32 + 1).wrapping_mul(0x85EB_CA6B))
}

/// The error of a generation whose values became NaN or infinite at step index `step`.
fn diverged(step: u32, total: usize) -> Error {
    Error::Overflow {
        what: "the latents".into(),
        when: format!(
            "at step {} of {total} (the U-Net's output or the scheduler's update overflowed)",
            step as u64 + 1
        ),
    }
}

/// Steps between reads of the NaN flag ([`State::status`]) during the loop, so that a
/// diverged generation stops within two or three steps instead of after all of them. A read
/// adds no wait: a 4-byte copy submitted behind the step, mapped asynchronously, and looked at
/// only after a later step's fence, which the loop waits for anyway to report the step (natively
/// the map has resolved by then; in the browser it may take a step more). Measured on lavapipe (sd1-tiny, 200 steps of ~50 ms): taking
/// the value costs ~20 µs, and the copy's submit takes over the wait for the previous step that
/// the next step's submit has there otherwise, so the loop took no longer (9.2 s with a read
/// after 186 of the 200 steps, 10.8 s with none: run-to-run noise). The price in counters: one
/// submit and 4 bytes read back per read.
const STATUS_EVERY: usize = 2;

/// A read of the NaN flag in flight: its staging buffer is mapped asynchronously, and the loop
/// looks at it after a later step's fence, when the copy has long landed.
struct StatusRead {
    /// 0 while mapping, 1 mapped, 2 the map failed (set by the map callback).
    state: Arc<AtomicU8>,
}

impl StatusRead {
    /// Queues the copy of `status` into `staging` and its map.
    fn start(gpu: &Gpu, status: &Tensor, staging: &wgpu::Buffer) -> Result<Self> {
        gpu.copy_buffer(status.buffer()?, staging, 4);
        let state = Arc::new(AtomicU8::new(0));
        let s = state.clone();
        staging.slice(..4).map_async(wgpu::MapMode::Read, move |r| {
            s.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release);
        });
        Ok(StatusRead { state })
    }

    /// The flag once mapped (unmapping the staging buffer), `None` while still mapping.
    fn take(&self, gpu: &Gpu, staging: &wgpu::Buffer) -> Option<Result<u32>> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            1 => {
                let flag = staging
                    .slice(..4)
                    .get_mapped_range()
                    .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
                    .map_err(|e| Error::Readback(e.to_string()));
                staging.unmap();
                Counters::add(&gpu.counters.bytes_read_back, 4);
                Some(flag)
            }
            _ => Some(Err(Error::Readback(
                "mapping the status flag failed".into(),
            ))),
        }
    }
}

/// What the step callback of [`SdModels::generate_with`] asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepReply {
    /// Go on without a preview.
    Continue,
    /// Go on, with a preview at the next call (one small readback, which also waits for the
    /// step: the browser's event loop runs meanwhile).
    Preview,
    /// Stop: `generate_with` returns [`Error::Cancelled`].
    Stop,
    /// Stop denoising and decode the model's current estimate of the clean image (a partial
    /// result, e.g. after Ctrl-C); the image says how many steps ran.
    Finish,
}

impl SdModels {
    /// Runs the pipeline. After each denoising step `on_step(done, total, preview)` is called;
    /// it returns true to receive a preview with the next call (which costs one small readback).
    pub async fn generate(
        &mut self,
        opts: &ImageOptions,
        on_step: &mut dyn FnMut(usize, usize, Option<Preview>) -> bool,
    ) -> Result<Image> {
        self.generate_with(opts, &mut |done, total, preview| {
            if on_step(done, total, preview) {
                StepReply::Preview
            } else {
                StepReply::Continue
            }
        })
        .await
    }

    /// [`SdModels::generate`] whose step callback can also stop the loop.
    pub async fn generate_with(
        &mut self,
        opts: &ImageOptions,
        on_step: &mut dyn FnMut(usize, usize, Option<Preview>) -> StepReply,
    ) -> Result<Image> {
        // Every client mistake (a size too large for the adapter included) fails here, before
        // any GPU work.
        let Checked {
            lh,
            lw,
            sched,
            mut notes,
            edit,
        } = self.checked(opts)?;
        let state = State::new(self, &sched, opts, lh, lw, edit.as_ref())?;
        self.encode_prompts(&state, opts).await?;
        if let Some(e) = &edit {
            self.encode_images(&state, e, opts).await?;
        }
        self.init_latents(&state, &sched, opts, edit.as_ref())
            .await?;
        let (loop_counters, ran) = self.denoise(&state, &sched, opts, on_step).await?;
        // One 4-byte readback: the first step (if any) whose values stopped being finite (the
        // loop reads it every STATUS_EVERY steps too, so that a diverged run stops early; this
        // covers the steps after its last read).
        let first_bad = state.status.to_u32(&self.gpu).await?;
        if let Some(&step) = first_bad.first().filter(|&&s| s != u32::MAX) {
            return Err(diverged(step, sched.steps()));
        }
        // Stopped early: the last step's x0 (the model's estimate of the clean latents) makes a
        // cleaner picture than the still-noisy sample.
        let latents = if ran < sched.steps() {
            notes.push(format!(
                "stopped after {ran} of {} steps: the image is the model's estimate at that step",
                sched.steps()
            ));
            &state.x0_prev
        } else {
            &state.x
        };
        let raw = self.decode_latents(latents, opts.tiny_decoder).await?;
        let bad = raw.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::Overflow {
                what: "the VAE decoder's output".into(),
                when: format!("({bad} of {} values; the latents were finite)", raw.len()),
            });
        }
        let (w, h) = self.image_size(opts);
        Ok(Image::from_decoder(raw, w, h, notes, loop_counters, ran))
    }

    /// Text states of [negative, prompt] (or just the prompt), written into `state.context`;
    /// for SDXL both encoders' penultimate states side by side, and the second one's pooled
    /// output into `state.text_embeds` (the negative rows left at zero when the pipeline forces
    /// zeros for an empty negative prompt), and from those and the size numbers the U-Net's added
    /// embedding into `state.added`.
    async fn encode_prompts(&self, state: &State, opts: &ImageOptions) -> Result<()> {
        let zero_negative = state.batch == 2
            && opts.negative_prompt.is_empty()
            && self
                .xl
                .as_ref()
                .is_some_and(|x| x.force_zeros_for_empty_prompt);
        let mut prompts = Vec::new();
        if state.batch == 2 && !zero_negative {
            prompts.push(opts.negative_prompt.as_str());
        }
        prompts.push(opts.prompt.as_str());
        let first_row = state.batch - prompts.len();
        let mut g = Graph::new();
        let t = self.text_graph(&mut g, &prompts)?;
        let cv = g.tensor(&state.context);
        let at = first_row * self.tokenizer.max_len * self.context_dim();
        g.copy_into(t.context, cv, Dyn::Static(at as u32))?;
        if let (Some(pooled), Some(te), Some(ti), Some(ad)) =
            (t.pooled, &state.text_embeds, &state.time_ids, &state.added)
        {
            let tv = g.tensor(te);
            let width = g.shape(pooled)[1];
            g.copy_into(pooled, tv, Dyn::Static((first_row * width) as u32))?;
            // SDXL's added embedding, the same at every step: computed here, once.
            let tiv = g.tensor(ti);
            let a = self.unet.added_embedding(&mut g, tv, tiv)?;
            let av = g.tensor(ad);
            g.copy_into(a, av, Dyn::Static(0))?;
        }
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        for (v, ids) in &t.inputs {
            plan.write_u32(*v, ids)?;
        }
        plan.run()
    }

    /// The text states `[1, len, context_dim]` the U-Net attends to for `prompt` and, for SDXL,
    /// the pooled embedding `[1, pooled]` (diffusers' `encode_prompt` outputs).
    pub async fn prompt_states(&self, prompt: &str) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut g = Graph::new();
        let t = self.text_graph(&mut g, &[prompt])?;
        g.output(t.context);
        let outs: Vec<Value> = std::iter::once(t.context).chain(t.pooled).collect();
        if let Some(p) = t.pooled {
            g.output(p);
        }
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        for (v, ids) in &t.inputs {
            plan.write_u32(*v, ids)?;
        }
        let mut out = plan.run_read(&outs).await?.into_iter();
        let mut next = || {
            out.next()
                .map(|b| bytemuck::pod_collect_to_vec::<u8, f32>(&b))
        };
        Ok((next().unwrap_or_default(), next()))
    }

    /// Adds the text encoder(s) for `prompts`: the states `[n, len, context_dim]`, the pooled
    /// embedding `[n, pooled]` (SDXL) and the token-id inputs to write.
    fn text_graph(&self, g: &mut Graph, prompts: &[&str]) -> Result<TextGraph> {
        let (n, len) = (prompts.len(), self.tokenizer.max_len);
        let encode = |tok: &super::clip::ClipTokenizer| -> Result<Vec<u32>> {
            let mut ids = Vec::new();
            for p in prompts {
                ids.extend(tok.encode(p)?);
            }
            Ok(ids)
        };
        let ids = encode(&self.tokenizer)?;
        let iv = g.input("ids", &[ids.len()], DType::U32)?;
        let Some(xl) = &self.xl else {
            return Ok(TextGraph {
                context: self.text_encoder.forward(g, iv, n, len)?,
                pooled: None,
                inputs: vec![(iv, ids)],
            });
        };
        let ids2 = encode(&xl.tokenizer)?;
        let rows = xl.text_encoder.pool_rows(&ids2, len);
        let iv2 = g.input("ids_2", &[ids2.len()], DType::U32)?;
        let rv = g.input("pool rows", &[n], DType::U32)?;
        let h1 = self.text_encoder.states(g, iv, n, len, true, None)?;
        let s2 = xl.text_encoder.states(g, iv2, n, len, true, Some(rv))?;
        Ok(TextGraph {
            context: g.concat(h1.hidden, s2.hidden, 2)?,
            pooled: s2.pooled,
            inputs: vec![(iv, ids), (iv2, ids2), (rv, rows)],
        })
    }

    /// The init image's latents (scaled) into `state.init`; for an inpainting U-Net, the
    /// latent mask and the masked image's latents into every batch copy of `state.cond`.
    async fn encode_images(&self, state: &State, edit: &Edit, opts: &ImageOptions) -> Result<()> {
        let (Some(init), [_, _, lh, lw]) = (&state.init, state.lat_shape) else {
            return Ok(());
        };
        if opts.sample_encoding {
            return self.encode_images_sampled(state, edit, opts, init).await;
        }
        let f = self.vae.cfg.scale_factor();
        let shape = [1, self.vae.cfg.in_channels, lh * f, lw * f];
        let mut g = Graph::new();
        let encoded = |g: &mut Graph, name: &str| -> Result<(Value, Value)> {
            let img = g.input(name, &shape, DType::F32)?;
            let mean = self.vae.encode_mean(g, img)?;
            Ok((img, g.scale(mean, self.vae.cfg.scaling_factor, 0.0)?))
        };
        let (img, lat) = encoded(&mut g, "init image")?;
        let iv = g.tensor(init);
        g.copy_into(lat, iv, Dyn::Static(0))?;
        let mut masked_in = None;
        if let (Some(cond), Some((mask, _))) = (&state.cond, &edit.mask) {
            let (mimg, mlat) = encoded(&mut g, "masked image")?;
            let mv = g.input("mask", &[1, 1, lh, lw], DType::F32)?;
            let both = g.concat(mv, mlat, 1)?;
            let cv = g.tensor(cond);
            let per = g.shape(both).iter().product::<usize>();
            for k in 0..state.batch {
                g.copy_into(both, cv, Dyn::Static((k * per) as u32))?;
            }
            masked_in = Some((mimg, mv, mask));
        }
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.write_f32(img, &edit.image)?;
        if let (Some((mimg, mv, mask)), Some((_, masked))) = (masked_in, &edit.mask) {
            plan.write_f32(mimg, masked)?;
            plan.write_f32(mv, mask)?;
        }
        plan.run()
    }

    /// [`SdModels::encode_images`] with seeded draws from the latent distributions: the moments
    /// come back to the host (a few KB), the draw is made there with the GPU RNG's noise (or the
    /// given one) and goes up again.
    async fn encode_images_sampled(
        &self,
        state: &State,
        edit: &Edit,
        opts: &ImageOptions,
        init: &Arc<Tensor>,
    ) -> Result<()> {
        let [_, c, lh, lw] = state.lat_shape;
        let f = self.vae.cfg.scale_factor();
        let shape = [1, self.vae.cfg.in_channels, lh * f, lw * f];
        let n = c * lh * lw;
        if let Some(v) = opts.encoding_noise.as_ref().filter(|v| v.len() != n) {
            return Err(Error::Data {
                name: "encoding_noise".into(),
                msg: format!("{} values, expected {n}", v.len()),
            });
        }
        let images = std::iter::once(&edit.image).chain(
            edit.mask
                .as_ref()
                .filter(|_| state.cond.is_some())
                .map(|(_, m)| m),
        );
        let mut latents = Vec::new();
        for (k, image) in images.enumerate() {
            let mut g = Graph::new();
            let seed = g.scalar("seed")?;
            let img = g.input("image", &shape, DType::F32)?;
            let moments = self.vae.encode_moments(&mut g, img)?;
            g.output(moments);
            let noise = g.randn(&[1, c, lh, lw], Dyn::slot(seed), 2 + k as u32)?;
            g.output(noise);
            let mut plan = g.compile(&self.gpu, CompileOptions::default()).await?;
            plan.set(seed, opts.seed);
            plan.write_f32(img, image)?;
            let out = plan.run_read(&[moments, noise]).await?;
            let m: Vec<f32> = bytemuck::pod_collect_to_vec(&out[0]);
            let drawn: Vec<f32> = bytemuck::pod_collect_to_vec(&out[1]);
            let eps = match (&opts.encoding_noise, k) {
                (Some(v), 0) => v.clone(),
                _ => drawn,
            };
            let z = super::vae::sample_latents(&m, &eps);
            latents.push(
                z.iter()
                    .map(|v| v * self.vae.cfg.scaling_factor)
                    .collect::<Vec<f32>>(),
            );
        }
        self.gpu
            .write_buffer(init.buffer()?, 0, bytemuck::cast_slice(&latents[0]));
        if let (Some(cond), Some((mask, _)), Some(masked)) =
            (&state.cond, &edit.mask, latents.get(1))
        {
            let mut per: Vec<f32> = mask.clone();
            per.extend(masked);
            let all: Vec<f32> = (0..state.batch).flat_map(|_| per.iter().copied()).collect();
            self.gpu
                .write_buffer(cond.buffer()?, 0, bytemuck::cast_slice(&all));
        }
        Ok(())
    }

    /// Initial latents into `x` and the first U-Net input: the noise (given, or from the GPU
    /// RNG) scaled by the init sigma, or for an edit the init image's latents noised to the
    /// first step's level (the noise also kept in `state.noise` for inpainting's blend).
    async fn init_latents(
        &self,
        state: &State,
        sched: &Schedule,
        opts: &ImageOptions,
        edit: Option<&Edit>,
    ) -> Result<()> {
        let mut g = Graph::new();
        let seed = g.scalar("seed")?;
        let (lat, lat_in) = match &opts.latents {
            Some(_) => {
                let v = g.input("latents", &state.lat_shape, DType::F32)?;
                (v, Some(v))
            }
            None => (g.randn(&state.lat_shape, Dyn::slot(seed), 0)?, None),
        };
        if let Some(nv) = &state.noise {
            let t = g.tensor(nv);
            g.copy_into(lat, t, Dyn::Static(0))?;
        }
        let xs = match (edit, &state.init) {
            (Some(e), Some(init)) if !e.from_noise => {
                // The scheduler's add_noise at the first step run.
                let (a, b) = sched.noise_coeffs(0);
                let iv = g.tensor(init);
                let x0 = g.scale(iv, a, 0.0)?;
                let n = g.scale(lat, b, 0.0)?;
                g.add(x0, n)?
            }
            _ => g.scale(lat, sched.init_noise_sigma, 0.0)?,
        };
        let xv = g.tensor(&state.x);
        g.copy_into(xs, xv, Dyn::Static(0))?;
        let first = g.scale(xs, sched.first_input_scale, 0.0)?;
        let uv = g.tensor(&state.unet_in);
        for k in 0..state.batch {
            g.copy_into(first, uv, Dyn::Static((k * state.n) as u32))?;
        }
        let mut plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.set(seed, opts.seed);
        if let (Some(l), Some(v)) = (&opts.latents, lat_in) {
            plan.write_f32(v, l)?;
        }
        plan.run()
    }

    /// The step graph: the U-Net on the CFG batch at the step's timestep, then the scheduler
    /// update (with its noise from the seeded GPU RNG, or from `step_noise` when given).
    async fn step_plan(
        &self,
        state: &State,
        sched: &Schedule,
        opts: &ImageOptions,
    ) -> Result<StepPlan> {
        let needs_noise = sched.coeffs.iter().any(|k| k.s != 0.0);
        let mut g = Graph::new();
        let step = g.scalar("step")?;
        let noise_seed = g.scalar("noise_seed")?;
        let tt = g.tensor(&state.timesteps);
        let t = g.slice_rows(tt, Dyn::slot(step), 1)?;
        let t = g.reshape(t, &[1])?;
        let ctx = g.tensor(&state.context);
        let uin = g.tensor(&state.unet_in);
        // An inpainting U-Net takes the mask and the masked image's latents beside the latents.
        let unet_x = match &state.cond {
            Some(c) => {
                let cv = g.tensor(c);
                g.concat(uin, cv, 1)?
            }
            None => uin,
        };
        let extra = UnetExtra {
            guidance: state.guidance_embedding.as_ref().map(|e| g.tensor(e)),
            added: state.added.as_ref().map(|e| g.tensor(e)),
        };
        let model_out = self.unet.forward_cond(&mut g, unet_x, t, ctx, &extra)?;
        let noise_input = opts.step_noise.is_some() && needs_noise;
        let noise = if !needs_noise {
            None
        } else if noise_input {
            Some(g.input("noise", &state.lat_shape, DType::F32)?)
        } else {
            Some(g.randn(&state.lat_shape, Dyn::slot(noise_seed), 1)?)
        };
        let v = StepValues {
            model_out,
            coeffs: g.tensor(&state.coeffs),
            guidance: g.tensor(&state.guidance),
            x: g.tensor(&state.x),
            x0_prev: g.tensor(&state.x0_prev),
            unet_in: uin,
            status: g.tensor(&state.status),
            noise,
        };
        g.scheduler_step(&v, Dyn::slot(step))?;
        if let (Some(table), Some(init), Some(noise), Some(mask)) =
            (&state.blend, &state.init, &state.noise, &state.mask)
        {
            let (tv, iv, nv, mv) = (
                g.tensor(table),
                g.tensor(init),
                g.tensor(noise),
                g.tensor(mask),
            );
            g.latent_blend(tv, iv, nv, mv, v.x, uin, Dyn::slot(step))?;
        }
        Ok(StepPlan {
            plan: g.compile(&self.gpu, CompileOptions::default()).await?,
            step,
            noise_seed,
            noise_in: noise.filter(|_| noise_input),
        })
    }

    /// The denoising loop: the step plan replayed per step, each reported once the GPU has
    /// finished it. Returns what the loop cost and how many steps ran.
    async fn denoise(
        &self,
        state: &State,
        sched: &Schedule,
        opts: &ImageOptions,
        on_step: &mut dyn FnMut(usize, usize, Option<Preview>) -> StepReply,
    ) -> Result<(CounterSnapshot, usize)> {
        let gpu = &self.gpu;
        let StepPlan {
            mut plan,
            step,
            noise_seed,
            noise_in,
        } = self.step_plan(state, sched, opts).await?;
        let n = state.n;
        let preview_staging = gpu.create_buffer(
            "preview",
            (n * 4) as u64,
            wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        );
        let status_staging = gpu.create_buffer(
            "status readback",
            4,
            wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        );
        let mut status_read: Option<StatusRead> = None;
        let [_, c, lh, lw] = state.lat_shape;
        // With a tiny decoder loaded, previews are its decode of the model's current estimate of
        // the clean latents (full size), else the latents projected to RGB (one pixel each). Its
        // plan is compiled at the first preview asked for.
        let mut tiny: Option<(crate::Plan, Value)> = None;
        let mut tiny_read = None;
        let before = gpu.counters();
        let total = sched.steps();
        // Step i is reported done (`on_step(i + 1, ..)`) once the GPU has finished it, while
        // step i + 1 is already queued: the GPU never waits for the callback. A preview asked
        // for at step i is a copy of the latents queued right then (after step i + 1), mapped
        // when step i + 1 is reported.
        let mut pending: Option<(Fence, bool)> = None;
        let mut run = 0;
        for i in 0..=total {
            if i < total {
                plan.set(step, i as u32);
                plan.set(noise_seed, step_seed(opts.seed, i));
                if let (Some(all), Some(nv)) = (&opts.step_noise, noise_in) {
                    let nz = all.get(i).ok_or_else(|| Error::Data {
                        name: "step_noise".into(),
                        msg: format!("no noise for step {i}"),
                    })?;
                    plan.write_f32(nv, nz)?;
                }
                plan.run()?;
                run = i + 1;
                // The last step's flag is read after the loop.
                if status_read.is_none() && run % STATUS_EVERY == 0 && run < total {
                    status_read = Some(StatusRead::start(gpu, &state.status, &status_staging)?);
                }
            }
            let queued = (i < total).then(|| (gpu.fence(), false));
            let Some((fence, copied)) = std::mem::replace(&mut pending, queued) else {
                continue;
            };
            gpu.wait(fence).await?;
            if let Some(flag) = status_read
                .as_ref()
                .and_then(|r| r.take(gpu, &status_staging))
            {
                status_read = None;
                let flag = flag?;
                if flag != u32::MAX {
                    gpu.wait_idle()?;
                    return Err(diverged(flag, total));
                }
            }
            let preview = match (copied, &tiny, tiny_read.take()) {
                (false, _, _) => None,
                (true, Some((plan, _)), Some(read)) => {
                    let bytes = plan.finish_read(read).await?;
                    let raw: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[0]);
                    let f = self.taesd.as_ref().map_or(1, |t| t.cfg.scale_factor());
                    let img =
                        Image::from_decoder(raw, lw * f, lh * f, vec![], Default::default(), 0);
                    Some(Preview {
                        width: img.width,
                        height: img.height,
                        rgb: img.rgb,
                    })
                }
                (true, _, _) => {
                    let bytes = gpu.map_read(&preview_staging, (n * 4) as u64).await?;
                    let lat: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
                    let map = if self.xl.is_some() {
                        &SDXL_LATENT_RGB
                    } else {
                        &SD_LATENT_RGB
                    };
                    Some(preview_from_latents(&lat, c, lh, lw, map))
                }
            };
            match on_step(i, total, preview) {
                StepReply::Continue => {}
                StepReply::Preview => {
                    if let Some(p) = pending.as_mut() {
                        if let (Some(t), None) = (&self.taesd, &tiny) {
                            let mut g = Graph::new();
                            let xv = g.tensor(&state.x0_prev);
                            let img = t.decode(&mut g, xv)?;
                            g.output(img);
                            tiny = Some((g.compile(gpu, CompileOptions::default()).await?, img));
                        }
                        match &tiny {
                            Some((plan, img)) => {
                                tiny_read = Some(plan.submit_read_heads(&[(*img, u64::MAX)], 0)?)
                            }
                            None => {
                                gpu.copy_buffer(state.x.buffer()?, &preview_staging, (n * 4) as u64)
                            }
                        }
                        p.1 = true;
                    }
                }
                StepReply::Stop => {
                    gpu.wait_idle()?;
                    return Err(Error::Cancelled);
                }
                StepReply::Finish => break,
            }
        }
        if let Some((fence, _)) = pending {
            gpu.wait(fence).await?;
        }
        Ok((gpu.counters() - before, run))
    }

    /// Adds the VAE decoder for latents `x` to `g`: the image `[1, 3, h, w]`.
    pub(super) fn decode_graph(&self, g: &mut Graph, x: crate::Value) -> Result<crate::Value> {
        let z = g.scale(x, 1.0 / self.vae.cfg.scaling_factor, 0.0)?;
        let img = self.vae.decode(g, z)?;
        g.output(img);
        Ok(img)
    }

    /// The VAE decoder's output `[3, h, w]` for the latents in `x` (the tiny decoder's with
    /// `tiny`).
    async fn decode_latents(&self, x: &Arc<Tensor>, tiny: bool) -> Result<Vec<f32>> {
        let mut g = Graph::new();
        let xv = g.tensor(x);
        let img = match (&self.taesd, tiny) {
            (Some(t), true) => {
                let img = t.decode(&mut g, xv)?;
                g.output(img);
                img
            }
            (None, true) => {
                return Err(Error::Data {
                    name: "tiny_decoder".into(),
                    msg: "no tiny decoder (TAESD) is loaded".into(),
                })
            }
            (_, false) => self.decode_graph(&mut g, xv)?,
        };
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        let out = plan.run_read(&[img]).await?;
        Ok(bytemuck::pod_collect_to_vec(&out[0]))
    }
}

/// The text encoders in a graph: the U-Net's text states, SDXL's pooled embedding, and the
/// u32 inputs (token ids, pooled rows) with their values.
struct TextGraph {
    context: Value,
    pooled: Option<Value>,
    inputs: Vec<(Value, Vec<u32>)>,
}

/// The compiled step graph and its run-time values.
struct StepPlan {
    plan: crate::Plan,
    step: crate::Scalar,
    noise_seed: crate::Scalar,
    /// The noise input when `step_noise` replaces the GPU RNG.
    noise_in: Option<crate::Value>,
}

/// The GPU tensors of one generation.
struct State {
    /// 2 with classifier-free guidance (`[uncond, cond]`), else 1.
    batch: usize,
    /// `[1, c, h, w]` of the latents, and their element count.
    lat_shape: [usize; 4],
    n: usize,
    /// Text states `[batch, tokens, hidden]`.
    context: Arc<Tensor>,
    /// The scheduler's sample, DPM++'s previous x0, the next U-Net input (batch copies).
    x: Arc<Tensor>,
    x0_prev: Arc<Tensor>,
    unet_in: Arc<Tensor>,
    /// u32 `[1]`: the first step whose values were NaN or infinite (`u32::MAX`: none).
    status: Arc<Tensor>,
    /// The schedule's coefficient rows and timesteps, and the guidance scale.
    coeffs: Arc<Tensor>,
    timesteps: Arc<Tensor>,
    guidance: Arc<Tensor>,
    /// An edit: the init image's latents `[1, c, h, w]` (scaled) and the initial noise.
    init: Option<Arc<Tensor>>,
    noise: Option<Arc<Tensor>>,
    /// Inpainting with an ordinary U-Net: the latent mask `[1, 1, h, w]` and the blend table
    /// `[steps, 3]` (see [`crate::Graph::latent_blend`]).
    mask: Option<Arc<Tensor>>,
    blend: Option<Arc<Tensor>>,
    /// An inpainting U-Net's extra input `[batch, 1 + c, h, w]`: mask, masked image latents.
    cond: Option<Arc<Tensor>>,
    /// An LCM U-Net's guidance-scale embedding `[1, time_cond_proj_dim]`.
    guidance_embedding: Option<Arc<Tensor>>,
    /// SDXL: the pooled text embeddings `[batch, pooled]` and the size numbers `[batch * 6]`
    /// (original height and width, crop top and left, target height and width: the image's
    /// size, no crop, as diffusers' defaults).
    text_embeds: Option<Arc<Tensor>>,
    time_ids: Option<Arc<Tensor>>,
    /// SDXL: the U-Net's added embedding `[batch, time_embed_dim]`, computed once from those.
    added: Option<Arc<Tensor>>,
}

impl State {
    fn new(
        m: &SdModels,
        sched: &Schedule,
        opts: &ImageOptions,
        lh: usize,
        lw: usize,
        edit: Option<&Edit>,
    ) -> Result<State> {
        let gpu = &m.gpu;
        let batch = m.cfg_batch(opts);
        let c = m.vae.cfg.latent_channels;
        let lat_shape = [1, c, lh, lw];
        let n = c * lh * lw;
        if let Some(l) = &opts.latents {
            if l.len() != n {
                return Err(Error::Data {
                    name: "latents".into(),
                    msg: format!("{} values, expected {lat_shape:?} = {n}", l.len()),
                });
            }
        }
        let given = opts.latents.iter().chain(opts.step_noise.iter().flatten());
        for (k, v) in given.enumerate() {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::Data {
                    name: if k == 0 && opts.latents.is_some() {
                        "latents".into()
                    } else {
                        "step_noise".into()
                    },
                    msg: format!("value {i} is {} (values must be finite)", v[i]),
                });
            }
        }
        let zeros = |name: &str, shape: &[usize]| -> Result<Arc<Tensor>> {
            Ok(Arc::new(Tensor::zeros(gpu, name, shape, DType::F32)?))
        };
        let table = |name: &str, shape: &[usize], v: &[f32]| -> Result<Arc<Tensor>> {
            Ok(Arc::new(Tensor::from_f32(gpu, name, shape, v)?))
        };
        let steps = sched.steps();
        let inpainting_unet = m.unet_kind()? == UnetKind::Inpainting;
        let latent_mask = edit.and_then(|e| e.mask.as_ref()).map(|(mask, _)| mask);
        let blend = match latent_mask.filter(|_| !inpainting_unet) {
            Some(mask) => {
                let rows: Vec<f32> = (0..steps)
                    .flat_map(|i| {
                        let (a, b) = sched.noise_coeffs(i + 1);
                        [a, b, sched.coeffs[i].in_scale]
                    })
                    .collect();
                Some((
                    table("latent mask", &[1, 1, lh, lw], mask)?,
                    table("blend", &[steps, 3], &rows)?,
                ))
            }
            None => None,
        };
        let (mask, blend) = blend.unzip();
        Ok(State {
            init: edit
                .map(|_| zeros("init latents", &lat_shape))
                .transpose()?,
            noise: edit.map(|_| zeros("noise", &lat_shape)).transpose()?,
            mask,
            blend,
            cond: inpainting_unet
                .then(|| zeros("inpainting input", &[batch, c + 1, lh, lw]))
                .transpose()?,
            guidance_embedding: m
                .unet
                .cfg
                .time_cond_proj_dim
                .map(|d| {
                    table(
                        "guidance embedding",
                        &[1, d],
                        &guidance_embedding(opts.guidance, d),
                    )
                })
                .transpose()?,
            text_embeds: m
                .unet
                .cfg
                .text_time
                .map(|tt| zeros("text embeds", &[batch, tt.pooled_dim]))
                .transpose()?,
            time_ids: m
                .unet
                .cfg
                .text_time
                .map(|_| {
                    let f = m.vae.cfg.scale_factor();
                    let (h, w) = ((lh * f) as f32, (lw * f) as f32);
                    let ids: Vec<f32> = (0..batch).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
                    table("time ids", &[batch * TIME_IDS], &ids)
                })
                .transpose()?,
            added: m
                .unet
                .cfg
                .text_time
                .map(|_| zeros("added embedding", &[batch, m.unet.cfg.time_embed_dim]))
                .transpose()?,
            batch,
            lat_shape,
            n,
            context: zeros("context", &[batch, m.tokenizer.max_len, m.context_dim()])?,
            x: zeros("x", &lat_shape)?,
            x0_prev: zeros("x0_prev", &lat_shape)?,
            unet_in: zeros("unet_in", &[batch, c, lh, lw])?,
            status: Arc::new(Tensor::from_u32(gpu, "status", &[1], &[u32::MAX])?),
            coeffs: table("coeffs", &[steps, COEFFS], &sched.coeff_table())?,
            timesteps: table("timesteps", &[steps, 1], &sched.timesteps)?,
            guidance: table("guidance", &[1], &[opts.guidance])?,
        })
    }
}

impl Image {
    /// The image from the decoder's output `[3, h, w]` in [-1, 1].
    fn from_decoder(
        raw: Vec<f32>,
        w: usize,
        h: usize,
        mut notes: Vec<String>,
        loop_counters: CounterSnapshot,
        steps: usize,
    ) -> Image {
        if raw.len() != 3 * h * w {
            notes.push(format!("decoder produced {} values for {w}x{h}", raw.len()));
        }
        let mut rgb = vec![0u8; 3 * h * w];
        for p in 0..(h * w).min(raw.len() / 3) {
            for ch in 0..3 {
                let v = (raw[ch * h * w + p] / 2.0 + 0.5).clamp(0.0, 1.0);
                rgb[p * 3 + ch] = (v * 255.0).round() as u8;
            }
        }
        Image {
            width: w,
            height: h,
            rgb,
            raw,
            notes,
            loop_counters,
            steps,
        }
    }
}
