//! GGUF metadata as llama.cpp's converter writes it, with llama.cpp's defaults for what a file
//! leaves out.

use super::{
    check_context, check_layers, unsupported, Arch, Facts, Gemma4Facts, LinearAttn, LlmConfig, Moe,
    RopeScaling, Rotary,
};
use crate::error::{Error, Result};
use crate::formats::gguf::{Gguf, Value};
use crate::kernels::elementwise::Act;

/// Reads `{arch}.{key}` values.
struct Keys<'a> {
    g: &'a Gguf,
    arch: &'a str,
}

impl Keys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// A required integer.
    fn u(&self, k: &str) -> Result<usize> {
        self.g
            .require(&self.key(k))?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::Data {
                name: self.key(k),
                msg: "not an integer".into(),
            })
    }

    fn f(&self, k: &str) -> Option<f64> {
        self.g.get(&self.key(k)).and_then(|v| v.as_f64())
    }

    /// An integer per layer: a list of `layers` (Gemma 4's widths and head counts), or one for
    /// all.
    fn per_layer(&self, k: &str, layers: usize) -> Result<Vec<usize>> {
        let bad = |msg: String| Error::Data {
            name: self.key(k),
            msg,
        };
        match self.g.require(&self.key(k))? {
            Value::Array(a) => {
                let v: Vec<usize> = a
                    .values()
                    .map(|x| x.as_u64().map(|n| n as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("not a list of integers".into()))?;
                if v.len() != layers {
                    return Err(bad(format!("{} values for {layers} layers", v.len())));
                }
                Ok(v)
            }
            other => other
                .as_u64()
                .map(|n| vec![n as usize; layers])
                .ok_or_else(|| bad("not an integer".into())),
        }
    }
}

