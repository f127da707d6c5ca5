//! What a generation may ask for, checked before any work: the image size (a multiple of the
//! U-Net's levels, and small enough that every buffer of the step graph and the VAE decoder
//! fits the adapter), the guidance scale and the step count. Each mistake is a client error
//! ([`Error::Data`] or [`Error::Unsupported`]) that says what works.

use super::edit::{mask_to_latent, masked, RgbImage};
use super::models::SdModels;
use super::pipeline::ImageOptions;
use super::schedulers::{Schedule, SchedulerConfig};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::Graph;

/// The largest guidance scale accepted. Classifier-free guidance computes, per element in f32,
/// `m = uncond + g (cond - uncond)`; a U-Net predicts unit-variance noise (or velocity), so
/// `|cond - uncond|` stays within ~10 and at `g = 100` `|m|` within ~1e3. The scheduler scales
/// it by at most σ_max (14.6 for SD's scaled_linear betas, 157 for linear ones): latents within
/// ~2e5, whose squares summed by the next group norm (< 1e7 elements) stay below 1e18, twenty
/// orders of magnitude under f32's 3.4e38. Every step starts from the U-Net's normalized
/// input, so this does not compound. People use 1 to ~15 (diffusers' default 7.5; images
/// saturate past ~30), so 100 refuses no real use, where `1e38` overflowed on the first
/// update and ended, after the whole loop, as "the latents became NaN".
pub const MAX_GUIDANCE: f32 = 100.0;

/// The most denoising steps (SD's schedulers train on 1000 timesteps).
pub const MAX_STEPS: usize = 1000;

/// A generation's options once checked: the latent size, the schedule (from the first step
/// that `strength` runs) and its notes, and the prepared init image and mask.
pub(super) struct Checked {
    pub lh: usize,
    pub lw: usize,
    pub sched: Schedule,
    pub notes: Vec<String>,
    pub edit: Option<Edit>,
}

/// An init image (img2img), with a mask for inpainting, at the generation's size.
pub(super) struct Edit {
    /// The image, planar `[3, h, w]` in [-1, 1].
    pub image: Vec<f32>,
    /// Inpainting: the mask at the latent size `[lh * lw]` (1 = repaint), and the image with
    /// the repainted pixels at 0, planar.
    pub mask: Option<(Vec<f32>, Vec<f32>)>,
    /// The generation starts from pure noise (inpainting at strength 1, as diffusers'
    /// `is_strength_max`), not from the noised image.
    pub from_noise: bool,
}

/// What a U-Net's input channels say about it, for `latent` latent channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnetKind {
    /// Latents in (text-to-image, img2img, inpainting by blending).
    Plain,
    /// An inpainting U-Net: latents, the mask and the masked image's latents in.
    Inpainting,
}

/// diffusers' default `strength`: 0.8 for img2img, 1 for inpainting.
pub const DEFAULT_STRENGTH: f32 = 0.8;

impl SdModels {
    /// Checks `opts` as a generation does before any work (size, guidance, steps, the
    /// schedule, every buffer against the adapter's limit), running nothing: a front end can
    /// refuse a request with it before queueing it. The client's mistakes are
    /// [`Error::Data`] or [`Error::Unsupported`].
    pub fn check(&self, opts: &ImageOptions) -> Result<()> {
        self.checked(opts).map(drop)
    }

    pub(super) fn checked(&self, opts: &ImageOptions) -> Result<Checked> {
        let kind = self.unet_kind()?;
        let (lh, lw) = self.latent_size(opts)?;
        let sc = SchedulerConfig::from_json(&self.scheduler_config, opts.scheduler)?;
        let mut notes: Vec<String> = sc.note.iter().cloned().collect();
        let strength = self.strength(opts, kind)?;
        let start = match strength {
            Some(s) => Schedule::start_for_strength(opts.steps, s)?,
            None => 0,
        };
        let sched = sc.schedule_from(opts.steps, start)?;
        let edit = self.edit(opts, kind, lh, lw, strength, &mut notes)?;
        self.check_size(lh, lw, self.cfg_batch(opts), edit.is_some())?;
        Ok(Checked {
            lh,
            lw,
            sched,
            notes,
            edit,
        })
    }

