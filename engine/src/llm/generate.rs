//! The decode loop: load a model, prefill the prompt in chunks, then replay the decode graph
//! once per token. Sampling happens on the GPU; each token costs one submit and an 8-byte
//! readback (the id and its log-probability), and the next token's run is submitted before
//! that readback (the decode loop is pipelined).

use super::batch::{Batch, Post};
use super::config::LlmConfig;
use super::constrain::{Constraint, Grammar, Grammars};
use super::model::{build_step, KvCache, Step};
use super::options::LoadOptions;
use super::weights::{gguf_names, LlmWeights};
pub use crate::device::now_ms;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::formats::gguf::Gguf;
use crate::formats::safetensors::take_checkpoint;
use crate::formats::{text_file, ModelFiles, TensorSource};
use crate::kernels::sample::{
    bias_words, constraint_words, SamplerSettings, NON_FINITE_ID, SAMPLE_OUT_LEN, TOP_LOGPROBS_MAX,
};
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use crate::weights::{Quantize, Weights};
use std::sync::Arc;

/// Default prompt tokens processed per prefill run.
pub const PREFILL_CHUNK: usize = 64;

/// Prompt tails this short run through the one-token decode graph, one token per run, instead
/// of a whole prefill chunk (whose cost does not shrink with its valid rows)...
pub const TAIL_VIA_DECODE: usize = 4;

/// ... and on a software adapter, tails up to this fraction of a chunk: there a chunk of 64
/// costs 20-40 one-token runs (lavapipe: a 6-token prompt of SmolLM2-135M Q4_1 took 3.6 s to
/// its first token through a chunk, 0.6 s through 6 decode runs).
const SOFTWARE_TAIL_FRACTION: usize = 4;

/// Options of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerSettings,
    pub seed: u32,
    /// Generation stops when the text contains one of these (it is cut before it).
    pub stop: Vec<String>,
    /// Submit the run for token n + 1 before reading token n back, so the GPU computes while
    /// the host handles a token (default). The ids and log-probabilities are the same either
    /// way; a stop found with a run in flight discards that run's token. Constrained
    /// generation is serial (each token's mask needs the token before).
    pub pipelined: bool,
    /// What the output must match: before every draw the sampler gets the grammar's allowed
    /// tokens as a bitmask.
    pub grammar: Option<Grammar>,
    /// (token id, bias) added to the logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
}

impl GenerateOptions {
    /// Bytes of the sampler's output a token reads back: the id and its log-probability, plus
    /// the top_logprobs pairs when asked for.
    fn readback(&self) -> u64 {
        8 * (1 + self.sampler.top_logprobs.min(TOP_LOGPROBS_MAX as u32) as u64)
    }
}

impl Default for GenerateOptions {
    /// The front ends' defaults ([`super::TextOptions::default`]).
    fn default() -> Self {
        super::TextOptions::default().generate_options()
    }
}

/// Why generation ended (serialized as `eos`, `stopstring`, `maxtokens`, `contextfull`,
/// `cancelled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
    Cancelled,
}

/// Wall-clock timings of a generation.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub ttft_ms: f64,
    pub decode_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// The decode loop's host cost per run, in milliseconds: recording the commands, the
    /// submit call, and waiting for the token (blocked on the GPU: the part pipelining hides).
    pub encode_ms_per_token: f64,
    pub submit_ms_per_token: f64,
    pub wait_ms_per_token: f64,
    /// Computing the grammar's mask of allowed tokens, per token (constrained requests).
    pub mask_ms_per_token: f64,
}

/// The result of a generation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Leading prompt tokens whose keys and values were kept from the previous generation
    /// (not prefilled again).
    pub reused: usize,
    pub ids: Vec<u32>,
    /// Natural-log probability of each generated id under the unmodified logits.
    pub logprobs: Vec<f32>,
    /// Per generated id, the `top_logprobs` most likely (id, log-probability) pairs (empty
    /// lists when none were asked for).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub text: String,
    pub stop: StopReason,
    /// The sampler seed used (the random one when none was given).
    pub seed: u32,
    pub timings: Timings,
}

