//! The decoder of every family in `config::Arch` as a graph: one function builds the graph of a step over `t` tokens
//! at a run-time position. The prefill graph (t = chunk) and the decode graph (t = 1) are two
//! compilations of it. Token ids come from the history tensor on the GPU and the sampled id goes
//! back into it, so decode needs nothing from the CPU but the run scalars.

use super::config::{LlmConfig, Rotary};
use super::weights::{
    AttnWeights, DeltaWeights, LayerWeights, LlmWeights, Mixer, MoeKind, MoeWeights, QkNorms,
    Stacked,
};
use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::graph::{Act, AttentionOptions, GluInput, UnaryOp};
use crate::kernels::delta::GatedDelta;
use crate::kernels::sample::{constraint_words, SETTINGS_LEN};
use crate::tensor::Tensor;
use crate::{CompileOptions, Dyn, Graph, Plan, Scalar, Value};
use std::sync::Arc;

/// Per-layer key and value caches `[seqs, ctx, kv_heads * head_dim]`, the token history
/// `[seqs * (ctx + 1)]` (per sequence: prompt ids, then every sampled id at its position) and
/// the rotary cos/sin tables of those `ctx` positions (one per rotary embedding: global, then
/// Gemma 3's local one). The tensors may hold several sequences (parallel slots sharing them, so
/// that one decode run serves all: [`KvCache::shared`]); this cache is sequence `seq`.
///
/// Qwen 3.5's linear-attention layers keep no keys and values but two states per sequence,
/// which every token updates in place: `conv` `[seqs, taps - 1, channels]` (the convolution's
/// last inputs) and `delta` `[seqs, v_heads, k_dim, v_dim]` (the recurrent state).
pub struct KvCache {
    /// Keys and values of each attention layer that keeps its own, in layer order
    /// (`LlmConfig::kv_index`).
    pub k: Vec<Arc<Tensor>>,
    pub v: Vec<Arc<Tensor>>,
    /// The states of each linear-attention layer, in layer order.
    pub conv: Vec<Arc<Tensor>>,
    pub delta: Vec<Arc<Tensor>>,
    pub history: Arc<Tensor>,
    pub rope: Vec<Arc<Tensor>>,
    pub ctx: usize,
    /// This cache's sequence in the tensors, and how many they hold.
    pub seq: usize,
    pub seqs: usize,
}

impl KvCache {
    /// Bytes the caches of `ctx` positions take on the GPU (keys and values for every layer, 2
    /// bytes an element when `f16`, else 4; the history, the rotary tables; linear-attention
    /// states and their snapshot): what [`KvCache::new`] and a generation allocate.
    pub fn bytes(cfg: &LlmConfig, ctx: usize, f16: bool) -> u64 {
        let el = if f16 { 2 } else { 4 };
        let attn = cfg.attention_layers();
        let kv: usize = (0..cfg.layers)
            .filter(|&i| cfg.keeps_kv(i))
            .map(|i| {
                let (kv, d) = cfg.attn_dims(i);
                2 * (ctx * kv * d).next_multiple_of(2) * el
            })
            .sum();
        let tables = 1 + usize::from(cfg.rope_local.is_some());
        let rope = tables * ctx * cfg.rope.dims.div_ceil(2) * 2 * 4;
        // The recurrent states, twice: the live ones and the snapshot prefix reuse keeps
        // (`TextModel::resume_states`).
        let states = cfg.linear.as_ref().map_or(0, |la| {
            let (c, d) = la.state_len();
            2 * (cfg.layers - attn) * (c + d) * 4
        });
        (kv + (ctx + 1) * 4 + rope + states) as u64
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
        let mut one = Self::shared(gpu, cfg, ropes, ctx, f16, 1)?;
        Ok(one.remove(0))
    }

