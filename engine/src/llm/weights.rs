//! A decoder's tensors under Hugging Face's names, through the one loader
//! ([`crate::weights`]): safetensors as they are, GGUF through [`gguf_name`]. Every tensor is
//! shape-checked against the config.

use super::config::{Arch, LinearAttn, LlmConfig, Moe, RopeScaling, Rotary};
use crate::dtype::dequantize;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::{RowPart, VarBuilder, Weights};
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

/// Per-head q/k norm weights (Qwen3, Gemma 3): one f32 `[2 d]` (q_norm, k_norm) for a stacked
/// projection, or the two `[d]` vectors when Q/K/V are apart, or the query's alone (a Gemma 4
/// layer reading another layer's keys and values).
pub enum QkNorms {
    Stacked(Arc<Tensor>),
    Apart(Arc<Tensor>, Arc<Tensor>),
    Query(Arc<Tensor>),
}

/// The token mixer of a layer: attention over the KV cache, or Qwen 3.5's linear attention.
pub enum Mixer {
    Attention(AttnWeights),
    Linear(DeltaWeights),
}

/// An attention layer's projections.
pub struct AttnWeights {
    /// q_proj, k_proj, v_proj (rows in that order).
    pub qkv: Stacked,
    pub qk_norm: Option<QkNorms>,
    pub wo: Arc<Tensor>,
    pub bo: Option<Arc<Tensor>>,
    /// Qwen 3.5: the output gate's projection (the gate halves of q_proj's heads).
    pub gate: Option<Arc<Tensor>>,
    /// Gemma 4: the value norm's weight (ones: the norm has none).
    pub v_norm: Option<Arc<Tensor>>,
}

/// Gemma 4's per-layer input embeddings: a token table of every layer's inputs, the projection
/// of the embeddings to them and its norm.
pub struct PerLayerInputs {
    /// embed_tokens_per_layer `[vocab, layers * dim]`.
    pub embed: Arc<Tensor>,
    /// per_layer_model_projection `[layers * dim, hidden]`.
    pub proj: Arc<Tensor>,
    /// per_layer_projection_norm `[dim]`.
    pub norm: Arc<Tensor>,
}

/// A Gemma 4 layer's use of its per-layer input: gate, projection back, norm.
pub struct PerLayerBlock {
    /// per_layer_input_gate `[dim, hidden]`.
    pub gate: Arc<Tensor>,
    /// per_layer_projection `[hidden, dim]`.
    pub proj: Arc<Tensor>,
    /// post_per_layer_input_norm `[hidden]`.
    pub norm: Arc<Tensor>,
}

/// A Gated DeltaNet layer (Qwen 3.5's `linear_attn`).
pub struct DeltaWeights {
    /// in_proj_qkv, in_proj_z, in_proj_b, in_proj_a: one product `[proj_width, h]` when their
    /// dtypes agree.
    pub proj: Stacked,
    /// conv1d.weight `[channels, 1, taps]`, f32.
    pub conv: Arc<Tensor>,
    /// `-exp(A_log)` `[v_heads]`, f32.
    pub a: Arc<Tensor>,
    /// dt_bias `[v_heads]`.
    pub dt_bias: Arc<Tensor>,
    /// The gated RMSNorm's weight `[v_dim]` (plain, not `1 + w`).
    pub norm: Arc<Tensor>,
    /// out_proj `[h, v_heads v_dim]`.
    pub out: Arc<Tensor>,
}

/// A mixture-of-experts block: the router, the experts, and how they sit beside the layer's
/// dense MLP ([`MoeKind`]).
pub struct MoeWeights {
    /// The router `[experts, h]` (Gemma 4's router.proj, Qwen's mlp.gate).
    pub router: Arc<Tensor>,
    /// Each expert's weight factor `[experts]`, f32 (Gemma 4's router.per_expert_scale; ones).
    pub expert_scale: Arc<Tensor>,
    /// experts.gate_up_proj `[experts, 2 width, h]` (each expert's gate rows, then up rows).
    pub gate_up: Arc<Tensor>,
    /// experts.down_proj `[experts, h, width]`.
    pub down: Arc<Tensor>,
    pub kind: MoeKind,
}

