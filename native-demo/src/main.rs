//! `kiln`: the native command-line front end of the engine.

mod bench;
mod bench_image;
mod bench_text;
mod defaults;
mod hub;
mod image;
mod window;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::llm::{LoadOptions, Quantize, TextModel, TextOptions};
use kiln::{Gpu, GpuOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run generative models on any GPU (wgpu/WGSL)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt.
    Text(TextArgs),
    /// Chat interactively using the model's chat template.
    Chat(ChatArgs),
    /// Generate an image with a Stable Diffusion pipeline.
    Image(image::ImageArgs),
    /// Benchmarks: `kernels` or `text`.
    Bench(bench::BenchArgs),
    /// List adapters, features and limits.
    Info,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A model folder (config.json + safetensors + tokenizer.json), a .gguf file or a Hugging Face
    /// repo id. Default: the embedded King James Bible model (models/text-kjv).
    #[arg(long)]
    model: Option<String>,
    /// Quantize float matrices on load: none, q4 or q8.
    #[arg(long, default_value_t = LoadOptions::default().quantize)]
    quantize: Quantize,
    /// Context length (KV-cache positions).
    #[arg(long, default_value_t = LoadOptions::default().ctx)]
    ctx: usize,
}

/// The sampler flags. Every default is the engine's (`TextOptions::default()`), which the wasm
/// module and the npm package use too.
#[derive(Args, Clone)]
struct SamplingArgs {
    /// Maximum new tokens.
    #[arg(long, default_value_t = DEFAULTS.max_tokens)]
    max_tokens: usize,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = DEFAULTS.temperature)]
    temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    #[arg(long, default_value_t = DEFAULTS.top_k)]
    top_k: u32,
    /// Nucleus mass in (0, 1]; 1 disables.
    #[arg(long, default_value_t = DEFAULTS.top_p)]
    top_p: f32,
    /// Minimum probability relative to the most likely token; 0 disables.
    #[arg(long, default_value_t = DEFAULTS.min_p)]
    min_p: f32,
    /// Repetition penalty; 1 disables.
    #[arg(long, default_value_t = DEFAULTS.repeat_penalty)]
    repeat_penalty: f32,
    /// Previous tokens the penalty looks at.
    #[arg(long, default_value_t = DEFAULTS.repeat_window)]
    repeat_window: u32,
    #[arg(long, default_value_t = DEFAULTS.seed)]
    seed: u32,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

/// The engine's option defaults, which the flags show and use.
static DEFAULTS: std::sync::LazyLock<TextOptions> = std::sync::LazyLock::new(TextOptions::default);

impl SamplingArgs {
    /// The engine's options for these flags.
    fn options(&self) -> TextOptions {
        TextOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_window: self.repeat_window,
            seed: self.seed,
            stop: self.stop.clone(),
            ..TextOptions::default()
        }
    }
}

#[derive(Args)]
struct TextArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Include the log-probability of each generated token.
    #[arg(long)]
    logprobs: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
}

/// The GPU, or an error that says how to get a driver.
pub fn gpu() -> Result<Arc<Gpu>> {
    pollster::block_on(Gpu::new(GpuOptions::default())).context("no usable GPU adapter")
}

/// A spinner on stderr for work without a known length (hidden when `show` is false).
pub fn spinner(show: bool, msg: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let s = ProgressBar::new_spinner();
    s.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    s.set_message(msg.to_string());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

fn load(gpu: &Arc<Gpu>, m: &ModelArgs, quiet: bool) -> Result<TextModel> {
    let files = if let Some(path) = &m.model {
        let p = PathBuf::from(path);
        if p.exists() {
            kiln::formats::files::read_model_path(&p)?
        } else if hub::looks_like_repo_id(path) {
            hub::fetch(path)?
        } else {
            bail!("model '{path}' not found: pass a local folder (config.json, *.safetensors, tokenizer.json), a .gguf file, or a Hugging Face repo id (owner/name, or owner/name:file.gguf)");
        }
    } else {
        if !quiet {
            eprintln!("model: {}", defaults::TEXT_NAME);
        }
        defaults::text()
    };
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1)
    };
    bar.set_style(
        ProgressStyle::with_template("loading {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let opts = LoadOptions {
        ctx: m.ctx,
        quantize: m.quantize,
        ..Default::default()
    };
    let model = pollster::block_on(TextModel::load(gpu, files, &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    }))?;
    bar.finish_and_clear();
    if model.ctx() < m.ctx && !quiet {
        eprintln!(
            "note: context of {} positions (the model's maximum), not {}",
            model.ctx(),
            m.ctx
        );
    }
    Ok(model)
}

