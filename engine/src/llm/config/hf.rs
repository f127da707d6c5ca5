//! `config.json` (and `generation_config.json`) as transformers writes them, 4.x and 5.

use super::{
    check_context, check_layers, unsupported, Arch, Facts, Gemma4Facts, LinearAttn, LlmConfig, Moe,
    RopeScaling, Rotary,
};
use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::kernels::elementwise::Act;
use serde_json::Value as Json;

impl LlmConfig {
    /// From `config.json` (and `generation_config.json` for EOS ids, when present).
    pub fn from_hf(config: &str, generation: Option<&str>) -> Result<LlmConfig> {
        let c = Keys::parse("config.json", config)?;
        // Qwen 3.5 is published as a vision-language model: its text model's config is
        // `text_config` (the weights under `model.language_model`).
        // So are Gemma 4's (`Gemma4ForConditionalGeneration`, `model.language_model`).
        if let Some(text) = c.get("text_config").filter(|t| t.is_object()) {
            let outer = c.get("model_type").and_then(|m| m.as_str());
            if arch(&c).is_err() || matches!(outer, Some("qwen3_5" | "qwen3_5_moe" | "gemma4")) {
                let mut text = text.clone();
                if text.get("model_type").is_none() {
                    let inner = match outer {
                        Some("gemma4") => "gemma4_text",
                        Some("qwen3_5_moe") => "qwen3_5_moe_text",
                        _ => "qwen3_5_text",
                    };
                    text["model_type"] = inner.into();
                }
                if let Some(t) = c
                    .get("tie_word_embeddings")
                    .filter(|_| text.get("tie_word_embeddings").is_none())
                {
                    text["tie_word_embeddings"] = t.clone();
                }
                return Self::from_hf(&text.to_string(), generation);
            }
        }
        let arch = arch(&c)?;
        if c.flag("mlp_bias", false)? {
            return Err(unsupported("mlp_bias = true (MLP projections with biases)"));
        }
        let hidden = c.need_count("hidden_size")?;
        let heads = c.need_count("num_attention_heads")?;
        let head_dim = c.count("head_dim", hidden / heads)?;
        let kv_heads = c.count("num_key_value_heads", heads)?;
        let layers = check_layers(c.need_count("num_hidden_layers")?, "num_hidden_layers")?;
        let max_positions = check_context(
            c.count("max_position_embeddings", 2048)?,
            "max_position_embeddings",
        )?;
        let (mut sliding_window, sliding_layers, linear_layers) = sliding(&c, arch, layers)?;
        let gemma4 = (arch == Arch::Gemma4)
            .then(|| gemma4_facts(&c, &sliding_layers, heads, (kv_heads, head_dim), layers))
            .transpose()?;
        let global_dim = gemma4
            .as_ref()
            .and_then(|g| g.global_attn)
            .map_or(head_dim, |g| g.1);
        let (rope, rope_local) = rotaries(&c, arch, (head_dim, global_dim), max_positions)?;
        let linear = (arch == Arch::Qwen35)
            .then(|| -> Result<LinearAttn> {
                Ok(LinearAttn {
                    conv_kernel: c.count("linear_conv_kernel_dim", 4)?,
                    k_heads: c.count("linear_num_key_heads", 16)?,
                    v_heads: c.count("linear_num_value_heads", 32)?,
                    k_dim: c.count("linear_key_head_dim", 128)?,
                    v_dim: c.count("linear_value_head_dim", 128)?,
                    gguf_layout: false,
                })
            })
            .transpose()?;
        // A flag, or Gemma 4's "all" / "vision" (only image tokens look both ways: text is causal).
        let bidirectional = match c.get("use_bidirectional_attention") {
            Some(serde_json::Value::String(s)) => s == "all",
            Some(serde_json::Value::Null) | None => false,
            Some(_) => c.flag("use_bidirectional_attention", false)?,
        };
        if bidirectional {
            // transformers turns a bidirectional model's window W into W / 2 + 1 keys either
            // side (|q - k| < W / 2 + 1: EmbeddingGemma's 512 sees 256 each way).
            sliding_window = sliding_window.map(|w| w / 2 + 1);
        }
        let moe = moe(&c, arch)?;
        let gemma = arch.is_gemma();
        let softcap = |k: &str| -> Result<Option<f32>> {
            let v = c.num(k, 0.0)?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(c.err(format!("{k} = {v}: must be a positive number or null")));
            }
            Ok((v > 0.0).then_some(v as f32))
        };
        let attn_scale = if arch == Arch::Gemma4 {
            // q and k are RMS-normed: transformers' Gemma 4 attention is unscaled.
            1.0
        } else if gemma {
            let q = c.num("query_pre_attn_scalar", 256.0)?;
            if !(q.is_finite() && q > 0.0) {
                return Err(c.err(format!("query_pre_attn_scalar = {q}: must be positive")));
            }
            q.powf(-0.5) as f32
        } else {
            (head_dim as f32).powf(-0.5)
        };
        Facts {
            arch,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            // Qwen 3.5 MoE's dense MLP is its shared expert.
            intermediate: match moe {
                Some(m) if m.shared_expert => c.need_count("shared_expert_intermediate_size")?,
                _ => c.need_count("intermediate_size")?,
            },
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
            eos: eos(&c, generation)?,
            act: act(&c)?,
            // transformers' Gemma 2/3 and Qwen 3.5 norms multiply by (1 + w); Gemma 4's by w.
            norm_offset: if (gemma && arch != Arch::Gemma4) || arch == Arch::Qwen35 {
                1.0
            } else {
                0.0
            },
            attn_scale,
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
            bidirectional,
            linear,
            linear_layers,
            moe,
            gemma4,
        }
        .into_config()
    }
}

