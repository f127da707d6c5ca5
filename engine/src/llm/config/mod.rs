//! Model hyper-parameters, read from a Hugging Face `config.json` ([`hf`]) or GGUF metadata
//! ([`gguf`]). Each source is read with its own keys and defaults into [`Facts`]; the rules of
//! an architecture (q/k norms, embedding scale, which soft-caps and rotary bases apply) are
//! applied once, in [`Facts::into_config`]. A value the engine does not support is an error
//! naming it.

mod gguf;
mod hf;

use crate::error::{Error, Result};
use crate::kernels::elementwise::Act;

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
    /// `Gemma4ForCausalLM` / GGUF `gemma4` (Gemma 4's text model): Gemma 3's layer with plain
    /// (`w`) norms, values normed too, attention unscaled, full-attention layers with their own
    /// head size (and keys as values), per-layer input embeddings, the last layers reading
    /// earlier layers' keys and values.
    Gemma4,
    /// `Qwen3_5ForCausalLM` / GGUF `qwen35` (Qwen 3.5): Gated DeltaNet linear-attention layers
    /// between gated full-attention layers (q/k norms, partial rotary), `(1 + w)` norms; with
    /// experts `Qwen3_5MoeForCausalLM` / GGUF `qwen35moe`.
    Qwen35,
}

impl Arch {
    /// Gemma's layer: norms after attention and after the MLP too (`post_attention_layernorm`
    /// normalizes the attention output, not the MLP input), embeddings scaled by sqrt(hidden).
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3 | Arch::Gemma4)
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
    /// `rope_type = "proportional"` (Gemma 4's full attention): the first `rotated` of the
    /// head's `dims / 2` frequencies are `theta^(-2i / dims) / factor`, the rest 0 (their dims
    /// pass through); pairs are (i, i + dims / 2) over the whole head.
    Proportional { rotated: usize, factor: f32 },
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
            Some(RopeScaling::Proportional { rotated, factor }) => base
                .iter()
                .enumerate()
                .map(|(i, f)| if i < *rotated { f / factor } else { 0.0 })
                .collect(),
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

/// A mixture-of-experts block in every layer: each token runs `top_k` of `experts` gated MLPs
/// of `width`, chosen and weighted by a router. Beside it the layer's dense MLP runs on the same
/// input: as a shared expert (`shared_expert`: Qwen 3.5 MoE, scaled by a sigmoid gate), or with
/// norms of its own (Gemma 4's 26B-A4B, whose router and experts read the residual).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Moe {
    pub experts: usize,
    pub top_k: usize,
    pub width: usize,
    pub shared_expert: bool,
}

/// The sizes of Qwen 3.5's linear-attention (Gated DeltaNet) layers.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearAttn {
    /// Taps of the causal convolution over time (`linear_conv_kernel_dim`).
    pub conv_kernel: usize,
    pub k_heads: usize,
    pub v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    /// The tensors as llama.cpp's converter writes them: the value heads (their rows in every
    /// tensor) in tiled order, value head `h` reading key head `h % k_heads` (transformers:
    /// `h / (v_heads / k_heads)`); `ssm_a` = `-exp(A_log)`; the convolution `[channels, taps]`.
    pub gguf_layout: bool,
}

impl LinearAttn {
    /// Channels of the convolution: q, k and v (`2 k_heads k_dim + v_heads v_dim`).
    pub fn conv_channels(&self) -> usize {
        2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim
    }

    /// Width of the layer's input projection: q | k | v | z | b | a.
    pub fn proj_width(&self) -> usize {
        self.conv_channels() + self.v_heads * self.v_dim + 2 * self.v_heads
    }