/// Where a mixture-of-experts block reads and how its output joins the dense MLP's.
pub enum MoeKind {
    /// Gemma 4: router and experts read the residual, each through a norm of its own (the
    /// router's weight: router.scale times `hidden^-1/2`; pre_feedforward_layernorm_2); the
    /// experts' sum is normed (post_feedforward_layernorm_2) and added to the dense MLP's
    /// output normed by post_feedforward_layernorm_1.
    Gemma4 {
        router_norm: Arc<Tensor>,
        pre_norm: Arc<Tensor>,
        post_norm: Arc<Tensor>,
        post_mlp_norm: Arc<Tensor>,
    },
    /// Qwen 3.5 MoE: router and experts read the MLP's (normed) input; the dense MLP is a shared
    /// expert, scaled by `sigmoid(gate . x)` (shared_expert_gate `[1, h]`).
    SharedExpert { gate: Arc<Tensor> },
}

/// Weights of one decoder layer.
pub struct LayerWeights {
    pub attn_norm: Arc<Tensor>,
    pub mixer: Mixer,
    /// Gemma: the norm of the attention output before the residual add.
    pub post_attn_norm: Option<Arc<Tensor>>,
    pub ffn_norm: Arc<Tensor>,
    /// gate_proj, up_proj.
    pub gate_up: Stacked,
    pub w_down: Arc<Tensor>,
    /// Gemma: the norm of the MLP output before the residual add.
    pub post_ffn_norm: Option<Arc<Tensor>>,
    /// Gemma 4: the mixture-of-experts block.
    pub moe: Option<MoeWeights>,
    /// Gemma 4: the per-layer input block, and the layer's output scale (`layer_scalar`).
    pub per_layer: Option<PerLayerBlock>,
    pub scale: Option<f32>,
}

/// All weights of a model, on the GPU, and each rotary embedding (global, then Gemma 3's local
/// one) with its inverse frequencies (any GGUF `rope_freqs.weight` applied), from which the KV
/// cache makes its cos/sin tables.
pub struct LlmWeights {
    pub embed: Arc<Tensor>,
    pub layers: Vec<LayerWeights>,
    pub norm: Arc<Tensor>,
    pub lm_head: Arc<Tensor>,
    pub ropes: Vec<(Rotary, Vec<f32>)>,
    /// Gemma 4's per-layer input embeddings.
    pub per_layer: Option<PerLayerInputs>,
}

/// GGUF's name (llama.cpp's) for a tensor given its Hugging Face name.
pub fn gguf_name(hf: &str) -> String {
    gguf_name_for(hf, false)
}

/// [`gguf_name`] for Gemma 2/3 and Qwen 3.5, whose `post_attention_layernorm` llama.cpp calls
/// `post_attention_norm` (Gemma's follows attention; its MLP's input norm is
/// `pre_feedforward_layernorm`, GGUF `ffn_norm`).
pub fn gguf_name_gemma(hf: &str) -> String {
    gguf_name_for(hf, true)
}

/// The GGUF name map of an architecture.
pub fn gguf_names(arch: Arch) -> fn(&str) -> String {
    if arch.is_gemma() || arch == Arch::Qwen35 {
        gguf_name_gemma
    } else {
        gguf_name
    }
}

