//! `kiln`: the native command-line front end of the engine.

mod bench;
mod defaults;
mod embed;
mod hub;
mod image;
mod inspect;
mod serve;
mod window;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::llm::chat::{Overflow, Sampling};
use kiln::llm::{
    ChatRequest, Grammar, LoadOptions, Message, Prepared, Quantize, TextModel, TextOptions,
};
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
    /// Serve the models over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Benchmarks: kernels, text, chat, image or soak.
    Bench(bench::BenchArgs),
    /// List adapters, features and limits; with --model, what a model file holds and whether
    /// Kiln can load it (from its headers, before loading anything).
    Info(InfoArgs),
    /// Token ids of a text as a model's tokenizer encodes it (as llama.cpp's llama-tokenize).
    Tokenize(TokenizeArgs),
    /// Sentence embeddings with a sentence-transformers model (one vector per text).
    Embed(embed::EmbedArgs),
    /// The models in a folder (as `kiln serve --models-dir` offers them): kind, size, and
    /// whether Kiln can load each, or why not.
    List(ListArgs),
}

#[derive(Args)]
struct ListArgs {
    /// The folder.
    dir: PathBuf,
}

#[derive(Args)]
struct TokenizeArgs {
    /// A model folder, a .gguf file or a Hugging Face repo id (only its tokenizer is read).
    /// Default: the embedded text model.
    #[arg(short, long)]
    model: Option<String>,
    /// The text; `-` reads it from standard input.
    text: String,
    /// Print JSON: the ids and each token's text.
    #[arg(long)]
    json: bool,
    /// Do not add the BOS token the model's prompts start with.
    #[arg(long)]
    no_bos: bool,
}

/// `kiln tokenize`: ids as `kiln text --prompt-ids` takes them (comma-separated), or JSON with
/// each token's text.
fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = if a.text == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the text from standard input")?;
        s
    } else {
        a.text.clone()
    };
    let (files, _) = text_files(a.model.as_deref()).stage(EXIT_MODEL)?;
    let tok = kiln::llm::generate::read_tokenizer(&files).stage(EXIT_MODEL)?;
    let ids = if a.no_bos {
        tok.encode(&text)
    } else {
        tok.encode_prompt(&text)
    }
    .stage(EXIT_GENERATION)?;
    if a.json {
        let pieces: Vec<String> = ids.iter().map(|&i| tok.token_text(i)).collect();
        println!("{}", serde_json::json!({"ids": ids, "pieces": pieces}));
    } else {
        let s: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", s.join(","));
    }
    Ok(())
}

#[derive(Args)]
struct InfoArgs {
    /// A .gguf file or a model folder to inspect instead of the adapters.
    #[arg(short, long)]
    model: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A model folder (config.json + safetensors + tokenizer.json), a .gguf file or a Hugging Face
    /// repo id. Default: the embedded King James Bible model (models/text-kjv).
    #[arg(short, long)]
    model: Option<String>,
    /// Quantize float matrices on load: none, q4, q8, q4_k or q6_k (llama.cpp's bytes).
    #[arg(long, default_value_t = LoadOptions::default().quantize)]
    quantize: Quantize,
    /// Context length (KV-cache positions).
    #[arg(long, default_value_t = LoadOptions::default().ctx)]
    ctx: usize,
    /// KV-cache element type: auto (f16 on GPUs, f32 on software adapters), f32 or f16.
    #[arg(long, default_value_t = LoadOptions::default().kv_cache)]
    kv_cache: kiln::llm::KvCacheType,
    /// Chat template instead of the model's: chatml, gemma, gemma4, llama3, phi3, or a Jinja file.
    /// Without it a model with no template of its own gets its architecture's (Gemma's).
    #[arg(long)]
    chat_template: Option<String>,
}