impl LlmConfig {
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
            "qwen35" | "qwen35moe" => Arch::Qwen35,
            "gemma4" => Arch::Gemma4,
            other => {
                return Err(unsupported(format!(
                    "GGUF architecture '{other}' (supported: llama, qwen2, qwen3, qwen35, qwen35moe, gemma2, gemma3, gemma4, phi3)"
                )))
            }
        };
        let k = Keys {
            g,
            arch: &arch_name,
        };
        let hidden = k.u("embedding_length")?;
        let heads = k.u("attention.head_count")?;
        let gemma4_arch = arch == Arch::Gemma4;
        // Gemma 4: key_length is the full-attention layers', key_length_swa the sliding ones'.
        let head_dim = match k.u("attention.key_length_swa") {
            Ok(d) if gemma4_arch => d,
            _ => k.u("attention.key_length").unwrap_or(hidden / heads.max(1)),
        };
        let layers = check_layers(k.u("block_count")?, &k.key("block_count"))?;
        let tokens = g
            .require("tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        let max_positions = check_context(
            k.u("context_length").unwrap_or(2048),
            &k.key("context_length"),
        )?;
        let dims = k.u("rope.dimension_count").unwrap_or(head_dim);
        let local_dims = match k.u("rope.dimension_count_swa") {
            Ok(d) if gemma4_arch => d,
            _ => dims,
        };
        let (sliding_window, sliding_layers) = sliding(&k, arch, layers)?;
        let kv_per_layer = k.per_layer("attention.head_count_kv", layers).ok();
        let gemma4 = gemma4_arch
            .then(|| {
                let vocab = k.u("vocab_size").unwrap_or(tokens);
                gemma4_facts(&k, &sliding_layers, layers, kv_per_layer.as_deref(), vocab)
            })
            .transpose()?;
        let (linear, linear_layers) = if arch == Arch::Qwen35 {
            linear_attention(&k, layers)?
        } else {
            (None, vec![false; layers])
        };
        let moe = match k.g.get(&k.key("expert_count")) {
            Some(_) if matches!(arch, Arch::Gemma4 | Arch::Qwen35) => Some(Moe {
                experts: k.u("expert_count")?,
                top_k: k.u("expert_used_count")?,
                width: k.u("expert_feed_forward_length")?,
                shared_expert: arch == Arch::Qwen35,
            }),
            // Mixtral-style files say `llama` with experts: not the dense model they would
            // otherwise load as.
            Some(_) if k.u("expert_count").unwrap_or(0) > 0 => {
                return Err(unsupported(format!(
                    "GGUF architecture '{arch_name}' with {} experts (mixture-of-experts: gemma4 and qwen35moe only)",
                    k.u("expert_count").unwrap_or(0)
                )))
            }
            _ => None,
        };
        let gemma = arch.is_gemma();
        let softcap = |key: &str, default: f64| {
            let v = k.f(key).unwrap_or(default);
            (v > 0.0).then_some(v as f32)
        };
        // llama.cpp: 1/sqrt(head_dim), except Gemma 2/3 27B's 1/sqrt(hidden / heads).
        let big_gemma =
            (arch == Arch::Gemma2 && layers == 46) || (arch == Arch::Gemma3 && layers == 62);
        let attn_scale = if gemma4_arch {
            1.0 // q and k are RMS-normed
        } else if big_gemma {
            ((hidden / heads.max(1)) as f32).powf(-0.5)
        } else {
            (head_dim as f32).powf(-0.5)
        };
        Facts {
            arch,
            hidden,
            layers,
            heads,
            kv_heads: kv_per_layer
                .as_ref()
                .and_then(|v| {
                    (0..layers)
                        .find(|&i| sliding_layers[i] || !gemma4_arch)
                        .map(|i| v[i])
                })
                .unwrap_or(heads),
            head_dim,
            // One width, or Gemma 4's per layer (the first: the others come with the extras);
            // no layers means no width, refused by the config's checks.
            // Qwen 3.5 MoE's dense MLP is its shared expert.
            intermediate: match moe {
                Some(m) if m.shared_expert => k.u("expert_shared_feed_forward_length")?,
                _ => k
                    .per_layer("feed_forward_length", layers)?
                    .first()
                    .copied()
                    .unwrap_or(0),
            },
            vocab: k.u("vocab_size").unwrap_or(tokens),
            rms_eps: k.f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope: rotary(&k, dims, max_positions),
            rope_local: Rotary {
                theta: k.f("rope.freq_base_swa").unwrap_or(10000.0) as f32,
                dims: local_dims,
                scaling: None,
            },
            sliding_window,
            sliding_layers,
            max_positions,
            tie_embeddings: g.tensor_names.iter().all(|n| n != "output.weight"),
            // The converter permutes llama's Q and K rows for interleaved rotary pairs.
            rope_interleaved: arch == Arch::Llama,
            bos: id(g, "tokenizer.ggml.bos_token_id"),
            eos: eos(g, arch),
            act: if gemma { Act::GeluTanh } else { Act::Silu },
            // The converter adds Gemma's 1 into the norm weights.
            norm_offset: 0.0,
            attn_scale,
            attn_softcap: softcap("attn_logit_softcapping", 50.0),
            final_softcap: match arch {
                Arch::Gemma2 => softcap("final_logit_softcapping", 30.0),
                _ => softcap("final_logit_softcapping", 0.0),
            },
            bidirectional: false,
            linear,
            linear_layers,
            moe,
            gemma4,
        }
        .into_config()
    }

    /// From the first bytes of a `.gguf` file (a browser fetches only those to size a model):
    /// `None` when `prefix` ends inside the metadata (read more and ask again).
    pub fn from_gguf_prefix(name: &str, prefix: &[u8]) -> Result<Option<LlmConfig>> {
        Gguf::parse_metadata(name, prefix)?
            .map(|g| LlmConfig::from_gguf(&g))
            .transpose()
    }
}

fn id(g: &Gguf, k: &str) -> Option<u32> {
    g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32)
}