fn gguf_name_for(hf: &str, gemma: bool) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        // Gemma 4's per-layer inputs.
        (
            "model.embed_tokens_per_layer.weight",
            "per_layer_token_embd.weight",
        ),
        (
            "model.per_layer_model_projection.weight",
            "per_layer_model_proj.weight",
        ),
        (
            "model.per_layer_projection_norm.weight",
            "per_layer_proj_norm.weight",
        ),
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
        "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        // Phi-3: llama.cpp keeps the fused gate/up matrix under ffn_up.
        "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        // Gemma 4's per-layer input block and output scale.
        "per_layer_input_gate.weight" => "inp_gate.weight",
        "per_layer_projection.weight" => "proj.weight",
        "post_per_layer_input_norm.weight" => "post_norm.weight",
        "layer_scalar" => "layer_output_scale.weight",
        // Gemma 4's mixture-of-experts block (the gate and up matrices apart in some files).
        "router.proj.weight" | "mlp.gate.weight" => "ffn_gate_inp.weight",
        "router.scale" => "ffn_gate_inp.scale",
        "router.per_expert_scale" => "ffn_down_exps.scale",
        "experts.gate_up_proj" | "mlp.experts.gate_up_proj" => "ffn_gate_up_exps.weight",
        "experts.gate_proj" | "mlp.experts.gate_proj" => "ffn_gate_exps.weight",
        "experts.up_proj" | "mlp.experts.up_proj" => "ffn_up_exps.weight",
        "experts.down_proj" | "mlp.experts.down_proj" => "ffn_down_exps.weight",
        // Qwen 3.5 MoE's shared expert (its gate `[1, h]` a vector `[h]` in a GGUF).
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        "pre_feedforward_layernorm_2.weight" => "pre_ffw_norm_2.weight",
        "post_feedforward_layernorm_1.weight" => "post_ffw_norm_1.weight",
        "post_feedforward_layernorm_2.weight" => "post_ffw_norm_2.weight",
        // Qwen 3.5's linear attention (the values in llama.cpp's layout: see LinearAttn).
        "linear_attn.in_proj_qkv.weight" => "attn_qkv.weight",
        "linear_attn.in_proj_z.weight" => "attn_gate.weight",
        "linear_attn.in_proj_b.weight" => "ssm_beta.weight",
        "linear_attn.in_proj_a.weight" => "ssm_alpha.weight",
        "linear_attn.A_log" => "ssm_a",
        "linear_attn.dt_bias" => "ssm_dt.bias",
        "linear_attn.conv1d.weight" => "ssm_conv1d.weight",
        "linear_attn.norm.weight" => "ssm_norm.weight",
        "linear_attn.out_proj.weight" => "ssm_out.weight",
        other => other,
    };
    format!("blk.{layer}.{t}")
}

