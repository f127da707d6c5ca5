//! Sentence embeddings from sentence-transformers folders (`modules.json`: a Transformer, a
//! Pooling, optional Dense layers, an optional Normalize), with BERT-family encoders
//! (all-MiniLM, bge): token, position and token-type embeddings, post-norm blocks of
//! bidirectional attention and a GELU feed-forward, on the same kernels as the rest (nomic-bert:
//! rotary positions instead of a position table, a fused Q/K/V projection, a SwiGLU
//! feed-forward, no biases); or with a
//! decoder Kiln runs for text (Qwen3-Embedding: causal, last-token pooling), one input per pass
//! through the text model's own graph, its final-norm states pooled on the host.
//!
//! Many inputs run as one forward pass, packed without padding: every product sees all the
//! batch's tokens at once (`[T, hidden]`), attention runs per input on its rows, and pooling is
//! one product with a `[inputs, T]` matrix (the mean's 1/len over an input's rows, or a one at
//! its first (CLS) or last token). Dense layers run on the GPU too; the L2 normalisation on the
//! host, on the few numbers that come back.

use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::formats::safetensors::take_checkpoint;
use crate::formats::ModelFiles;
use crate::graph::{Graph, UnaryOp, Value};
use crate::tensor::Tensor;
use crate::weights::{Quantize, VarBuilder, Weights};
use crate::{CompileOptions, Dyn};
use serde_json::Value as Json;
use std::sync::Arc;

/// The most tokens one forward pass packs (larger batches run as several passes).
pub const MAX_PASS_TOKENS: usize = 8192;

/// How token states become one vector per input (sentence-transformers' `Pooling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean over the input's tokens (all-MiniLM, nomic).
    Mean,
    /// The first token's state (`[CLS]`; bge).
    Cls,
    /// The last token's state (decoder embedders).
    LastToken,
}

/// Which BERT-family encoder: BERT's own layout, or nomic-bert's (nomic-embed-text).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BertKind {
    Bert,
    /// Rotary positions of base `theta` over every head dim (rotate-half), a fused `Wqkv`, a
    /// SwiGLU feed-forward (`fc2(silu(fc12 x) * fc11 x)`), no biases but the norms'.
    Nomic {
        theta: f32,
    },
}

/// A BERT encoder's hyper-parameters (`config.json`).
#[derive(Clone, Debug)]
pub struct BertConfig {
    pub kind: BertKind,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
    pub act: UnaryOp,
}

impl BertConfig {
    pub fn from_json(s: &str) -> Result<BertConfig> {
        let c = Keys::parse("config.json", s)?;
        let ty = c.text("model_type", "")?;
        if ty == "nomic_bert" {
            return Self::nomic(&c);
        }
        if ty != "bert" {
            return Err(Error::Unsupported(format!(
                "embedding model type '{ty}' (Kiln's encoders: model_type \"bert\", \"nomic_bert\")"
            )));
        }
        c.only("position_embedding_type", Json::from("absolute"))?;
        let act = match c.text("hidden_act", "gelu")? {
            "gelu" => UnaryOp::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => UnaryOp::GeluTanh,
            other => {
                return Err(Error::Unsupported(format!(
                    "BERT hidden_act '{other}' (gelu, gelu_new)"
                )))
            }
        };
        let (hidden, heads) = c.hidden_and_heads()?;
        let (positions, type_vocab) = (
            c.count("max_position_embeddings", 512)?,
            c.count("type_vocab_size", 2)?,
        );
        if positions < 2 || type_vocab == 0 {
            return Err(c.err(format!(
                "max_position_embeddings {positions} and type_vocab_size {type_vocab} (at least 2 \
                 positions and 1 token type)"
            )));
        }
        Ok(BertConfig {
            kind: BertKind::Bert,
            vocab: c.need_count("vocab_size")?,
            hidden,
            heads,
            layers: c.need_count("num_hidden_layers")?,
            intermediate: c.need_count("intermediate_size")?,
            positions,
            type_vocab,
            eps: c.num("layer_norm_eps", 1e-12)? as f32,
            act,
        })
    }
}