/// The sampler flags. Every default is the engine's (`TextOptions::default()`), which the wasm
/// module and the npm package use too.
#[derive(Args, Clone)]
struct SamplingArgs {
    /// Maximum new tokens.
    #[arg(short = 'n', long, default_value_t = DEFAULTS.max_tokens)]
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
    /// Sampler seed (default: a random one, printed so the run can be repeated).
    #[arg(long)]
    seed: Option<u32>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// The output must be JSON valid under the JSON schema in this file.
    #[arg(long, conflicts_with_all = ["grammar", "json_object"])]
    json_schema: Option<PathBuf>,
    /// The output must be a JSON object.
    #[arg(long, conflicts_with = "grammar")]
    json_object: bool,
    /// The output must match the grammar in this file (llguidance's Lark dialect).
    #[arg(long)]
    grammar: Option<PathBuf>,
    /// Add BIAS to token ID's logit before sampling, as ID=BIAS (repeatable; -100 bans, 100
    /// forces).
    #[arg(long, value_parser = parse_bias)]
    logit_bias: Vec<(u32, f32)>,
}

/// `ID=BIAS` of `--logit-bias`.
fn parse_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, b) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected ID=BIAS"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("'{id}' is not a token id"))?;
    let b: f32 = b
        .trim()
        .parse()
        .map_err(|_| format!("'{b}' is not a number"))?;
    if !(-100.0..=100.0).contains(&b) {
        return Err(format!("bias {b} is outside [-100, 100]"));
    }
    Ok((id, b))
}

/// The engine's option defaults, which the flags show and use.
static DEFAULTS: std::sync::LazyLock<TextOptions> = std::sync::LazyLock::new(TextOptions::default);

impl SamplingArgs {
    /// The engine's options for these flags (the grammar files read).
    fn options(&self) -> Result<TextOptions> {
        let read = |f: &PathBuf| {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
        };
        let grammar = if let Some(f) = &self.json_schema {
            let schema = serde_json::from_str(&read(f)?)
                .with_context(|| format!("{} is not JSON", f.display()))?;
            Some(Grammar::JsonSchema { schema })
        } else if let Some(f) = &self.grammar {
            Some(Grammar::Lark { grammar: read(f)? })
        } else {
            self.json_object.then_some(Grammar::JsonObject)
        };
        Ok(TextOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_window: self.repeat_window,
            seed: self.seed,
            stop: self.stop.clone(),
            grammar,
            logit_bias: self.logit_bias.iter().copied().collect(),
            ..TextOptions::default()
        })
    }
}

#[derive(Args)]
struct TextArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt text; `-` reads it from standard input.
    #[arg(short, long, conflicts_with_all = ["prompt_ids", "prompt_file"])]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt_file: Option<PathBuf>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Include the log-probability of each generated token.
    #[arg(long)]
    logprobs: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Print only the generated text (no progress, echo or summary).
    #[arg(short, long)]
    quiet: bool,
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

/// Exit status of a usage error (bad flags or values; clap uses it too).
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the model cannot be found or loaded.
pub const EXIT_MODEL: i32 = 3;
/// Exit status when generation fails.
pub const EXIT_GENERATION: i32 = 4;

/// An error with the exit status of the stage that failed.
#[derive(Debug)]
pub struct Failed {
    pub code: i32,
    pub err: anyhow::Error,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.err)
    }
}

impl std::error::Error for Failed {}

/// Tags errors with the exit status of their stage.
pub trait Stage<T> {
    fn stage(self, code: i32) -> Result<T>;
}

impl<T, E: Into<anyhow::Error>> Stage<T> for std::result::Result<T, E> {
    fn stage(self, code: i32) -> Result<T> {
        self.map_err(|e| {
            let err: anyhow::Error = e.into();
            if err.is::<Failed>() {
                err
            } else {
                Failed { code, err }.into()
            }
        })
    }
}

/// A flag that Ctrl-C (SIGINT) sets instead of killing the process, so long work can stop
/// cleanly (`what` says how, e.g. "stopping after this token"); a second Ctrl-C exits at once
/// (status 130).
pub fn on_interrupt(what: &'static str) -> Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                for _ in 0..2 {
                    if tokio::signal::ctrl_c().await.is_err() {
                        return;
                    }
                    if f.swap(true, Ordering::Relaxed) {
                        std::process::exit(130);
                    }
                    eprintln!("\n(interrupted: {what}; Ctrl-C again to quit now)");
                }
            });
        });
    flag
}

