//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata. A value the
//! engine does not support is an error naming it.

use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::formats::gguf::{Gguf, Value};
use crate::kernels::elementwise::Act;
use serde_json::Value as Json;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` / GGUF `llama` (Llama 2/3, SmolLM, TinyLlama, Mistral).
    Llama,
    /// `Qwen2ForCausalLM` / GGUF `qwen2` (q/k/v biases).
    Qwen2,
    /// `Qwen3ForCausalLM` / GGUF `qwen3` (per-head q/k RMSNorm).
    Qwen3,
    /// `Gemma2ForCausalLM` / GGUF `gemma2` (sandwich norms, soft-capping, alternating windows).
    Gemma2,
    /// `Gemma3ForCausalLM` / GGUF `gemma3` (Gemma 2 without soft-capping, with q/k norms and
    /// local layers on their own rotary base).
    Gemma3,
    /// `Phi3ForCausalLM` / GGUF `phi3` (fused qkv_proj and gate_up_proj, LongRoPE).
    Phi3,
}

impl Arch {
    /// Gemma's layer: norms after attention and after the MLP too (`post_attention_layernorm`
    /// normalizes the attention output, not the MLP input), embeddings scaled by sqrt(hidden).
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// Rotary frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type = "llama3"`.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
    /// `rope_type = "linear"`: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// `rope_type = "longrope"` (Phi-3's "su"): per-frequency divisors, `short` for positions
    /// below `original_max` and `long` from there on, and cos/sin scaled by `attention_factor`.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        original_max: usize,
        attention_factor: f32,
    },
}

/// One rotary embedding: base, rotated dims of each head, scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    pub theta: f32,
    /// Rotated dims per head (`head_dim * partial_rotary_factor`); the rest pass through.
    pub dims: usize,
    pub scaling: Option<RopeScaling>,
}

impl Rotary {
    /// Inverse frequencies as transformers computes them (f32), scaling applied; LongRoPE's
    /// short factors (see [`Rotary::table`] for the long ones).
    pub fn inv_freq(&self) -> Vec<f32> {
        let base = crate::kernels::rope::inv_freq(self.dims, self.theta);
        match &self.scaling {
            None => base,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => crate::kernels::rope::llama3_inv_freq(
                &base,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings,
            ),
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::LongRope { short, .. }) => self.long_rope(short),
        }
    }

    /// `1 / (factor_i * theta^(2i / dims))`, in f32 as transformers' `_compute_longrope_parameters`.
    fn long_rope(&self, factors: &[f32]) -> Vec<f32> {
        (0..self.dims / 2)
            .map(|i| {
                let e = factors.get(i).copied().unwrap_or(1.0);
                1.0 / (e * self.theta.powf((2 * i) as f32 / self.dims as f32))
            })
            .collect()
    }

    /// The `[positions, dims / 2, 2]` cos/sin table of `inv_freq` (as [`Rotary::inv_freq`],
    /// or a GGUF's adjusted copy). LongRoPE: positions from `original_max` on use the long
    /// factors (what transformers uses once a sequence grows past it), and every entry is
    /// scaled by the attention factor.
    pub fn table(&self, inv_freq: &[f32], positions: usize) -> Vec<f32> {
        match &self.scaling {
            Some(RopeScaling::LongRope {
                long,
                original_max,
                attention_factor,
                ..
            }) => {
                let short_end = positions.min(*original_max);
                let mut t = crate::kernels::rope::table(inv_freq, positions);
                if positions > short_end {
                    let lt = crate::kernels::rope::table(&self.long_rope(long), positions);
                    let row = inv_freq.len() * 2;
                    t[short_end * row..].copy_from_slice(&lt[short_end * row..]);
                }
                t.iter_mut().for_each(|x| *x *= attention_factor);
                t
            }
            _ => crate::kernels::rope::table(inv_freq, positions),
        }
    }
}

