//! A decoder's tensors under Hugging Face's names, through the one loader
//! ([`crate::weights`]): safetensors as they are, GGUF through [`gguf_name`]. Every tensor is
//! shape-checked against the config.

use super::config::{Arch, LlmConfig};
use crate::dtype::dequantize;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::Weights;
use std::sync::Arc;

/// Weights of one decoder layer.
pub struct LayerWeights {
    pub attn_norm: Arc<Tensor>,
    pub wq: Arc<Tensor>,
    pub wk: Arc<Tensor>,
    pub wv: Arc<Tensor>,
    pub bq: Option<Arc<Tensor>>,
    pub bk: Option<Arc<Tensor>>,
    pub bv: Option<Arc<Tensor>>,
    pub wo: Arc<Tensor>,
    pub bo: Option<Arc<Tensor>>,
    pub ffn_norm: Arc<Tensor>,
    pub w_gate: Arc<Tensor>,
    pub w_up: Arc<Tensor>,
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
            let b = |s: &str, n: usize| -> Result<Option<Arc<Tensor>>> {
                if bias {
                    attn.get(s, &[n]).map(Some)
                } else {
                    attn.optional(s, &[n])
                }
            };
            layers.push(LayerWeights {
                attn_norm: l.get("input_layernorm.weight", &[h])?,
                wq: attn.get("q_proj.weight", &[cfg.heads * d, h])?,
                wk: attn.get("k_proj.weight", &[kv * d, h])?,
                wv: attn.get("v_proj.weight", &[kv * d, h])?,
                bq: b("q_proj.bias", cfg.heads * d)?,
                bk: b("k_proj.bias", kv * d)?,
                bv: b("v_proj.bias", kv * d)?,
                wo: attn.get("o_proj.weight", &[h, cfg.heads * d])?,
                bo: attn.optional("o_proj.bias", &[h])?,
                ffn_norm: l.get("post_attention_layernorm.weight", &[h])?,
                w_gate: mlp.get("gate_proj.weight", &[cfg.intermediate, h])?,
                w_up: mlp.get("up_proj.weight", &[cfg.intermediate, h])?,
                w_down: mlp.get("down_proj.weight", &[h, cfg.intermediate])?,
            });
            on_progress(i + 2, total);
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
