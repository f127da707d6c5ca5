//! The decoder of every family in `config::Arch` as a graph: one function builds the graph of a step over `t` tokens
//! at a run-time position. The prefill graph (t = chunk) and the decode graph (t = 1) are two
//! compilations of it. Token ids come from the history tensor on the GPU and the sampled id goes
//! back into it, so decode needs nothing from the CPU but the run scalars.

use super::config::{LlmConfig, Rotary};
use super::weights::{LayerWeights, LlmWeights, QkNorms, Stacked};
use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{AttentionOptions, GluInput, UnaryOp};
use crate::kernels::sample::{constraint_words, SETTINGS_LEN};
use crate::tensor::Tensor;
use crate::{CompileOptions, Dyn, Graph, Plan, Scalar, Value};
use std::sync::Arc;

/// Per-layer key and value caches `[1, ctx, kv_heads * head_dim]`, the token history
/// `[ctx + 1]` (prompt ids, then every sampled id at its position) and the rotary cos/sin
/// tables of those `ctx` positions (one per rotary embedding: global, then Gemma 3's local one).
pub struct KvCache {
    pub k: Vec<Arc<Tensor>>,
    pub v: Vec<Arc<Tensor>>,
    pub history: Arc<Tensor>,
    pub rope: Vec<Arc<Tensor>>,
    pub ctx: usize,
}

impl KvCache {
    /// Bytes the caches of `ctx` positions take on the GPU (keys and values for every layer, 2
    /// bytes an element when `f16`, else 4; the history, the rotary tables): what
    /// [`KvCache::new`] allocates.
    pub fn bytes(cfg: &LlmConfig, ctx: usize, f16: bool) -> u64 {
        let el = if f16 { 2 } else { 4 };
        let kv = 2 * cfg.layers * (ctx * cfg.kv_heads * cfg.head_dim).next_multiple_of(2) * el;
        let tables = 1 + usize::from(cfg.rope_local.is_some());
        let rope = tables * ctx * cfg.rope.dims.div_ceil(2) * 2 * 4;
        (kv + (ctx + 1) * 4 + rope) as u64
    }

    /// Allocates the caches for `ctx` positions (f16 or f32) and the rotary table of each of
    /// `ropes` (the embedding and its inverse frequencies, as [`LlmWeights`] holds them).
    pub fn new(
        gpu: &Gpu,
        cfg: &LlmConfig,
        ropes: &[(Rotary, Vec<f32>)],
        ctx: usize,
        f16: bool,
    ) -> Result<KvCache> {
        let w = cfg.kv_heads * cfg.head_dim;
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        let mut k = Vec::with_capacity(cfg.layers);
        let mut v = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            k.push(Arc::new(Tensor::zeros(
                gpu,
                &format!("k_cache.{i}"),
                &[1, ctx, w],
                dtype,
            )?));
            v.push(Arc::new(Tensor::zeros(
                gpu,
                &format!("v_cache.{i}"),
                &[1, ctx, w],
                dtype,
            )?));
        }
        let history = Arc::new(Tensor::zeros(gpu, "history", &[ctx + 1], DType::U32)?);
        let rope = ropes
            .iter()
            .enumerate()
            .map(|(i, (r, inv_freq))| {
                let table = r.table(inv_freq, ctx);
                Tensor::from_f32(
                    gpu,
                    &format!("rope_table.{i}"),
                    &[ctx, inv_freq.len(), 2],
                    &table,
                )
                .map(Arc::new)
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            k,
            v,
            history,
            rope,
            ctx,
        })
    }
}