/// A loaded model with its caches and compiled graphs.
pub struct TextModel {
    pub gpu: Arc<Gpu>,
    pub config: LlmConfig,
    pub tokenizer: Arc<TextTokenizer>,
    /// Shared by [`TextModel::fork`]s.
    pub weights: Arc<LlmWeights>,
    pub kv: KvCache,
    pub prefill: Step,
    pub decode: Step,
    /// How the caches and steps were built (what a fork repeats): an f16 cache, logits kept.
    kv_f16: bool,
    keep_logits: bool,
    /// The tokens whose keys and values are in the cache, position by position: a new prompt
    /// sharing a prefix with them prefills only the rest.
    cached: Vec<u32>,
    /// The tokens as the grammar engine sees them, built on the first constrained request.
    grammars: Option<Grammars>,
    /// The parallel slots this one decodes together with ([`TextModel::into_slots`]).
    batch: Option<Arc<Batch>>,
    /// This request's constraint words (mask, biases) while it has any: what a batched decode
    /// row is given.
    constraint_words: Option<Vec<u32>>,
    /// Linear-attention layers (Qwen 3.5): a copy of this sequence's recurrent states, saved
    /// before a prompt's last prefill run (see [`TextModel::resume_states`]).
    snapshot: Option<Snapshot>,
}

/// Recurrent states saved at a point of a token sequence: one tensor per state region of the
/// cache ([`KvCache::state_regions`]), and the tokens the states had consumed.
struct Snapshot {
    states: Vec<crate::tensor::Tensor>,
    tokens: Vec<u32>,
}