    /// f32 elements of one sequence's states: the convolution's last inputs and the recurrent
    /// state of every value head.
    pub fn state_len(&self) -> (usize, usize) {
        (
            (self.conv_kernel - 1) * self.conv_channels(),
            self.v_heads * self.k_dim * self.v_dim,
        )
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
    /// Attention sees the whole input both ways (EmbeddingGemma's
    /// `use_bidirectional_attention`; sliding layers then see |q - k| < window): an embedder
    /// that generates no text.
    pub bidirectional: bool,
    /// Qwen 3.5's linear-attention layers (their sizes), and which layers they are (the others
    /// attend over the KV cache).
    pub linear: Option<LinearAttn>,
    pub linear_layers: Vec<bool>,
    /// Full attention gated by `sigmoid` of a second half of q_proj (Qwen 3.5).
    pub attn_gate: bool,
    /// Gemma 4's full-attention layers: their key/value heads and head size, where not the
    /// sliding layers' (`kv_heads`, `head_dim`).
    pub global_attn: Option<(usize, usize)>,
    /// Gemma 4: full-attention layers take their keys as values (`attention_k_eq_v`).
    pub k_eq_v: bool,
    /// Gemma 4: values RMS-normed per head, without a weight.
    pub v_norm: bool,
    /// The layer whose keys and values each layer attends over: itself, or (Gemma 4's
    /// `num_kv_shared_layers`) the last earlier layer of its type that keeps them.
    pub kv_source: Vec<usize>,
    /// Each layer's MLP width (Gemma 4 doubles it in the layers that share keys and values).
    pub mlp_widths: Vec<usize>,
    /// Gemma 4's per-layer inputs: (dims per layer, the table's vocabulary).
    pub per_layer_input: Option<(usize, usize)>,
    /// A mixture-of-experts block in every layer (Gemma 4's `enable_moe_block`, Qwen 3.5 MoE).
    pub moe: Option<Moe>,
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

/// What a config source says of a checkpoint, read with that source's keys and defaults.
struct Facts {
    arch: Arch,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    rms_eps: f32,
    rope: Rotary,
    /// The rotary embedding of sliding-window layers, where the architecture has its own.
    rope_local: Rotary,
    sliding_window: Option<usize>,
    sliding_layers: Vec<bool>,
    max_positions: usize,
    tie_embeddings: bool,
    rope_interleaved: bool,
    bos: Option<u32>,
    eos: Vec<u32>,
    act: Act,
    norm_offset: f32,
    attn_scale: f32,
    /// The soft-caps the source gives (or defaults), before the architecture says which apply.
    attn_softcap: Option<f32>,
    final_softcap: Option<f32>,
    bidirectional: bool,
    linear: Option<LinearAttn>,
    linear_layers: Vec<bool>,
    moe: Option<Moe>,
    /// Gemma 4's extras (absent for every other architecture).
    gemma4: Option<Gemma4Facts>,
}

/// What Gemma 4 adds to a config.
struct Gemma4Facts {
    global_attn: Option<(usize, usize)>,
    k_eq_v: bool,
    kv_shared_layers: usize,
    double_wide_mlp: bool,
    per_layer_input: Option<(usize, usize)>,
    /// Each layer's MLP width as a GGUF lists it (else from `double_wide_mlp`).
    mlp_widths: Option<Vec<usize>>,
}

impl Facts {
    /// The architecture's rules, the same whichever source the facts came from.
    fn into_config(self) -> Result<LlmConfig> {
        let arch = self.arch;
        let gemma = arch.is_gemma();
        let layers = self.layers;
        let g4 = self.gemma4.as_ref();
        let shared = g4.map_or(0, |g| g.kv_shared_layers);
        if shared >= layers && shared > 0 {
            return Err(unsupported(format!(
                "{shared} KV-shared layers of {layers} (some layer must keep keys and values)"
            )));
        }
        let first_shared = layers - shared;
        // A shared layer reads the last earlier layer of its type (sliding or full) that keeps
        // keys and values (transformers' kv_sharing_modes).
        let kv_source = (0..layers)
            .map(|i| {
                if i < first_shared {
                    return Ok(i);
                }
                (0..first_shared)
                    .rev()
                    .find(|&j| self.sliding_layers.get(j) == self.sliding_layers.get(i))
                    .ok_or_else(|| {
                        unsupported(format!(
                            "KV-shared layer {i}: no earlier layer of its type keeps keys and values"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let wide = g4.is_some_and(|g| g.double_wide_mlp);
        let listed = g4.and_then(|g| g.mlp_widths.clone());
        let mlp_widths = listed.unwrap_or_else(|| {
            (0..layers)
                .map(|i| {
                    if wide && i >= first_shared {
                        2 * self.intermediate
                    } else {
                        self.intermediate
                    }
                })
                .collect()
        });
        LlmConfig {
            arch,
            hidden: self.hidden,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            intermediate: self.intermediate,
            vocab: self.vocab,
            rms_eps: self.rms_eps,
            rope: self.rope,
            // Gemma 3's local layers rotate with their own base.
            rope_local: matches!(arch, Arch::Gemma3 | Arch::Gemma4).then_some(self.rope_local),
            sliding_window: self.sliding_window,
            sliding_layers: self.sliding_layers,
            max_positions: self.max_positions,
            tie_embeddings: self.tie_embeddings,
            rope_interleaved: self.rope_interleaved,
            bos: self.bos,
            eos: self.eos,
            act: self.act,
            qk_norm: matches!(
                arch,
                Arch::Qwen3 | Arch::Gemma3 | Arch::Gemma4 | Arch::Qwen35
            ),
            norm_offset: self.norm_offset,
            // In the embedding's dtype, as transformers multiplies (f32 here).
            embed_scale: gemma.then(|| (self.hidden as f32).sqrt()),
            attn_scale: self.attn_scale,
            // Gemma 3's config carries attn_logit_softcapping, but neither transformers nor
            // llama.cpp applies it: only Gemma 2 caps attention scores.
            attn_softcap: self.attn_softcap.filter(|_| arch == Arch::Gemma2),
            final_softcap: self.final_softcap.filter(|_| gemma),
            bidirectional: self.bidirectional,
            linear: self.linear,
            linear_layers: self.linear_layers,
            attn_gate: arch == Arch::Qwen35,
            global_attn: g4.and_then(|g| g.global_attn),
            k_eq_v: g4.is_some_and(|g| g.k_eq_v),
            v_norm: arch == Arch::Gemma4,
            kv_source,
            mlp_widths,
            per_layer_input: g4.and_then(|g| g.per_layer_input),
            moe: self.moe,
        }
        .validate()
    }
}

impl LlmConfig {
    /// Whether layer `i` attends through the sliding window.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// Layer `i`'s key/value heads and head size (Gemma 4's full-attention layers have their
    /// own).
    pub fn attn_dims(&self, layer: usize) -> (usize, usize) {
        match self.global_attn {
            Some(g) if !self.sliding_layers.get(layer).copied().unwrap_or(false) => g,
            _ => (self.kv_heads, self.head_dim),
        }
    }

    /// Whether layer `i` writes keys and values of its own (not a KV-shared layer).
    pub fn keeps_kv(&self, layer: usize) -> bool {
        !self.is_linear(layer) && self.kv_source.get(layer) == Some(&layer)
    }

    /// Index of the KV cache layer `i` attends over, among the layers that keep one.
    pub fn kv_index(&self, layer: usize) -> usize {
        let src = self.kv_source.get(layer).copied().unwrap_or(layer);
        (0..src).filter(|&j| self.keeps_kv(j)).count()
    }

    /// Layers keeping a KV cache.
    pub fn kv_layers(&self) -> usize {
        (0..self.layers).filter(|&i| self.keeps_kv(i)).count()
    }

    /// Whether layer `i` is a linear-attention (Gated DeltaNet) layer.
    pub fn is_linear(&self, layer: usize) -> bool {
        self.linear_layers.get(layer).copied().unwrap_or(false)
    }

    /// Layer `i`'s index among the layers of its kind (attention or linear attention): which
    /// of the KV caches or of the recurrent states it uses.
    pub fn mixer_index(&self, layer: usize) -> usize {
        let linear = self.is_linear(layer);
        (0..layer).filter(|&j| self.is_linear(j) == linear).count()
    }

    /// Layers that attend over the KV cache.
    pub fn attention_layers(&self) -> usize {
        (0..self.layers).filter(|&i| !self.is_linear(i)).count()
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
        for (kv, d) in std::iter::once((self.kv_heads, self.head_dim)).chain(self.global_attn) {
            if d == 0 || !d.is_multiple_of(2) || d > crate::kernels::attention::MAX_HEAD_DIM {
                return Err(unsupported(format!(
                    "head_dim {d} (even, at most {})",
                    crate::kernels::attention::MAX_HEAD_DIM
                )));
            }
            if kv == 0 || !self.heads.is_multiple_of(kv) {
                return Err(unsupported(format!(
                    "{} heads with {kv} kv heads (heads must be a multiple of kv heads)",
                    self.heads
                )));
            }
        }
        if self.kv_source.len() != self.layers || self.mlp_widths.len() != self.layers {
            return Err(Error::Data {
                name: "model config".into(),
                msg: format!(
                    "per-layer tables of {} entries for {} layers",
                    self.kv_source.len(),
                    self.layers
                ),
            });
        }
        if let Some(m) = self.moe {
            let most = crate::kernels::moe::MAX_TOP_K.min(m.experts);
            if m.experts == 0 || m.width == 0 || m.top_k == 0 || m.top_k > most {
                return Err(unsupported(format!(
                    "a mixture of {} experts of width {}, top {} (1 to {most})",
                    m.experts, m.width, m.top_k
                )));
            }
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
            let max_d = self
                .global_attn
                .map_or(self.head_dim, |g| g.1.max(self.head_dim));
            if r.dims == 0 || !r.dims.is_multiple_of(2) || r.dims > max_d {
                return Err(unsupported(format!(
                    "{} rotary dims of head_dim {} (an even number, at most head_dim)",
                    r.dims, max_d
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
                Some(RopeScaling::Proportional { rotated, factor }) => {
                    factor.is_finite() && *factor > 0.0 && *rotated <= r.dims / 2
                }
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
        if self.linear_layers.len() != self.layers {
            return Err(Error::Data {
                name: "model config".into(),
                msg: format!(
                    "{} linear-attention flags for {} layers",
                    self.linear_layers.len(),
                    self.layers
                ),
            });
        }
        match &self.linear {
            None if self.linear_layers.iter().any(|&l| l) => {
                return Err(unsupported(
                    "linear-attention layers in an architecture without them",
                ))
            }
            Some(la) => {
                let max = crate::kernels::delta::MAX_HEAD_DIM;
                let kmax = crate::kernels::delta::MAX_CONV_KERNEL;
                if la.k_heads == 0
                    || la.v_heads == 0
                    || !la.v_heads.is_multiple_of(la.k_heads)
                    || la.k_dim == 0
                    || la.v_dim == 0
                    || la.k_dim > max
                    || la.v_dim > max
                    || la.conv_kernel < 2
                    || la.conv_kernel > kmax
                {
                    return Err(unsupported(format!(
                        "linear attention with {} key heads of {} dims, {} value heads of {} dims, convolution of {} taps (value heads a multiple of key heads, head dims at most {max}, 2 to {kmax} taps)",
                        la.k_heads, la.k_dim, la.v_heads, la.v_dim, la.conv_kernel
                    )));
                }
            }
            None => {}
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
