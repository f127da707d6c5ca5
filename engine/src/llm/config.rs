//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata. A value the
//! engine does not support is an error naming it.

use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::formats::gguf::Gguf;
use serde_json::Value as Json;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` / GGUF `llama` (Llama 2/3, SmolLM, TinyLlama, Mistral without sliding window).
    Llama,
    /// `Qwen2ForCausalLM` / GGUF `qwen2` (q/k/v biases).
    Qwen2,
}

/// Llama-3 rotary frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
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
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    /// GGUF llama files store Q/K rows permuted for interleaved rotary pairs.
    pub rope_interleaved: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
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

impl LlmConfig {
    /// From `config.json` (and `generation_config.json` for EOS ids, when present).
    pub fn from_hf(config: &str, generation: Option<&str>) -> Result<LlmConfig> {
        let c = Keys::parse("config.json", config)?;
        let archs: Vec<&str> = c
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let arch = match archs.first().copied().or_else(|| c.get("model_type").and_then(|m| m.as_str())) {
            Some("LlamaForCausalLM") | Some("MistralForCausalLM") | Some("llama") | Some("mistral") => Arch::Llama,
            Some("Qwen2ForCausalLM") | Some("qwen2") => Arch::Qwen2,
            Some(other) => return Err(unsupported(format!("architecture '{other}' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"))),
            None => return Err(unsupported("config.json names no architecture")),
        };
        if c.get("sliding_window").is_some() {
            let w = c.count("sliding_window", 0)?;
            let max = c.count("max_position_embeddings", 0)?;
            let used = c.flag("use_sliding_window", arch == Arch::Llama)?;
            if used && w < max {
                return Err(unsupported(format!(
                    "sliding_window = {w} (sliding-window attention is not supported)"
                )));
            }
        }
        if c.flag("mlp_bias", false)? {
            return Err(unsupported("mlp_bias = true (MLP projections with biases)"));
        }
        let act = c.text("hidden_act", "silu")?;
        if act != "silu" {
            return Err(unsupported(format!("hidden_act '{act}' (only silu)")));
        }
        let hidden = c.need_count("hidden_size")?;
        let heads = c.need_count("num_attention_heads")?;
        let kv_heads = c.count("num_key_value_heads", heads)?;
        let head_dim = c.count("head_dim", hidden / heads)?;
        // transformers 5 nests rope settings in `rope_parameters`; 4.x has them at the top.
        let rope = c
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| c.get("rope_scaling"));
        let rope_theta = match c.get("rope_parameters").and_then(|r| r.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| c.err(format!("rope_parameters.rope_theta: {v} is not a number")))?,
            None => c.num("rope_theta", 10000.0)?,
        } as f32;
        let rope_scaling = match rope {
            None | Some(Json::Null) => None,
            Some(s) => {
                let t = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                match t {
                    "llama3" => {
                        let f = |k: &str| {
                            s.get(k)
                                .and_then(|v| v.as_f64())
                                .map(|v| v as f32)
                                .ok_or_else(|| unsupported(format!("rope_scaling without '{k}'")))
                        };
                        Some(Llama3Scaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f(
                                "original_max_position_embeddings",
                            )?,
                        })
                    }
                    "default" => None,
                    other => {
                        return Err(unsupported(format!(
                            "rope_scaling type '{other}' (only llama3)"
                        )))
                    }
                }
            }
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
            layers: c.need_count("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            intermediate: c.need_count("intermediate_size")?,
            vocab: c.need_count("vocab_size")?,
            rms_eps: c.num("rms_norm_eps", 1e-6)? as f32,
            rope_theta,
            rope_scaling,
            max_positions: c.count("max_position_embeddings", 2048)?,
            tie_embeddings: c.flag("tie_word_embeddings", false)?,
            rope_interleaved: false,
            bos: ids(c.get("bos_token_id")).first().copied(),
            eos,
        };
        cfg.validate()
    }

    /// From GGUF metadata (`general.architecture` = llama or qwen2).
    pub fn from_gguf(g: &Gguf) -> Result<LlmConfig> {
        let arch_name = g
            .require("general.architecture")?
            .as_str()
            .unwrap_or("")
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(unsupported(format!(
                    "GGUF architecture '{other}' (supported: llama, qwen2)"
                )))
            }
        };
        let u = |k: &str| -> Result<usize> {
            g.require(&format!("{arch_name}.{k}"))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::Data {
                    name: k.into(),
                    msg: "not an integer".into(),
                })
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let f = |k: &str, d: f64| {
            g.get(&format!("{arch_name}.{k}"))
                .and_then(|v| v.as_f64())
                .unwrap_or(d) as f32
        };
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
        let cfg = LlmConfig {
            arch,
            hidden,
            layers: u("block_count")?,
            heads,
            kv_heads,
            head_dim,
            intermediate: u("feed_forward_length")?,
            vocab,
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: f("rope.freq_base", 10000.0),
            // llama.cpp stores llama3 scaling as a `rope_freqs.weight` tensor of divisors.
            rope_scaling: None,
            max_positions: u("context_length").unwrap_or(2048),
            tie_embeddings: g.tensor_names.iter().all(|n| n != "output.weight"),
            rope_interleaved: arch == Arch::Llama,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
        };
        cfg.validate()
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
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(
                "rope_theta",
                self.rope_theta,
                "the rotary base must be a finite number > 1",
            );
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad("rms_norm_eps", self.rms_eps, "must be a finite number >= 0");
        }
        if let Some(s) = self.rope_scaling {
            let f = [
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings,
            ];
            if f.iter().any(|x| !(x.is_finite() && *x > 0.0))
                || s.high_freq_factor <= s.low_freq_factor
            {
                return bad(
                    "rope_scaling factor",
                    s.factor,
                    "llama3 scaling needs positive factors and high_freq_factor > low_freq_factor",
                );
            }
        }
        Ok(self)
    }

    /// Rotary inverse frequencies (with llama3 scaling when configured).
    pub fn inv_freq(&self) -> Vec<f32> {
        let base = crate::kernels::rope::inv_freq(self.head_dim, self.rope_theta);
        match self.rope_scaling {
            Some(s) => crate::kernels::rope::llama3_inv_freq(
                &base,
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings,
            ),
            None => base,
        }
    }
}