/// A compiled step and the handles to drive it.
pub struct Step {
    pub plan: Plan,
    /// Tokens per run.
    pub tokens: usize,
    /// Position of the first token of this run.
    pub pos: Scalar,
    /// Row of the last valid token in this run (`n - 1`).
    pub last: Scalar,
    /// History index the sampled id is written to (`pos + n`; `ctx + 1` to skip writing).
    pub next: Scalar,
    /// Sampler seed.
    pub seed: Scalar,
    /// Sampler settings input (f32 `[SETTINGS_LEN]`).
    pub settings: Value,
    /// Sampler constraint input (u32 `[constraint_words(vocab)]`: a grammar's allowed-id
    /// bitmask, the logit biases), read only when the settings switch them on.
    pub constraint: Value,
    /// Sampler output (u32 `[SAMPLE_OUT_LEN]`: id, logprob bits, the top_logprobs pairs).
    pub out: Value,
    /// Logits of the last valid token (when built with `keep_logits`).
    pub logits: Option<Value>,
}

/// Builds and compiles the step graph over `tokens` tokens: the embedding rows at the run-time
/// position, each layer's attention and feed-forward blocks, the head on the last valid token
/// and the sampler.
pub async fn build_step(
    gpu: &Arc<Gpu>,
    cfg: &LlmConfig,
    w: &LlmWeights,
    kv: &KvCache,
    tokens: usize,
    keep_logits: bool,
) -> Result<Step> {
    let mut g = Graph::new();
    let (pos, last, next, seed) = (
        g.scalar("pos")?,
        g.scalar("last")?,
        g.scalar("next")?,
        g.scalar("seed")?,
    );
    let history = g.tensor(&kv.history);
    let x = decoder(&mut g, cfg, w, kv, tokens, pos)?;
    // Only the last valid token needs logits.
    let xl = g.slice_rows(x, Dyn::slot(last), 1)?; // [1, h]
    let norm = g.tensor(&w.norm);
    let xl = g.rms_norm(xl, norm, cfg.rms_eps)?;
    let head = g.tensor(&w.lm_head);
    let mut logits = g.linear(xl, head, None)?; // [1, vocab]
    if let Some(cap) = cfg.final_softcap {
        logits = g.unary(logits, UnaryOp::Softcap { cap })?;
    }
    let logits = g.reshape(logits, &[cfg.vocab])?;
    let settings = g.input("sampler", &[SETTINGS_LEN], DType::F32)?;
    let constraint = g.input("constraint", &[constraint_words(cfg.vocab)], DType::U32)?;
    let out = g.sample(
        logits,
        settings,
        history,
        constraint,
        Dyn::slot(next),
        Dyn::slot(seed),
    )?;
    g.output(out);
    if keep_logits {
        g.output(logits);
    }
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    Ok(Step {
        plan,
        tokens,
        pos,
        last,
        next,
        seed,
        settings,
        constraint,
        out,
        logits: keep_logits.then_some(logits),
    })
}

/// The decoder over `tokens` tokens read from the cache's token history at run-time position
/// `pos`: the embedding rows and every layer (keys and values written into the caches) →
/// hidden states `[1, tokens, h]` before the final norm.
fn decoder(
    g: &mut Graph,
    cfg: &LlmConfig,
    w: &LlmWeights,
    kv: &KvCache,
    tokens: usize,
    pos: Scalar,
) -> Result<Value> {
    let history = g.tensor(&kv.history);
    let embed = g.tensor(&w.embed);
    let ropes: Vec<Value> = kv.rope.iter().map(|t| g.tensor(t)).collect();
    let x = g.gather_at(embed, history, Dyn::slot(pos), tokens)?; // [t, h]
    let mut x = g.reshape(x, &[1, tokens, cfg.hidden])?;
    if let Some(s) = cfg.embed_scale {
        x = g.scale(x, s, 0.0)?;
    }
    for (i, lw) in w.layers.iter().enumerate() {
        let at = LayerAt {
            index: i,
            rope: ropes[cfg.rope_index(i)],
            k_cache: g.tensor(&kv.k[i]),
            v_cache: g.tensor(&kv.v[i]),
            pos,
            tokens,
        };
        x = attention_block(g, cfg, lw, &at, x)?;
        x = ffn_block(g, cfg, lw, x)?;
    }
    Ok(x)
}