impl BertConfig {
    /// nomic-bert's config, as transformers 5 saves it (`hidden_size`, `rope_parameters`, ...)
    /// or as nomic's own code wrote it (`n_embd`, `rotary_emb_base`, ..., as the published
    /// nomic-embed-text folders have it); the variants Kiln does not run are refused.
    fn nomic(c: &Keys) -> Result<BertConfig> {
        let count = |new: &str, old: &str| -> Result<usize> {
            match c.get(new) {
                Some(_) => c.need_count(new),
                None => c.need_count(old),
            }
        };
        for (k, want) in [
            ("prenorm", Json::from(false)),
            ("causal", Json::from(false)),
            ("qkv_proj_bias", Json::from(false)),
            ("mlp_fc1_bias", Json::from(false)),
            ("mlp_fc2_bias", Json::from(false)),
            ("rotary_emb_interleaved", Json::from(false)),
            ("rotary_emb_fraction", Json::from(1.0)),
            ("activation_function", Json::from("swiglu")),
            ("use_rms_norm", Json::from(false)),
            ("parallel_block", Json::from(false)),
        ] {
            c.only(k, want)?;
        }
        for (k, what) in [
            ("rotary_emb_scale_base", "xPos rotary scaling"),
            ("rotary_scaling_factor", "dynamic NTK rotary scaling"),
        ] {
            if c.get(k).is_some_and(|v| !v.is_null()) {
                return Err(Error::Unsupported(format!("nomic-bert with {k} ({what})")));
            }
        }
        if c.get("hidden_act").is_some() && c.text("hidden_act", "silu")? != "silu" {
            return Err(Error::Unsupported(format!(
                "nomic-bert hidden_act '{}' (silu: a SwiGLU feed-forward)",
                c.text("hidden_act", "")?
            )));
        }
        let theta = match c.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
            Some(t) => t.as_f64(),
            None => c
                .get("rope_theta")
                .or(c.get("rotary_emb_base"))
                .and_then(|t| t.as_f64()),
        }
        .unwrap_or(1000.0);
        let (hidden, heads) = (
            count("hidden_size", "n_embd")?,
            count("num_attention_heads", "n_head")?,
        );
        if hidden % heads != 0 || !(hidden / heads).is_multiple_of(2) || !(theta > 1.0) {
            return Err(c.err(format!(
                "{hidden} wide in {heads} heads (an even head size), rotary base {theta}"
            )));
        }
        let positions = count("max_position_embeddings", "n_positions")?;
        let type_vocab = c.count("type_vocab_size", 2)?;
        if positions < 2 || type_vocab == 0 {
            return Err(c.err(format!(
                "{positions} positions and {type_vocab} token types (at least 2 and 1)"
            )));
        }
        let eps = match c.get("layer_norm_eps") {
            Some(_) => c.num("layer_norm_eps", 1e-12)?,
            None => c.num("layer_norm_epsilon", 1e-12)?,
        };
        Ok(BertConfig {
            kind: BertKind::Nomic {
                theta: theta as f32,
            },
            vocab: c.need_count("vocab_size")?,
            hidden,
            heads,
            layers: count("num_hidden_layers", "n_layer")?,
            intermediate: count("intermediate_size", "n_inner")?,
            positions,
            type_vocab,
            eps: eps as f32,
            act: UnaryOp::Silu,
        })
    }
}

impl BertConfig {
    /// nomic-bert's rotary cos/sin table over `positions` (every head dim rotated, its base),
    /// uploaded once per model; `None` for BERT's position table.
    fn rotary_table(&self, gpu: &Arc<Gpu>, positions: usize) -> Result<Option<Arc<Tensor>>> {
        let BertKind::Nomic { theta } = self.kind else {
            return Ok(None);
        };
        let d = self.hidden / self.heads;
        let freqs = crate::kernels::rope::inv_freq(d, theta);
        let table = crate::kernels::rope::table(&freqs, positions);
        let t = Tensor::from_f32(gpu, "rotary", &[positions, d / 2, 2], &table)?;
        Ok(Some(Arc::new(t)))
    }
}

/// A `Dense` module: `act(x W^T + b)`.
pub struct DenseLayer {
    pub inputs: usize,
    pub outputs: usize,
    pub tanh: bool,
    pub weights: Weights,
}

/// The most tokens per input for decoder embedders (each position costs a KV-cache row).
pub const MAX_DECODER_TOKENS: usize = 2048;

/// A decoder embedder's compiled pass for inputs of one length: the run position, the pooling
/// weights input and the pooled (Dense) output.
struct DecoderPass {
    plan: crate::Plan,
    pos: crate::Scalar,
    pool: Value,
    out: Value,
}

/// The network under the pooling.
enum Encoder {
    /// `rotary`: nomic-bert's cos/sin table over the longest input, made once at load.
    Bert {
        cfg: BertConfig,
        weights: Weights,
        rotary: Option<Arc<Tensor>>,
    },
    Decoder(Box<crate::llm::TextModel>),
}

/// A loaded embedding model.
pub struct Embedder {
    pub gpu: Arc<Gpu>,
    encoder: Encoder,
    pub pooling: Pooling,
    pub dense: Vec<DenseLayer>,
    pub normalize: bool,
    /// Tokens per input at most (longer inputs are truncated, the end token kept).
    pub max_len: usize,
    /// sentence-transformers' named prompts (`config_sentence_transformers.json`), e.g.
    /// Qwen3-Embedding's `query` instruction, and the one used when a request names none.
    pub prompts: std::collections::BTreeMap<String, String>,
    pub default_prompt: Option<String>,
    tokenizer: EmbedTokenizer,
    /// A decoder embedder's compiled passes by input length (compiled at the first input of
    /// each length, replayed after).
    hidden_plans: std::sync::Mutex<std::collections::HashMap<usize, DecoderPass>>,
}

/// Input lengths whose decoder passes are kept compiled at most (then the cache starts over).
const MAX_HIDDEN_PLANS: usize = 64;

/// How an input becomes ids: a `tokenizer.json` (its post-processor adds the start and end
/// tokens; truncation set to the longest input), or a GGUF's vocabulary with the start and end
/// tokens its metadata asks for added here (llama.cpp's `[CLS] ... [SEP]` for BERT).
enum EmbedTokenizer {
    Json(tokenizers::Tokenizer),
    Gguf {
        tok: crate::tokenizer::TextTokenizer,
        start: Option<u32>,
        end: Option<u32>,
    },
}

fn data_err(name: &str, msg: impl Into<String>) -> Error {
    Error::Data {
        name: name.into(),
        msg: msg.into(),
    }
}

fn text(files: &ModelFiles, name: &str) -> Result<String> {
    crate::formats::text_file(files, name)?
        .ok_or_else(|| data_err("embedding model", format!("missing {name}")))
}