/// Everything the graph builder needs to know about a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    /// The rotary embedding of full-attention layers (of every layer without `rope_local`).
    pub rope: Rotary,
    /// Gemma 3's sliding-window layers rotate with their own base.
    pub rope_local: Option<Rotary>,
    /// Keys a sliding-window layer sees (the query's own included), and which layers slide.
    pub sliding_window: Option<usize>,
    pub sliding_layers: Vec<bool>,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    /// GGUF llama files store Q/K rows permuted for interleaved rotary pairs.
    pub rope_interleaved: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// The MLP's gate activation (SiLU; Gemma's GELU-tanh).
    pub act: Act,
    /// Per-head RMSNorm of q and k before the rotation (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Added to every RMSNorm weight on load: Gemma's `(1 + w)` norms in a Hugging Face folder
    /// (llama.cpp's converter adds the 1 into the GGUF's weights).
    pub norm_offset: f32,
    /// Embeddings multiplied by this (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// Attention score scale (1 / sqrt(head_dim); Gemma: query_pre_attn_scalar^-0.5).
    pub attn_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
}

/// More decoder layers than any real checkpoint has (the largest have a few hundred): a
/// header claiming more is damaged, and per-layer tables are sized by it (found by fuzzing: a
/// 4-billion-layer GGUF header asked for 4 GB before any tensor was looked at).
const MAX_LAYERS: usize = 4096;

fn check_layers(layers: usize, key: &str) -> Result<usize> {
    if layers > MAX_LAYERS {
        return Err(Error::Data {
            name: key.into(),
            msg: format!("{layers} layers (a decoder has at most {MAX_LAYERS})"),
        });
    }
    Ok(layers)
}

/// A context length (`max_position_embeddings`, `{arch}.context_length`) that can hold a prompt
/// and a reply: at least 2 positions. A 0 in a damaged header would leave no KV-cache position.
fn check_context(positions: usize, key: &str) -> Result<usize> {
    if positions < 2 {
        return Err(Error::Data {
            name: key.into(),
            msg: format!(
                "a context of {positions} positions holds no prompt and reply (at least 2)"
            ),
        });
    }
    Ok(positions)
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported(what.into())
}

fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// A rotary embedding from a `rope_parameters` / `rope_scaling` object (`None`: no scaling
/// entry) and the defaults found beside it.
fn rotary_from(
    c: &Keys,
    params: Option<&Json>,
    theta: f32,
    dims: usize,
    max_positions: usize,
) -> Result<Rotary> {
    let s = match params {
        None | Some(Json::Null) => {
            return Ok(Rotary {
                theta,
                dims,
                scaling: None,
            })
        }
        Some(s) => s,
    };
    let theta = match s.get("rope_theta") {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| c.err(format!("rope_theta: {v} is not a number")))?
            as f32,
        None => theta,
    };
    let t = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| s.get(k).and_then(|v| v.as_f64());
    let need = |k: &str| {
        num(k)
            .map(|v| v as f32)
            .ok_or_else(|| unsupported(format!("{t} rope scaling without '{k}'")))
    };
    let factors = |k: &str| -> Result<Vec<f32>> {
        let a = s
            .get(k)
            .and_then(|v| v.as_array())
            .ok_or_else(|| unsupported(format!("{t} rope scaling without '{k}' (a list)")))?;
        let f: Vec<f32> = a
            .iter()
            .filter_map(|x| x.as_f64())
            .map(|x| x as f32)
            .collect();
        if f.len() != dims / 2 || a.len() != f.len() {
            return Err(c.err(format!(
                "rope scaling '{k}': {} numbers for {} frequencies",
                a.len(),
                dims / 2
            )));
        }
        Ok(f)
    };
    let scaling = match t {
        "default" => None,
        "llama3" => Some(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        }),
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "longrope" | "su" => {
            let original_max = num("original_max_position_embeddings")
                .or_else(|| {
                    c.get("original_max_position_embeddings")
                        .and_then(|v| v.as_f64())
                })
                .ok_or_else(|| {
                    unsupported("longrope scaling without 'original_max_position_embeddings'")
                })? as usize;
            let factor = num("factor").unwrap_or(max_positions as f64 / original_max.max(1) as f64);
            let attention_factor = match num("attention_factor") {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original_max as f64).ln()).sqrt(),
            } as f32;
            Some(RopeScaling::LongRope {
                short: factors("short_factor")?,
                long: factors("long_factor")?,
                original_max,
                attention_factor,
            })
        }
        other => {
            return Err(unsupported(format!(
                "rope scaling type '{other}' (supported: llama3, linear, longrope)"
            )))
        }
    };
    Ok(Rotary {
        theta,
        dims,
        scaling,
    })
}