/// A compiled pass that gives the final-norm hidden states of `tokens` tokens (a decoder
/// embedder's token embeddings): the ids are read from the cache's history at `pos`.
pub struct Hidden {
    pub plan: Plan,
    pub pos: Scalar,
    /// `[tokens, h]`.
    pub out: Value,
}

/// Builds and compiles [`Hidden`] for `tokens` tokens.
pub async fn build_hidden(
    gpu: &Arc<Gpu>,
    cfg: &LlmConfig,
    w: &LlmWeights,
    kv: &KvCache,
    tokens: usize,
) -> Result<Hidden> {
    let mut g = Graph::new();
    let pos = g.scalar("pos")?;
    let x = decoder(&mut g, cfg, w, kv, tokens, pos)?;
    let norm = g.tensor(&w.norm);
    let x = g.rms_norm(x, norm, cfg.rms_eps)?;
    let out = g.reshape(x, &[tokens, cfg.hidden])?;
    g.output(out);
    Ok(Hidden {
        plan: g.compile(gpu, CompileOptions::default()).await?,
        pos,
        out,
    })
}

/// Where a layer's block runs: its index, rotary table, KV caches and the step's position.
struct LayerAt {
    index: usize,
    rope: Value,
    k_cache: Value,
    v_cache: Value,
    pos: Scalar,
    tokens: usize,
}

/// `x + o_proj(attention(norm(x)))` (Gemma: `x + norm(o_proj(..))`), `[1, t, h]`; the step's
/// keys and values are written into the caches on the way.
fn attention_block(
    g: &mut Graph,
    cfg: &LlmConfig,
    lw: &LayerWeights,
    at: &LayerAt,
    x: Value,
) -> Result<Value> {
    let attn_norm = g.tensor(&lw.attn_norm);
    let hn = g.rms_norm(x, attn_norm, cfg.rms_eps)?;
    let q = project_qkv(g, cfg, lw, at, hn)?;
    // Query i sits at pos + i and sees keys 0..=pos + i (the last `window` of them in a
    // sliding-window layer); the cache holds pos + t keys.
    let opts = AttentionOptions {
        causal: true,
        scale: Some(cfg.attn_scale),
        window: cfg.window(at.index),
        softcap: cfg.attn_softcap,
    };
    let a = g.attention_with(
        q,
        at.k_cache,
        at.v_cache,
        cfg.heads,
        cfg.kv_heads,
        Dyn::slot(at.pos),
        Dyn::affine(at.pos, 1, at.tokens as u32),
        &opts,
    )?;
    let (wo, bo) = (g.tensor(&lw.wo), lw.bo.as_ref().map(|b| g.tensor(b)));
    residual_product(g, cfg, a, wo, bo, lw.post_attn_norm.as_ref(), x)
}