fn text(a: TextArgs) -> Result<()> {
    let gpu = gpu()?;
    let t0 = std::time::Instant::now();
    let mut model = load(&gpu, &a.model, a.json)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let request = TextOptions {
        prompt: a.prompt.clone(),
        prompt_ids: a.prompt_ids.clone(),
        ..a.sampling.options()
    };
    if request.prompt.is_none() && request.prompt_ids.is_none() {
        bail!("give --prompt TEXT or --prompt-ids 1,2,3");
    }
    let prompt = request.prompt_ids(&model.tokenizer)?;
    let opts = request.generate_options();
    let json = a.json;
    let mut out = std::io::stdout();
    // The prompt is echoed once the first token is out; until then a spinner shows the prefill.
    let mut echo = if json { None } else { a.prompt.clone() };
    let spinner = spinner(!json, &format!("prefill of {} tokens", prompt.len()));
    let g = pollster::block_on(model.generate(&prompt, &opts, &mut |piece| {
        spinner.finish_and_clear();
        if !json {
            if let Some(p) = echo.take() {
                let _ = out.write_all(p.as_bytes());
            }
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
        true
    }))?;
    spinner.finish_and_clear();
    if json {
        let mut v = g.to_json();
        v["timings"]["load_ms"] = load_ms.into();
        if !a.logprobs {
            v["logprobs"] = serde_json::Value::Null;
        }
        println!("{v}");
    } else {
        println!();
        if a.logprobs {
            eprintln!("logprobs: {:?}", g.logprobs);
        }
        eprintln!(
            "[{} prompt + {} generated tokens; prefill {:.1} tok/s, decode {:.1} tok/s, first token {:.0} ms; stop: {}]",
            g.prompt_ids.len(),
            g.ids.len(),
            g.timings.prefill_tok_s,
            g.timings.decode_tok_s,
            g.timings.ttft_ms,
            g.stop
        );
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let gpu = gpu()?;
    let mut model = load(&gpu, &a.model, false)?;
    if model.tokenizer.chat_template.is_none() {
        bail!("this model has no chat template (chat_template.jinja, tokenizer_config.json 'chat_template' or GGUF 'tokenizer.chat_template')");
    }
    let mut messages: Vec<(String, String)> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(("system".into(), s.clone()));
    }
    let opts = a.sampling.options().generate_options();
    eprintln!("(chat; an empty line or end of input quits)");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(("user".into(), line.trim_end().to_string()));
        // Keep room for a reply: forget the oldest exchanges while the conversation does not fit.
        let room = opts.max_tokens.min(model.ctx() / 4).max(1);
        let first = usize::from(a.system.is_some());
        let ids = loop {
            let ids = model
                .tokenizer
                .encode(&model.tokenizer.render_chat(&messages)?)?;
            if ids.len() + room <= model.ctx() || messages.len() <= first + 1 {
                break ids;
            }
            let n = if messages.len() > first + 2 { 2 } else { 1 };
            messages.drain(first..first + n);
            eprintln!(
                "(context of {} tokens full: the oldest exchange is forgotten)",
                model.ctx()
            );
        };
        let mut out = std::io::stdout();
        let r = pollster::block_on(model.generate(&ids, &opts, &mut |p| {
            let _ = out.write_all(p.as_bytes());
            let _ = out.flush();
            true
        }));
        println!();
        match r {
            Ok(g) => messages.push(("assistant".into(), g.text)),
            Err(e @ kiln::Error::Data { .. }) => {
                // A message that cannot fit: say so and keep the conversation going.
                eprintln!("error: {e}");
                messages.pop();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn info() -> Result<()> {
    let adapters = pollster::block_on(kiln::device::list_adapters());
    if adapters.is_empty() {
        bail!("no GPU adapter found. On Linux without a GPU install Mesa's software Vulkan driver: sudo apt-get install mesa-vulkan-drivers");
    }
    for a in &adapters {
        println!(
            "adapter: {} ({:?}, {:?}, driver {} {})",
            a.name, a.backend, a.device_type, a.driver, a.driver_info
        );
    }
    let g = gpu()?;
    println!("selected: {}", g.describe());
    let l = &g.limits;
    println!(
        "limits: max storage binding {} MiB, max buffer {} MiB, workgroup storage {} B, invocations {}, storage buffers/stage {}",
        l.max_storage_buffer_binding_size >> 20,
        l.max_buffer_size >> 20,
        l.max_compute_workgroup_storage_size,
        l.max_compute_invocations_per_workgroup,
        l.max_storage_buffers_per_shader_stage
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Text(a) => text(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Image(a) => image::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Info => info(),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI's defaults are the engine's, and the engine's are what the browser gets for an
    /// empty options object: one set of defaults for every front end.
    #[test]
    fn cli_defaults_are_the_engine_defaults_the_web_uses() {
        let cli = Cli::try_parse_from(["kiln", "text", "--prompt", "x"]).unwrap();
        let Cmd::Text(a) = cli.cmd else {
            panic!("not the text command")
        };
        let web = TextOptions::from_json("{}").unwrap();
        assert_eq!(a.sampling.options(), TextOptions::default());
        assert_eq!(a.sampling.options(), web);
        let load = LoadOptions::from_json("{}").unwrap();
        assert_eq!((a.model.ctx, a.model.quantize), (load.ctx, load.quantize));
        // The JavaScript spelling reaches the same fields, and a typo is an error.
        let js =
            TextOptions::from_json(r#"{"maxTokens": 5, "topK": 3, "promptIds": [1]}"#).unwrap();
        assert_eq!(
            (js.max_tokens, js.top_k, js.prompt_ids),
            (5, 3, Some(vec![1]))
        );
        assert!(TextOptions::from_json(r#"{"topk": 3}"#).is_err());
        let image = Cli::try_parse_from(["kiln", "image", "--prompt", "x"]).unwrap();
        let Cmd::Image(i) = image.cmd else {
            panic!("not the image command")
        };
        let web = kiln::diffusion::pipeline::ImageOptions::from_json(r#"{"prompt": "x"}"#).unwrap();
        assert_eq!(i.options().unwrap(), web);
    }
}