    /// The steps and guidance this pipeline is made for when a request does not say: few-step
    /// models from their folder (an LCM-distilled U-Net: 4 steps at guidance 8, given to the
    /// U-Net as an embedding; an LCM scheduler with an ordinary U-Net, as after merging
    /// LCM-LoRA: 4 steps, guidance 1; Euler with "trailing" timesteps, SD-Turbo's: 1 step,
    /// guidance 0), else [`ImageOptions::default`]'s; with a note saying why, for few-step ones.
    pub fn defaults(&self) -> (usize, f32, Option<String>) {
        let sc = SchedulerConfig::from_json(&self.scheduler_config, None).ok();
        let kind = sc.as_ref().map(|c| c.kind);
        let few = if self.unet.cfg.time_cond_proj_dim.is_some() {
            Some((4, 8.0, "an LCM-distilled U-Net"))
        } else if kind == Some(super::schedulers::SchedulerKind::Lcm) {
            Some((4, 1.0, "an LCM scheduler"))
        } else if sc.as_ref().is_some_and(|c| c.trailing())
            && kind == Some(super::schedulers::SchedulerKind::Euler)
        {
            Some((
                1,
                0.0,
                "Euler with trailing timesteps (SD-Turbo's scheduler)",
            ))
        } else {
            None
        };
        match few {
            Some((steps, guidance, why)) => (
                steps,
                guidance,
                Some(format!(
                    "defaults for {why}: {steps} step{}, guidance {guidance}",
                    if steps == 1 { "" } else { "s" }
                )),
            ),
            None => {
                let d = ImageOptions::default();
                (d.steps, d.guidance, None)
            }
        }
    }

    /// 2 with classifier-free guidance (a guidance above 1, and a U-Net without LCM's guidance
    /// embedding, which takes the scale as an input instead, as diffusers decides), else 1.
    pub fn cfg_batch(&self, opts: &ImageOptions) -> usize {
        if opts.guidance > 1.0 && self.unet.cfg.time_cond_proj_dim.is_none() {
            2
        } else {
            1
        }
    }

    /// Plain or inpainting, from the U-Net's input channels (the VAE's latent channels, or
    /// twice them and the mask).
    pub fn unet_kind(&self) -> Result<UnetKind> {
        let (c, lat) = (self.unet.cfg.in_channels, self.vae.cfg.latent_channels);
        if c == lat {
            Ok(UnetKind::Plain)
        } else if c == 2 * lat + 1 {
            Ok(UnetKind::Inpainting)
        } else {
            Err(Error::Unsupported(format!(
                "a U-Net with {c} input channels for {lat} latent channels (expected {lat}, or \
                 {} for an inpainting U-Net)",
                2 * lat + 1
            )))
        }
    }

    /// The strength of an edit (`None` for text-to-image), checked: in [0, 1], and only with
    /// an init image; an inpainting U-Net needs an image and a mask.
    fn strength(&self, opts: &ImageOptions, kind: UnetKind) -> Result<Option<f32>> {
        let bad = |name: &str, msg: String| Error::Data {
            name: name.into(),
            msg,
        };
        if kind == UnetKind::Inpainting && (opts.init_image.is_none() || opts.mask.is_none()) {
            return Err(bad(
                "mask",
                "this is an inpainting U-Net (9 input channels): it needs an init image and a \
                 mask"
                    .into(),
            ));
        }
        if opts.mask.is_some() && opts.init_image.is_none() {
            return Err(bad("mask", "a mask needs an init image to repaint".into()));
        }
        if let Some(s) = opts.strength {
            if !(0.0..=1.0).contains(&s) {
                return Err(bad(
                    "strength",
                    format!("{s}: expected a number from 0 to 1 (the share of the steps run)"),
                ));
            }
            if opts.init_image.is_none() {
                return Err(bad("strength", "needs an init image".into()));
            }
        }
        if opts.init_image.is_none() {
            return Ok(None);
        }
        if let Some(why) = &self.vae.cfg.encoder_unsupported {
            return Err(Error::Unsupported(why.clone()));
        }
        let default = if opts.mask.is_some() {
            1.0
        } else {
            DEFAULT_STRENGTH
        };
        Ok(Some(opts.strength.unwrap_or(default)))
    }

