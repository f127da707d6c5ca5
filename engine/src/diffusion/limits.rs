//! What a generation may ask for, checked before any work: the image size (a multiple of the
//! U-Net's levels, and small enough that every buffer of the step graph and the VAE decoder
//! fits the adapter), the guidance scale and the step count. Each mistake is a client error
//! ([`Error::Data`] or [`Error::Unsupported`]) that says what works.

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

/// A generation's options once checked: the latent size, the schedule and its notes.
pub(super) struct Checked {
    pub lh: usize,
    pub lw: usize,
    pub sched: Schedule,
    pub notes: Vec<String>,
}

impl SdModels {
    /// Checks `opts` as a generation does before any work (size, guidance, steps, the
    /// schedule, every buffer against the adapter's limit), running nothing: a front end can
    /// refuse a request with it before queueing it. The client's mistakes are
    /// [`Error::Data`] or [`Error::Unsupported`].
    pub fn check(&self, opts: &ImageOptions) -> Result<()> {
        self.checked(opts).map(drop)
    }

    pub(super) fn checked(&self, opts: &ImageOptions) -> Result<Checked> {
        let (lh, lw) = self.latent_size(opts)?;
        let sc = SchedulerConfig::from_json(&self.scheduler_config, opts.scheduler)?;
        let sched = sc.schedule(opts.steps)?;
        self.check_size(lh, lw, if opts.guidance > 1.0 { 2 } else { 1 })?;
        Ok(Checked {
            lh,
            lw,
            sched,
            notes: sc.note.into_iter().collect(),
        })
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
        (opts.width.unwrap_or(d), opts.height.unwrap_or(d))
    }

    /// Errors, as [`Error::Unsupported`] naming the largest square size this adapter holds,
    /// when an image of this latent size needs a buffer larger than the adapter binds. The same
    /// accounting as compiling (`Graph::check_fits` on the step graph and the VAE decoder), so
    /// a size it accepts does not fail later on a binding limit; it builds graphs (uploading
    /// weights on first use, as the generation would) but allocates no activation and
    /// compiles nothing.
    fn check_size(&self, lh: usize, lw: usize, batch: usize) -> Result<()> {
        let (what, bytes, limit) = match self.size_fits(lh, lw, batch) {
            Err(Error::TooLarge { what, bytes, limit }) => (what, bytes, limit),
            other => return other,
        };
        let f = self.vae.cfg.scale_factor();
        let largest = match self.largest_square(lh.max(lw), batch)? {
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
    fn size_fits(&self, lh: usize, lw: usize, batch: usize) -> Result<()> {
        let c = self.unet.cfg.in_channels;
        let mut g = Graph::new();
        let x = g.input("unet_in", &[batch, c, lh, lw], DType::F32)?;
        let t = g.input("t", &[1], DType::F32)?;
        let ctx_shape = [batch, self.tokenizer.max_len, self.text_encoder.cfg.hidden];
        let ctx = g.input("context", &ctx_shape, DType::F32)?;
        self.unet.forward(&mut g, x, t, ctx)?;
        g.check_fits(&self.gpu)
            .map_err(|e| named(e, "the U-Net's"))?;
        let mut g = Graph::new();
        let lc = self.vae.cfg.latent_channels;
        let z = g.input("latents", &[1, lc, lh, lw], DType::F32)?;
        self.decode_graph(&mut g, z)?;
        g.check_fits(&self.gpu)
            .map_err(|e| named(e, "the VAE decoder's"))
    }

    /// The largest square image side (a multiple of [`Self::size_multiple`], 0 if none) whose
    /// buffers fit, below a latent side `above` known not to: a binary search, since every
    /// buffer grows with the size (about log2(above) graph builds, only on this error path).
    fn largest_square(&self, above: usize, batch: usize) -> Result<usize> {
        let unit = self.size_multiple() / self.vae.cfg.scale_factor();
        let fits = |k: usize| match self.size_fits(k * unit, k * unit, batch) {
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