    /// Caches for `seqs` sequences of `ctx` positions in one set of tensors: one [`KvCache`]
    /// per sequence. An f16 cache needs an even row width (sequences start on whole words).
    pub fn shared(
        gpu: &Gpu,
        cfg: &LlmConfig,
        ropes: &[(Rotary, Vec<f32>)],
        ctx: usize,
        f16: bool,
        seqs: usize,
    ) -> Result<Vec<KvCache>> {
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        let mut k = Vec::with_capacity(cfg.layers);
        let mut v = Vec::with_capacity(cfg.layers);
        let (mut conv, mut delta) = (Vec::new(), Vec::new());
        for i in 0..cfg.layers {
            if let Some(la) = cfg.linear.as_ref().filter(|_| cfg.is_linear(i)) {
                let (taps, c) = (la.conv_kernel - 1, la.conv_channels());
                let dshape = [seqs, la.v_heads, la.k_dim, la.v_dim];
                conv.push(Arc::new(Tensor::zeros(
                    gpu,
                    &format!("conv_state.{i}"),
                    &[seqs, taps, c],
                    DType::F32,
                )?));
                delta.push(Arc::new(Tensor::zeros(
                    gpu,
                    &format!("delta_state.{i}"),
                    &dshape,
                    DType::F32,
                )?));
                continue;
            }
            if !cfg.keeps_kv(i) {
                continue; // reads another layer's (Gemma 4's KV-shared layers)
            }
            let (kv_heads, d) = cfg.attn_dims(i);
            let w = kv_heads * d;
            for (caches, name) in [(&mut k, "k_cache"), (&mut v, "v_cache")] {
                caches.push(Arc::new(Tensor::zeros(
                    gpu,
                    &format!("{name}.{i}"),
                    &[seqs, ctx, w],
                    dtype,
                )?));
            }
        }
        let history = Arc::new(Tensor::zeros(
            gpu,
            "history",
            &[seqs * (ctx + 1)],
            DType::U32,
        )?);
        let rope: Vec<Arc<Tensor>> = ropes
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
        Ok((0..seqs)
            .map(|seq| KvCache {
                k: k.clone(),
                v: v.clone(),
                conv: conv.clone(),
                delta: delta.clone(),
                history: history.clone(),
                rope: rope.clone(),
                ctx,
                seq,
                seqs,
            })
            .collect())
    }

    /// Index of this sequence's first id in the history.
    pub fn history_start(&self) -> usize {
        self.seq * (self.ctx + 1)
    }

    /// Byte offset of this sequence's first id in the history buffer.
    pub fn history_bytes(&self) -> u64 {
        4 * self.history_start() as u64
    }