/// The rotated queries `[1, t, heads d]`, after writing the rotated keys and the values into
/// the caches at the run-time position.
fn project_qkv(
    g: &mut Graph,
    cfg: &LlmConfig,
    lw: &LayerWeights,
    at: &LayerAt,
    hn: Value,
) -> Result<Value> {
    let d = cfg.head_dim;
    let (rope, kc, vc, pos) = (at.rope, at.k_cache, at.v_cache, at.pos);
    match &lw.qkv {
        // One product for Q/K/V, then one kernel rotates q and k and writes k and v into the
        // caches at the run-time position.
        Stacked::One { w, bias } => {
            let (w, b) = (g.tensor(w), bias.as_ref().map(|b| g.tensor(b)));
            let mut qkv = g.linear(hn, w, b)?; // [1, t, (heads + 2 kv_heads) d]
            if let Some(QkNorms::Stacked(n)) = &lw.qk_norm {
                let n = g.tensor(n);
                let n = g.reshape(n, &[2, d])?;
                qkv = g.qk_norm(qkv, n, cfg.heads, cfg.kv_heads, cfg.rms_eps)?;
            }
            g.rope_kv(
                qkv,
                rope,
                kc,
                vc,
                cfg.heads,
                cfg.kv_heads,
                cfg.rope_interleaved,
                Dyn::slot(pos),
            )
        }
        Stacked::Apart(p) => {
            let mut out = Vec::with_capacity(3);
            for (w, b) in p {
                let (w, b) = (g.tensor(w), b.as_ref().map(|b| g.tensor(b)));
                out.push(g.linear(hn, w, b)?);
            }
            let (mut q, mut k, v) = (out[0], out[1], out[2]);
            if let Some(QkNorms::Apart(qn, kn)) = &lw.qk_norm {
                let (qn, kn) = (g.tensor(qn), g.tensor(kn));
                q = head_norm(g, q, qn, cfg.heads, d, cfg.rms_eps)?;
                k = head_norm(g, k, kn, cfg.kv_heads, d, cfg.rms_eps)?;
            }
            let q = g.rope(q, rope, cfg.heads, cfg.rope_interleaved, Dyn::slot(pos))?;
            let k = g.rope(k, rope, cfg.kv_heads, cfg.rope_interleaved, Dyn::slot(pos))?;
            let kvw = (cfg.kv_heads * d) as u32;
            g.copy_into(k, kc, Dyn::affine(pos, kvw, 0))?;
            g.copy_into(v, vc, Dyn::affine(pos, kvw, 0))?;
            Ok(q)
        }
    }
}

/// `x + down_proj(glu(gate, up))` of `norm(x)` (SwiGLU; Gemma's GELU-tanh gate, and its
/// post-norm), `[1, t, h]`.
fn ffn_block(g: &mut Graph, cfg: &LlmConfig, lw: &LayerWeights, x: Value) -> Result<Value> {
    let ffn_norm = g.tensor(&lw.ffn_norm);
    let hn = g.rms_norm(x, ffn_norm, cfg.rms_eps)?;
    let m = match &lw.gate_up {
        Stacked::One { w, .. } => {
            let w = g.tensor(w);
            let gu = g.linear(hn, w, None)?; // [1, t, 2 intermediate]: gate, then up
            let input = GluInput::Halves {
                x: gu,
                gate_first: true,
            };
            g.glu(input, cfg.act)?
        }
        Stacked::Apart(p) => {
            let (wg, wu) = (g.tensor(&p[0].0), g.tensor(&p[1].0));
            let gate = g.linear(hn, wg, None)?; // [1, t, intermediate]
            let up = g.linear(hn, wu, None)?;
            g.glu(GluInput::Pair { gate, up }, cfg.act)?
        }
    };
    let wd = g.tensor(&lw.w_down);
    residual_product(g, cfg, m, wd, None, lw.post_ffn_norm.as_ref(), x)
}

/// `x + a w^T (+ b)`, or with a post-norm (Gemma) `x + norm(a w^T (+ b))`.
fn residual_product(
    g: &mut Graph,
    cfg: &LlmConfig,
    a: Value,
    w: Value,
    b: Option<Value>,
    post_norm: Option<&Arc<Tensor>>,
    x: Value,
) -> Result<Value> {
    match post_norm {
        None => g.linear_add(a, w, b, x),
        Some(n) => {
            let o = g.linear(a, w, b)?;
            let n = g.tensor(n);
            let o = g.rms_norm(o, n, cfg.rms_eps)?;
            g.add(x, o)
        }
    }
}

/// RMSNorm of each head of `x` `[1, t, heads d]` over its `d` dims (q/k norms of projections
/// that are apart).
fn head_norm(g: &mut Graph, x: Value, w: Value, heads: usize, d: usize, eps: f32) -> Result<Value> {
    let t = g.shape(x)[1];
    let y = g.reshape(x, &[t, heads, d])?;
    let y = g.rms_norm(y, w, eps)?;
    g.reshape(y, &[1, t, heads * d])
}