/// The architecture `architectures` (or `model_type`) names.
fn arch(c: &Keys) -> Result<Arch> {
    let archs: Vec<&str> = c
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let named = archs
        .first()
        .copied()
        .or_else(|| c.get("model_type").and_then(|m| m.as_str()));
    Ok(match named {
        // `...Model`: the decoder without its head, as embedders (Qwen3-Embedding) save it.
        Some(
            "LlamaForCausalLM" | "MistralForCausalLM" | "LlamaModel" | "MistralModel" | "llama"
            | "mistral",
        ) => Arch::Llama,
        Some("Qwen2ForCausalLM" | "Qwen2Model" | "qwen2") => Arch::Qwen2,
        Some("Qwen3ForCausalLM" | "Qwen3Model" | "qwen3") => Arch::Qwen3,
        Some("Gemma2ForCausalLM" | "Gemma2Model" | "gemma2") => Arch::Gemma2,
        Some("Gemma3ForCausalLM" | "Gemma3TextModel" | "gemma3_text") => Arch::Gemma3,
        Some("Phi3ForCausalLM" | "Phi3Model" | "phi3") => Arch::Phi3,
        Some(
            "Qwen3_5ForCausalLM" | "Qwen3_5TextModel" | "qwen3_5_text" | "Qwen3_5MoeForCausalLM"
            | "Qwen3_5MoeTextModel" | "qwen3_5_moe_text",
        ) => Arch::Qwen35,
        Some("Gemma4ForCausalLM" | "Gemma4TextModel" | "gemma4_text") => Arch::Gemma4,
        Some(other) => return Err(unsupported(format!("architecture '{other}' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Phi3ForCausalLM)"))),
        None => return Err(unsupported("config.json names no architecture")),
    })
}

/// The mixture-of-experts block: Gemma 4's `enable_moe_block` (`num_experts`, `top_k_experts`,
/// `moe_intermediate_size`), Qwen 3.5 MoE's `num_experts` (`num_experts_per_tok`,
/// `moe_intermediate_size`, a shared expert).
fn moe(c: &Keys, arch: Arch) -> Result<Option<Moe>> {
    Ok(match arch {
        Arch::Gemma4 if c.flag("enable_moe_block", false)? => Some(Moe {
            experts: c.count("num_experts", 128)?,
            top_k: c.count("top_k_experts", 8)?,
            width: c.count("moe_intermediate_size", 704)?,
            shared_expert: false,
        }),
        Arch::Qwen35 if c.count("num_experts", 0)? > 0 => Some(Moe {
            experts: c.count("num_experts", 0)?,
            top_k: c.count("num_experts_per_tok", 8)?,
            width: c.count("moe_intermediate_size", 512)?,
            shared_expert: true,
        }),
        _ => None,
    })
}

