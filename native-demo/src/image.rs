//! `kiln image`: Stable Diffusion from a diffusers folder to a PNG.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln::diffusion::models::{read_pipeline_dir, SdModels};
use kiln::diffusion::pipeline::{ImageOptions, RgbImage, StepReply};
use kiln::diffusion::schedulers::SchedulerKind;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The engine's image defaults, which the flags show and use.
static DEFAULTS: std::sync::LazyLock<ImageOptions> =
    std::sync::LazyLock::new(ImageOptions::default);

#[derive(Args)]
pub struct ImageArgs {
    /// A diffusers pipeline folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/,
    /// scheduler/) or a Hugging Face repo id (owner/name, downloaded with hf-hub). Default: the
    /// embedded coloured-shapes model (models/image-shapes).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = DEFAULTS.negative_prompt.clone())]
    negative_prompt: String,
    /// Denoising steps [default: 20, or the model's: 4 for LCM, 1 for SD-Turbo]
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (1 disables guidance) [default: 7.5, or the model's]
    #[arg(long)]
    guidance: Option<f32>,
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
    /// img2img: start from this image (PNG) instead of noise; its size is the default size.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// Inpainting: repaint where this mask (PNG, the init image's size) is white.
    #[arg(long, requires = "init_image")]
    mask: Option<PathBuf>,
    /// How much of the init image to repaint, 0 to 1: the share of the steps run (default 0.8,
    /// 1 with --mask).
    #[arg(long, requires = "init_image")]
    strength: Option<f32>,
    /// Encode the init image to a seeded draw from the VAE's latent distribution (diffusers'
    /// default) instead of its mean.
    #[arg(long, requires = "init_image")]
    sample_encoding: bool,
    /// A tiny autoencoder folder (diffusers' AutoencoderTiny, e.g. madebyollin/taesd) for the
    /// window's live previews (full-size pictures of the current estimate).
    #[arg(long, value_name = "DIR")]
    taesd: Option<PathBuf>,
    /// Decode the final image with --taesd's decoder instead of the VAE (faster, less detail).
    #[arg(long, requires = "taesd")]
    tiny_decoder: bool,
    /// A LoRA file to merge into the U-Net and text encoder (diffusers/PEFT or kohya
    /// safetensors), with an optional scale (default 1); repeat for several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
    /// Quantize the U-Net's and text encoders' float matrices on load: none, q4, q8, q4_k or
    /// q6_k (for SDXL where its f16 weights do not fit; q8 stays closest to the image).
    #[arg(long, default_value_t = kiln::llm::Quantize::None)]
    quantize: kiln::llm::Quantize,
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

/// A pipeline's files from a folder or a Hugging Face repo id (`owner/name`).
pub fn pipeline_files(model: &str) -> Result<kiln::formats::ModelFiles> {
    let dir = PathBuf::from(model);
    if dir.is_dir() {
        Ok(read_pipeline_dir(&dir)?)
    } else if crate::hub::looks_like_repo_id(model) {
        crate::hub::fetch_kind(model, crate::hub::Kind::Pipeline)
    } else {
        bail!("model '{model}' not found: pass a diffusers pipeline folder or a Hugging Face repo id (owner/name)")
    }
}

/// `FILE[:SCALE]` arguments read into `set_loras`'s `(label, bytes, scale)`.
pub fn read_loras(args: &[String]) -> Result<Vec<(String, Vec<u8>, f32)>> {
    args.iter()
        .map(|a| {
            let (path, scale) = match a.rsplit_once(':') {
                Some((p, s)) if s.parse::<f32>().is_ok() => (p, s.parse::<f32>()?),
                _ => (a.as_str(), 1.0),
            };
            let bytes = std::fs::read(path).with_context(|| format!("--lora: reading {path}"))?;
            Ok((path.to_string(), bytes, scale))
        })
        .collect()
}

/// Decodes a PNG (any colour type and depth) to 8-bit RGB: gray is repeated, alpha dropped,
/// 16-bit samples take their high byte. `what` names the input in errors.
pub fn decode_png(bytes: &[u8], what: &str) -> Result<RgbImage> {
    decode_png_alpha(bytes, what).map(|(img, _)| img)
}

/// A mask PNG: white = repaint; or, as OpenAI's image edits define a mask, where it has
/// transparent pixels, fully transparent = repaint (made white, the rest black).
pub fn decode_mask_png(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let (mut img, alpha) = decode_png_alpha(bytes, what)?;
    if let Some(alpha) = alpha.filter(|a| a.iter().any(|&v| v < 255)) {
        img.rgb = alpha
            .iter()
            .flat_map(|&a| [if a == 0 { 255 } else { 0 }; 3])
            .collect();
    }
    Ok(img)
}

/// [`decode_png`] and the alpha channel, where the PNG has one.
fn decode_png_alpha(bytes: &[u8], what: &str) -> Result<(RgbImage, Option<Vec<u8>>)> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    // A header may claim any size: refuse what no generation could use before allocating it.
    dec.set_limits(png::Limits {
        bytes: 4 * kiln::diffusion::edit::MAX_SIDE * kiln::diffusion::edit::MAX_SIDE,
    });
    let mut rd = dec
        .read_info()
        .with_context(|| format!("{what}: not a PNG image"))?;
    let (w, h) = rd.info().size();
    let max = kiln::diffusion::edit::MAX_SIDE as u32;
    if w > max || h > max {
        bail!("{what}: {w}x{h} pixels (each side at most {max})");
    }
    let mut buf = vec![0; rd.output_buffer_size().context("PNG too large")?];
    let info = rd
        .next_frame(&mut buf)
        .with_context(|| format!("{what}: reading the PNG"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let px = &buf[..info.buffer_size()];
    let per = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{what}: an indexed PNG was not expanded"),
    };
    let rgb = px
        .chunks_exact(per)
        .flat_map(|p| {
            if per < 3 {
                [p[0]; 3]
            } else {
                [p[0], p[1], p[2]]
            }
        })
        .collect();
    let alpha = (per % 2 == 0).then(|| px.chunks_exact(per).map(|p| p[per - 1]).collect());
    Ok((RgbImage::new(w, h, rgb, what)?, alpha))
}

/// Reads a PNG file as 8-bit RGB (see [`decode_png`]).
pub fn read_png(path: &std::path::Path, what: &str) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{what}: reading {}", path.display()))?;
    decode_png(&bytes, what)
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
            steps: self.steps.unwrap_or(DEFAULTS.steps),
            guidance: self.guidance.unwrap_or(DEFAULTS.guidance),
            scheduler: self.scheduler,
            seed: self.seed,
            width: self.width,
            height: self.height,
            init_image: match &self.init_image {
                Some(p) => Some(read_png(p, "--init-image")?),
                None => None,
            },
            mask: match &self.mask {
                Some(p) => Some(read_png(p, "--mask")?),
                None => None,
            },
            strength: self.strength,
            sample_encoding: self.sample_encoding,
            tiny_decoder: self.tiny_decoder,
            ..Default::default()
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
        Some(model) => pipeline_files(model)?,
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
    let mut m = SdModels::load_with(&gpu, files, a.quantize)?;
    spinner.finish_and_clear();
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(dir) = &a.taesd {
        let files = if dir.is_dir() {
            kiln::formats::files::read_model_dir(dir)?
        } else if crate::hub::looks_like_repo_id(&dir.to_string_lossy()) {
            crate::hub::fetch_kind(&dir.to_string_lossy(), crate::hub::Kind::DiffusersModel)?
        } else {
            bail!(
                "--taesd {}: not a folder or a Hugging Face repo id",
                dir.display()
            );
        };
        m.set_tiny_decoder(files)
            .with_context(|| format!("--taesd {}", dir.display()))?;
    }
    if !a.loras.is_empty() {
        let n = m.set_loras(read_loras(&a.loras)?)?;
        if !a.json {
            eprintln!("LoRA: {n} modules merged from {}", a.loras.join(", "));
        }
    }
    let mut opts = a.options()?;
    // A few-step model's own steps and guidance where the flags leave them out.
    let (steps, guidance, why) = m.defaults();
    if a.steps.is_none() || a.guidance.is_none() {
        opts.steps = a.steps.unwrap_or(steps);
        opts.guidance = a.guidance.unwrap_or(guidance);
        if let Some(why) = why.filter(|_| !a.json) {
            eprintln!("{why}");
        }
    }
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
    // The client's mistakes (a size too large for this adapter, a degenerate step count, ...)
    // before any work or note.
    m.check(&opts)?;
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
    if !a.json {
        slow_size_note(&gpu, &m, &opts);
    }
    let progress = Progress::new(!a.json, opts.steps);
    let t1 = Instant::now();
    // The bar counts steps the GPU has finished; Ctrl-C stops after the current step and the
    // model's estimate at that step is decoded and written (a partial image, noted).
    let interrupted = crate::on_interrupt("finishing this step, then writing the partial image");
    let mut decoding = None;
    let img = pollster::block_on(m.generate_with(&opts, &mut |done, total, _| {
        progress.step(done, total);
        let stop = interrupted.load(std::sync::atomic::Ordering::Relaxed);
        if done == total || stop {
            progress.finish();
            decoding = Some(progress.decoding());
        }
        if stop {
            StepReply::Finish
        } else {
            StepReply::Continue
        }
    }));
    progress.finish();
    if let Some(s) = decoding {
        s.finish_and_clear();
    }
    let img = img?;
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

/// Image area (pixels) from which a software adapter takes minutes. Measured on lavapipe (2
/// cores) with the embedded model and guidance (a batch of 2): 256x256 took 6 s for 2 steps and
/// the decode; 512x512 8 s a step, 54 s for 6 steps, 10 s of decode; 1024x1024 50 s a step,
/// 3 min until the first step was done, 80 s of decode (20 steps: about 20 min). A Stable
/// Diffusion checkpoint is slower still at any size.
const SLOW_SOFTWARE_PIXELS: usize = 512 * 512;

/// A note on stderr, before any work, when the image will be slow on this adapter: one running
/// on the CPU (lavapipe, SwiftShader) and a size from [`SLOW_SOFTWARE_PIXELS`].
fn slow_size_note(gpu: &kiln::Gpu, m: &SdModels, opts: &ImageOptions) {
    let (w, h) = m.image_size(opts);
    if gpu.info.device_type == wgpu::DeviceType::Cpu && w * h >= SLOW_SOFTWARE_PIXELS {
        eprintln!(
            "note: {w}x{h} on a software adapter ({}, the CPU) takes minutes; the progress \
             below estimates how long",
            gpu.info.name
        );
    }
}

/// Denoising progress on stderr (stdout is --json's): on a terminal a bar with the steps done,
/// the time elapsed and an estimate of the time left; elsewhere (a log, a pipe), where a bar
/// draws nothing, a plain line at step 1 and then at most every [`Progress::LINE_EVERY`].
struct Progress {
    bar: ProgressBar,
    /// Plain lines instead of the bar.
    lines: bool,
    start: Instant,
    /// When step 1 was reported: the estimate leaves out what came before it (encoding the
    /// prompt, compiling the step graph), which later steps do not repeat.
    first: std::cell::Cell<Option<Instant>>,
    last_line: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    const LINE_EVERY: Duration = Duration::from_secs(10);

    fn new(show: bool, steps: usize) -> Progress {
        let lines = show && !std::io::stderr().is_terminal();
        let bar = if show && !lines {
            ProgressBar::new(steps as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}{prefix}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        // Shown from the start: before step 1 is done the prompt is encoded and the step graph
        // compiled, which on a software adapter at a large size takes minutes of its own.
        bar.set_message("starting");
        bar.enable_steady_tick(Duration::from_millis(500));
        if lines {
            eprintln!("denoising {steps} steps (the first also encodes the prompt and compiles)");
        }
        Progress {
            bar,
            lines,
            start: Instant::now(),
            first: None.into(),
            last_line: None.into(),
        }
    }

    /// Step `done` of `total` is finished.
    fn step(&self, done: usize, total: usize) {
        let now = Instant::now();
        let first = *self.first.get().get_or_insert(now);
        self.first.set(Some(first));
        // Steps cost the same: the mean since step 1 times the steps left.
        let left =
            (done > 1).then(|| (now - first).mul_f64((total - done) as f64 / (done - 1) as f64));
        let left = left.map_or(String::new(), |d| format!(", ~{} left", short(d)));
        self.bar.set_message("denoising");
        self.bar.set_prefix(left.clone());
        self.bar.set_position(done as u64);
        let due = self
            .last_line
            .get()
            .is_none_or(|t| now - t >= Self::LINE_EVERY);
        if self.lines && (due || done == total) {
            self.last_line.set(Some(now));
            eprintln!(
                "denoising: step {done}/{total}, {} elapsed{left}",
                short(now - self.start)
            );
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// The decode after the loop: a spinner, or a line.
    fn decoding(&self) -> ProgressBar {
        if self.lines {
            eprintln!("decoding the image");
        }
        crate::spinner(!self.bar.is_hidden(), "decoding the image")
    }
}

/// A duration as 45s, 3m05s or 1h02m.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_of_any_colour_type_decodes_to_rgb() {
        let rgb: Vec<u8> = (0..2 * 3 * 3).map(|v| v as u8 * 10).collect();
        let img = decode_png(&png_bytes(3, 2, &rgb).unwrap(), "x").unwrap();
        assert_eq!((img.width, img.height, img.rgb), (3, 2, rgb));
        // Gray with alpha, 16 bits: gray repeated, alpha dropped, high bytes kept.
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 2, 1);
        enc.set_color(png::ColorType::GrayscaleAlpha);
        enc.set_depth(png::BitDepth::Sixteen);
        enc.write_header()
            .unwrap()
            .write_image_data(&[0x12, 0x34, 0xff, 0xff, 0xab, 0xcd, 0, 0])
            .unwrap();
        let img = decode_png(&out, "x").unwrap();
        assert_eq!(img.rgb, vec![0x12, 0x12, 0x12, 0xab, 0xab, 0xab]);
        // A mask with transparency: fully transparent = repaint (white), the rest black; an
        // opaque RGBA mask keeps its colours (white = repaint).
        let rgba = |a: [u8; 2]| {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, 2, 1);
            enc.set_color(png::ColorType::Rgba);
            enc.write_header()
                .unwrap()
                .write_image_data(&[9, 9, 9, a[0], 255, 255, 255, a[1]])
                .unwrap();
            out
        };
        assert_eq!(
            decode_mask_png(&rgba([0, 128]), "m").unwrap().rgb,
            [255, 255, 255, 0, 0, 0]
        );
        assert_eq!(
            decode_mask_png(&rgba([255, 255]), "m").unwrap().rgb,
            [9, 9, 9, 255, 255, 255]
        );
        let e = decode_png(b"GIF89a....", "--mask").unwrap_err();
        assert!(format!("{e:#}").contains("--mask: not a PNG"), "{e:#}");
    }
}