/// `modules.json`'s entries: (type, path), in order.
fn modules(files: &ModelFiles) -> Result<Vec<(String, String)>> {
    let j: Json = serde_json::from_str(&text(files, "modules.json")?)
        .map_err(|e| data_err("modules.json", e.to_string()))?;
    let list = j
        .as_array()
        .ok_or_else(|| data_err("modules.json", "expected a list of modules"))?;
    let mut out: Vec<(u64, String, String)> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let ty = m["type"]
            .as_str()
            .ok_or_else(|| data_err("modules.json", format!("module {i} has no type")))?;
        let path = m["path"].as_str().unwrap_or("").trim_end_matches('/');
        out.push((
            m["idx"].as_u64().unwrap_or(i as u64),
            ty.into(),
            path.into(),
        ));
    }
    out.sort_by_key(|m| m.0);
    Ok(out.into_iter().map(|(_, t, p)| (t, p)).collect())
}

/// A Pooling module's mode: sentence-transformers 6's `pooling_mode`, or the older booleans.
fn pooling(cfg: &str) -> Result<Pooling> {
    let j: Json =
        serde_json::from_str(cfg).map_err(|e| data_err("Pooling config", e.to_string()))?;
    let mode = match j.get("pooling_mode").and_then(|v| v.as_str()) {
        Some(m) => m.to_string(),
        None => {
            let on: Vec<&str> = [
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                ("pooling_mode_weightedmean_tokens", "weightedmean"),
                ("pooling_mode_lasttoken", "lasttoken"),
            ]
            .iter()
            .filter(|(k, _)| j.get(k).and_then(|v| v.as_bool()) == Some(true))
            .map(|(_, m)| *m)
            .collect();
            match on.as_slice() {
                [one] => one.to_string(),
                _ => {
                    return Err(Error::Unsupported(format!(
                        "Pooling with modes {on:?} (one of mean, cls, lasttoken)"
                    )))
                }
            }
        }
    };
    match mode.as_str() {
        "mean" => Ok(Pooling::Mean),
        "cls" => Ok(Pooling::Cls),
        "lasttoken" => Ok(Pooling::LastToken),
        other => Err(Error::Unsupported(format!(
            "pooling mode '{other}' (mean, cls or lasttoken)"
        ))),
    }
}

/// The named prompts of `config_sentence_transformers.json` and its `default_prompt_name`.
fn prompts(files: &ModelFiles) -> (std::collections::BTreeMap<String, String>, Option<String>) {
    let j: Json = crate::formats::text_file(files, "config_sentence_transformers.json")
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Json::Null);
    let prompts = j
        .get("prompts")
        .and_then(|p| p.as_object())
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let default = j
        .get("default_prompt_name")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    (prompts, default)
}

/// The longest input: sentence-transformers' `max_seq_length` (older `sentence_bert_config.json`),
/// else the tokenizer's `model_max_length`, capped by the position table.
fn max_len(files: &ModelFiles, positions: usize) -> usize {
    let num = |file: &str, key: &str| -> Option<usize> {
        let t = crate::formats::text_file(files, file).ok()??;
        let j: Json = serde_json::from_str(&t).ok()?;
        j.get(key)?.as_u64().map(|v| v as usize)
    };
    num("sentence_bert_config.json", "max_seq_length")
        .or_else(|| num("tokenizer_config.json", "model_max_length"))
        .unwrap_or(positions)
        .clamp(2, positions.max(2))
}

