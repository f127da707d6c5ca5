//! The Llama/Qwen2 decoder as a graph: one function builds the graph of a step over `t` tokens
//! at a run-time position. The prefill graph (t = chunk) and the decode graph (t = 1) are two
//! compilations of it. Token ids come from the history tensor on the GPU and the sampled id goes
//! back into it, so decode needs nothing from the CPU but the run scalars.

use super::config::LlmConfig;
use super::weights::{LlmWeights, Stacked};
use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{Act, GluInput};
use crate::kernels::sample::SETTINGS_LEN;
use crate::tensor::Tensor;
use crate::{CompileOptions, Dyn, Graph, Plan, Scalar, Value};
use std::sync::Arc;

/// Per-layer key and value caches `[1, ctx, kv_heads * head_dim]`, the token history
/// `[ctx + 1]` (prompt ids, then every sampled id at its position) and the rotary cos/sin table
/// of those `ctx` positions.
pub struct KvCache {
    pub k: Vec<Arc<Tensor>>,
    pub v: Vec<Arc<Tensor>>,
    pub history: Arc<Tensor>,
    pub rope: Arc<Tensor>,
    pub ctx: usize,
}

impl KvCache {
    /// Bytes the caches of `ctx` positions take on the GPU (f32 keys and values for every layer,
    /// the history, the rotary table): what [`KvCache::new`] allocates.
    pub fn bytes(cfg: &LlmConfig, ctx: usize) -> u64 {
        let kv = 2 * cfg.layers * ctx * cfg.kv_heads * cfg.head_dim * 4;
        let rope = ctx * cfg.head_dim.div_ceil(2) * 2 * 4;
        (kv + (ctx + 1) * 4 + rope) as u64
    }

    /// Allocates the caches for `ctx` positions and the rotary table of `inv_freq`.
    pub fn new(gpu: &Gpu, cfg: &LlmConfig, inv_freq: &[f32], ctx: usize) -> Result<KvCache> {
        let w = cfg.kv_heads * cfg.head_dim;
        let mut k = Vec::with_capacity(cfg.layers);
        let mut v = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            k.push(Arc::new(Tensor::zeros(
                gpu,
                &format!("k_cache.{i}"),
                &[1, ctx, w],
                DType::F32,
            )?));
            v.push(Arc::new(Tensor::zeros(
                gpu,
                &format!("v_cache.{i}"),
                &[1, ctx, w],
                DType::F32,
            )?));
        }
        let history = Arc::new(Tensor::zeros(gpu, "history", &[ctx + 1], DType::U32)?);
        let table = crate::kernels::rope::table(inv_freq, ctx);
        let rope = Arc::new(Tensor::from_f32(
            gpu,
            "rope_table",
            &[ctx, inv_freq.len(), 2],
            &table,
        )?);
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
    /// Sampler output (u32 `[SAMPLE_OUT_LEN]`: id, logprob bits, the top_logprobs pairs).
    pub out: Value,
    /// Logits of the last valid token (when built with `keep_logits`).
    pub logits: Option<Value>,
}

/// Builds and compiles the step graph over `tokens` tokens.
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
    let (h, d) = (cfg.hidden, cfg.head_dim);
    let kvw = cfg.kv_heads * d;
    let history = g.tensor(&kv.history);
    let embed = g.tensor(&w.embed);
    let rope = g.tensor(&kv.rope);

    let x = g.gather_at(embed, history, Dyn::slot(pos), tokens)?; // [t, h]
    let mut x = g.reshape(x, &[1, tokens, h])?;
    for (i, lw) in w.layers.iter().enumerate() {
        // Attention block.
        let attn_norm = g.tensor(&lw.attn_norm);
        let hn = g.rms_norm(x, attn_norm, cfg.rms_eps)?;
        let (kc, vc) = (g.tensor(&kv.k[i]), g.tensor(&kv.v[i]));
        let q = match &lw.qkv {
            // One product for Q/K/V, then one kernel rotates q and k and writes k and v into
            // the caches at the run-time position.
            Stacked::One { w, bias } => {
                let (w, b) = (g.tensor(w), bias.as_ref().map(|b| g.tensor(b)));
                let qkv = g.linear(hn, w, b)?; // [1, t, (heads + 2 kv_heads) d]
                let interleaved = cfg.rope_interleaved;
                g.rope_kv(
                    qkv,
                    rope,
                    kc,
                    vc,
                    cfg.heads,
                    cfg.kv_heads,
                    interleaved,
                    Dyn::slot(pos),
                )?
            }
            Stacked::Apart(p) => {
                let mut out = Vec::with_capacity(3);
                for (w, b) in p {
                    let (w, b) = (g.tensor(w), b.as_ref().map(|b| g.tensor(b)));
                    out.push(g.linear(hn, w, b)?);
                }
                let (q, k, v) = (out[0], out[1], out[2]);
                let q = g.rope(q, rope, cfg.heads, cfg.rope_interleaved, Dyn::slot(pos))?;
                let k = g.rope(k, rope, cfg.kv_heads, cfg.rope_interleaved, Dyn::slot(pos))?;
                g.copy_into(k, kc, Dyn::affine(pos, kvw as u32, 0))?;
                g.copy_into(v, vc, Dyn::affine(pos, kvw as u32, 0))?;
                q
            }
        };
        // Query i sits at pos + i and sees keys 0..=pos + i; the cache holds pos + t keys.
        let a = g.attention(
            q,
            kc,
            vc,
            cfg.heads,
            cfg.kv_heads,
            true,
            Dyn::slot(pos),
            Dyn::affine(pos, 1, tokens as u32),
        )?;
        let (wo, bo) = (g.tensor(&lw.wo), lw.bo.as_ref().map(|b| g.tensor(b)));
        x = g.linear_add(a, wo, bo, x)?; // x + o_proj(a), [1, t, h]

        // Feed-forward block (SwiGLU).
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
                g.glu(input, Act::Silu)?
            }
            Stacked::Apart(p) => {
                let (wg, wu) = (g.tensor(&p[0].0), g.tensor(&p[1].0));
                let gate = g.linear(hn, wg, None)?; // [1, t, intermediate]
                let up = g.linear(hn, wu, None)?;
                g.glu(GluInput::Pair { gate, up }, Act::Silu)?
            }
        };
        let wd = g.tensor(&lw.w_down);
        x = g.linear_add(m, wd, None, x)?; // x + down_proj(m), [1, t, h]
    }
    // Only the last valid token needs logits.
    let xl = g.slice_rows(x, Dyn::slot(last), 1)?; // [1, h]
    let norm = g.tensor(&w.norm);
    let xl = g.rms_norm(xl, norm, cfg.rms_eps)?;
    let head = g.tensor(&w.lm_head);
    let logits = g.linear(xl, head, None)?; // [1, vocab]
    let logits = g.reshape(logits, &[cfg.vocab])?;
    let settings = g.input("sampler", &[SETTINGS_LEN], DType::F32)?;
    let out = g.sample(logits, settings, history, Dyn::slot(next), Dyn::slot(seed))?;
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
        out,
        logits: keep_logits.then_some(logits),
    })
}