    /// The init image and mask at the generation's size, checked (the mask must have the
    /// image's size).
    fn edit(
        &self,
        opts: &ImageOptions,
        kind: UnetKind,
        lh: usize,
        lw: usize,
        strength: Option<f32>,
        notes: &mut Vec<String>,
    ) -> Result<Option<Edit>> {
        let Some(img) = &opts.init_image else {
            return Ok(None);
        };
        img.check("init image")?;
        let f = self.vae.cfg.scale_factor();
        let (w, h) = (lw * f, lh * f);
        if (img.width, img.height) != (w, h) {
            notes.push(format!(
                "the init image ({}x{}) was resized to {w}x{h}",
                img.width, img.height
            ));
        }
        let image = img.resized(w, h).to_planar();
        let mask = match &opts.mask {
            None => None,
            Some(m) => {
                m.check("mask")?;
                if (m.width, m.height) != (img.width, img.height) {
                    return Err(Error::Data {
                        name: "mask".into(),
                        msg: format!(
                            "size {}x{}, but the init image is {}x{} (they must match)",
                            m.width, m.height, img.width, img.height
                        ),
                    });
                }
                let full = m.resized(w, h).to_mask();
                let masked_image = masked(&image, &full);
                Some((mask_to_latent(&full, h, w, lh, lw), masked_image))
            }
        };
        let from_noise = mask.is_some() && strength == Some(1.0);
        debug_assert!(kind == UnetKind::Plain || mask.is_some());
        Ok(Some(Edit {
            image,
            mask,
            from_noise,
        }))
    }

    /// The latent size of the requested image after checking the options that need no GPU
    /// work (size multiple, guidance, steps), or an error saying what works.
    fn latent_size(&self, opts: &ImageOptions) -> Result<(usize, usize)> {
        let f = self.vae.cfg.scale_factor();
        let (w, h) = self.image_size(opts);
        let mult = self.size_multiple();
        if !w.is_multiple_of(mult) || !h.is_multiple_of(mult) || w == 0 || h == 0 {
            return Err(Error::Unsupported(format!(
                "size {w}x{h}: width and height must be positive multiples of {mult} (the VAE's \
                 factor {f} times the U-Net's {} halvings)",
                mult / f
            )));
        }
        let g = opts.guidance;
        if !(0.0..=MAX_GUIDANCE).contains(&g) {
            // 1e38 as such, not as 39 digits.
            let shown = if g.abs() >= 1e6 {
                format!("{g:e}")
            } else {
                format!("{g}")
            };
            return Err(Error::Data {
                name: "guidance".into(),
                msg: format!(
                    "{shown}: expected a number from 0 to {MAX_GUIDANCE} (at most 1 means no \
                     guidance; 5 to 10 is usual)"
                ),
            });
        }
        if opts.steps == 0 || opts.steps > MAX_STEPS {
            return Err(Error::Unsupported(format!(
                "{} steps (1 to {MAX_STEPS})",
                opts.steps
            )));
        }
        Ok((h / f, w / f))
    }

    /// What image sizes must be a multiple of: the VAE's factor times 2 per U-Net downsampling
    /// (the skip connections need every level's size to halve exactly).
    pub fn size_multiple(&self) -> usize {
        let downs = self.unet.cfg.block_out_channels.len().saturating_sub(1);
        self.vae.cfg.scale_factor() << downs
    }

    /// The size an image of `opts` will have: the requested one, else the pipeline's default
    /// (the U-Net's sample size times the VAE factor).
    pub fn image_size(&self, opts: &ImageOptions) -> (usize, usize) {
        let d = self.unet.cfg.sample_size * self.vae.cfg.scale_factor();
        // An edit keeps the init image's size, rounded down to a size the models take.
        let (dw, dh) = match &opts.init_image {
            Some(RgbImage { width, height, .. }) => {
                let m = self.size_multiple();
                ((width / m).max(1) * m, (height / m).max(1) * m)
            }
            None => (d, d),
        };
        (opts.width.unwrap_or(dw), opts.height.unwrap_or(dh))
    }