/// The GPU, or an error that says how to get a driver.
pub fn gpu() -> Result<Arc<Gpu>> {
    pollster::block_on(Gpu::new(GpuOptions::default()))
        .context("no usable GPU adapter")
        .stage(EXIT_MODEL)
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
    load_model(gpu, m, quiet).stage(EXIT_MODEL)
}

/// The files of the text model `--model` names (the embedded one when absent) and its display
/// name.
pub fn text_files(model: Option<&str>) -> Result<(kiln::formats::ModelFiles, String)> {
    Ok(if let Some(path) = model {
        let p = PathBuf::from(path);
        let files = if p.exists() {
            kiln::formats::files::read_model_path(&p)?
        } else if hub::looks_like_repo_id(path) {
            hub::fetch(path)?
        } else {
            bail!("model '{path}' not found: pass a local folder (config.json, *.safetensors, tokenizer.json), a .gguf file, or a Hugging Face repo id (owner/name, or owner/name:file.gguf)");
        };
        (files, path.to_string())
    } else {
        (defaults::text(), defaults::TEXT_NAME.to_string())
    })
}

fn load_model(gpu: &Arc<Gpu>, m: &ModelArgs, quiet: bool) -> Result<TextModel> {
    let (files, name) = text_files(m.model.as_deref())?;
    if m.model.is_none() && !quiet {
        eprintln!("model: {name}");
    }
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1)
    };
    bar.set_style(
        ProgressStyle::with_template("loading {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let chat_template = match &m.chat_template {
        Some(t) if std::path::Path::new(t).is_file() => Some(
            std::fs::read_to_string(t).with_context(|| format!("reading the chat template {t}"))?,
        ),
        Some(t)
            if kiln::llm::BUILTIN_CHAT_TEMPLATES
                .iter()
                .any(|(n, _)| n == t) =>
        {
            Some(t.clone())
        }
        Some(t) => bail!(
            "--chat-template '{t}' is neither a file nor a built-in template ({})",
            kiln::llm::BUILTIN_CHAT_TEMPLATES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => None,
    };
    let opts = LoadOptions {
        ctx: m.ctx,
        quantize: m.quantize,
        chat_template,
        kv_cache: m.kv_cache,
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

/// The prompt of `kiln text`: `--prompt` (`-` reads standard input) or `--prompt-file`.
fn prompt_text(a: &TextArgs) -> Result<Option<String>> {
    Ok(match (&a.prompt, &a.prompt_file) {
        (Some(p), _) if p == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading the prompt from standard input")?;
            Some(s)
        }
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the prompt file {}", f.display()))?,
        ),
        (None, None) => None,
    })
}

fn text(a: TextArgs) -> Result<()> {
    let prompt_text = prompt_text(&a).stage(EXIT_USAGE)?;
    if prompt_text.is_none() && a.prompt_ids.is_none() {
        return Err(anyhow::anyhow!(
            "give --prompt TEXT (or -p -, --prompt-file FILE) or --prompt-ids 1,2,3"
        ))
        .stage(EXIT_USAGE);
    }
    let request = TextOptions {
        prompt: prompt_text.clone(),
        prompt_ids: a.prompt_ids.clone(),
        ..a.sampling.options().stage(EXIT_USAGE)?
    };
    request.sampler().validate().stage(EXIT_USAGE)?;
    let gpu = gpu()?;
    let t0 = std::time::Instant::now();
    let quiet = a.json || a.quiet;
    let mut model = load(&gpu, &a.model, quiet)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let prompt = request
        .prompt_ids(&model.tokenizer)
        .stage(EXIT_GENERATION)?;
    let opts = request.generate_options();
    let json = a.json;
    let mut out = std::io::stdout();
    // The prompt is echoed once the first token is out; until then a spinner shows the prefill.
    let mut echo = if quiet { None } else { prompt_text };
    let spinner = spinner(!quiet, &format!("prefill of {} tokens", prompt.len()));
    // Ctrl-C ends the generation at the next token, with the summary (stop: cancelled).
    let interrupted = on_interrupt("stopping after this token");
    let g = pollster::block_on(model.generate(&prompt, &opts, &mut |piece| {
        spinner.finish_and_clear();
        if !json {
            if let Some(p) = echo.take() {
                let _ = out.write_all(p.as_bytes());
            }
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
        !interrupted.load(std::sync::atomic::Ordering::Relaxed)
    }))
    .stage(EXIT_GENERATION)?;
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
        if !a.quiet {
            eprintln!(
                "[{} prompt + {} generated tokens; prefill {:.1} tok/s, decode {:.1} tok/s, first token {:.0} ms; stop: {}; seed: {}]",
                g.prompt_ids.len(),
                g.ids.len(),
                g.timings.prefill_tok_s,
                g.timings.decode_tok_s,
                g.timings.ttft_ms,
                g.stop,
                g.seed
            );
        }
    }
    Ok(())
}

/// `kiln chat`: the conversation goes through the engine's chat-completion core (the one
/// `kiln serve` and the npm package use), so each turn reuses the keys and values of the
/// conversation so far and prefills only the new turn; the oldest messages are dropped when
/// the context is full.
fn chat(a: ChatArgs) -> Result<()> {
    let gpu = gpu()?;
    let mut model = load(&gpu, &a.model, false)?;
    if model.tokenizer.chat_template.is_none() {
        return Err(anyhow::anyhow!("this model has no chat template (chat_template.jinja, tokenizer_config.json 'chat_template' or GGUF 'tokenizer.chat_template'); name one with --chat-template (chatml, gemma, gemma4, llama3, phi3, or a Jinja file)")).stage(EXIT_MODEL);
    }
    let mut messages: Vec<Message> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    let mut sampling = Sampling::from_options(&a.sampling.options().stage(EXIT_USAGE)?);
    sampling.stream = Some(true);
    // One seed for the whole conversation, printed so it can be repeated.
    let seed = sampling
        .seed
        .unwrap_or_else(kiln::llm::options::random_seed);
    sampling.seed = Some(seed);
    eprintln!("(chat; seed {seed}; an empty line or end of input quits)");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message::new("user", line.trim_end()));
        let req = ChatRequest {
            messages: messages.clone(),
            context_overflow: Some(Overflow::DropOldest),
            sampling: sampling.clone(),
            ..Default::default()
        };
        let mut out = std::io::stdout();
        let r = Prepared::chat(&model, &req, "kiln").and_then(|p| {
            pollster::block_on(p.run(&mut model, &mut |chunk| {
                if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                }
                true
            }))
        });
        println!();
        match r {
            Ok(v) => {
                let dropped = v["kiln"]["dropped_messages"].as_u64().unwrap_or(0) as usize;
                if dropped > 0 {
                    let first = usize::from(a.system.is_some());
                    messages.drain(first..first + dropped);
                    eprintln!(
                        "(context of {} tokens full: {dropped} oldest messages forgotten)",
                        model.ctx()
                    );
                }
                let text = v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default();
                messages.push(Message::new("assistant", text));
            }
            Err(e @ (kiln::Error::Data { .. } | kiln::Error::Unsupported(_))) => {
                // A message that cannot fit: say so and keep the conversation going.
                eprintln!("error: {e}");
                messages.pop();
            }
            Err(e) => return Err(e).stage(EXIT_GENERATION),
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
        Cmd::Serve(a) => serve::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Info(InfoArgs { model: Some(m) }) => inspect::model(&m).stage(EXIT_MODEL),
        Cmd::Info(InfoArgs { model: None }) => info(),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Embed(a) => embed::run(a),
        Cmd::List(a) => inspect::list(&a.dir).stage(EXIT_MODEL),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(e.downcast_ref::<Failed>().map_or(1, |f| f.code));
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
        assert_eq!(a.sampling.options().unwrap(), TextOptions::default());
        assert_eq!(a.sampling.options().unwrap(), web);
        let load = LoadOptions::from_json("{}").unwrap();
        assert_eq!(
            (a.model.ctx, a.model.quantize, a.model.kv_cache),
            (load.ctx, load.quantize, load.kv_cache)
        );
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