/// EOS and end-of-turn ids, plus the end-of-turn token of chat formats that llama.cpp also
/// stops at (by its text) when the file does not name it.
fn eos(g: &Gguf, arch: Arch) -> Vec<u32> {
    let mut eos: Vec<u32> = id(g, "tokenizer.ggml.eos_token_id").into_iter().collect();
    if let Some(e) = id(g, "tokenizer.ggml.eot_token_id") {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    let turn_end = match arch {
        Arch::Gemma2 | Arch::Gemma3 => Some("<end_of_turn>"),
        Arch::Gemma4 => Some("<turn|>"),
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
    eos
}

/// The global rotary embedding. llama.cpp keeps llama3 scaling as a `rope_freqs.weight` tensor
/// of divisors and Phi-3's LongRoPE factors as tensors too (applied by `LlmWeights::load`);
/// linear scaling is a key.
fn rotary(k: &Keys, dims: usize, max_positions: usize) -> Rotary {
    let scaling = match k
        .g
        .get(&k.key("rope.scaling.type"))
        .and_then(|v| v.as_str())
    {
        Some("linear") => k
            .f("rope.scaling.factor")
            .filter(|&x| x > 0.0 && x != 1.0)
            .map(|factor| RopeScaling::Linear {
                factor: factor as f32,
            }),
        // Phi-3: the factor lists are the tensors rope_factors_short/long (LlmWeights::load).
        _ if k
            .g
            .tensor_names
            .iter()
            .any(|n| n == "rope_factors_long.weight") =>
        {
            let original_max = k
                .u("rope.scaling.original_context_length")
                .unwrap_or(max_positions);
            let factor = max_positions as f64 / original_max.max(1) as f64;
            let attention_factor = k.f("rope.scaling.attn_factor").unwrap_or(if factor <= 1.0 {
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
    Rotary {
        theta: k.f("rope.freq_base").unwrap_or(10000.0) as f32,
        dims,
        scaling,
    }
}

/// Gemma 4's extras as llama.cpp writes them: the full-attention layers' `key_length` and key /
/// value heads (`head_count_kv` per layer), `shared_kv_layers`, `feed_forward_length` per layer,
/// `embedding_length_per_layer_input`. A full-attention layer without `attn_v` takes its keys
/// as values (the loader looks).
fn gemma4_facts(
    k: &Keys,
    sliding: &[bool],
    layers: usize,
    kv: Option<&[usize]>,
    vocab: usize,
) -> Result<Gemma4Facts> {
    let full = (0..layers).find(|&i| !sliding[i]);
    let global_attn = match full {
        Some(i) => Some((
            kv.map_or(k.u("attention.head_count")?, |v| v[i]),
            k.u("attention.key_length")?,
        )),
        None => None,
    };
    let per_layer_input = match k.u("embedding_length_per_layer_input") {
        Ok(0) | Err(_) => None,
        Ok(dim) => {
            let vocab =
                k.g.tensor_shape("per_layer_token_embd.weight")
                    .and_then(|s| s.first().copied())
                    .unwrap_or(vocab);
            Some((dim, vocab))
        }
    };
    Ok(Gemma4Facts {
        global_attn,
        k_eq_v: true,
        kv_shared_layers: k.u("attention.shared_kv_layers").unwrap_or(0),
        double_wide_mlp: false,
        per_layer_input,
        mlp_widths: Some(k.per_layer("feed_forward_length", layers)?),
    })
}

/// Qwen 3.5's linear-attention sizes and layers as llama.cpp writes them: `ssm.conv_kernel`
/// taps, `ssm.group_count` key heads of `ssm.state_size` dims, `ssm.time_step_rank` value heads
/// sharing `ssm.inner_size`; which layers are recurrent from `attention.recurrent_layers` (else
/// every `full_attention_interval`-th layer attends). Tensors in llama.cpp's layout.
fn linear_attention(k: &Keys, layers: usize) -> Result<(Option<LinearAttn>, Vec<bool>)> {
    let v_heads = k.u("ssm.time_step_rank")?;
    let inner = k.u("ssm.inner_size")?;
    if v_heads == 0 || !inner.is_multiple_of(v_heads) {
        return Err(Error::Data {
            name: k.key("ssm.inner_size"),
            msg: format!("{inner} is not a whole number of dims for {v_heads} value heads"),
        });
    }
    let la = LinearAttn {
        conv_kernel: k.u("ssm.conv_kernel")?,
        k_heads: k.u("ssm.group_count")?,
        v_heads,
        k_dim: k.u("ssm.state_size")?,
        v_dim: inner / v_heads,
        gguf_layout: true,
    };
    let key = k.key("attention.recurrent_layers");
    let flags: Vec<bool> = match k.g.get(&key) {
        Some(Value::Array(a)) => a.values().map(|v| v == Value::Bool(true)).collect(),
        _ => {
            let n = k.u("full_attention_interval").unwrap_or(4).max(1);
            (0..layers).map(|i| (i + 1) % n != 0).collect()
        }
    };
    if flags.len() != layers {
        return Err(Error::Data {
            name: key,
            msg: format!("{} flags for {layers} layers", flags.len()),
        });
    }
    Ok((Some(la), flags))
}

/// Sliding windows as llama.cpp reads them: a window size and a per-layer pattern (a list of
/// flags, or n: every n-th layer is global), with these defaults per architecture.
fn sliding(k: &Keys, arch: Arch, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let (default_window, default_pattern) = match arch {
        Arch::Gemma2 => (4096, 2),
        Arch::Gemma3 => (0, 6),
        _ => (0, 0),
    };
    let window = k.u("attention.sliding_window").unwrap_or(default_window);
    let pattern_key = k.key("attention.sliding_window_pattern");
    let sliding_layers: Vec<bool> = match k.g.get(&pattern_key) {
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
    // llama.cpp leaves Phi-3's window off ("Phi SWA is currently disabled"): so does Kiln, to
    // answer as the engine that wrote the file does.
    Ok((
        (window > 0 && arch != Arch::Phi3).then_some(window),
        sliding_layers,
    ))
}