/// The MLP activation (Gemma names it `hidden_activation`; `hidden_act` elsewhere).
fn act(c: &Keys) -> Result<Act> {
    let name = match c.get("hidden_activation") {
        Some(_) => c.text("hidden_activation", "")?,
        None => c.text("hidden_act", "silu")?,
    };
    Ok(match name {
        "silu" | "swish" => Act::Silu,
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Act::GeluTanh,
        "gelu" => Act::GeluErf,
        other => {
            return Err(unsupported(format!(
                "hidden activation '{other}' (supported: silu, gelu, gelu_pytorch_tanh)"
            )))
        }
    })
}

/// The global and the local rotary embeddings. transformers 5 nests the settings in
/// `rope_parameters` (per layer type for Gemma 3); 4.x has rope_theta / rope_scaling /
/// rope_local_base_freq at the top.
fn rotaries(
    c: &Keys,
    arch: Arch,
    (head_dim, global_head_dim): (usize, usize),
    max_positions: usize,
) -> Result<(Rotary, Rotary)> {
    let params = c.get("rope_parameters").filter(|v| v.is_object());
    // Qwen 3.5 rotates a quarter of each head unless its config says otherwise.
    let default_partial = if arch == Arch::Qwen35 { 0.25 } else { 1.0 };
    let partial = params
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(|v| v.as_f64())
        .map_or_else(|| c.num("partial_rotary_factor", default_partial), Ok)?;
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(c.err(format!(
            "partial_rotary_factor = {partial}: must be in (0, 1]"
        )));
    }
    let dims = (head_dim as f64 * partial) as usize;
    let global_dims = (global_head_dim as f64 * partial) as usize;
    let top_theta = c.num("rope_theta", if arch == Arch::Gemma3 { 1e6 } else { 1e4 })? as f32;
    let (global, local) = match params {
        Some(p) if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() => (
            p.get("full_attention").cloned(),
            p.get("sliding_attention").cloned(),
        ),
        Some(p) => (Some(p.clone()), None),
        None => (c.get("rope_scaling").cloned(), None),
    };
    let rope = rotary_from(c, global.as_ref(), top_theta, global_dims, max_positions)?;
    let local_theta = c.num("rope_local_base_freq", 10000.0)? as f32;
    let rope_local = rotary_from(c, local.as_ref(), local_theta, dims, max_positions)?;
    Ok((rope, rope_local))
}

/// The window, which layers slide and which are linear attention: `layer_types` (transformers 5)
/// says, older configs imply it per architecture (Qwen 3.5: every `full_attention_interval`-th
/// layer attends, the others are linear).
fn sliding(c: &Keys, arch: Arch, layers: usize) -> Result<(Option<usize>, Vec<bool>, Vec<bool>)> {
    let window = c.count("sliding_window", 0)?;
    let types = match c.get("layer_types") {
        Some(_) => Some(c.strings("layer_types")?),
        None => None,
    };
    let linear_layers: Vec<bool> = match (&types, arch) {
        (Some(t), _) => t.iter().map(|x| x == "linear_attention").collect(),
        (None, Arch::Qwen35) => {
            let n = c.count("full_attention_interval", 4)?.max(1);
            (0..layers).map(|i| (i + 1) % n != 0).collect()
        }
        (None, _) => vec![false; layers],
    };
    if arch != Arch::Qwen35 && linear_layers.iter().any(|&l| l) {
        return Err(unsupported(
            "layer type 'linear_attention' outside Qwen 3.5 (Qwen3_5ForCausalLM)",
        ));
    }
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
                    "full_attention" | "linear_attention" => Ok(false),
                    other => Err(unsupported(format!(
                        "layer type '{other}' (supported: full_attention, sliding_attention, linear_attention)"
                    ))),
                })
                .collect::<Result<_>>()?
        }
        (None, Arch::Qwen35) => vec![false; layers],
        (None, Arch::Gemma2) => (0..layers).map(|i| i % 2 == 0).collect(),
        (None, Arch::Gemma3 | Arch::Gemma4) => {
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
    Ok((sliding_window, sliding_layers, linear_layers))
}