    /// Errors, as [`Error::Unsupported`] naming the largest square size this adapter holds,
    /// when an image of this latent size needs a buffer larger than the adapter binds. The same
    /// accounting as compiling (`Graph::check_fits` on the step graph and the VAE decoder), so
    /// a size it accepts does not fail later on a binding limit; it builds graphs (uploading
    /// weights on first use, as the generation would) but allocates no activation and
    /// compiles nothing.
    fn check_size(&self, lh: usize, lw: usize, batch: usize, encode: bool) -> Result<()> {
        let (what, bytes, limit) = match self.size_fits(lh, lw, batch, encode) {
            Err(Error::TooLarge { what, bytes, limit }) => (what, bytes, limit),
            other => return other,
        };
        let f = self.vae.cfg.scale_factor();
        let largest = match self.largest_square(lh.max(lw), batch, encode)? {
            0 => "no image size fits".to_string(),
            s => format!(
                "the largest square image it holds is {s}x{s} (sizes are multiples of {})",
                self.size_multiple()
            ),
        };
        Err(Error::Unsupported(format!(
            "size {}x{}: {what} needs {bytes} bytes, more than this adapter binds in one buffer \
             ({limit} bytes); {largest}",
            lw * f,
            lh * f
        )))
    }

    /// Whether every buffer of a generation at this latent size fits the adapter's binding
    /// limit ([`Error::TooLarge`] naming the first that does not): the step graph (the U-Net
    /// on the CFG batch; the scheduler update adds only latent-sized state) and the decoder.
    fn size_fits(&self, lh: usize, lw: usize, batch: usize, encode: bool) -> Result<()> {
        let c = self.unet.cfg.in_channels;
        let mut g = Graph::new();
        let x = g.input("unet_in", &[batch, c, lh, lw], DType::F32)?;
        let t = g.input("t", &[1], DType::F32)?;
        let ctx_shape = [batch, self.tokenizer.max_len, self.context_dim()];
        let ctx = g.input("context", &ctx_shape, DType::F32)?;
        let mut extra = super::unet::UnetExtra::default();
        if self.unet.cfg.text_time.is_some() {
            let shape = [batch, self.unet.cfg.time_embed_dim];
            extra.added = Some(g.input("added embedding", &shape, DType::F32)?);
        }
        self.unet.forward_cond(&mut g, x, t, ctx, &extra)?;
        g.check_fits(&self.gpu)
            .map_err(|e| named(e, "the U-Net's"))?;
        let mut g = Graph::new();
        let lc = self.vae.cfg.latent_channels;
        let z = g.input("latents", &[1, lc, lh, lw], DType::F32)?;
        self.decode_graph(&mut g, z)?;
        g.check_fits(&self.gpu)
            .map_err(|e| named(e, "the VAE decoder's"))?;
        if !encode {
            return Ok(());
        }
        let mut g = Graph::new();
        let f = self.vae.cfg.scale_factor();
        let img = g.input(
            "image",
            &[1, self.vae.cfg.in_channels, lh * f, lw * f],
            DType::F32,
        )?;
        self.vae.encode_mean(&mut g, img)?;
        g.check_fits(&self.gpu)
            .map_err(|e| named(e, "the VAE encoder's"))
    }

    /// The largest square image side (a multiple of [`Self::size_multiple`], 0 if none) whose
    /// buffers fit, below a latent side `above` known not to: a binary search, since every
    /// buffer grows with the size (about log2(above) graph builds, only on this error path).
    fn largest_square(&self, above: usize, batch: usize, encode: bool) -> Result<usize> {
        let unit = self.size_multiple() / self.vae.cfg.scale_factor();
        let fits = |k: usize| match self.size_fits(k * unit, k * unit, batch, encode) {
            Ok(()) => Ok(true),
            Err(Error::TooLarge { .. }) => Ok(false),
            Err(e) => Err(e),
        };
        // Invariant: `lo` latent units fit (0 trivially), `hi` do not.
        let (mut lo, mut hi) = (0, above.div_ceil(unit).max(1));
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo * self.size_multiple())
    }
}

/// `e`, its value's name prefixed with the component's when it is [`Error::TooLarge`].
fn named(e: Error, component: &str) -> Error {
    match e {
        Error::TooLarge { what, bytes, limit } => Error::TooLarge {
            what: format!("{component} {what}"),
            bytes,
            limit,
        },
        e => e,
    }
}