impl LlmConfig {
    /// From `config.json` (and `generation_config.json` for EOS ids, when present).
    pub fn from_hf(config: &str, generation: Option<&str>) -> Result<LlmConfig> {
        let c = Keys::parse("config.json", config)?;
        let archs: Vec<&str> = c
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let named = archs
            .first()
            .copied()
            .or_else(|| c.get("model_type").and_then(|m| m.as_str()));
        let arch = match named {
            Some("LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral") => Arch::Llama,
            Some("Qwen2ForCausalLM" | "qwen2") => Arch::Qwen2,
            Some("Qwen3ForCausalLM" | "qwen3") => Arch::Qwen3,
            Some("Gemma2ForCausalLM" | "gemma2") => Arch::Gemma2,
            Some("Gemma3ForCausalLM" | "gemma3_text") => Arch::Gemma3,
            Some("Phi3ForCausalLM" | "phi3") => Arch::Phi3,
            Some(other) => return Err(unsupported(format!("architecture '{other}' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM)"))),
            None => return Err(unsupported("config.json names no architecture")),
        };
        if c.flag("mlp_bias", false)? {
            return Err(unsupported("mlp_bias = true (MLP projections with biases)"));
        }
        if c.flag("use_bidirectional_attention", false)? {
            return Err(unsupported(
                "use_bidirectional_attention = true (an encoder, not a decoder)",
            ));
        }
        // Gemma names the MLP activation `hidden_activation`; `hidden_act` elsewhere.
        let act_name = match c.get("hidden_activation") {
            Some(_) => c.text("hidden_activation", "")?,
            None => c.text("hidden_act", "silu")?,
        };
        let act = match act_name {
            "silu" | "swish" => Act::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Act::GeluTanh,
            "gelu" => Act::GeluErf,
            other => {
                return Err(unsupported(format!(
                    "hidden activation '{other}' (supported: silu, gelu, gelu_pytorch_tanh)"
                )))
            }
        };
        let hidden = c.need_count("hidden_size")?;
        let heads = c.need_count("num_attention_heads")?;
        let kv_heads = c.count("num_key_value_heads", heads)?;
        let head_dim = c.count("head_dim", hidden / heads)?;
        let layers = check_layers(c.need_count("num_hidden_layers")?, "num_hidden_layers")?;
        let max_positions = check_context(
            c.count("max_position_embeddings", 2048)?,
            "max_position_embeddings",
        )?;

        // Rotary: transformers 5 nests the settings in `rope_parameters` (per layer type for
        // Gemma 3); 4.x has rope_theta / rope_scaling / rope_local_base_freq at the top.
        let params = c.get("rope_parameters").filter(|v| v.is_object());
        let partial = params
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(|v| v.as_f64())
            .map_or_else(|| c.num("partial_rotary_factor", 1.0), Ok)?;
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(c.err(format!(
                "partial_rotary_factor = {partial}: must be in (0, 1]"
            )));
        }
        let dims = (head_dim as f64 * partial) as usize;
        let top_theta = c.num("rope_theta", if arch == Arch::Gemma3 { 1e6 } else { 1e4 })? as f32;
        let (global, local) = match params {
            Some(p)
                if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() =>
            {
                (
                    p.get("full_attention").cloned(),
                    p.get("sliding_attention").cloned(),
                )
            }
            Some(p) => (Some(p.clone()), None),
            None => (c.get("rope_scaling").cloned(), None),
        };
        let rope = rotary_from(&c, global.as_ref(), top_theta, dims, max_positions)?;
        let rope_local = if arch == Arch::Gemma3 {
            let theta = c.num("rope_local_base_freq", 10000.0)? as f32;
            Some(rotary_from(&c, local.as_ref(), theta, dims, max_positions)?)
        } else {
            None
        };