impl LlmWeights {
    /// Uploads every tensor the architecture needs, checking names and shapes: the embedding,
    /// each layer, the final norm and head, and the rotary tables (with the frequency factors a
    /// GGUF file may carry as tensors).
    pub fn load(
        w: &Weights,
        cfg: &LlmConfig,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LlmWeights> {
        let h = cfg.hidden;
        let total = cfg.layers + 2;
        let root = w.root();
        // Causal-LM checkpoints keep the decoder under `model.`; a bare decoder (`Qwen3Model`,
        // as sentence-transformers saves Qwen3-Embedding) has it at the root.
        let model = root
            .first_of(
                &["model", "model.language_model", ""],
                "embed_tokens.weight",
            )
            .unwrap_or_else(|_| root.pp("model"));
        let embed = model.get("embed_tokens.weight", &[cfg.vocab, h])?;
        on_progress(1, total);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            layers.push(load_layer(cfg, i, &model.pp("layers").pp(i))?);
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
        let norm = norm_weight(cfg, &model, "norm.weight", h)?;
        // Tied embeddings: no separate head in the checkpoint, the embedding serves both.
        let lm_head = if cfg.tie_embeddings {
            embed.clone()
        } else {
            root.get("lm_head.weight", &[cfg.vocab, h])?
        };
        let ropes = rotary_tables(w, cfg)?;
        let per_layer = match cfg.per_layer_input {
            Some((dim, vocab)) => Some(PerLayerInputs {
                embed: model.get("embed_tokens_per_layer.weight", &[vocab, cfg.layers * dim])?,
                proj: model.get("per_layer_model_projection.weight", &[cfg.layers * dim, h])?,
                norm: norm_weight(cfg, &model, "per_layer_projection_norm.weight", dim)?,
            }),
            None => None,
        };
        on_progress(total, total);
        Ok(LlmWeights {
            embed,
            layers,
            norm,
            lm_head,
            ropes,
            per_layer,
        })
    }
}

/// A norm weight (`1 +` it where the architecture stores offsets: Gemma).
fn norm_weight(cfg: &LlmConfig, vb: &VarBuilder, name: &str, len: usize) -> Result<Arc<Tensor>> {
    if cfg.norm_offset == 0.0 {
        vb.get(name, &[len])
    } else {
        vb.get_vectors_plus(&[name], &[len], cfg.norm_offset)
    }
}

/// One decoder layer (`model.layers.{i}`).
fn load_layer(cfg: &LlmConfig, i: usize, l: &VarBuilder) -> Result<LayerWeights> {
    let h = cfg.hidden;
    // Qwen 3.5 MoE's dense MLP is its shared expert.
    let mlp = match cfg.moe {
        Some(m) if m.shared_expert => l.pp("mlp").pp("shared_expert"),
        _ => l.pp("mlp"),
    };
    let mixer = match &cfg.linear {
        Some(la) if cfg.is_linear(i) => Mixer::Linear(load_delta(cfg, la, &l.pp("linear_attn"))?),
        _ if cfg.arch == Arch::Gemma4 => {
            Mixer::Attention(load_gemma4_attention(cfg, i, &l.pp("self_attn"))?)
        }
        _ => Mixer::Attention(load_attention(cfg, &l.pp("self_attn"))?),
    };
    let inter = cfg.mlp_widths[i];
    let gate_up = if cfg.arch == Arch::Phi3 {
        Stacked::One {
            w: mlp.get("gate_up_proj.weight", &[2 * inter, h])?,
            bias: None,
        }
    } else {
        let gu = mlp.get_stacked(&["gate_proj.weight", "up_proj.weight"], &[[inter, h]; 2])?;
        match gu {
            Some(w) => Stacked::One { w, bias: None },
            None => Stacked::Apart(vec![
                (mlp.get("gate_proj.weight", &[inter, h])?, None),
                (mlp.get("up_proj.weight", &[inter, h])?, None),
            ]),
        }
    };
    // Gemma norms the attention and feed-forward outputs too; its pre-feed-forward norm is
    // what the others call post_attention_layernorm.
    let norm = |name: &str| norm_weight(cfg, l, name, h);
    let (post_attn_norm, ffn_norm, post_ffn_norm) = if cfg.arch.is_gemma() {
        (
            Some(norm("post_attention_layernorm.weight")?),
            norm("pre_feedforward_layernorm.weight")?,
            Some(norm("post_feedforward_layernorm.weight")?),
        )
    } else {
        (None, norm("post_attention_layernorm.weight")?, None)
    };
    let per_layer = match cfg.per_layer_input {
        Some((dim, _)) => Some(PerLayerBlock {
            gate: l.get("per_layer_input_gate.weight", &[dim, h])?,
            proj: l.get("per_layer_projection.weight", &[h, dim])?,
            norm: norm("post_per_layer_input_norm.weight")?,
        }),
        None => None,
    };
    // Gemma 4's layer_scalar (a buffer transformers saves; llama.cpp's layer_output_scale).
    let scale = match l.has("layer_scalar") {
        true => Some(l.get_cpu("layer_scalar", &[1])?[0]).filter(|&s| s != 1.0),
        false => None,
    };
    let moe = match cfg.moe {
        Some(m) => Some(load_moe(cfg, m, l)?),
        None => None,
    };
    Ok(LayerWeights {
        attn_norm: norm("input_layernorm.weight")?,
        mixer,
        post_attn_norm,
        ffn_norm,
        gate_up,
        w_down: mlp.get("down_proj.weight", &[h, inter])?,
        post_ffn_norm,
        moe,
        per_layer,
        scale,
    })
}

/// The mixture-of-experts block of layer `l`: the router, the experts (gate and up matrices
/// stacked per expert where a GGUF keeps them apart), and Gemma 4's norms or Qwen 3.5 MoE's
/// shared-expert gate.
fn load_moe(cfg: &LlmConfig, m: Moe, l: &VarBuilder) -> Result<MoeWeights> {
    let h = cfg.hidden;
    // Gemma 4 keeps the block at the layer's top level, Qwen under `mlp`.
    let e = match m.shared_expert {
        true => l.pp("mlp"),
        false => l.clone(),
    };
    // One 3-D tensor (transformers 5's layout), gate and up apart (some GGUFs), or a tensor per
    // expert (the Qwen MoE checkpoints, which transformers 5.25 still saves that way).
    let gate_up = if e.has("experts.gate_up_proj") {
        e.get_experts(&["experts.gate_up_proj"], m.experts, &[2 * m.width], h)?
    } else if e.has("experts.gate_proj") {
        let names = ["experts.gate_proj", "experts.up_proj"];
        e.get_experts(&names, m.experts, &[m.width; 2], h)?
    } else if e.has("experts.0.gate_proj.weight") {
        let names = ["experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight"];
        e.get_experts(&names, m.experts, &[m.width; 2], h)?
    } else {
        e.get_experts(&["experts.gate_up_proj"], m.experts, &[2 * m.width], h)?
    };
    let down = match e.has("experts.0.down_proj.weight") {
        true => e.get_experts(&["experts.{e}.down_proj.weight"], m.experts, &[h], m.width)?,
        false => e.get_experts(&["experts.down_proj"], m.experts, &[h], m.width)?,
    };
    if m.shared_expert {
        let name = "shared_expert_gate.weight";
        let shape = e.shape(name)?;
        if shape != [1, h] && shape != [h] {
            return Err(Error::Data {
                name: e.path(name),
                msg: format!("shape {shape:?}, expected [1, {h}]"),
            });
        }
        let gate = e.get_cpu(name, &shape)?;
        let gate = Arc::new(Tensor::from_f32(e.gpu(), name, &[1, h], &gate)?);
        let ones = vec![1.0; m.experts];
        return Ok(MoeWeights {
            router: e.get("gate.weight", &[m.experts, h])?,
            expert_scale: Arc::new(Tensor::from_f32(
                e.gpu(),
                "expert_scale",
                &[m.experts],
                &ones,
            )?),
            gate_up,
            down,
            kind: MoeKind::SharedExpert { gate },
        });
    }
    let norm = |name: &str| norm_weight(cfg, l, name, h);
    let root = (h as f32).powf(-0.5);
    Ok(MoeWeights {
        router: l.get("router.proj.weight", &[m.experts, h])?,
        expert_scale: l.get_stacked_f32(&["router.per_expert_scale"], &[m.experts])?,
        gate_up,
        down,
        kind: MoeKind::Gemma4 {
            router_norm: l.get_vectors_map(&["router.scale"], &[h], &|x| x * root)?,
            pre_norm: norm("pre_feedforward_layernorm_2.weight")?,
            post_norm: norm("post_feedforward_layernorm_2.weight")?,
            post_mlp_norm: norm("post_feedforward_layernorm_1.weight")?,
        },
    })
}

/// An attention layer's projections (`self_attn`).
fn load_attention(cfg: &LlmConfig, attn: &VarBuilder) -> Result<AttnWeights> {
    let (h, d) = (cfg.hidden, cfg.head_dim);
    let qkv = load_qkv(cfg, attn)?;
    let qk_norm = if !cfg.qk_norm {
        None
    } else if matches!(qkv, Stacked::One { .. }) {
        Some(QkNorms::Stacked(attn.get_vectors_plus(
            &["q_norm.weight", "k_norm.weight"],
            &[d, d],
            cfg.norm_offset,
        )?))
    } else {
        Some(QkNorms::Apart(
            norm_weight(cfg, attn, "q_norm.weight", d)?,
            norm_weight(cfg, attn, "k_norm.weight", d)?,
        ))
    };
    let gate = if cfg.attn_gate {
        Some(gated_query_part(cfg, attn, 1)?)
    } else {
        None
    };
    Ok(AttnWeights {
        qkv,
        qk_norm,
        wo: attn.get("o_proj.weight", &[h, cfg.heads * d])?,
        bo: attn.optional("o_proj.bias", &[h])?,
        gate,
        v_norm: None,
    })
}

/// A Gemma 4 attention layer: q, and unless it reads another layer's keys and values, k and v
/// (none in full-attention layers with keys as values), apart; their norms, v's without weight.
fn load_gemma4_attention(cfg: &LlmConfig, i: usize, attn: &VarBuilder) -> Result<AttnWeights> {
    let h = cfg.hidden;
    let (kv, d) = cfg.attn_dims(i);
    let mut parts = vec![(attn.get("q_proj.weight", &[cfg.heads * d, h])?, None)];
    let q_norm = norm_weight(cfg, attn, "q_norm.weight", d)?;
    let (qk_norm, v_norm) = if cfg.keeps_kv(i) {
        parts.push((attn.get("k_proj.weight", &[kv * d, h])?, None));
        let k_eq_v = cfg.k_eq_v && cfg.window(i).is_none() && !attn.has("v_proj.weight");
        if !k_eq_v {
            parts.push((attn.get("v_proj.weight", &[kv * d, h])?, None));
        }
        let ones = Arc::new(Tensor::from_f32(
            attn.gpu(),
            "v_norm.ones",
            &[d],
            &vec![1.0; d],
        )?);
        (
            QkNorms::Apart(q_norm, norm_weight(cfg, attn, "k_norm.weight", d)?),
            Some(ones),
        )
    } else {
        (QkNorms::Query(q_norm), None)
    };
    Ok(AttnWeights {
        qkv: Stacked::Apart(parts),
        qk_norm: Some(qk_norm),
        wo: attn.get("o_proj.weight", &[h, cfg.heads * d])?,
        bo: None,
        gate: None,
        v_norm,
    })
}

/// One of the halves of each head of a gated q_proj (`[heads * 2 d, h]`: per head d query rows,
/// then d gate rows): 0 the queries, 1 the gates, `[heads d, h]`.
fn gated_query_part(cfg: &LlmConfig, attn: &VarBuilder, half: usize) -> Result<Arc<Tensor>> {
    let (d, heads) = (cfg.head_dim, cfg.heads);
    let part = RowPart {
        name: "q_proj.weight",
        shape: [2 * heads * d, cfg.hidden],
        rows: (0..heads)
            .map(|hd| (2 * hd + half) * d..(2 * hd + half + 1) * d)
            .collect(),
    };
    attn.get_rows(&[part])?.ok_or_else(|| {
        Error::Unsupported(format!(
            "adapters on '{}' (the gated query projection is split by rows)",
            attn.path("q_proj.weight")
        ))
    })
}

/// A Gated DeltaNet layer (`model.layers.{i}.linear_attn`).
fn load_delta(cfg: &LlmConfig, la: &LinearAttn, l: &VarBuilder) -> Result<DeltaWeights> {
    let h = cfg.hidden;
    let (vh, vd) = (la.v_heads, la.v_heads * la.v_dim);
    let c = la.conv_channels();
    let names = [
        "in_proj_qkv.weight",
        "in_proj_z.weight",
        "in_proj_b.weight",
        "in_proj_a.weight",
    ];
    let shapes = [[c, h], [vd, h], [vh, h], [vh, h]];
    let proj = match l.get_stacked(&names, &shapes)? {
        Some(w) => Stacked::One { w, bias: None },
        None => Stacked::Apart(
            names
                .iter()
                .zip(&shapes)
                .map(|(n, s)| Ok((l.get(n, s)?, None)))
                .collect::<Result<_>>()?,
        ),
    };
    // llama.cpp stores -exp(A_log) and the convolution squeezed.
    let (conv_shape, a_of): (&[usize], &dyn Fn(f32) -> f32) = if la.gguf_layout {
        (&[c, la.conv_kernel], &|x| x)
    } else {
        // transformers: `-self.A_log.float().exp()`.
        (&[c, 1, la.conv_kernel], &|x| -x.exp())
    };
    Ok(DeltaWeights {
        proj,
        conv: l.get_f32("conv1d.weight", conv_shape)?,
        a: l.get_vectors_map(&["A_log"], &[vh], a_of)?,
        dt_bias: l.get_f32("dt_bias", &[vh])?,
        norm: l.get_f32("norm.weight", &[la.v_dim])?,
        out: l.get("out_proj.weight", &[h, vd])?,
    })
}

/// Q/K/V as one stacked product where the three can be stacked (Phi-3 stores them so), else
/// three; biases for Qwen2 and checkpoints that carry them.
fn load_qkv(cfg: &LlmConfig, attn: &VarBuilder) -> Result<Stacked> {
    let (h, d, kv) = (cfg.hidden, cfg.head_dim, cfg.kv_heads);
    let qkv_rows = [cfg.heads * d, kv * d, kv * d];
    if cfg.arch == Arch::Phi3 {
        return Ok(Stacked::One {
            w: attn.get("qkv_proj.weight", &[qkv_rows.iter().sum(), h])?,
            bias: None,
        });
    }
    if cfg.attn_gate {
        return load_gated_qkv(cfg, attn);
    }
    let names = ["q_proj", "k_proj", "v_proj"];
    let has_bias = cfg.arch == Arch::Qwen2 || attn.has("q_proj.bias");
    let weights: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
    let biases: Vec<String> = names.iter().map(|n| format!("{n}.bias")).collect();
    let (wn, bn): (Vec<&str>, Vec<&str>) = (
        weights.iter().map(String::as_str).collect(),
        biases.iter().map(String::as_str).collect(),
    );
    Ok(match attn.get_stacked(&wn, &qkv_rows.map(|r| [r, h]))? {
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
    })
}

/// Q/K/V of a gated attention layer (Qwen 3.5): the query halves of q_proj's heads, k_proj and
/// v_proj, stacked where their dtypes agree.
fn load_gated_qkv(cfg: &LlmConfig, attn: &VarBuilder) -> Result<Stacked> {
    let (h, d, kv) = (cfg.hidden, cfg.head_dim, cfg.kv_heads);
    if attn.has("q_proj.bias") {
        return Err(Error::Unsupported(format!(
            "biases on a gated attention layer ('{}')",
            attn.path("q_proj.bias")
        )));
    }
    let whole = |name, rows| RowPart::whole(name, [rows, h]);
    let heads = cfg.heads;
    let q = RowPart {
        name: "q_proj.weight",
        shape: [2 * heads * d, h],
        rows: (0..heads).map(|i| 2 * i * d..(2 * i + 1) * d).collect(),
    };
    let parts = [
        q,
        whole("k_proj.weight", kv * d),
        whole("v_proj.weight", kv * d),
    ];
    Ok(match attn.get_rows(&parts)? {
        Some(w) => Stacked::One { w, bias: None },
        None => Stacked::Apart(vec![
            (gated_query_part(cfg, attn, 0)?, None),
            (attn.get("k_proj.weight", &[kv * d, h])?, None),
            (attn.get("v_proj.weight", &[kv * d, h])?, None),
        ]),
    })
}

/// The rotary embeddings and their inverse frequencies: the global one (with llama.cpp's
/// llama3 divisors or Phi-3 LongRoPE factors when the file carries them as tensors), and the
/// local one of sliding-window layers.
fn rotary_tables(w: &Weights, cfg: &LlmConfig) -> Result<Vec<(Rotary, Vec<f32>)>> {
    let mut freqs = cfg.rope.inv_freq();
    let n_freq = freqs.len();
    let factors = |name: &str| -> Result<Option<Vec<f32>>> {
        let Some(raw) = w.raw(name) else {
            return Ok(None);
        };
        let f = dequantize(raw.dtype, raw.data, raw.shape.iter().product())?;
        if f.len() != n_freq || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            return Err(Error::Data {
                name: name.into(),
                msg: format!(
                    "{} factors for {} frequencies (each positive and finite)",
                    f.len(),
                    n_freq
                ),
            });
        }
        Ok(Some(f))
    };
    // llama.cpp's llama3 scaling: divisors of the base frequencies.
    if let Some(f) = factors("rope_freqs.weight")? {
        freqs.iter_mut().zip(&f).for_each(|(a, b)| *a /= b);
    }
    // llama.cpp's Phi-3 LongRoPE factors are tensors (config lists in a HF folder): the GGUF
    // config comes with empty lists for them to fill.
    let mut rope = cfg.rope.clone();
    if let Some(RopeScaling::LongRope { short, long, .. }) = &mut rope.scaling {
        if short.is_empty() || long.is_empty() {
            let need = |name: &str| {
                factors(name)?.ok_or_else(|| Error::Data {
                    name: w.describe(),
                    msg: format!("LongRoPE scaling without the tensor '{name}'"),
                })
            };
            *short = need("rope_factors_short.weight")?;
            *long = need("rope_factors_long.weight")?;
            freqs = rope.inv_freq();
        }
    }
    let mut ropes = vec![(rope, freqs)];
    if let Some(local) = &cfg.rope_local {
        ropes.push((local.clone(), local.inv_freq()));
    }
    Ok(ropes)
}
