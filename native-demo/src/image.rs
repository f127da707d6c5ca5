//! `kiln image`: Stable Diffusion from a diffusers folder to a PNG.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln::diffusion::models::{read_pipeline_dir, SdModels};
use kiln::diffusion::pipeline::ImageOptions;
use kiln::diffusion::schedulers::SchedulerKind;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImageArgs {
    /// A diffusers pipeline folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/,
    /// scheduler/). Default: the embedded coloured-shapes model (models/image-shapes).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale (1 disables guidance).
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// ddim, euler, euler-a, dpm++2m or lcm (default: the pipeline's own, Euler if unsupported).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long, default_value_t = 0)]
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

/// Writes 8-bit RGB as a PNG.
pub fn write_png(path: &std::path::Path, w: usize, h: usize, rgb: &[u8]) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(rgb)?;
    Ok(())
}

pub fn run(a: ImageArgs) -> Result<()> {
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
    let f = m.vae.cfg.scale_factor();
    let latents = match &a.latents {
        Some(p) => Some(kiln::formats::npy::parse(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    let (dw, dh) = match &latents {
        Some(l) if l.shape.len() == 4 => (l.shape[3] * f, l.shape[2] * f),
        Some(l) => bail!(
            "latents of shape {:?}: expected [1, channels, h, w]",
            l.shape
        ),
        None => (m.unet.cfg.sample_size * f, m.unet.cfg.sample_size * f),
    };
    let opts = ImageOptions {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance: a.guidance,
        scheduler: a
            .scheduler
            .as_deref()
            .map(SchedulerKind::from_cli)
            .transpose()?,
        seed: a.seed,
        width: a.width.unwrap_or(dw),
        height: a.height.unwrap_or(dh),
        latents: latents.map(|l| l.data),
        step_noise: None,
    };
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
    let img = pollster::block_on(m.generate(&opts, &mut |done, _, _| {
        bar.set_position(done as u64);
        false
    }))?;
    bar.finish_and_clear();
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