/// One draw of the sampler, from its read-back words.
struct Draw {
    id: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

impl Draw {
    /// The draw for generated token `at` (0: the one the prompt's prefill samples).
    fn new(bytes: &[u8], top_n: u32, at: usize) -> Result<Draw> {
        let w = |i: usize| {
            bytes
                .get(4 * i..4 * i + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        if w(0) == NON_FINITE_ID {
            return Err(Error::Overflow {
                what: format!("the logits of generated token {at}"),
                when: format!(
                    "({} values; the weights are finite, so an activation overflowed)",
                    w(1)
                ),
            });
        }
        let n = (top_n as usize).min((SAMPLE_OUT_LEN - 2) / 2);
        Ok(Draw {
            id: w(0),
            logprob: f32::from_bits(w(1)),
            top: (0..n)
                .map(|r| (w(2 + 2 * r), f32::from_bits(w(3 + 2 * r))))
                .collect(),
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use crate::formats::files::read_model_path;

/// The config, tokenizer and checkpoint of a model's files: one `.gguf`, or a Hugging Face
/// folder (config.json, tokenizer files, safetensors or shards).
/// The tokenizer of a model's files alone (a GGUF's metadata, or a folder's tokenizer files),
/// without its weights: what `kiln tokenize` needs.
pub fn read_tokenizer(files: &ModelFiles) -> Result<TextTokenizer> {
    match files.iter().find(|(k, _)| k.ends_with(".gguf")) {
        Some((name, bytes)) => match Gguf::parse_metadata(name, bytes)? {
            Some(g) => TextTokenizer::from_gguf(&g),
            None => Err(Error::Data {
                name: name.clone(),
                msg: "the file ends inside its metadata".into(),
            }),
        },
        None => TextTokenizer::from_hf_files(files),
    }
}

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
        let names = gguf_names(cfg.arch);
        let tok = TextTokenizer::from_gguf(&g)?;
        (
            cfg,
            tok,
            Weights::new(gpu, &name, Box::new(g)).with_names(names),
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
        let (config, mut tokenizer, checkpoint) = read_checkpoint(gpu, files, opts.quantize)?;
        if let Some(t) = &opts.chat_template {
            tokenizer.chat_template = Some(crate::tokenizer::chat_template_named(t).to_string());
        } else if tokenizer.chat_template.is_none() && config.arch.is_gemma() {
            let name = if config.arch == super::config::Arch::Gemma4 {
                "gemma4"
            } else {
                "gemma"
            };
            tokenizer.chat_template = Some(crate::tokenizer::chat_template_named(name).to_string());
        }
        let weights = LlmWeights::load(&checkpoint, &config, on_progress)?;
        drop(checkpoint); // the file bytes; the GPU tensors live on in `weights`
        if opts.ctx < 2 {
            return Err(Error::Data {
                name: "ctx".into(),
                msg: format!(
                    "a context of {} positions holds no prompt and reply (at least 2)",
                    opts.ctx
                ),
            });
        }
        let ctx = opts.ctx.min(config.max_positions);
        // Rows of an f16 cache hold whole words.
        let f16 = opts.kv_cache.is_f16(gpu)
            && (0..config.layers).all(|i| {
                let (kv, d) = config.attn_dims(i);
                (kv * d) % 2 == 0
            });
        let kv = KvCache::new(gpu, &config, &weights.ropes, ctx, f16)?;
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
        // The pipelined loop alternates two staging sets.
        decode.plan.prepare_pipelined();
        Ok(TextModel {
            gpu: gpu.clone(),
            config,
            tokenizer: Arc::new(tokenizer),
            weights: Arc::new(weights),
            kv,
            prefill,
            decode,
            kv_f16: f16,
            keep_logits: opts.keep_logits,
            cached: Vec::new(),
            grammars: None,
            batch: None,
            constraint_words: None,
            snapshot: None,
        })
    }

    /// Another model on the same weights and tokenizer with its own KV cache and compiled
    /// steps: a parallel slot of a server, which generates while this one does (apart: see
    /// [`TextModel::into_slots`] for slots that decode together).
    pub async fn fork(&self) -> Result<TextModel> {
        let kv = KvCache::new(
            &self.gpu,
            &self.config,
            &self.weights.ropes,
            self.kv.ctx,
            self.kv_f16,
        )?;
        self.on_cache(kv, None).await
    }

    /// `n` parallel slots on this model's weights (this model's own cache is dropped): slots
    /// that generate at the same time decode together, one run for a token of each
    /// ([`super::batch`]), sharing one set of KV caches with a sequence each. Where the shared
    /// caches would be more than the adapter binds at once, the slots are [`TextModel::fork`]s
    /// that decode apart.
    pub async fn into_slots(self, n: usize) -> Result<Vec<TextModel>> {
        if n <= 1 {
            return Ok(vec![self]);
        }
        let (gpu, cfg, ctx) = (&self.gpu, &self.config, self.kv.ctx);
        let kvs = match KvCache::shared(gpu, cfg, &self.weights.ropes, ctx, self.kv_f16, n) {
            Ok(k) => k,
            Err(Error::TooLarge { .. }) => {
                let mut slots = Vec::with_capacity(n);
                for _ in 1..n {
                    slots.push(self.fork().await?);
                }
                slots.insert(0, self);
                return Ok(slots);
            }
            Err(e) => return Err(e),
        };
        let batch = Arc::new(Batch::new(gpu, cfg, &self.weights, &kvs).await?);
        let mut slots = Vec::with_capacity(n);
        for kv in kvs {
            slots.push(self.on_cache(kv, Some(batch.clone())).await?);
        }
        Ok(slots)
    }

    /// A model on this one's weights with the cache `kv` (steps compiled for it, as this
    /// model's were), decoding in `batch` when given.
    async fn on_cache(&self, kv: KvCache, batch: Option<Arc<Batch>>) -> Result<TextModel> {
        let (gpu, cfg) = (&self.gpu, &self.config);
        let chunk = self.prefill.tokens;
        let prefill = build_step(gpu, cfg, &self.weights, &kv, chunk, self.keep_logits).await?;
        let decode = build_step(gpu, cfg, &self.weights, &kv, 1, self.keep_logits).await?;
        decode.plan.prepare_pipelined();
        Ok(TextModel {
            gpu: gpu.clone(),
            config: cfg.clone(),
            tokenizer: self.tokenizer.clone(),
            weights: self.weights.clone(),
            kv,
            prefill,
            decode,
            kv_f16: self.kv_f16,
            keep_logits: self.keep_logits,
            cached: Vec::new(),
            grammars: None,
            batch,
            constraint_words: None,
            snapshot: None,
        })
    }

    /// The batch this slot decodes in ([`TextModel::into_slots`]).
    pub fn batch(&self) -> Option<&Arc<Batch>> {
        self.batch.as_ref()
    }

    /// Forgets which tokens the KV cache holds, so the next generation prefills its whole
    /// prompt (the cache is otherwise reused for the longest common prefix).
    pub fn reset_cache(&mut self) {
        self.cached.clear();
        if let Some(s) = &mut self.snapshot {
            s.tokens.clear();
        }
    }

    /// Tokens whose keys and values the cache keeps for the next generation to reuse.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
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
        self.generate_with(prompt, opts, &mut |piece, _| on_piece(piece))
            .await
    }

    /// [`TextModel::generate`] whose callback also sees the generation so far (the ids and
    /// log-probabilities up to the piece). The keys and values of the longest prefix `prompt`
    /// shares with the previous generation's tokens are reused (at least the last prompt token
    /// is run again, for its logits).
    pub async fn generate_with(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_piece: &mut dyn FnMut(&str, &Generation) -> bool,
    ) -> Result<Generation> {
        self.check_request(prompt, opts)?;
        let (opts, mut constraint) = self.constrain(opts)?;
        let opts = &opts;
        let reused = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        // Recurrent states continue only from a point they were at.
        let reused = if self.kv.state_regions().is_empty() {
            reused
        } else {
            self.resume_states(prompt, reused)?
        };
        // Until this generation ends well, the cache holds only the shared prefix for sure.
        self.cached.truncate(reused);
        let t0 = now_ms();
        let first = self.prefill(prompt, reused, opts).await?;
        self.cached = prompt.to_vec();
        let ttft = now_ms() - t0;
        let mut g = Generation {
            prompt_ids: prompt.to_vec(),
            reused,
            ids: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text: String::new(),
            stop: StopReason::MaxTokens,
            seed: opts.seed,
            timings: Timings::default(),
        };
        let t1 = now_ms();
        // Decoding together with the other slots while this loop runs.
        let member = self.batch.as_ref().map(|b| b.member(self.kv.seq));
        let r = self
            .decode_loop(&mut g, first, opts, &mut constraint, on_piece)
            .await;
        drop(member);
        if r.is_err() {
            self.cached.clear();
        }
        let cost = r?;
        let decode_ms = now_ms() - t1;
        g.timings = Timings::new(prompt.len() - reused, g.ids.len(), ttft, decode_ms, &cost);
        if let Some(c) = &constraint {
            g.timings.mask_ms_per_token = c.mask_ms / c.masks.max(1) as f64;
        }
        Ok(g)
    }

    /// Where a prompt sharing `common` leading tokens with the cache can start, for a model with
    /// recurrent states (linear attention), which hold one point of a sequence and cannot be
    /// rewound: the live states when they consumed exactly the cached tokens and the prompt
    /// extends those; else the snapshot taken before the last prompt's final prefill run when
    /// the prompt extends its tokens (restored); else the start (states zeroed). A restart
    /// never recomputes a state from a guess: it resumes one the model computed.
    fn resume_states(&mut self, prompt: &[u32], common: usize) -> Result<usize> {
        // `cached` is what the live states consumed (the decode loop keeps it so, a run in
        // flight at a stop included).
        if common > 0 && common == self.cached.len() {
            return Ok(common);
        }
        let regions = self.kv.state_regions();
        if let Some(s) = &self.snapshot {
            let n = s.tokens.len();
            if n > 0 && n <= common && prompt.starts_with(&s.tokens) {
                let copies: Vec<_> = regions
                    .iter()
                    .zip(&s.states)
                    .map(|(&(t, off, size), saved)| {
                        Ok((saved.buffer()?.as_ref(), 0, t.buffer()?.as_ref(), off, size))
                    })
                    .collect::<Result<_>>()?;
                self.gpu.copy_regions(&copies);
                return Ok(n);
            }
        }
        let clears: Vec<_> = regions
            .iter()
            .map(|&(t, off, size)| Ok((t.buffer()?.as_ref(), off, size)))
            .collect::<Result<_>>()?;
        self.gpu.clear_regions(&clears);
        Ok(0)
    }

    /// Saves this sequence's recurrent states as the snapshot of `tokens` (the states have
    /// consumed exactly those).
    fn save_states(&mut self, tokens: &[u32]) -> Result<()> {
        let regions = self.kv.state_regions();
        if self.snapshot.is_none() {
            let states = regions
                .iter()
                .map(|&(t, _, size)| {
                    crate::tensor::Tensor::zeros(
                        &self.gpu,
                        &format!("{}.saved", t.name),
                        &[size as usize / 4],
                        crate::dtype::DType::F32,
                    )
                })
                .collect::<Result<_>>()?;
            self.snapshot = Some(Snapshot {
                states,
                tokens: Vec::new(),
            });
        }
        let Some(s) = &mut self.snapshot else {
            return Ok(());
        };
        let copies: Vec<_> = regions
            .iter()
            .zip(&s.states)
            .map(|(&(t, off, size), saved)| {
                Ok((t.buffer()?.as_ref(), off, saved.buffer()?.as_ref(), 0, size))
            })
            .collect::<Result<_>>()?;
        self.gpu.copy_regions(&copies);
        s.tokens = tokens.to_vec();
        Ok(())
    }

    /// The request's grammar and logit biases: its [`Constraint`] (the first mask computed),
    /// the constraint input of both steps written (that mask, the biases), and options whose
    /// sampler settings switch them on. Unconstrained requests write nothing.
    fn constrain(
        &mut self,
        opts: &GenerateOptions,
    ) -> Result<(GenerateOptions, Option<Constraint>)> {
        let mut opts = opts.clone();
        self.constraint_words = None;
        if opts.grammar.is_none() && opts.logit_bias.is_empty() {
            return Ok((opts, None));
        }
        let vocab = self.config.vocab;
        let bias = bias_words(vocab, &opts.logit_bias)?;
        let mut constraint = match &opts.grammar {
            None => None,
            Some(g) => {
                if self.grammars.is_none() {
                    self.grammars = Some(Grammars::new(&self.tokenizer, &self.config.eos, vocab)?);
                }
                self.grammars
                    .as_ref()
                    .map(|gs| gs.constraint(g))
                    .transpose()?
            }
        };
        let mut words = vec![0u32; constraint_words(vocab)];
        let mask_words = vocab.div_ceil(32);
        if let Some(c) = constraint.as_mut() {
            words[..mask_words].copy_from_slice(c.mask()?);
        }
        words[mask_words..mask_words + bias.len()].copy_from_slice(&bias);
        for step in [&self.prefill, &self.decode] {
            step.plan.write_u32(step.constraint, &words)?;
        }
        self.constraint_words = Some(words);
        opts.sampler.mask = constraint.is_some();
        opts.sampler.biases = (bias.len() / 2) as u32;
        opts.pipelined &= constraint.is_none();
        Ok((opts, constraint))
    }

    /// A clear error for settings and prompts the model cannot run.
    fn check_request(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<()> {
        let ctx = self.kv.ctx;
        opts.sampler.validate()?;
        let bad = |msg: String| {
            Err(Error::Data {
                name: "prompt".into(),
                msg,
            })
        };
        if prompt.is_empty() {
            return bad("empty prompt".into());
        }
        if self.config.bidirectional {
            return Err(Error::Unsupported(
                "text generation with a model whose attention looks both ways (use_bidirectional_attention: an embedding model such as EmbeddingGemma; use kiln embed)".into(),
            ));
        }
        if opts.max_tokens == 0 {
            return Err(Error::Data {
                name: "max_tokens".into(),
                msg: "0: at least one token must be generated".into(),
            });
        }
        if prompt.len() >= ctx {
            return bad(format!("{} tokens do not fit the context of {ctx} (at least one position must remain for generation)", prompt.len()));
        }
        if let Some(&id) = prompt.iter().find(|&&t| t as usize >= self.config.vocab) {
            return bad(format!(
                "token id {id} is outside the vocabulary of {}",
                self.config.vocab
            ));
        }
        Ok(())
    }

    /// Prompt tails of at most this many tokens run through the decode graph, one token per
    /// run (see [`TAIL_VIA_DECODE`]).
    pub fn tail_via_decode(&self) -> usize {
        if self.gpu.features.software {
            (self.prefill.tokens / SOFTWARE_TAIL_FRACTION).max(TAIL_VIA_DECODE)
        } else {
            TAIL_VIA_DECODE
        }
    }

    /// Writes the prompt into the history and runs the prefill graph over `prompt[start..]` in
    /// chunks (the cache holds the keys and values before `start`); only the last chunk samples
    /// (the others write the id nowhere). Returns the first draw.
    async fn prefill(
        &mut self,
        prompt: &[u32],
        start: usize,
        opts: &GenerateOptions,
    ) -> Result<Draw> {
        let ctx = self.kv.ctx;
        let settings = opts.sampler.to_f32s();
        self.gpu.write_buffer(
            self.kv.history.buffer()?,
            self.kv.history_bytes(),
            bytemuck::cast_slice(prompt),
        );
        for step in [&mut self.prefill, &mut self.decode] {
            step.plan.write_f32(step.settings, &settings)?;
            step.plan.set(step.seed, opts.seed);
        }
        let mut start = start;
        loop {
            let left = prompt.len() - start;
            // A prefill run costs its whole chunk however few rows are valid: a short tail (the
            // common case when a chat turn reuses the cache) goes through the one-token graph.
            let p = if left <= self.tail_via_decode() {
                &mut self.decode
            } else {
                &mut self.prefill
            };
            let n = p.tokens.min(left);
            let done = n == left;
            p.plan.set(p.pos, start as u32);
            p.plan.set(p.last, (n - 1) as u32);
            let next = if done { start + n } else { ctx + 1 };
            p.plan.set(p.next, next as u32);
            if done {
                // Recurrent states: saved where the prompt's last run starts, so that a later
                // prompt extending this point (the same prompt again, a chat's next turn)
                // resumes there.
                if start > 0 && !self.kv.state_regions().is_empty() {
                    self.save_states(&prompt[..start])?;
                }
                let p = if left <= self.tail_via_decode() {
                    &mut self.decode
                } else {
                    &mut self.prefill
                };
                let out = p.plan.run_read_heads(&[(p.out, opts.readback())]).await?;
                return Draw::new(&out[0], opts.sampler.top_logprobs, 0);
            }
            p.plan.run()?;
            start += n;
        }
    }

    /// Submits the decode run that feeds the id at `pos` (staging set `pos % 2`, so two runs
    /// in flight never share one), adding its host cost to `cost`.
    fn submit_decode(
        &mut self,
        pos: usize,
        opts: &GenerateOptions,
        cost: &mut HostCost,
    ) -> Result<crate::graph::PendingRead> {
        let d = &mut self.decode;
        d.plan.set(d.pos, pos as u32);
        d.plan.set(d.last, 0);
        d.plan.set(d.next, (pos + 1) as u32);
        let run = d
            .plan
            .submit_read_heads(&[(d.out, opts.readback())], pos % 2)?;
        cost.encode_ms += run.encode_ms;
        cost.submit_ms += run.submit_ms;
        cost.runs += 1;
        Ok(run)
    }

    /// Replays the decode graph once per token from the first sampled one, streaming text
    /// through a [`StreamDecoder`], until a stop condition; fills `g` and returns the loop's
    /// host cost. Pipelined, the run for the next position is submitted before the current
    /// token is read back: its id is sampled into the token history on the GPU, so the run
    /// needs nothing from the host.
    async fn decode_loop(
        &mut self,
        g: &mut Generation,
        first: Draw,
        opts: &GenerateOptions,
        constraint: &mut Option<Constraint>,
        on_piece: &mut dyn FnMut(&str, &Generation) -> bool,
    ) -> Result<HostCost> {
        let ctx = self.kv.ctx;
        let stops: Vec<&str> = opts
            .stop
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        let longest_stop = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut stream = StreamDecoder::new();
        let mut tok = first;
        // Runs submitted and not read back yet: (position, the run), oldest first.
        let mut inflight: std::collections::VecDeque<(usize, crate::graph::PendingRead)> =
            Default::default();
        let mut cost = HostCost::default();
        // The run at `pos` feeds the id at `pos` and samples the next one: allowed while the
        // generation could still want that token.
        let runnable = |pos: usize, ids: usize| ids < opts.max_tokens && pos + 1 < ctx;
        loop {
            g.ids.push(tok.id);
            g.logprobs.push(tok.logprob);
            if opts.sampler.top_logprobs > 0 {
                g.top_logprobs.push(tok.top);
            }
            if self.config.eos.contains(&tok.id) {
                g.stop = StopReason::Eos;
                break;
            }
            if let Some(c) = constraint.as_mut() {
                c.commit(tok.id)?;
            }
            if let Some(piece) = stream.push(&self.tokenizer, tok.id)? {
                let text = stream.text();
                let sent = text.len() - piece.len();
                // A stop string not found before can only end in the new piece.
                let mut from = sent.saturating_sub(longest_stop);
                while !text.is_char_boundary(from) {
                    from -= 1;
                }
                let cut = stops
                    .iter()
                    .filter_map(|s| text[from..].find(s).map(|i| from + i))
                    .min();
                if let Some(cut) = cut {
                    if cut > sent {
                        on_piece(&text[sent..cut], g);
                    }
                    g.text = text[..cut].to_string();
                    g.stop = StopReason::StopString;
                    break;
                }
                if !on_piece(&piece, g) {
                    g.stop = StopReason::Cancelled;
                    break;
                }
            }
            let n = g.ids.len();
            let pos = g.prompt_ids.len() + n - 1;
            if n >= opts.max_tokens {
                g.stop = StopReason::MaxTokens;
                break;
            }
            if pos + 1 >= ctx {
                g.stop = StopReason::ContextFull;
                break;
            }
            if let Some(c) = constraint.as_mut() {
                // The next draw's allowed tokens (constrained runs are serial: none in flight).
                let d = &self.decode;
                let mask = c.mask()?;
                d.plan.write_words_at(d.constraint, 0, mask)?;
                if let Some(w) = self.constraint_words.as_mut() {
                    w[..mask.len()].copy_from_slice(mask);
                }
            }
            // With other slots decoding, this token runs in their batch (once the runs of its
            // own already in flight are read).
            let together = self.batch.clone().filter(|b| b.members() > 1);
            if let (Some(batch), true) = (&together, inflight.is_empty()) {
                let post = Post {
                    pos,
                    seed: opts.seed,
                    settings: opts.sampler.to_f32s(),
                    constraint: self.constraint_words.clone(),
                    readback: opts.readback(),
                };
                let t0 = now_ms();
                let out = batch.step(self.kv.seq, post).await?;
                cost.wait_ms += now_ms() - t0;
                cost.runs += 1;
                self.cached.push(g.ids[n - 1]);
                tok = Draw::new(&out, opts.sampler.top_logprobs, n)?;
                continue;
            }
            let alone = together.is_none();
            if inflight.is_empty() {
                inflight.push_back((pos, self.submit_decode(pos, opts, &mut cost)?));
            }
            if opts.pipelined && alone && inflight.len() < 2 && runnable(pos + 1, n + 1) {
                inflight.push_back((pos + 1, self.submit_decode(pos + 1, opts, &mut cost)?));
            }
            let Some((at, run)) = inflight.pop_front() else {
                break;
            };
            debug_assert_eq!(at, pos);
            let t0 = now_ms();
            let out = self.decode.plan.finish_read(run).await?;
            cost.wait_ms += now_ms() - t0;
            // The id fed at `pos` now has its keys and values in the cache.
            self.cached.push(g.ids[n - 1]);
            tok = Draw::new(&out[0], opts.sampler.top_logprobs, n)?;
        }
        // A run still in flight feeds a token past the stop: it runs whatever comes next, so the
        // caches (and recurrent states) hold that token too.
        for (pos, _) in &inflight {
            let all = g.prompt_ids.len() + g.ids.len();
            if *pos == self.cached.len() && *pos < all {
                let id = match pos.checked_sub(g.prompt_ids.len()) {
                    Some(i) => g.ids[i],
                    None => g.prompt_ids[*pos],
                };
                self.cached.push(id);
            }
        }
        if g.stop == StopReason::StopString {
            return Ok(cost);
        }
        // The whole text once (the end-of-sequence id is not part of it), and what of it the
        // stream has not handed out yet.
        let kept = g.ids.len() - (g.stop == StopReason::Eos) as usize;
        g.text = self.tokenizer.decode(&g.ids[..kept])?;
        if g.stop != StopReason::Cancelled {
            let rest = g.text.strip_prefix(stream.text()).unwrap_or("").to_string();
            if !rest.is_empty() {
                on_piece(&rest, g);
            }
        }
        Ok(cost)
    }
}

/// The decode loop's host time, summed over its runs.
#[derive(Default)]
struct HostCost {
    encode_ms: f64,
    submit_ms: f64,
    wait_ms: f64,
    runs: usize,
}

impl Timings {
    /// Rates from the prompt length, the generated count and the two phases' durations (the
    /// first token comes from the prefill, so decode rates count the others), and the decode
    /// loop's host cost per run.
    fn new(prompt: usize, generated: usize, ttft: f64, decode_ms: f64, cost: &HostCost) -> Timings {
        let decoded = generated.saturating_sub(1);
        let runs = cost.runs.max(1) as f64;
        Timings {
            encode_ms_per_token: cost.encode_ms / runs,
            submit_ms_per_token: cost.submit_ms / runs,
            wait_ms_per_token: cost.wait_ms / runs,
            prefill_ms: ttft,
            ttft_ms: ttft,
            decode_ms,
            prefill_tok_s: prompt as f64 / (ttft / 1e3).max(1e-9),
            decode_tok_s: if decoded > 0 {
                decoded as f64 / (decode_ms / 1e3).max(1e-9)
            } else {
                0.0
            },
            ..Default::default()
        }
    }
}