    /// This sequence's part of every recurrent state tensor (linear-attention layers): the
    /// tensor, the byte offset and the bytes. Empty for models without such layers.
    pub fn state_regions(&self) -> Vec<(&Arc<Tensor>, u64, u64)> {
        self.conv
            .iter()
            .chain(&self.delta)
            .map(|t| {
                let per_seq = (t.shape[1..].iter().product::<usize>() * 4) as u64;
                (t, self.seq as u64 * per_seq, per_seq)
            })
            .collect()
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
    let valid = Dyn::affine(last, 1, 1);
    let x = decoder(&mut g, cfg, w, kv, Tokens::Run { pos, tokens, valid })?;
    // Only the last valid token needs logits.
    let xl = g.slice_rows(x, Dyn::slot(last), 1)?; // [1, h]
    let logits = head(&mut g, cfg, w, xl)?; // [1, vocab]
    let logits = g.reshape(logits, &[cfg.vocab])?;
    let settings = g.input("sampler", &[SETTINGS_LEN], DType::F32)?;
    let constraint = g.input("constraint", &[constraint_words(cfg.vocab)], DType::U32)?;
    let out = g.sample_at(
        logits,
        settings,
        history,
        Some((Dyn::Static(kv.history_start() as u32), kv.ctx + 1)),
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

/// The final norm, the head and Gemma 2's soft-cap on hidden rows `[r, h]` → logits `[r, vocab]`.
fn head(g: &mut Graph, cfg: &LlmConfig, w: &LlmWeights, x: Value) -> Result<Value> {
    let norm = g.tensor(&w.norm);
    let x = g.rms_norm(x, norm, cfg.rms_eps)?;
    let head = g.tensor(&w.lm_head);
    let mut logits = g.linear(x, head, None)?;
    if let Some(cap) = cfg.final_softcap {
        logits = g.unary(logits, UnaryOp::Softcap { cap })?;
    }
    Ok(logits)
}

/// A compiled decode step of several sequences at once (continuous batching of parallel slots
/// that share one [`KvCache::shared`] set): one token of each of `rows` sequences per run, one
/// product per weight matrix for all of them. Per row `r` the run scalars give its sequence,
/// position, history index and seed; the row samples into its sequence's history with its own
/// sampler settings and constraint.
pub struct BatchStep {
    pub plan: Plan,
    pub rows: usize,
    /// First of `rows` consecutive scalars each: the cache sequence, the position of the token
    /// fed, its index in the shared history (`seq * (ctx + 1) + pos`), the sampler seed.
    pub seq: Scalar,
    pub pos: Scalar,
    pub tok: Scalar,
    pub seed: Scalar,
    /// Sampler settings `[rows, SETTINGS_LEN]`, constraints `[rows, ..]` and outputs
    /// `[rows, SAMPLE_OUT_LEN]`: a row each, as [`Step`]'s.
    pub settings: Value,
    pub constraint: Value,
    pub out: Value,
}

/// Builds and compiles [`BatchStep`] for `rows` sequences of the caches `kv` belongs to.
pub async fn build_batch(
    gpu: &Arc<Gpu>,
    cfg: &LlmConfig,
    w: &LlmWeights,
    kv: &KvCache,
    rows: usize,
) -> Result<BatchStep> {
    let mut g = Graph::new();
    let seq = g.scalars("seq", rows)?;
    let pos = g.scalars("pos", rows)?;
    let tok = g.scalars("tok", rows)?;
    let seed = g.scalars("seed", rows)?;
    let history = g.tensor(&kv.history);
    let x = decoder(
        &mut g,
        cfg,
        w,
        kv,
        Tokens::Batch {
            rows,
            seq,
            pos,
            tok,
        },
    )?;
    let x = g.reshape(x, &[rows, cfg.hidden])?;
    let logits = head(&mut g, cfg, w, x)?; // [rows, vocab]
                                           // One sampler per row, each into its sequence's part of the history.
    let settings = g.input("sampler", &[rows, SETTINGS_LEN], DType::F32)?;
    let cw = constraint_words(cfg.vocab);
    let constraint = g.input("constraint", &[rows, cw], DType::U32)?;
    let history_at = Dyn::Rows {
        first: seq,
        mul: (kv.ctx + 1) as u32,
        add: 0,
    };
    let out = g.sample_at(
        logits,
        settings,
        history,
        Some((history_at, kv.ctx + 1)),
        constraint,
        Dyn::rows(pos).plus(1),
        Dyn::rows(seed),
    )?;
    g.output(out);
    let plan = g.compile(gpu, CompileOptions::default()).await?;
    Ok(BatchStep {
        plan,
        rows,
        seq,
        pos,
        tok,
        seed,
        settings,
        constraint,
        out,
    })
}

/// The tokens a decoder graph runs: `tokens` of one sequence (the cache's) from run-time
/// position `pos`, of which the first `valid` are real (the rest a prefill run's padding, which
/// recurrent states must not see), or one token of each of `rows` sequences (per-row scalars,
/// see [`BatchStep`]).
#[derive(Clone, Copy)]
enum Tokens {
    Run {
        pos: Scalar,
        tokens: usize,
        valid: Dyn,
    },
    Batch {
        rows: usize,
        seq: Scalar,
        pos: Scalar,
        tok: Scalar,
    },
}

/// The decoder over the tokens read from the cache's token history: the embedding rows and
/// every layer (keys and values written into the caches) → hidden states `[1, tokens, h]`
/// (a batch: `[rows, 1, h]`) before the final norm.
fn decoder(
    g: &mut Graph,
    cfg: &LlmConfig,
    w: &LlmWeights,
    kv: &KvCache,
    tokens: Tokens,
) -> Result<Value> {
    let history = g.tensor(&kv.history);
    let embed = g.tensor(&w.embed);
    let ropes: Vec<Value> = kv.rope.iter().map(|t| g.tensor(t)).collect();
    let (x, (b, t)) = match tokens {
        Tokens::Run { pos, tokens, .. } => {
            let at = Dyn::slot(pos).plus(kv.history_start() as u32);
            (g.gather_at(embed, history, at, tokens)?, (1, tokens))
        }
        Tokens::Batch { rows, tok, .. } => (
            g.gather_at(embed, history, Dyn::rows(tok), rows)?,
            (rows, 1),
        ),
    };
    let mut x = g.reshape(x, &[b, t, cfg.hidden])?;
    if let Some(s) = cfg.embed_scale {
        x = g.scale(x, s, 0.0)?;
    }
    let per_layer = match &w.per_layer {
        Some(p) => per_layer_inputs(g, cfg, p, kv, tokens, x)?,
        None => Vec::new(),
    };
    for (i, lw) in w.layers.iter().enumerate() {
        let place = Place::new(tokens, kv);
        let j = cfg.mixer_index(i);
        x = match &lw.mixer {
            Mixer::Attention(aw) => {
                let c = cfg.kv_index(i);
                let at = LayerAt {
                    index: i,
                    rope: ropes[cfg.rope_index(i)],
                    k_cache: g.tensor(&kv.k[c]),
                    v_cache: g.tensor(&kv.v[c]),
                    place,
                    dims: cfg.attn_dims(i),
                };
                attention_block(g, cfg, lw, aw, &at, x)?
            }
            Mixer::Linear(dw) => {
                let states = (g.tensor(&kv.conv[j]), g.tensor(&kv.delta[j]));
                delta_block(g, cfg, lw, dw, states, place, x)?
            }
        };
        x = ffn_block(g, cfg, lw, x)?;
        if let (Some(pb), Some(&input)) = (&lw.per_layer, per_layer.get(i)) {
            x = per_layer_block(g, cfg, pb, input, x)?;
        }
        if let Some(s) = lw.scale {
            x = g.scale(x, s, 0.0)?;
        }
    }
    Ok(x)
}

/// Gemma 4's per-layer inputs `[b, t, dim]` of every layer: the token's row of the per-layer
/// table (scaled by `sqrt(dim)`) and the projection of the scaled embeddings `x` (by
/// `hidden^-1/2`, RMS-normed per layer), summed and scaled by `2^-1/2`.
fn per_layer_inputs(
    g: &mut Graph,
    cfg: &LlmConfig,
    p: &super::weights::PerLayerInputs,
    kv: &KvCache,
    tokens: Tokens,
    x: Value,
) -> Result<Vec<Value>> {
    let Some((dim, _)) = cfg.per_layer_input else {
        return Ok(Vec::new());
    };
    let (b, t) = (g.shape(x)[0], g.shape(x)[1]);
    let (n, width) = (b * t, cfg.layers * dim);
    let history = g.tensor(&kv.history);
    let table = g.tensor(&p.embed);
    let tok = match tokens {
        Tokens::Run { pos, tokens, .. } => {
            let at = Dyn::slot(pos).plus(kv.history_start() as u32);
            g.gather_at(table, history, at, tokens)?
        }
        Tokens::Batch { rows, tok, .. } => g.gather_at(table, history, Dyn::rows(tok), rows)?,
    }; // [n, layers dim]
    let tok = g.scale(tok, (dim as f32).sqrt(), 0.0)?;
    let proj = g.tensor(&p.proj);
    let ctx = g.linear(x, proj, None)?; // [b, t, layers dim]
    let ctx = g.scale(ctx, (cfg.hidden as f32).powf(-0.5), 0.0)?;
    let ctx = g.reshape(ctx, &[n * cfg.layers, dim])?;
    let norm = g.tensor(&p.norm);
    let ctx = g.rms_norm(ctx, norm, cfg.rms_eps)?;
    let ctx = g.reshape(ctx, &[n, width])?;
    let both = g.add(ctx, tok)?;
    let both = g.scale(both, 0.5f32.sqrt(), 0.0)?;
    if n == 1 {
        // One token (decode): layer i's inputs are row i of the [layers, dim] view, no copy.
        let rows = g.reshape(both, &[cfg.layers, dim])?;
        return (0..cfg.layers)
            .map(|i| {
                let s = g.slice_rows(rows, Dyn::Static(i as u32), 1)?;
                g.reshape(s, &[b, t, dim])
            })
            .collect();
    }
    // Layer i's inputs are columns [i dim, (i + 1) dim): rows of the transpose.
    let both = g.reshape(both, &[1, n, width])?;
    let cols = g.transpose(both)?; // [1, layers dim, n]
    let cols = g.reshape(cols, &[width, n])?;
    (0..cfg.layers)
        .map(|i| {
            let s = g.slice_rows(cols, Dyn::Static((i * dim) as u32), dim)?; // [dim, n]
            let s = g.reshape(s, &[1, dim, n])?;
            let s = g.transpose(s)?; // [1, n, dim]
            g.reshape(s, &[b, t, dim])
        })
        .collect()
}

/// Gemma 4's per-layer input block: `x + norm(proj(act(gate(x)) * input))`.
fn per_layer_block(
    g: &mut Graph,
    cfg: &LlmConfig,
    pb: &super::weights::PerLayerBlock,
    input: Value,
    x: Value,
) -> Result<Value> {
    let gw = g.tensor(&pb.gate);
    let gate = g.linear(x, gw, None)?;
    let m = g.glu(GluInput::Pair { gate, up: input }, cfg.act)?;
    let pw = g.tensor(&pb.proj);
    let y = g.linear(m, pw, None)?;
    let n = g.tensor(&pb.norm);
    let y = g.rms_norm(y, n, cfg.rms_eps)?;
    g.add(x, y)
}

/// The final-norm hidden states `[tokens, h]` of `tokens` tokens read from the cache's history
/// at run-time position `pos` (a decoder embedder's token embeddings), added to `g`.
pub fn final_states(
    g: &mut Graph,
    cfg: &LlmConfig,
    w: &LlmWeights,
    kv: &KvCache,
    tokens: usize,
    pos: Scalar,
) -> Result<Value> {
    let valid = Dyn::Static(tokens as u32);
    let x = decoder(g, cfg, w, kv, Tokens::Run { pos, tokens, valid })?;
    let norm = g.tensor(&w.norm);
    let x = g.rms_norm(x, norm, cfg.rms_eps)?;
    g.reshape(x, &[tokens, cfg.hidden])
}

/// Where a layer's tokens sit in the caches: the position of each row's first token, the
/// cache sequence, the keys valid after the step, and for one sequence its run.
#[derive(Clone, Copy)]
struct Place {
    pos: Dyn,
    seq: Dyn,
    kv_len: Dyn,
    /// Real tokens of each row (recurrent states update through these only).
    valid: Dyn,
    /// (position scalar, tokens, sequence) of a one-sequence run.
    run: Option<(Scalar, usize, usize)>,
}

impl Place {
    fn new(tokens: Tokens, kv: &KvCache) -> Place {
        match tokens {
            Tokens::Run { pos, tokens, valid } => Place {
                pos: Dyn::slot(pos),
                seq: Dyn::Static(kv.seq as u32),
                kv_len: Dyn::affine(pos, 1, tokens as u32),
                valid,
                run: Some((pos, tokens, kv.seq)),
            },
            Tokens::Batch { seq, pos, .. } => Place {
                pos: Dyn::rows(pos),
                seq: Dyn::rows(seq),
                kv_len: Dyn::rows(pos).plus(1),
                valid: Dyn::Static(1),
                run: None,
            },
        }
    }
}

/// Where a layer's block runs: its index, rotary table, KV caches, the tokens' place, and its
/// key/value heads and head size.
struct LayerAt {
    index: usize,
    rope: Value,
    k_cache: Value,
    v_cache: Value,
    place: Place,
    dims: (usize, usize),
}

/// `x + o_proj(attention(norm(x)))` (Gemma: `x + norm(o_proj(..))`), `[b, t, h]`; the step's
/// keys and values are written into the caches on the way.
fn attention_block(
    g: &mut Graph,
    cfg: &LlmConfig,
    lw: &LayerWeights,
    aw: &AttnWeights,
    at: &LayerAt,
    x: Value,
) -> Result<Value> {
    let attn_norm = g.tensor(&lw.attn_norm);
    let hn = g.rms_norm(x, attn_norm, cfg.rms_eps)?;
    let q = project_qkv(g, cfg, aw, at, hn)?;
    // Query i sits at pos + i and sees keys 0..=pos + i (the last `window` of them in a
    // sliding-window layer); the cache holds pos + t keys. A bidirectional model (an
    // embedder) sees every key of its input, within `window` either side in sliding layers.
    let opts = AttentionOptions {
        causal: !cfg.bidirectional,
        scale: Some(cfg.attn_scale),
        window: cfg.window(at.index),
        softcap: cfg.attn_softcap,
        seq: Some(at.place.seq),
    };
    let p = at.place;
    let a = g.attention_with(
        q, at.k_cache, at.v_cache, cfg.heads, at.dims.0, p.pos, p.kv_len, &opts,
    )?;
    // Qwen 3.5: the output gated by sigmoid of its own projection.
    let a = match &aw.gate {
        Some(w) => {
            let w = g.tensor(w);
            let gate = g.linear(hn, w, None)?;
            g.glu(GluInput::Pair { gate, up: a }, Act::Sigmoid)?
        }
        None => a,
    };
    let (wo, bo) = (g.tensor(&aw.wo), aw.bo.as_ref().map(|b| g.tensor(b)));
    residual_product(g, cfg, a, wo, bo, lw.post_attn_norm.as_ref(), x)
}

/// A linear-attention (Gated DeltaNet) layer: `x + out_proj(gated_norm(delta_rule(conv(q, k,
/// v))))` of `norm(x)`, `[b, t, h]`, updating the sequence's convolution and recurrent states
/// (`states`) with its valid tokens. Runs of several tokens take the chunked delta rule.
fn delta_block(
    g: &mut Graph,
    cfg: &LlmConfig,
    lw: &LayerWeights,
    dw: &DeltaWeights,
    (conv_state, delta_state): (Value, Value),
    p: Place,
    x: Value,
) -> Result<Value> {
    let Some(la) = &cfg.linear else {
        return Err(crate::error::Error::Unsupported(
            "a linear-attention layer in a config without its sizes".into(),
        ));
    };
    let attn_norm = g.tensor(&lw.attn_norm);
    let hn = g.rms_norm(x, attn_norm, cfg.rms_eps)?;
    // q | k | v | z | b | a in one row per token.
    let proj = match &dw.proj {
        Stacked::One { w, .. } => {
            let w = g.tensor(w);
            g.linear(hn, w, None)?
        }
        Stacked::Apart(ps) => {
            let mut out: Option<Value> = None;
            for (w, _) in ps {
                let w = g.tensor(w);
                let y = g.linear(hn, w, None)?;
                out = Some(match out {
                    None => y,
                    Some(o) => g.concat(o, y, 2)?,
                });
            }
            out.ok_or_else(|| crate::error::shape_err("delta_block", "no projections"))?
        }
    };
    let c = la.conv_channels();
    let conv_w = g.tensor(&dw.conv);
    let conv_w = g.reshape(conv_w, &[c, la.conv_kernel])?;
    let qkv = g.causal_conv(proj, conv_w, conv_state, c, p.valid, p.seq)?;
    let op = GatedDelta {
        k_heads: la.k_heads,
        v_heads: la.v_heads,
        dk: la.k_dim,
        dv: la.v_dim,
        eps: cfg.rms_eps,
        tiled: la.gguf_layout,
        valid: p.valid,
        seq: p.seq,
        chunked: g.shape(x)[1] > 1,
    };
    let (a, dt, norm) = (g.tensor(&dw.a), g.tensor(&dw.dt_bias), g.tensor(&dw.norm));
    let y = g.gated_delta(op, qkv, proj, a, dt, norm, delta_state)?;
    let out = g.tensor(&dw.out);
    residual_product(g, cfg, y, out, None, lw.post_attn_norm.as_ref(), x)
}

/// The rotated queries `[b, t, heads d]`, after writing the rotated keys and the values into
/// the caches at the tokens' place.
fn project_qkv(
    g: &mut Graph,
    cfg: &LlmConfig,
    lw: &AttnWeights,
    at: &LayerAt,
    hn: Value,
) -> Result<Value> {
    let (kv_heads, d) = at.dims;
    let (rope, kc, vc, p) = (at.rope, at.k_cache, at.v_cache, at.place);
    let heads = (cfg.heads, kv_heads);
    let qkv = match &lw.qkv {
        // One product for Q/K/V, then one kernel rotates q and k and writes k and v into the
        // caches at the run-time position.
        Stacked::One { w, bias } => {
            let (w, b) = (g.tensor(w), bias.as_ref().map(|b| g.tensor(b)));
            let mut qkv = g.linear(hn, w, b)?; // [b, t, (heads + 2 kv_heads) d]
            if let Some(QkNorms::Stacked(n)) = &lw.qk_norm {
                let n = g.tensor(n);
                let n = g.reshape(n, &[2, d])?;
                qkv = g.qk_norm(qkv, n, cfg.heads, kv_heads, cfg.rms_eps)?;
            }
            qkv
        }
        Stacked::Apart(ps) => {
            let mut out = Vec::with_capacity(3);
            for (w, b) in ps {
                let (w, b) = (g.tensor(w), b.as_ref().map(|b| g.tensor(b)));
                out.push(g.linear(hn, w, b)?);
            }
            // Gemma 4: q alone where the layer reads another's keys and values; k as v in
            // full-attention layers with keys as values (before k's norm).
            let (mut q, mut k) = (out[0], out.get(1).copied());
            let mut v = out.get(2).copied().or(k);
            match &lw.qk_norm {
                Some(QkNorms::Apart(qn, kn)) => {
                    let (qn, kn) = (g.tensor(qn), g.tensor(kn));
                    q = head_norm(g, q, qn, cfg.heads, d, cfg.rms_eps)?;
                    if let Some(kk) = k {
                        k = Some(head_norm(g, kk, kn, kv_heads, d, cfg.rms_eps)?);
                    }
                }
                Some(QkNorms::Query(qn)) => {
                    let qn = g.tensor(qn);
                    q = head_norm(g, q, qn, cfg.heads, d, cfg.rms_eps)?;
                }
                _ => {}
            }
            if let (Some(vv), Some(vn)) = (v, &lw.v_norm) {
                let vn = g.tensor(vn);
                v = Some(head_norm(g, vv, vn, kv_heads, d, cfg.rms_eps)?);
            }
            let (Some(k), Some(v)) = (k, v) else {
                let pos = p.run.map_or(p.pos, |(pos, _, _)| Dyn::slot(pos));
                return g.rope(q, rope, cfg.heads, cfg.rope_interleaved, pos);
            };
            let Some((pos, _, seq)) = p.run else {
                // A batch of sequences: one rotary step over [q | k | v] as if stacked.
                let qk = g.concat(q, k, 2)?;
                let qkv = g.concat(qk, v, 2)?;
                return g.rope_kv_seq(qkv, rope, kc, vc, heads, cfg.rope_interleaved, p.pos, p.seq);
            };
            let q = g.rope(q, rope, cfg.heads, cfg.rope_interleaved, Dyn::slot(pos))?;
            let k = g.rope(k, rope, kv_heads, cfg.rope_interleaved, Dyn::slot(pos))?;
            let kvw = (kv_heads * d) as u32;
            let first = (seq * g.shape(kc)[1]) as u32 * kvw;
            g.copy_into(k, kc, Dyn::affine(pos, kvw, 0).plus(first))?;
            g.copy_into(v, vc, Dyn::affine(pos, kvw, 0).plus(first))?;
            return Ok(q);
        }
    };
    g.rope_kv_seq(qkv, rope, kc, vc, heads, cfg.rope_interleaved, p.pos, p.seq)
}

/// `x + down_proj(glu(gate, up))` of `norm(x)` (SwiGLU; Gemma's GELU-tanh gate, and its
/// post-norm), `[1, t, h]`; with Gemma 4's mixture of experts `x + post_norm(post_norm_1(mlp)
/// + moe(x))`.
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
    let Some(moe) = &lw.moe else {
        return residual_product(g, cfg, m, wd, None, lw.post_ffn_norm.as_ref(), x);
    };
    let mlp = g.linear(m, wd, None)?;
    let y = match &moe.kind {
        MoeKind::Gemma4 {
            router_norm,
            pre_norm,
            post_norm,
            post_mlp_norm,
        } => {
            // post_norm(post_norm_1(mlp) + post_norm_2(experts(pre_norm_2(x)))), routed on x.
            let n1 = g.tensor(post_mlp_norm);
            let h1 = g.rms_norm(mlp, n1, cfg.rms_eps)?;
            let (rn, pn) = (g.tensor(router_norm), g.tensor(pre_norm));
            let r_in = g.rms_norm(x, rn, cfg.rms_eps)?;
            let e_in = g.rms_norm(x, pn, cfg.rms_eps)?;
            let e = experts(g, cfg, moe, r_in, e_in)?;
            let qn = g.tensor(post_norm);
            let h2 = g.rms_norm(e, qn, cfg.rms_eps)?;
            let sum = g.add(h1, h2)?;
            let post = lw.post_ffn_norm.as_ref().ok_or_else(|| {
                shape_err(
                    "moe block",
                    "Gemma 4's experts need its post-feed-forward norm",
                )
            })?;
            let n = g.tensor(post);
            g.rms_norm(sum, n, cfg.rms_eps)?
        }
        MoeKind::SharedExpert { gate } => {
            // experts(hn) + sigmoid(gate . hn) mlp(hn), routed on hn.
            let e = experts(g, cfg, moe, hn, hn)?;
            let gw = g.tensor(gate);
            let s = g.linear(hn, gw, None)?;
            let s = g.unary(s, UnaryOp::Sigmoid)?;
            let shared = g.mul(mlp, s)?;
            g.add(e, shared)?
        }
    };
    g.add(x, y)
}

/// A mixture-of-experts block's experts `[b, t, h]`: the router on `r_in` (softmax, top k,
/// renormalized, per-expert scale), the chosen experts' gated MLPs on `e_in` summed with their
/// weights.
fn experts(
    g: &mut Graph,
    cfg: &LlmConfig,
    moe: &MoeWeights,
    r_in: Value,
    e_in: Value,
) -> Result<Value> {
    let m = cfg
        .moe
        .ok_or_else(|| shape_err("moe block", "expert weights without a config"))?;
    let shape = g.shape(e_in).to_vec();
    let rows = shape.iter().product::<usize>() / cfg.hidden;
    let r_in = g.reshape(r_in, &[rows, cfg.hidden])?;
    let e_in = g.reshape(e_in, &[rows, cfg.hidden])?;
    let rw = g.tensor(&moe.router);
    let logits = g.linear(r_in, rw, None)?;
    let scale = g.tensor(&moe.expert_scale);
    let routes = g.moe_router(logits, scale, m.top_k, true)?;
    let (gu, down) = (g.tensor(&moe.gate_up), g.tensor(&moe.down));
    let e = g.moe_experts(e_in, routes, gu, down, cfg.act)?;
    g.reshape(e, &shape)
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

/// RMSNorm of each head of `x` `[b, t, heads d]` over its `d` dims (q/k norms of projections
/// that are apart).
fn head_norm(g: &mut Graph, x: Value, w: Value, heads: usize, d: usize, eps: f32) -> Result<Value> {
    let shape = g.shape(x).to_vec();
    let (b, t) = (shape[0], shape[1]);
    let y = g.reshape(x, &[b * t, heads, d])?;
    let y = g.rms_norm(y, w, eps)?;
    g.reshape(y, &[b, t, heads * d])
}