        // Sliding windows: `layer_types` (transformers 5) says which layers slide; older
        // configs imply it per architecture.
        let window = c.count("sliding_window", 0)?;
        let types = match c.get("layer_types") {
            Some(_) => Some(c.strings("layer_types")?),
            None => None,
        };
        let sliding_layers: Vec<bool> = match (&types, arch) {
            (Some(t), _) => {
                if t.len() != layers {
                    return Err(c.err(format!(
                        "layer_types lists {} layers, num_hidden_layers is {layers}",
                        t.len()
                    )));
                }
                t.iter()
                    .map(|x| match x.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(unsupported(format!(
                            "layer type '{other}' (supported: full_attention, sliding_attention)"
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
            (None, Arch::Gemma2) => (0..layers).map(|i| i % 2 == 0).collect(),
            (None, Arch::Gemma3) => {
                let n = c.count("sliding_window_pattern", 6)?.max(1);
                (0..layers).map(|i| (i + 1) % n != 0).collect()
            }
            (None, Arch::Qwen2 | Arch::Qwen3) => {
                let from = c.count("max_window_layers", layers)?;
                (0..layers)
                    .map(|i| c.flag("use_sliding_window", false).unwrap_or(false) && i >= from)
                    .collect()
            }
            (None, Arch::Llama | Arch::Phi3) => vec![true; layers],
        };
        // Qwen's configs carry a window with use_sliding_window = false: it does not apply.
        let qwen_off =
            matches!(arch, Arch::Qwen2 | Arch::Qwen3) && !c.flag("use_sliding_window", false)?;
        let sliding_window =
            (window > 0 && !qwen_off && sliding_layers.iter().any(|&s| s)).then_some(window);

        let gemma = arch.is_gemma();
        let softcap = |k: &str| -> Result<Option<f32>> {
            let v = c.num(k, 0.0)?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(c.err(format!("{k} = {v}: must be a positive number or null")));
            }
            Ok((v > 0.0).then_some(v as f32))
        };
        let attn_scale = if gemma {
            let q = c.num("query_pre_attn_scalar", 256.0)?;
            if !(q.is_finite() && q > 0.0) {
                return Err(c.err(format!("query_pre_attn_scalar = {q}: must be positive")));
            }
            q.powf(-0.5) as f32
        } else {
            (head_dim as f32).powf(-0.5)
        };
        let mut eos = ids(c.get("eos_token_id"));
        if let Some(g) = generation {
            let gj: Json = serde_json::from_str(g).map_err(|e| Error::Data {
                name: "generation_config.json".into(),
                msg: e.to_string(),
            })?;
            let ge = ids(gj.get("eos_token_id"));
            if !ge.is_empty() {
                eos = ge;
            }
        }
        let cfg = LlmConfig {
            arch,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate: c.need_count("intermediate_size")?,
            vocab: c.need_count("vocab_size")?,
            rms_eps: c.num("rms_norm_eps", 1e-6)? as f32,
            rope,
            rope_local,
            sliding_window,
            sliding_layers,
            max_positions,
            tie_embeddings: c.flag("tie_word_embeddings", gemma)?,
            rope_interleaved: false,
            bos: ids(c.get("bos_token_id")).first().copied(),
            eos,
            act,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            norm_offset: if gemma { 1.0 } else { 0.0 },
            // In the embedding's dtype, as transformers multiplies (f32 here).
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            attn_scale,
            // Gemma 3's config carries attn_logit_softcapping, but neither transformers nor
            // llama.cpp applies it: only Gemma 2 caps attention scores.
            attn_softcap: if arch == Arch::Gemma2 {
                softcap("attn_logit_softcapping")?
            } else {
                None
            },
            final_softcap: if gemma {
                softcap("final_logit_softcapping")?
            } else {
                None
            },
        };
        cfg.validate()
    }

    /// From GGUF metadata (`general.architecture`: llama, qwen2, qwen3, gemma2, gemma3, phi3),
    /// with llama.cpp's defaults for what a file leaves out.
    pub fn from_gguf(g: &Gguf) -> Result<LlmConfig> {
        let arch_name = g
            .require("general.architecture")?
            .as_str()
            .unwrap_or("")
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            other => {
                return Err(unsupported(format!(
                    "GGUF architecture '{other}' (supported: llama, qwen2, qwen3, gemma2, gemma3, phi3)"
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| -> Result<usize> {
            g.require(&key(k))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::Data {
                    name: key(k),
                    msg: "not an integer".into(),
                })
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let layers = check_layers(u("block_count")?, &key("block_count"))?;
        let f = |k: &str| g.get(&key(k)).and_then(|v| v.as_f64());
        let tokens = g
            .require("tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        let vocab = u("vocab_size").unwrap_or(tokens);
        let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        // The end-of-turn token of chat formats, which llama.cpp also stops at (by its text)
        // when the file does not name it.
        let turn_end = match arch {
            Arch::Gemma2 | Arch::Gemma3 => Some("<end_of_turn>"),
            Arch::Phi3 => Some("<|end|>"),
            _ => None,
        };
        if let Some(t) = turn_end {
            let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
            if let Some(i) = tokens
                .and_then(|a| a.strs())
                .and_then(|mut s| s.position(|x| x == t))
            {
                if !eos.contains(&(i as u32)) {
                    eos.push(i as u32);
                }
            }
        }
        let max_positions =
            check_context(u("context_length").unwrap_or(2048), &key("context_length"))?;
        let dims = u("rope.dimension_count").unwrap_or(head_dim);
        let theta = f("rope.freq_base").unwrap_or(10000.0) as f32;
        // llama.cpp keeps llama3 scaling as a `rope_freqs.weight` tensor of divisors and
        // Phi-3's LongRoPE factors as tensors too (applied by LlmWeights::load); linear scaling
        // is a key.
        let scaling = match g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("linear") => f("rope.scaling.factor")
                .filter(|&x| x > 0.0 && x != 1.0)
                .map(|factor| RopeScaling::Linear {
                    factor: factor as f32,
                }),
            // Phi-3: the factor lists are the tensors rope_factors_short/long (LlmWeights::load).
            _ if g
                .tensor_names
                .iter()
                .any(|n| n == "rope_factors_long.weight") =>
            {
                let original_max =
                    u("rope.scaling.original_context_length").unwrap_or(max_positions);
                let factor = max_positions as f64 / original_max.max(1) as f64;
                let attention_factor = f("rope.scaling.attn_factor").unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original_max as f64).ln()).sqrt()
                }) as f32;
                Some(RopeScaling::LongRope {
                    short: Vec::new(),
                    long: Vec::new(),
                    original_max,
                    attention_factor,
                })
            }
            _ => None,
        };
        let rope = Rotary {
            theta,
            dims,
            scaling,
        };
        // Sliding windows as llama.cpp reads them: a window size and a per-layer pattern (a
        // list of flags, or n: every n-th layer is global), with these defaults per architecture.
        let (default_window, default_pattern) = match arch {
            Arch::Gemma2 => (4096, 2),
            Arch::Gemma3 => (0, 6),
            _ => (0, 0),
        };
        let window = u("attention.sliding_window").unwrap_or(default_window);
        let pattern_key = key("attention.sliding_window_pattern");
        let sliding_layers: Vec<bool> = match g.get(&pattern_key) {
            Some(Value::Array(a)) => {
                let flags: Vec<bool> = a.values().map(|v| v == Value::Bool(true)).collect();
                if flags.len() != layers {
                    return Err(Error::Data {
                        name: pattern_key,
                        msg: format!("{} flags for {layers} layers", flags.len()),
                    });
                }
                flags
            }
            other => {
                let n = other.and_then(|v| v.as_u64()).unwrap_or(default_pattern) as usize;
                (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
            }
        };
        // llama.cpp leaves Phi-3's window off ("Phi SWA is currently disabled"): so does Kiln,
        // to answer as the engine that wrote the file does.
        let sliding_window = (window > 0 && arch != Arch::Phi3).then_some(window);
        let gemma = arch.is_gemma();
        let rope_local = (arch == Arch::Gemma3).then(|| Rotary {
            theta: f("rope.freq_base_swa").unwrap_or(10000.0) as f32,
            dims,
            scaling: None,
        });
        let softcap = |k: &str, default: f64| {
            let v = f(k).unwrap_or(default);
            (v > 0.0).then_some(v as f32)
        };
        // llama.cpp: 1/sqrt(head_dim), except Gemma 2/3 27B's 1/sqrt(hidden / heads).
        let big_gemma =
            (arch == Arch::Gemma2 && layers == 46) || (arch == Arch::Gemma3 && layers == 62);
        let attn_scale = if big_gemma {
            ((hidden / heads.max(1)) as f32).powf(-0.5)
        } else {
            (head_dim as f32).powf(-0.5)
        };
        let cfg = LlmConfig {
            arch,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate: u("feed_forward_length")?,
            vocab,
            rms_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope,
            rope_local,
            sliding_window,
            sliding_layers,
            max_positions,
            tie_embeddings: g.tensor_names.iter().all(|n| n != "output.weight"),
            rope_interleaved: arch == Arch::Llama,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            act: if gemma { Act::GeluTanh } else { Act::Silu },
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            norm_offset: 0.0,
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            attn_scale,
            attn_softcap: if arch == Arch::Gemma2 {
                softcap("attn_logit_softcapping", 50.0)
            } else {
                None
            },
            final_softcap: match arch {
                Arch::Gemma2 => softcap("final_logit_softcapping", 30.0),
                Arch::Gemma3 => softcap("final_logit_softcapping", 0.0),
                _ => None,
            },
        };
        cfg.validate()
    }

    /// From the first bytes of a `.gguf` file (a browser fetches only those to size a model):
    /// `None` when `prefix` ends inside the metadata (read more and ask again).
    pub fn from_gguf_prefix(name: &str, prefix: &[u8]) -> Result<Option<LlmConfig>> {
        Gguf::parse_metadata(name, prefix)?
            .map(|g| LlmConfig::from_gguf(&g))
            .transpose()
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// The rotary embedding of layer `i`: 0 the global one, 1 `rope_local`.
    pub fn rope_index(&self, layer: usize) -> usize {
        usize::from(
            self.rope_local.is_some() && self.sliding_layers.get(layer).copied().unwrap_or(false),
        )
    }

    fn validate(self) -> Result<Self> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(unsupported(format!(
                "{} heads with {} kv heads (heads must be a multiple of kv heads)",
                self.heads, self.kv_heads
            )));
        }
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.head_dim > crate::kernels::attention::MAX_HEAD_DIM
        {
            return Err(unsupported(format!(
                "head_dim {} (even, at most {})",
                self.head_dim,
                crate::kernels::attention::MAX_HEAD_DIM
            )));
        }
        if self.hidden == 0 || self.layers == 0 || self.vocab == 0 || self.intermediate == 0 {
            return Err(unsupported(format!(
                "degenerate sizes: hidden {}, layers {}, vocab {}, intermediate {}",
                self.hidden, self.layers, self.vocab, self.intermediate
            )));
        }
        // Values that would run as silent garbage (all-equal logits, NaN norms).
        let bad = |what: &str, v: f32, want: &str| {
            Err(Error::Data {
                name: "model config".into(),
                msg: format!("{what} = {v}: {want}"),
            })
        };
        for r in std::iter::once(&self.rope).chain(&self.rope_local) {
            if !(r.theta.is_finite() && r.theta > 1.0) {
                return bad(
                    "rope_theta",
                    r.theta,
                    "the rotary base must be a finite number > 1",
                );
            }
            if r.dims == 0 || !r.dims.is_multiple_of(2) || r.dims > self.head_dim {
                return Err(unsupported(format!(
                    "{} rotary dims of head_dim {} (an even number, at most head_dim)",
                    r.dims, self.head_dim
                )));
            }
            let ok = match &r.scaling {
                None => true,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => {
                    [
                        *factor,
                        *low_freq_factor,
                        *high_freq_factor,
                        *original_max_position_embeddings,
                    ]
                    .iter()
                    .all(|x| x.is_finite() && *x > 0.0)
                        && high_freq_factor > low_freq_factor
                }
                Some(RopeScaling::Linear { factor }) => factor.is_finite() && *factor > 0.0,
                Some(RopeScaling::LongRope {
                    short,
                    long,
                    original_max,
                    attention_factor,
                }) => {
                    short.iter().chain(long).all(|x| x.is_finite() && *x > 0.0)
                        && *original_max > 0
                        && attention_factor.is_finite()
                        && *attention_factor > 0.0
                }
            };
            if !ok {
                return Err(Error::Data {
                    name: "model config".into(),
                    msg: format!("rope scaling {:?}: factors must be positive and finite (llama3: high_freq_factor > low_freq_factor)", r.scaling),
                });
            }
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad("rms_norm_eps", self.rms_eps, "must be a finite number >= 0");
        }
        if !(self.attn_scale.is_finite() && self.attn_scale > 0.0) {
            return bad(
                "attention scale",
                self.attn_scale,
                "must be a positive number",
            );
        }
        if self.sliding_layers.len() != self.layers {
            return Err(Error::Data {
                name: "model config".into(),
                msg: format!(
                    "{} sliding-window flags for {} layers",
                    self.sliding_layers.len(),
                    self.layers
                ),
            });
        }
        Ok(self)
    }

    /// Rotary inverse frequencies of the global rotary embedding (scaling applied).
    pub fn inv_freq(&self) -> Vec<f32> {
        self.rope.inv_freq()
    }
}