/// Gemma 4's extras: the full-attention layers' head size and key/value heads
/// (`per_layer_config` as transformers 5.25 saves it, else `global_head_dim` and
/// `num_global_key_value_heads`), keys as values, KV-shared layers, double-wide MLPs and the
/// per-layer input embeddings.
fn gemma4_facts(
    c: &Keys,
    sliding: &[bool],
    heads: usize,
    (kv_heads, head_dim): (usize, usize),
    layers: usize,
) -> Result<Gemma4Facts> {
    let k_eq_v = c.flag("attention_k_eq_v", false)?;
    let full: Vec<usize> = (0..layers).filter(|&i| !sliding[i]).collect();
    let global_attn = match c.get("per_layer_config").and_then(|p| p.as_object()) {
        Some(per_layer) => {
            let mut dims = None;
            for (k, v) in per_layer {
                let i: usize = k
                    .parse()
                    .map_err(|_| c.err(format!("per_layer_config key '{k}' is not a layer")))?;
                let d = v
                    .get("head_dim")
                    .and_then(|x| x.as_u64())
                    .map_or(head_dim, |x| x as usize);
                let kv = v
                    .get("num_key_value_heads")
                    .and_then(|x| x.as_u64())
                    .map_or(kv_heads, |x| x as usize);
                if !full.contains(&i) || dims.is_some_and(|o| o != (kv, d)) {
                    return Err(unsupported(format!(
                        "per_layer_config for layer {i}: only the full-attention layers may differ, all alike"
                    )));
                }
                dims = Some((kv, d));
            }
            dims
        }
        None => {
            let d = c.count("global_head_dim", 512)?;
            let kv = if k_eq_v {
                c.count("num_global_key_value_heads", kv_heads)?
            } else {
                kv_heads
            };
            (!full.is_empty()).then_some((kv, d))
        }
    };
    if let Some((kv, _)) = global_attn {
        if kv == 0 || !heads.is_multiple_of(kv) {
            return Err(unsupported(format!(
                "{heads} heads with {kv} kv heads in full-attention layers"
            )));
        }
    }
    let ple_dim = match c.get("hidden_size_per_layer_input") {
        Some(serde_json::Value::Null) => 0,
        _ => c.count("hidden_size_per_layer_input", 256)?,
    };
    Ok(Gemma4Facts {
        global_attn,
        k_eq_v,
        kv_shared_layers: c.count("num_kv_shared_layers", 0)?,
        double_wide_mlp: c.flag("use_double_wide_mlp", false)?,
        mlp_widths: None,
        per_layer_input: (ple_dim > 0)
            .then(|| {
                c.count("vocab_size_per_layer_input", 262_144)
                    .map(|v| (ple_dim, v))
            })
            .transpose()?,
    })
}

/// EOS ids: generation_config.json's when it names any, else config.json's.
fn eos(c: &Keys, generation: Option<&str>) -> Result<Vec<u32>> {
    if let Some(g) = generation {
        let gj: Json = serde_json::from_str(g).map_err(|e| Error::Data {
            name: "generation_config.json".into(),
            msg: e.to_string(),
        })?;
        let ge = ids(gj.get("eos_token_id"));
        if !ge.is_empty() {
            return Ok(ge);
        }
    }
    Ok(ids(c.get("eos_token_id")))
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
        // Gemma 4: `partial_rotary_factor` of the head's frequencies turn, over the whole head.
        "proportional" => {
            let partial = num("partial_rotary_factor").unwrap_or(1.0);
            if !(partial > 0.0 && partial <= 1.0) {
                return Err(c.err(format!(
                    "proportional rope: partial_rotary_factor = {partial}: must be in (0, 1]"
                )));
            }
            Some(RopeScaling::Proportional {
                rotated: (partial * dims as f64 / 2.0) as usize,
                factor: num("factor").unwrap_or(1.0) as f32,
            })
        }
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
                "rope scaling type '{other}' (supported: llama3, linear, longrope, proportional)"
            )))
        }
    };
    Ok(Rotary {
        theta,
        dims,
        scaling,
    })
}