impl Embedder {
    /// Loads a sentence-transformers folder's files ([`crate::formats::files::embedding_model`]).
    pub async fn load(gpu: &Arc<Gpu>, mut files: ModelFiles, q: Quantize) -> Result<Embedder> {
        if !files.contains_key("modules.json") {
            if let Some(name) = files.keys().find(|k| k.ends_with(".gguf")).cloned() {
                let bytes = files.remove(&name).unwrap_or_default();
                return Self::load_gguf(gpu, &name, bytes, q);
            }
        }
        let mods = modules(&files)?;
        let mut pooling_mode = None;
        let mut dense = Vec::new();
        let mut normalize = false;
        let mut transformer = false;
        for (ty, path) in &mods {
            let kind = ty.rsplit('.').next().unwrap_or(ty);
            let at = |f: &str| {
                if path.is_empty() {
                    f.to_string()
                } else {
                    format!("{path}/{f}")
                }
            };
            match kind {
                "Transformer" if path.is_empty() => transformer = true,
                "Pooling" => pooling_mode = Some(pooling(&text(&files, &at("config.json"))?)?),
                "Dense" => {
                    let c = Keys::parse(&at("config.json"), &text(&files, &at("config.json"))?)?;
                    let act = c.text("activation_function", "torch.nn.modules.linear.Identity")?;
                    let tanh = match act.rsplit('.').next().unwrap_or(act) {
                        "Tanh" => true,
                        "Identity" => false,
                        other => {
                            return Err(Error::Unsupported(format!(
                                "{path}: Dense activation '{other}' (Tanh or Identity)"
                            )))
                        }
                    };
                    let st = take_checkpoint(&mut files, path, "model")?;
                    dense.push(DenseLayer {
                        inputs: c.need_count("in_features")?,
                        outputs: c.need_count("out_features")?,
                        tanh,
                        weights: Weights::new(gpu, path, Box::new(st)),
                    });
                }
                "Normalize" => normalize = true,
                _ => {
                    return Err(Error::Unsupported(format!(
                        "sentence-transformers module '{ty}' at '{path}' (Kiln runs Transformer, \
                         Pooling, Dense and Normalize)"
                    )))
                }
            }
        }
        if !transformer {
            return Err(data_err(
                "modules.json",
                "no Transformer module at the folder's root",
            ));
        }
        let pooling = pooling_mode.ok_or_else(|| data_err("modules.json", "no Pooling module"))?;
        let config = text(&files, "config.json")?;
        let is_bert = serde_json::from_str::<Json>(&config)
            .ok()
            .and_then(|j| {
                j.get("model_type")
                    .and_then(|t| t.as_str())
                    .map(|t| t == "bert" || t == "nomic_bert")
            })
            .unwrap_or(false);
        let (prompts, default_prompt) = prompts(&files);
        let mut tokenizer = crate::tokenizer::build_tokenizer(
            files
                .get("tokenizer.json")
                .ok_or_else(|| data_err("embedding model", "missing tokenizer.json"))?,
        )?;
        let (encoder, max_len, hidden) = if is_bert {
            let cfg = BertConfig::from_json(&config)?;
            let max_len = max_len(&files, cfg.positions);
            let st = take_checkpoint(&mut files, "", "model")?;
            let weights = Weights::new(gpu, "embedding model", Box::new(st)).with_quantize(q);
            let h = cfg.hidden;
            let rotary = cfg.rotary_table(gpu, max_len)?;
            let encoder = Encoder::Bert {
                cfg,
                weights,
                rotary,
            };
            (encoder, max_len, h)
        } else {
            // A decoder Kiln runs for text; its config says which (or why not).
            let cfg = crate::llm::LlmConfig::from_hf(&config, None)?;
            if cfg.linear.is_some() {
                return Err(Error::Unsupported(
                    "embeddings from a model with linear-attention layers (Qwen 3.5)".into(),
                ));
            }
            let max_len = max_len(&files, cfg.max_positions).min(MAX_DECODER_TOKENS);
            let opts = crate::llm::LoadOptions {
                ctx: max_len,
                quantize: q,
                ..Default::default()
            };
            let m = crate::llm::TextModel::load(gpu, files, &opts, &mut |_, _| {}).await?;
            let h = m.config.hidden;
            (Encoder::Decoder(Box::new(m)), max_len, h)
        };
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| data_err("tokenizer.json", e.to_string()))?;
        tokenizer.with_padding(None);
        let mut width = hidden;
        for d in &dense {
            if d.inputs != width {
                return Err(data_err(
                    "Dense config",
                    format!("in_features {} after a {width}-wide embedding", d.inputs),
                ));
            }
            width = d.outputs;
        }
        Ok(Embedder {
            gpu: gpu.clone(),
            encoder,
            pooling,
            dense,
            normalize,
            max_len,
            prompts,
            default_prompt,
            tokenizer: EmbedTokenizer::Json(tokenizer),
            hidden_plans: Default::default(),
        })
    }

    /// A GGUF embedding model as llama.cpp's converter writes it (`general.architecture`
    /// "bert": its hyper-parameters, `bert.pooling_type`, the WordPiece vocabulary, tensors
    /// under llama.cpp's names); normalised as llama.cpp's embeddings are by default.
    fn load_gguf(gpu: &Arc<Gpu>, name: &str, bytes: Vec<u8>, q: Quantize) -> Result<Embedder> {
        use crate::formats::gguf::Gguf;
        let g = Gguf::parse(name, bytes)?;
        let arch = g
            .require("general.architecture")?
            .as_str()
            .unwrap_or("")
            .to_string();
        if arch != "bert" && arch != "nomic-bert" {
            return Err(Error::Unsupported(format!(
                "{name}: GGUF embedding architecture '{arch}' (Kiln's encoders: \"bert\", \
                 \"nomic-bert\"; decoder embedders load from their sentence-transformers folders)"
            )));
        }
        let bad = |msg: String| data_err(name, msg);
        let num = |k: &str| -> Result<usize> {
            g.require(&format!("{arch}.{k}"))?
                .as_u64()
                .filter(|&v| v > 0 && v <= 1 << 20)
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("'{arch}.{k}' is not a positive count")))
        };
        let shape = |t: &str| -> Result<Vec<usize>> {
            crate::formats::TensorSource::tensor(&g, t)
                .map(|r| r.shape.to_vec())
                .ok_or_else(|| bad(format!("missing tensor '{t}'")))
        };
        let (hidden, heads) = (num("embedding_length")?, num("attention.head_count")?);
        if hidden % heads != 0 {
            return Err(bad(format!("{hidden} wide in {heads} heads")));
        }
        let positions = num("context_length")?;
        let kind = match arch.as_str() {
            "nomic-bert" => BertKind::Nomic {
                theta: g
                    .get("nomic-bert.rope.freq_base")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1000.0) as f32,
            },
            _ => BertKind::Bert,
        };
        let cfg = BertConfig {
            kind,
            vocab: shape("token_embd.weight")?.first().copied().unwrap_or(0),
            hidden,
            heads,
            layers: num("block_count")?,
            intermediate: num("feed_forward_length")?,
            positions,
            type_vocab: shape("token_types.weight")?.first().copied().unwrap_or(0),
            eps: g
                .get(&format!("{arch}.attention.layer_norm_epsilon"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-12) as f32,
            act: match kind {
                BertKind::Nomic { .. } => UnaryOp::Silu,
                BertKind::Bert => UnaryOp::GeluErf,
            },
        };
        if positions < 2 || cfg.type_vocab == 0 || cfg.vocab == 0 {
            return Err(bad(format!(
                "{positions} positions, {} token types, a vocabulary of {}",
                cfg.type_vocab, cfg.vocab
            )));
        }
        let pooling = match g
            .get(&format!("{arch}.pooling_type"))
            .and_then(|v| v.as_u64())
        {
            Some(1) | None => Pooling::Mean,
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::LastToken,
            Some(p) => {
                return Err(Error::Unsupported(format!(
                    "{name}: {arch}.pooling_type {p} (1 mean, 2 CLS, 3 last token)"
                )))
            }
        };
        let tok = crate::tokenizer::TextTokenizer::from_gguf(&g)?;
        let flag = |k: &str| {
            g.get(k).and_then(|v| v.as_u64()).unwrap_or(0) == 1
                || matches!(g.get(k), Some(crate::formats::gguf::Value::Bool(true)))
        };
        let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let start =
            id("tokenizer.ggml.bos_token_id").filter(|_| flag("tokenizer.ggml.add_bos_token"));
        let end = id("tokenizer.ggml.seperator_token_id")
            .or_else(|| id("tokenizer.ggml.eos_token_id"))
            .filter(|_| {
                flag("tokenizer.ggml.add_eos_token") || flag("tokenizer.ggml.add_sep_token")
            });
        let weights = Weights::new(gpu, name, Box::new(g))
            .with_names(bert_gguf_name)
            .with_quantize(q);
        Ok(Embedder {
            gpu: gpu.clone(),
            max_len: positions,
            encoder: Encoder::Bert {
                rotary: cfg.rotary_table(gpu, positions)?,
                cfg,
                weights,
            },
            pooling,
            dense: Vec::new(),
            normalize: true,
            prompts: Default::default(),
            default_prompt: None,
            tokenizer: EmbedTokenizer::Gguf { tok, start, end },
            hidden_plans: Default::default(),
        })
    }

    /// The encoder's hidden size.
    pub fn hidden(&self) -> usize {
        match &self.encoder {
            Encoder::Bert { cfg, .. } => cfg.hidden,
            Encoder::Decoder(m) => m.config.hidden,
        }
    }

    /// The encoder's layers.
    pub fn layers(&self) -> usize {
        match &self.encoder {
            Encoder::Bert { cfg, .. } => cfg.layers,
            Encoder::Decoder(m) => m.config.layers,
        }
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        match &self.encoder {
            Encoder::Bert { cfg, .. } => cfg.vocab,
            Encoder::Decoder(m) => m.config.vocab,
        }
    }

    /// A named prompt's text (an error naming the ones there are otherwise).
    pub fn prompt(&self, name: &str) -> Result<&str> {
        self.prompts.get(name).map(String::as_str).ok_or_else(|| {
            data_err(
                "prompt_name",
                format!(
                    "'{name}': this model's prompts are {}",
                    if self.prompts.is_empty() {
                        "none".to_string()
                    } else {
                        self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            )
        })
    }

    /// The embedding's width.
    pub fn dim(&self) -> usize {
        self.dense.last().map_or(self.hidden(), |d| d.outputs)
    }

    /// An input's token ids as the model's tokenizer makes them (start and end tokens,
    /// truncated to [`Embedder::max_len`]).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        match &self.tokenizer {
            EmbedTokenizer::Json(t) => {
                let enc = t
                    .encode(text, true)
                    .map_err(|e| data_err("tokenizer", e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
            EmbedTokenizer::Gguf { tok, start, end } => {
                let mut ids: Vec<u32> = start.iter().copied().collect();
                let room = self.max_len - ids.len() - usize::from(end.is_some());
                ids.extend(tok.encode(text)?.into_iter().take(room));
                ids.extend(end);
                Ok(ids)
            }
        }
    }

    /// Embeddings of texts (one vector each), batched into as few passes as fit.
    pub async fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>>>()?;
        self.embed_ids(&ids).await
    }

    /// Embeddings of token-id inputs. Each must be non-empty, within the vocabulary and at
    /// most [`Embedder::max_len`] long (an error names the input otherwise).
    pub async fn embed_ids(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        for (i, ids) in inputs.iter().enumerate() {
            let bad = |msg: String| data_err("input", format!("input {i}: {msg}"));
            if ids.is_empty() {
                return Err(bad("no tokens".into()));
            }
            if ids.len() > self.max_len {
                return Err(bad(format!(
                    "{} tokens, more than the model's {}",
                    ids.len(),
                    self.max_len
                )));
            }
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab()) {
                return Err(bad(format!(
                    "token id {id} is outside the vocabulary ({})",
                    self.vocab()
                )));
            }
        }
        let mut out = Vec::with_capacity(inputs.len());
        let mut start = 0;
        while start < inputs.len() {
            let mut end = start;
            let mut total = 0;
            while end < inputs.len()
                && (end == start || total + inputs[end].len() <= MAX_PASS_TOKENS)
            {
                total += inputs[end].len();
                end += 1;
            }
            out.extend(self.pass(&inputs[start..end]).await?);
            start = end;
        }
        Ok(out)
    }

    /// One packed forward pass over `inputs` (a decoder: one pass per input).
    async fn pass(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if let Encoder::Decoder(m) = &self.encoder {
            let mut out = Vec::with_capacity(inputs.len());
            for ids in inputs {
                out.push(self.decoder_pass(m, ids).await?);
            }
            return Ok(out);
        }
        let p = self.pass_plan(inputs).await?;
        let bytes = p.plan.run_read(&[p.out]).await?;
        let flat: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[0]);
        let dim = self.dim();
        Ok(flat
            .chunks(dim)
            .map(|v| {
                if self.normalize {
                    l2_normalized(v)
                } else {
                    v.to_vec()
                }
            })
            .collect())
    }

    /// A decoder embedder's vector of one input: its final-norm states, pooled and through the
    /// Dense modules in the same pass (compiled once per input length).
    async fn decoder_pass(&self, m: &crate::llm::TextModel, ids: &[u32]) -> Result<Vec<f32>> {
        let n = ids.len();
        let cached = self.hidden_plans.lock().ok().and_then(|mut c| c.remove(&n));
        let mut p = match cached {
            Some(p) => p,
            None => {
                let mut g = Graph::new();
                let pos = g.scalar("pos")?;
                let x =
                    crate::llm::model::final_states(&mut g, &m.config, &m.weights, &m.kv, n, pos)?;
                let x = g.reshape(x, &[1, n, m.config.hidden])?;
                let pool = g.input("pooling", &[1, 1, n], DType::F32)?;
                let out = self.pooled(&mut g, x, pool)?;
                g.output(out);
                let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
                DecoderPass {
                    plan,
                    pos,
                    pool,
                    out,
                }
            }
        };
        self.gpu.write_buffer(
            m.kv.history.buffer()?,
            m.kv.history_bytes(),
            bytemuck::cast_slice(ids),
        );
        p.plan.set(p.pos, 0);
        p.plan.write_f32(p.pool, &self.pooling_rows(&[n])[..n])?;
        let bytes = p.plan.run_read(&[p.out]).await?;
        if let Ok(mut c) = self.hidden_plans.lock() {
            if c.len() >= MAX_HIDDEN_PLANS {
                c.clear();
            }
            c.insert(n, p);
        }
        let v: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[0]);
        Ok(if self.normalize { l2_normalized(&v) } else { v })
    }

    /// The pooling weights of inputs of `lens` tokens packed one after another: a row per input
    /// over all the tokens (mean: 1 / len over its own; CLS: its first; last token: its last).
    fn pooling_rows(&self, lens: &[usize]) -> Vec<f32> {
        let t: usize = lens.iter().sum();
        let mut pool = vec![0f32; lens.len() * t];
        let mut s = 0;
        for (i, &l) in lens.iter().enumerate() {
            let row = &mut pool[i * t..(i + 1) * t];
            match self.pooling {
                Pooling::Mean => row[s..s + l].fill(1.0 / l as f32),
                Pooling::Cls => row[s] = 1.0,
                Pooling::LastToken => row[s + l - 1] = 1.0,
            }
            s += l;
        }
        pool
    }

    /// Pooling (weights `pool` `[1, n, t]` over the states `x` `[1, t, h]`, one product) and the
    /// Dense modules → `[1, n, dim]` before normalisation.
    fn pooled(&self, g: &mut Graph, x: Value, pool: Value) -> Result<Value> {
        let xt = g.transpose(x)?; // [1, h, t]
        let mut e = g.linear(pool, xt, None)?; // [1, n, h]
        for d in &self.dense {
            e = d.weights.root().pp("linear").linear(g, e, d.outputs)?;
            if d.tanh {
                e = g.unary(e, UnaryOp::Softcap { cap: 1.0 })?;
            }
        }
        Ok(e)
    }

    /// The GPU time of one pass over `inputs` by kernel (timestamp queries; for benchmarks).
    pub async fn profile(&self, inputs: &[Vec<u32>]) -> Result<Vec<(String, f64)>> {
        self.pass_plan(inputs).await?.plan.profile().await
    }

    /// The compiled pass over `inputs` with its inputs written: the pooled (and Dense)
    /// embeddings `[1, n, dim]` before normalisation in `out`.
    async fn pass_plan(&self, inputs: &[Vec<u32>]) -> Result<PassPlan> {
        let (n, h) = (inputs.len(), self.hidden());
        let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |s, &l| {
                let at = *s;
                *s += l;
                Some(at)
            })
            .collect();
        let t: usize = lens.iter().sum();
        let ids: Vec<u32> = inputs.concat();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let pool = self.pooling_rows(&lens);
        let mut g = Graph::new();
        let iv = g.input("ids", &[t], DType::U32)?;
        let pv = g.input("positions", &[t], DType::U32)?;
        let mv = g.input("pooling", &[1, n, t], DType::F32)?;
        let x = self.encoder(&mut g, iv, pv, &starts, &lens)?; // [t, h]
        let x = g.reshape(x, &[1, t, h])?;
        let e = self.pooled(&mut g, x, mv)?;
        g.output(e);
        let plan = g.compile(&self.gpu, CompileOptions::default()).await?;
        plan.write_u32(iv, &ids)?;
        plan.write_u32(pv, &positions)?;
        plan.write_f32(mv, &pool)?;
        Ok(PassPlan { plan, out: e })
    }

    /// The encoder over packed inputs: ids and positions `[t]` → last hidden states `[t, h]`.
    fn encoder(
        &self,
        g: &mut Graph,
        ids: Value,
        pos: Value,
        starts: &[usize],
        lens: &[usize],
    ) -> Result<Value> {
        let Encoder::Bert {
            cfg: c,
            weights,
            rotary,
        } = &self.encoder
        else {
            return Err(Error::Unsupported(
                "a packed pass of a decoder embedder".into(),
            ));
        };
        let h = c.hidden;
        let vb = weights
            .root()
            .first_of(&["", "bert"], "embeddings.word_embeddings.weight")?;
        if let Some(table) = rotary {
            let table = g.tensor(table);
            return self.nomic_encoder(g, c, &vb, ids, table, starts, lens);
        }
        let emb = vb.pp("embeddings");
        let words = emb.value(g, "word_embeddings.weight", &[c.vocab, h])?;
        let table = g.tensor(&emb.get_f32("position_embeddings.weight", &[c.positions, h])?);
        let types = g.tensor(&emb.get_f32("token_type_embeddings.weight", &[c.type_vocab, h])?);
        let x = g.gather(words, ids)?;
        let p = g.gather(table, pos)?;
        let x = g.add(x, p)?;
        let type0 = g.slice_rows(types, Dyn::Static(0), 1)?; // every token is of type 0
        let x = g.add(x, type0)?;
        let mut x = emb.pp("LayerNorm").layer_norm(g, x, c.eps)?;
        for i in 0..c.layers {
            let l = vb.pp("encoder.layer").pp(i);
            let s = l.pp("attention.self");
            let q = s.pp("query").linear(g, x, h)?;
            let k = s.pp("key").linear(g, x, h)?;
            let v = s.pp("value").linear(g, x, h)?;
            let a = self.attention(g, (q, k, v), None, starts, lens)?;
            let o = l.pp("attention.output.dense").linear(g, a, h)?;
            let o = g.add(o, x)?;
            x = l.pp("attention.output.LayerNorm").layer_norm(g, o, c.eps)?;
            let f = l.pp("intermediate.dense").linear(g, x, c.intermediate)?;
            let f = g.unary(f, c.act)?;
            let f = l.pp("output.dense").linear(g, f, h)?;
            let f = g.add(f, x)?;
            x = l.pp("output.LayerNorm").layer_norm(g, f, c.eps)?;
        }
        Ok(x)
    }

    /// nomic-bert's encoder over packed inputs: token and type-0 embeddings (no position
    /// table), then post-norm blocks of rotary attention and a SwiGLU feed-forward.
    #[allow(clippy::too_many_arguments)]
    fn nomic_encoder(
        &self,
        g: &mut Graph,
        c: &BertConfig,
        vb: &VarBuilder,
        ids: Value,
        table: Value,
        starts: &[usize],
        lens: &[usize],
    ) -> Result<Value> {
        let h = c.hidden;
        let emb = vb.pp("embeddings");
        let words = emb.value(g, "word_embeddings.weight", &[c.vocab, h])?;
        let types = g.tensor(&emb.get_f32("token_type_embeddings.weight", &[c.type_vocab, h])?);
        let x = g.gather(words, ids)?;
        let type0 = g.slice_rows(types, Dyn::Static(0), 1)?; // every token is of type 0
        let x = g.add(x, type0)?;
        let mut x = vb.pp("emb_ln").layer_norm(g, x, c.eps)?;
        for i in 0..c.layers {
            let l = vb.pp("encoder.layers").pp(i);
            // Wqkv's q, k and v rows apart (one product each).
            let mut qkv = [None; 3];
            for (j, out) in qkv.iter_mut().enumerate() {
                let part = crate::weights::RowPart {
                    name: "attn.Wqkv.weight",
                    shape: [3 * h, h],
                    rows: vec![j * h..(j + 1) * h],
                };
                let w = l.get_rows(&[part])?.ok_or_else(|| {
                    data_err("nomic-bert", "Wqkv's rows could not be taken apart")
                })?;
                let w = g.tensor(&w);
                *out = Some(g.linear(x, w, None)?);
            }
            let [Some(q), Some(k), Some(v)] = qkv else {
                return Err(data_err("nomic-bert", "Wqkv"));
            };
            let a = self.attention(g, (q, k, v), Some(table), starts, lens)?;
            let o = l.pp("attn.out_proj").linear(g, a, h)?;
            let o = g.add(o, x)?;
            x = l.pp("norm1").layer_norm(g, o, c.eps)?;
            let gate = l.pp("mlp.fc12").linear(g, x, c.intermediate)?;
            let up = l.pp("mlp.fc11").linear(g, x, c.intermediate)?;
            let f = g.glu(
                crate::graph::GluInput::Pair { gate, up },
                crate::graph::Act::Silu,
            )?;
            let f = l.pp("mlp.fc2").linear(g, f, h)?;
            let f = g.add(f, x)?;
            x = l.pp("norm2").layer_norm(g, f, c.eps)?;
        }
        Ok(x)
    }

    /// Bidirectional multi-head attention of each input over its own rows of `q`, `k`, `v`
    /// `[t, h]`, q and k first rotated from position 0 of each input when a rotary `table` is
    /// given.
    fn attention(
        &self,
        g: &mut Graph,
        (q, k, v): (Value, Value, Value),
        rope: Option<Value>,
        starts: &[usize],
        lens: &[usize],
    ) -> Result<Value> {
        let (h, heads) = match &self.encoder {
            Encoder::Bert { cfg, .. } => (cfg.hidden, cfg.heads),
            Encoder::Decoder(_) => {
                return Err(Error::Unsupported("BERT attention of a decoder".into()))
            }
        };
        let t = lens.iter().sum::<usize>();
        let rotate = |g: &mut Graph, x: Value| match rope {
            Some(table) => g.rope(x, table, heads, false, Dyn::Static(0)),
            None => Ok(x),
        };
        if let [l] = lens {
            let r = |g: &mut Graph, v| g.reshape(v, &[1, *l, h]);
            let (q, k, v) = (r(g, q)?, r(g, k)?, r(g, v)?);
            let (q, k) = (rotate(g, q)?, rotate(g, k)?);
            let a = g.attention(
                q,
                k,
                v,
                heads,
                heads,
                false,
                Dyn::Static(0),
                Dyn::Static(*l as u32),
            )?;
            return g.reshape(a, &[*l, h]);
        }
        // Each input attends over its own rows; the outputs land in one [t, h] buffer.
        let out = Arc::new(Tensor::zeros(&self.gpu, "attention", &[t, h], DType::F32)?);
        let ov = g.tensor(&out);
        for (&s, &l) in starts.iter().zip(lens) {
            let rows = |g: &mut Graph, v| -> Result<Value> {
                let r = g.slice_rows(v, Dyn::Static(s as u32), l)?;
                g.reshape(r, &[1, l, h])
            };
            let (qi, ki, vi) = (rows(g, q)?, rows(g, k)?, rows(g, v)?);
            let (qi, ki) = (rotate(g, qi)?, rotate(g, ki)?);
            let a = g.attention(
                qi,
                ki,
                vi,
                heads,
                heads,
                false,
                Dyn::Static(0),
                Dyn::Static(l as u32),
            )?;
            g.copy_into(a, ov, Dyn::Static((s * h) as u32))?;
        }
        Ok(ov)
    }
}

