//! Loading a checkpoint's tensors onto the GPU under one naming scheme (Hugging Face's), from
//! safetensors or GGUF. Quantization is a dtype: `--quantize q4|q8` turns f32/f16/bf16
//! matrices into Q4_0/Q8_0 blocks on load; 1-D tensors (norms, biases) become f32.

use super::config::{Arch, LlmConfig};
use crate::device::Gpu;
use crate::dtype::{dequantize, quantize, DType};
use crate::error::{Error, Result};
use crate::formats::{RawTensor, TensorSource};
use crate::tensor::Tensor;
use std::sync::Arc;

/// On-load quantization of float matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quantize {
    #[default]
    None,
    Q4,
    Q8,
}

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

/// The checkpoint's name for a tensor given its Hugging Face name.
fn gguf_name(hf: &str) -> String {
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

struct Loader<'a> {
    gpu: &'a Gpu,
    src: &'a dyn TensorSource,
    gguf: bool,
    quantize: Quantize,
}

impl Loader<'_> {
    fn raw(&self, hf: &str) -> Option<RawTensor<'_>> {
        if self.gguf {
            self.src.tensor(&gguf_name(hf))
        } else {
            self.src.tensor(hf)
        }
    }

    fn missing(&self, hf: &str) -> Error {
        let n = if self.gguf {
            gguf_name(hf)
        } else {
            hf.to_string()
        };
        Error::Data {
            name: self.src.describe(),
            msg: format!("missing tensor '{n}'"),
        }
    }

    /// A tensor that must have `shape`.
    fn load(&self, hf: &str, shape: &[usize]) -> Result<Arc<Tensor>> {
        let raw = self.raw(hf).ok_or_else(|| self.missing(hf))?;
        self.upload(hf, raw, shape).map(Arc::new)
    }

    fn optional(&self, hf: &str, shape: &[usize]) -> Result<Option<Arc<Tensor>>> {
        match self.raw(hf) {
            Some(raw) => Ok(Some(Arc::new(self.upload(hf, raw, shape)?))),
            None => Ok(None),
        }
    }

    fn upload(&self, hf: &str, raw: RawTensor<'_>, shape: &[usize]) -> Result<Tensor> {
        if raw.shape != shape {
            return Err(Error::Data {
                name: format!("{}: '{hf}'", self.src.describe()),
                msg: format!("shape {:?}, expected {shape:?}", raw.shape),
            });
        }
        let n: usize = shape.iter().product();
        let float = matches!(raw.dtype, DType::F32 | DType::F16 | DType::BF16);
        if shape.len() == 1 && raw.dtype != DType::F32 {
            let v = dequantize(raw.dtype, raw.data, n)?;
            return Tensor::from_f32(self.gpu, hf, shape, &v);
        }
        let k = shape.last().copied().unwrap_or(1);
        let target = match self.quantize {
            Quantize::Q4 if float && shape.len() == 2 && k % 32 == 0 => Some(DType::Q4_0),
            Quantize::Q8 if float && shape.len() == 2 && k % 32 == 0 => Some(DType::Q8_0),
            _ => None,
        };
        match target {
            Some(dt) => {
                let q = quantize(dt, &dequantize(raw.dtype, raw.data, n)?)?;
                Tensor::upload(self.gpu, hf, shape, dt, &q)
            }
            None => Tensor::upload(self.gpu, hf, shape, raw.dtype, raw.data),
        }
    }
}

impl LlmWeights {
    /// Uploads every tensor the architecture needs, checking names and shapes.
    pub fn load(
        gpu: &Gpu,
        cfg: &LlmConfig,
        src: &dyn TensorSource,
        gguf: bool,
        quantize: Quantize,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LlmWeights> {
        let l = Loader {
            gpu,
            src,
            gguf,
            quantize,
        };
        let (h, d, kv) = (cfg.hidden, cfg.head_dim, cfg.kv_heads);
        let total = cfg.layers + 2;
        let embed = l.load("model.embed_tokens.weight", &[cfg.vocab, h])?;
        on_progress(1, total);
        let mut layers = Vec::with_capacity(cfg.layers);
        let bias = cfg.arch == Arch::Qwen2;
        for i in 0..cfg.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let b = |s: &str, n: usize| -> Result<Option<Arc<Tensor>>> {
                if bias {
                    l.load(&p(s), &[n]).map(Some)
                } else {
                    l.optional(&p(s), &[n])
                }
            };
            layers.push(LayerWeights {
                attn_norm: l.load(&p("input_layernorm.weight"), &[h])?,
                wq: l.load(&p("self_attn.q_proj.weight"), &[cfg.heads * d, h])?,
                wk: l.load(&p("self_attn.k_proj.weight"), &[kv * d, h])?,
                wv: l.load(&p("self_attn.v_proj.weight"), &[kv * d, h])?,
                bq: b("self_attn.q_proj.bias", cfg.heads * d)?,
                bk: b("self_attn.k_proj.bias", kv * d)?,
                bv: b("self_attn.v_proj.bias", kv * d)?,
                wo: l.load(&p("self_attn.o_proj.weight"), &[h, cfg.heads * d])?,
                bo: l.optional(&p("self_attn.o_proj.bias"), &[h])?,
                ffn_norm: l.load(&p("post_attention_layernorm.weight"), &[h])?,
                w_gate: l.load(&p("mlp.gate_proj.weight"), &[cfg.intermediate, h])?,
                w_up: l.load(&p("mlp.up_proj.weight"), &[cfg.intermediate, h])?,
                w_down: l.load(&p("mlp.down_proj.weight"), &[h, cfg.intermediate])?,
            });
            on_progress(i + 2, total);
        }
        let norm = l.load("model.norm.weight", &[h])?;
        // Tied embeddings: no separate head in the checkpoint, the embedding serves both.
        let lm_head = if cfg.tie_embeddings {
            embed.clone()
        } else {
            l.load("lm_head.weight", &[cfg.vocab, h])?
        };
        let mut freqs = cfg.inv_freq();
        if let Some(raw) = src.tensor("rope_freqs.weight") {
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
