//! The decode loop: load a model, prefill the prompt in chunks, then replay the decode graph
//! once per token. Sampling happens on the GPU; each token costs one submit and an 8-byte
//! readback (the id and its log-probability).

use super::config::LlmConfig;
use super::model::{build_step, KvCache, Step};
use super::weights::{gguf_name, LlmWeights};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::formats::gguf::Gguf;
use crate::formats::safetensors::{shard_names, take_checkpoint};
use crate::formats::{text_file, ModelFiles, TensorSource};
use crate::kernels::sample::SamplerSettings;
use crate::tokenizer::TextTokenizer;
use crate::weights::{Quantize, Weights};
use std::sync::Arc;

/// Default prompt tokens processed per prefill run.
pub const PREFILL_CHUNK: usize = 64;

/// How to load a text model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Context length (KV-cache positions); capped by the model's maximum.
    pub ctx: usize,
    pub quantize: Quantize,
    /// Also keep the last logits readable (tests, debugging).
    pub keep_logits: bool,
    /// Prompt tokens per prefill run.
    pub prefill_chunk: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ctx: 2048,
            quantize: Quantize::None,
            keep_logits: false,
            prefill_chunk: PREFILL_CHUNK,
        }
    }
}

/// Options of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerSettings,
    pub seed: u32,
    /// Generation stops when the text contains one of these (it is cut before it).
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampler: SamplerSettings::default(),
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
    Cancelled,
}

/// Wall-clock timings of a generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub prefill_ms: f64,
    pub ttft_ms: f64,
    pub decode_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    /// Natural-log probability of each generated id under the unmodified logits.
    pub logprobs: Vec<f32>,
    pub text: String,
    pub stop: StopReason,
    pub timings: Timings,
}

/// A loaded model with its caches and compiled graphs.
pub struct TextModel {
    pub gpu: Arc<Gpu>,
    pub config: LlmConfig,
    pub tokenizer: TextTokenizer,
    pub weights: LlmWeights,
    pub kv: KvCache,
    pub prefill: Step,
    pub decode: Step,
}

/// The sampler's output words (id, logprob bits) from its read-back bytes.
fn sampled(bytes: &[u8]) -> [u32; 2] {
    let w = |i: usize| {
        bytes
            .get(4 * i..4 * i + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0)
    };
    [w(0), w(1)]
}

/// Reads a model from disk: a `.gguf` file, or a folder with config.json, safetensors and
/// tokenizer files.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_model_path(path: &std::path::Path) -> Result<ModelFiles> {
    let io = |p: &std::path::Path, e: std::io::Error| Error::Data {
        name: p.display().to_string(),
        msg: e.to_string(),
    };
    let mut files = ModelFiles::new();
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        files.insert(name, std::fs::read(path).map_err(|e| io(path, e))?);
        return Ok(files);
    }
    if !path.is_dir() {
        return Err(Error::Data {
            name: path.display().to_string(),
            msg: "no such file or folder".into(),
        });
    }
    let mut wanted: Vec<String> = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
        "model.safetensors",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Ok(idx) = std::fs::read_to_string(path.join("model.safetensors.index.json")) {
        wanted.extend(shard_names(&idx)?);
    }
    for name in wanted {
        let p = path.join(&name);
        if p.is_file() {
            files.insert(name, std::fs::read(&p).map_err(|e| io(&p, e))?);
        }
    }
    Ok(files)
}

/// The config, tokenizer and checkpoint of a model's files: one `.gguf`, or a Hugging Face
/// folder (config.json, tokenizer files, safetensors or shards).
fn read_checkpoint(
    gpu: &Arc<Gpu>,
    mut files: ModelFiles,
    quantize: Quantize,
) -> Result<(LlmConfig, TextTokenizer, Weights)> {
    let gguf = files.keys().find(|k| k.ends_with(".gguf")).cloned();
    let (mut config, tokenizer, weights) = if let Some(name) = gguf {
        let bytes = files.remove(&name).unwrap_or_default();
        let g = Gguf::parse(&name, bytes)?;
        let cfg = LlmConfig::from_gguf(&g)?;
        let tok = TextTokenizer::from_gguf(&g)?;
        (
            cfg,
            tok,
            Weights::new(gpu, &name, Box::new(g)).with_names(gguf_name),
        )
    } else {
        let config = text_file(&files, "config.json")?.ok_or_else(|| Error::Data {
            name: "model".into(),
            msg: "no config.json and no .gguf file".into(),
        })?;
        let cfg = LlmConfig::from_hf(
            &config,
            text_file(&files, "generation_config.json")?.as_deref(),
        )?;
        let tok = TextTokenizer::from_hf_files(&files)?;
        let st = take_checkpoint(&mut files, "", "model")?;
        (cfg, tok, Weights::new(gpu, &st.describe(), Box::new(st)))
    };
    if config.eos.is_empty() {
        config.eos = tokenizer.eos.clone();
    }
    Ok((config, tokenizer, weights.with_quantize(quantize)))
}