/// llama.cpp's GGUF name of a BERT tensor given its Hugging Face name.
fn bert_gguf_name(hf: &str) -> String {
    let hf = hf.strip_prefix("bert.").unwrap_or(hf);
    let fixed = [
        ("embeddings.word_embeddings.weight", "token_embd.weight"),
        (
            "embeddings.position_embeddings.weight",
            "position_embd.weight",
        ),
        (
            "embeddings.token_type_embeddings.weight",
            "token_types.weight",
        ),
        ("embeddings.LayerNorm.weight", "token_embd_norm.weight"),
        ("embeddings.LayerNorm.bias", "token_embd_norm.bias"),
        // nomic-bert.
        ("emb_ln.weight", "token_embd_norm.weight"),
        ("emb_ln.bias", "token_embd_norm.bias"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let Some(rest) = hf
        .strip_prefix("encoder.layer.")
        .or_else(|| hf.strip_prefix("encoder.layers."))
    else {
        return hf.to_string();
    };
    let (layer, t) = rest.split_once('.').unwrap_or((rest, ""));
    let (module, kind) = t.rsplit_once('.').unwrap_or((t, ""));
    let g = match module {
        "attention.self.query" => "attn_q",
        "attention.self.key" => "attn_k",
        "attention.self.value" => "attn_v",
        "attention.output.dense" => "attn_output",
        "attention.output.LayerNorm" => "attn_output_norm",
        "intermediate.dense" => "ffn_up",
        "output.dense" => "ffn_down",
        "output.LayerNorm" => "layer_output_norm",
        // nomic-bert's names.
        "attn.Wqkv" => "attn_qkv",
        "attn.out_proj" => "attn_output",
        "norm1" => "attn_output_norm",
        "mlp.fc11" => "ffn_up",
        "mlp.fc12" => "ffn_gate",
        "mlp.fc2" => "ffn_down",
        "norm2" => "layer_output_norm",
        _ => return hf.to_string(),
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// A compiled pass and its output value.
struct PassPlan {
    plan: crate::Plan,
    out: Value,
}

/// `v / max(|v|, 1e-12)` (torch's `F.normalize`), in f64.
pub fn l2_normalized(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    v.iter().map(|&x| (x as f64 / norm) as f32).collect()
}

/// Inputs per request at most (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// OpenAI's `input`: a string, strings, token ids, or lists of token ids.
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// OpenAI's embeddings request (`POST /v1/embeddings`, `embeddings.create`).
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    pub input: EmbeddingInput,
    #[serde(default)]
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Keep the first N values, renormalised (Matryoshka-trained models).
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// Kiln's extension: a prompt of the model's `config_sentence_transformers.json` put before
    /// each text input (e.g. Qwen3-Embedding's `query` instruction), as sentence-transformers'
    /// `encode(prompt_name=...)`; without it the model's default prompt, if it names one.
    #[serde(default)]
    pub prompt_name: Option<String>,
    /// Accepted and ignored (OpenAI's end-user id).
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

impl EmbeddingRequest {
    pub fn from_json(s: &str) -> Result<EmbeddingRequest> {
        serde_json::from_str(s).map_err(|e| data_err("embedding request", e.to_string()))
    }
}

/// Truncates `v` to `dims` values and renormalises them (OpenAI's `dimensions`).
pub fn shorten(v: &mut Vec<f32>, dims: usize) -> Result<()> {
    if dims == 0 || dims > v.len() {
        return Err(data_err(
            "dimensions",
            format!("{dims}: the model's embeddings have {} (1 to {0})", v.len()),
        ));
    }
    v.truncate(dims);
    *v = l2_normalized(v);
    Ok(())
}

impl Embedder {
    /// Answers an OpenAI embeddings request: every input in one batched pass, the response
    /// object (`data[i].embedding` floats or base64, `usage`) with `model_id` as its model.
    pub async fn openai(&self, req: &EmbeddingRequest, model_id: &str) -> Result<Json> {
        let prefix = match req.prompt_name.as_ref().or(self.default_prompt.as_ref()) {
            Some(name) => self.prompt(name)?,
            None => "",
        };
        let tok = |s: &String| self.tokenize(&format!("{prefix}{s}"));
        let ids: Vec<Vec<u32>> = match &req.input {
            EmbeddingInput::One(s) => vec![tok(s)?],
            EmbeddingInput::Many(v) => v.iter().map(tok).collect::<Result<_>>()?,
            EmbeddingInput::Ids(v) => vec![v.clone()],
            EmbeddingInput::IdLists(v) => v.clone(),
        };
        if ids.is_empty() || ids.len() > MAX_INPUTS {
            return Err(data_err(
                "input",
                format!("{} inputs (1 to {MAX_INPUTS})", ids.len()),
            ));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(f) => {
                return Err(data_err(
                    "encoding_format",
                    format!("'{f}': float or base64"),
                ))
            }
        };
        let mut vs = self.embed_ids(&ids).await?;
        if let Some(d) = req.dimensions {
            for v in &mut vs {
                shorten(v, d)?;
            }
        }
        let tokens: usize = ids.iter().map(Vec::len).sum();
        let data: Vec<Json> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let e = if base64 {
                    use base64::Engine as _;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Json::from(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    serde_json::json!(v)
                };
                serde_json::json!({"object": "embedding", "index": i, "embedding": e})
            })
            .collect();
        Ok(serde_json::json!({
            "object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    }
}
