//! `kiln image`: Stable Diffusion from a diffusers folder to a PNG.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln::diffusion::models::{read_pipeline_dir, SdModels};
use kiln::diffusion::pipeline::{ImageOptions, StepReply};
use kiln::diffusion::schedulers::SchedulerKind;
use std::path::PathBuf;

/// The engine's image defaults, which the flags show and use.
static DEFAULTS: std::sync::LazyLock<ImageOptions> =
    std::sync::LazyLock::new(ImageOptions::default);

#[derive(Args)]
pub struct ImageArgs {
    /// A diffusers pipeline folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/,
    /// scheduler/). Default: the embedded coloured-shapes model (models/image-shapes).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = DEFAULTS.negative_prompt.clone())]
    negative_prompt: String,
    #[arg(long, default_value_t = DEFAULTS.steps)]
    steps: usize,
    /// Classifier-free guidance scale (1 disables guidance).
    #[arg(long, default_value_t = DEFAULTS.guidance)]
    guidance: f32,
    /// ddim, euler, euler-a, dpm++2m or lcm (default: the pipeline's own, Euler if unsupported).
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    #[arg(long, default_value_t = DEFAULTS.seed)]
    seed: u32,
    /// Image width (default: the U-Net's sample size times the VAE factor).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Initial latents (.npy, [1, 4, h/8, w/8], unscaled standard normal — diffusers' `latents=`).
    #[arg(long)]
    latents: Option<PathBuf>,
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// Show the denoising live in a desktop window, then the final image (X11; Xvfb works).
    #[arg(long)]
    window: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Encodes 8-bit RGB as a PNG (`kiln image` files, `kiln serve`'s `b64_json`).
pub fn png_bytes(w: usize, h: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(rgb)?;
    Ok(out)
}

/// Writes 8-bit RGB as a PNG.
pub fn write_png(path: &std::path::Path, w: usize, h: usize, rgb: &[u8]) -> Result<()> {
    std::fs::write(path, png_bytes(w, h, rgb)?)
        .with_context(|| format!("writing {}", path.display()))
}

impl ImageArgs {
    /// The engine's options for these flags (the latents file is read by [`run`]).
    pub fn options(&self) -> Result<ImageOptions> {
        Ok(ImageOptions {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            seed: self.seed,
            width: self.width,
            height: self.height,
            latents: None,
            step_noise: None,
        })
    }
}

pub fn run(a: ImageArgs) -> Result<()> {
    // A folder that is not there fails now, not after the whole generation.
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "--out {}: the folder {} does not exist",
                a.out.display(),
                dir.display()
            );
        }
    }
    let files = match &a.model {
        Some(model) => {
            let dir = PathBuf::from(model);
            if !dir.is_dir() {
                bail!("model '{model}' not found: pass a diffusers pipeline folder");
            }
            read_pipeline_dir(&dir)?
        }
        None => {
            if !a.json {
                eprintln!("model: {}", crate::defaults::IMAGE_NAME);
            }
            crate::defaults::image()
        }
    };
    let gpu = crate::gpu()?;
    let t0 = std::time::Instant::now();
    let spinner = crate::spinner(!a.json && !a.window, "loading the pipeline");
    let mut m = SdModels::load(&gpu, files)?;
    spinner.finish_and_clear();
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut opts = a.options()?;
    if let Some(p) = &a.latents {
        let l = kiln::formats::npy::parse(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?;
        // The image size follows the latents unless given.
        let f = m.vae.cfg.scale_factor();
        let [_, _, h, w] = l.shape[..] else {
            bail!(
                "latents of shape {:?}: expected [1, channels, h, w]",
                l.shape
            )
        };
        opts.width = opts.width.or(Some(w * f));
        opts.height = opts.height.or(Some(h * f));
        opts.latents = Some(l.data);
    }
    if a.window {
        let out = a.out.clone();
        return crate::window::run(move |win| {
            let total = opts.steps;
            let r = pollster::block_on(m.generate(&opts, &mut |done, _, preview| {
                if let Some(p) = preview {
                    win.show(
                        p.width,
                        p.height,
                        p.rgb,
                        format!("kiln — step {done}/{total}"),
                    );
                }
                true
            }));
            match r {
                Ok(img) => {
                    let saved = write_png(&out, img.width, img.height, &img.rgb)
                        .map(|_| format!(" — saved {}", out.display()))
                        .unwrap_or_else(|e| format!(" — {e}"));
                    win.show(
                        img.width,
                        img.height,
                        img.rgb,
                        format!("kiln — done{saved}"),
                    );
                }
                Err(e) => win.fail(e.to_string()),
            }
        });
    }
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(opts.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("denoising {bar:30} {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t1 = std::time::Instant::now();
    // The bar counts steps the GPU has finished; Ctrl-C stops after the current step and the
    // model's estimate at that step is decoded and written (a partial image, noted).
    let interrupted = crate::on_interrupt("finishing this step, then writing the partial image");
    let mut decoding = None;
    let img = pollster::block_on(m.generate_with(&opts, &mut |done, total, _| {
        bar.set_position(done as u64);
        let stop = interrupted.load(std::sync::atomic::Ordering::Relaxed);
        if done == total || stop {
            bar.finish_and_clear();
            decoding = Some(crate::spinner(!a.json, "decoding the image"));
        }
        if stop {
            StepReply::Finish
        } else {
            StepReply::Continue
        }
    }))?;
    bar.finish_and_clear();
    if let Some(s) = decoding {
        s.finish_and_clear();
    }
    let gen_ms = t1.elapsed().as_secs_f64() * 1e3;
    write_png(&a.out, img.width, img.height, &img.rgb)?;
    if a.json {
        let v = serde_json::json!({
            "out": a.out.display().to_string(), "width": img.width, "height": img.height, "steps": img.steps,
            "notes": img.notes,
            "per_step": {"submits": img.loop_counters.submits as f64 / img.steps as f64, "dispatches": img.loop_counters.dispatches / img.steps as u64,
                         "readback_bytes": img.loop_counters.bytes_read_back / img.steps as u64},
            "timings": {"load_ms": load_ms, "generate_ms": gen_ms},
        });
        println!("{v}");
    } else {
        for n in &img.notes {
            eprintln!("note: {n}");
        }
        eprintln!(
            "wrote {} ({}x{}, {} steps, {:.0} ms)",
            a.out.display(),
            img.width,
            img.height,
            img.steps,
            gen_ms
        );
    }
    Ok(())
}