impl TextModel {
    /// Loads a model from its files. `on_progress(done, total)` reports weight uploads.
    pub async fn load(
        gpu: &Arc<Gpu>,
        files: ModelFiles,
        opts: &LoadOptions,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<TextModel> {
        let (config, tokenizer, checkpoint) = read_checkpoint(gpu, files, opts.quantize)?;
        let weights = LlmWeights::load(&checkpoint, &config, on_progress)?;
        drop(checkpoint); // the file bytes; the GPU tensors live on in `weights`
        let ctx = opts.ctx.min(config.max_positions).max(1);
        let kv = KvCache::new(gpu, &config, &weights.inv_freq, ctx)?;
        let prefill = build_step(
            gpu,
            &config,
            &weights,
            &kv,
            opts.prefill_chunk.clamp(1, ctx),
            opts.keep_logits,
        )
        .await?;
        let decode = build_step(gpu, &config, &weights, &kv, 1, opts.keep_logits).await?;
        Ok(TextModel {
            gpu: gpu.clone(),
            config,
            tokenizer,
            weights,
            kv,
            prefill,
            decode,
        })
    }

    /// Context length.
    pub fn ctx(&self) -> usize {
        self.kv.ctx
    }

    /// Generates from prompt ids. `on_piece` receives text pieces (valid UTF-8) as they form and
    /// returns false to stop.
    pub async fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_piece: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let ctx = self.kv.ctx;
        opts.sampler.validate()?;
        if prompt.is_empty() {
            return Err(Error::Data {
                name: "prompt".into(),
                msg: "empty prompt".into(),
            });
        }
        if prompt.len() >= ctx {
            return Err(Error::Data { name: "prompt".into(), msg: format!("{} tokens do not fit the context of {ctx} (at least one position must remain for generation)", prompt.len()) });
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(Error::Data {
                name: "prompt".into(),
                msg: format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.config.vocab
                ),
            });
        }
        let settings = opts.sampler.to_f32s();
        let t0 = now_ms();
        self.gpu
            .write_buffer(self.kv.history.buffer()?, 0, bytemuck::cast_slice(prompt));
        for step in [&mut self.prefill, &mut self.decode] {
            step.plan.write_f32(step.settings, &settings)?;
            step.plan.set(step.seed, opts.seed);
        }
        // Prefill in chunks; only the last chunk samples (the others write the id nowhere).
        let chunk = self.prefill.tokens;
        let mut first = [0u32; 2];
        let mut start = 0;
        while start < prompt.len() {
            let n = chunk.min(prompt.len() - start);
            let done = start + n == prompt.len();
            let p = &mut self.prefill;
            p.plan.set(p.pos, start as u32);
            p.plan.set(p.last, (n - 1) as u32);
            p.plan.set(
                p.next,
                if done {
                    (start + n) as u32
                } else {
                    (ctx + 1) as u32
                },
            );
            if done {
                let out = p.plan.run_read(&[p.out]).await?;
                first = sampled(&out[0]);
            } else {
                p.plan.run()?;
            }
            start += n;
        }
        let ttft = now_ms() - t0;
        let mut g = Generation {
            prompt_ids: prompt.to_vec(),
            ids: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            stop: StopReason::MaxTokens,
            timings: Timings::default(),
        };
        // Text already handed to `on_piece`; a piece is sent once the decoded text extends it
        // and does not end in an incomplete UTF-8 sequence (decoded as U+FFFD).
        let mut sent = String::new();
        let mut tok = first;
        let t1 = now_ms();
        loop {
            g.ids.push(tok[0]);
            g.logprobs.push(f32::from_bits(tok[1]));
            if self.config.eos.contains(&tok[0]) {
                g.stop = StopReason::Eos;
                break;
            }
            let mut text = self.tokenizer.decode(&g.ids)?;
            if let Some(cut) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
                g.text = text;
                g.stop = StopReason::StopString;
                break;
            }
            if !text.ends_with('\u{FFFD}') {
                if let Some(piece) = text.strip_prefix(sent.as_str()).filter(|p| !p.is_empty()) {
                    let go_on = on_piece(piece);
                    sent = text.clone();
                    if !go_on {
                        g.text = text;
                        g.stop = StopReason::Cancelled;
                        break;
                    }
                }
            }
            g.text = text;
            if g.ids.len() >= opts.max_tokens {
                g.stop = StopReason::MaxTokens;
                break;
            }
            let pos = prompt.len() + g.ids.len() - 1;
            if pos + 1 >= ctx {
                g.stop = StopReason::ContextFull;
                break;
            }
            let d = &mut self.decode;
            d.plan.set(d.pos, pos as u32);
            d.plan.set(d.last, 0);
            d.plan.set(d.next, (pos + 1) as u32);
            let out = d.plan.run_read(&[d.out]).await?;
            tok = sampled(&out[0]);
        }
        if let Some(rest) = g.text.strip_prefix(sent.as_str()).filter(|p| !p.is_empty()) {
            on_piece(rest);
        }
        let decode_ms = now_ms() - t1;
        let decoded = g.ids.len().saturating_sub(1);
        g.timings = Timings {
            prefill_ms: ttft,
            ttft_ms: ttft,
            decode_ms,
            prefill_tok_s: prompt.len() as f64 / (ttft / 1e3).max(1e-9),
            decode_tok_s: if decoded > 0 {
                decoded as f64 / (decode_ms / 1e3).max(1e-9)
            } else {
                0.0
            },
        };
        Ok(g)
    }
}

/// Milliseconds from an arbitrary origin (`Date.now()` in the browser).
pub fn now_ms() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static T0: OnceLock<std::time::Instant> = OnceLock::new();
        T0.get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1e3
    }
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now()
    }
}
