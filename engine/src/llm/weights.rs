//! A decoder's tensors under Hugging Face's names, through the one loader
//! ([`crate::weights`]): safetensors as they are, GGUF through [`gguf_name`]. Every tensor is
//! shape-checked against the config.

use super::config::{Arch, LlmConfig};
use crate::dtype::dequantize;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::Weights;
use std::sync::Arc;

/// Projections a layer applies to the same input: stacked by rows into one matrix (one product)
/// when the checkpoint stores them in one dtype, else apart (a GGUF may quantize Q, K and V
/// differently).
pub enum Stacked {
    One {
        w: Arc<Tensor>,
        bias: Option<Arc<Tensor>>,
    },
    Apart(Vec<(Arc<Tensor>, Option<Arc<Tensor>>)>),
}

/// Weights of one decoder layer.
pub struct LayerWeights {
    pub attn_norm: Arc<Tensor>,
    /// q_proj, k_proj, v_proj (rows in that order).
    pub qkv: Stacked,
    pub wo: Arc<Tensor>,
    pub bo: Option<Arc<Tensor>>,
    pub ffn_norm: Arc<Tensor>,
    /// gate_proj, up_proj.
    pub gate_up: Stacked,
    pub w_down: Arc<Tensor>,
}

/// All weights of a model, on the GPU, and the rotary frequencies (with any scaling the config
/// or a GGUF `rope_freqs.weight` applies) from which the KV cache makes its cos/sin table.
pub struct LlmWeights {
    pub embed: Arc<Tensor>,
    pub layers: Vec<LayerWeights>,
    pub norm: Arc<Tensor>,
    pub lm_head: Arc<Tensor>,
    pub inv_freq: Vec<f32>,
}

/// GGUF's name (llama.cpp's) for a tensor given its Hugging Face name.
pub fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        return hf.to_string();
    };
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let t = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => other,
    };
    format!("blk.{layer}.{t}")
}

impl LlmWeights {
    /// Uploads every tensor the architecture needs, checking names and shapes.
    pub fn load(
        w: &Weights,
        cfg: &LlmConfig,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LlmWeights> {
        let (h, d, kv) = (cfg.hidden, cfg.head_dim, cfg.kv_heads);
        let total = cfg.layers + 2;
        let root = w.root();
        let model = root.pp("model");
        let embed = model.get("embed_tokens.weight", &[cfg.vocab, h])?;
        on_progress(1, total);
        let mut layers = Vec::with_capacity(cfg.layers);
        let bias = cfg.arch == Arch::Qwen2;
        for i in 0..cfg.layers {
            let l = model.pp("layers").pp(i);
            let (attn, mlp) = (l.pp("self_attn"), l.pp("mlp"));
            let qkv_rows = [cfg.heads * d, kv * d, kv * d];
            let qkv = ["q_proj", "k_proj", "v_proj"];
            let has_bias = bias || attn.has("q_proj.bias");
            let weights: Vec<String> = qkv.iter().map(|n| format!("{n}.weight")).collect();
            let biases: Vec<String> = qkv.iter().map(|n| format!("{n}.bias")).collect();
            let (wn, bn): (Vec<&str>, Vec<&str>) = (
                weights.iter().map(String::as_str).collect(),
                biases.iter().map(String::as_str).collect(),
            );
            let stacked = attn.get_stacked(&wn, &qkv_rows.map(|r| [r, h]))?;
            let qkv = match stacked {
                Some(w) => Stacked::One {
                    w,
                    bias: if has_bias {
                        Some(attn.get_stacked_f32(&bn, &qkv_rows)?)
                    } else {
                        None
                    },
                },
                None => Stacked::Apart(
                    (0..3)
                        .map(|i| {
                            let w = attn.get(&weights[i], &[qkv_rows[i], h])?;
                            let b = if has_bias {
                                Some(attn.get(&biases[i], &[qkv_rows[i]])?)
                            } else {
                                None
                            };
                            Ok((w, b))
                        })
                        .collect::<Result<_>>()?,
                ),
            };
            let inter = cfg.intermediate;
            let gu = mlp.get_stacked(&["gate_proj.weight", "up_proj.weight"], &[[inter, h]; 2])?;
            let gate_up = match gu {
                Some(w) => Stacked::One { w, bias: None },
                None => Stacked::Apart(vec![
                    (mlp.get("gate_proj.weight", &[inter, h])?, None),
                    (mlp.get("up_proj.weight", &[inter, h])?, None),
                ]),
            };
            layers.push(LayerWeights {
                attn_norm: l.get("input_layernorm.weight", &[h])?,
                qkv,
                wo: attn.get("o_proj.weight", &[h, cfg.heads * d])?,
                bo: attn.optional("o_proj.bias", &[h])?,
                ffn_norm: l.get("post_attention_layernorm.weight", &[h])?,
                gate_up,
                w_down: mlp.get("down_proj.weight", &[h, inter])?,
            });
            on_progress(i + 2, total);
        }
        // A config claiming fewer layers than the checkpoint holds would silently skip some.
        let extra = model.pp("layers").pp(cfg.layers);
        if extra.has("input_layernorm.weight") {
            return Err(Error::Data {
                name: w.describe(),
                msg: format!(
                    "the checkpoint holds layer {n} ('{}') but the config says {n} layers (num_hidden_layers / block_count)",
                    w.file_name(&extra.path("input_layernorm.weight")),
                    n = cfg.layers
                ),
            });
        }
        let norm = model.get("norm.weight", &[h])?;
        // Tied embeddings: no separate head in the checkpoint, the embedding serves both.
        let lm_head = if cfg.tie_embeddings {
            embed.clone()
        } else {
            root.get("lm_head.weight", &[cfg.vocab, h])?
        };
        let mut freqs = cfg.inv_freq();
        if let Some(raw) = w.raw("rope_freqs.weight") {
            let f = dequantize(raw.dtype, raw.data, raw.shape.iter().product())?;
            if f.len() != freqs.len() {
                return Err(Error::Data {
                    name: "rope_freqs.weight".into(),
                    msg: format!("{} factors for {} frequencies", f.len(), freqs.len()),
                });
            }
            freqs.iter_mut().zip(&f).for_each(|(a, b)| *a /= b);
        }
        on_progress(total, total);
        Ok(LlmWeights {
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: freqs,
        })
    }
}
