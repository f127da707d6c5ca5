//! The graph builder. Model code adds ops over symbolic [`Value`]s; shapes are inferred as
//! nodes are added, so a mismatch is reported at the op that caused it. [`Graph::compile`]
//! turns the graph into a [`Plan`] that replays with one compute pass and one submit.

mod fuse;
mod ops;
mod plan;

pub use crate::kernels::elementwise::{Act, BinaryOp, UnaryOp};
pub use crate::kernels::{Dyn, Scalar};
pub use ops::Op;
pub use plan::{CompileOptions, PendingRead, Plan, Traffic};

use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::kernels::attention::Attention;
use crate::kernels::conv::Conv2d;
use crate::kernels::delta::{CausalConv, GatedDelta};
use crate::kernels::elementwise::{
    Concat, CopyInto, Glu, SliceRows, TimestepEmbedding, Transpose, Upsample2x,
};
use crate::kernels::linear::{Gather, Linear};
use crate::kernels::moe::{MoeCombine, MoeLinear, MoeLists, MoeRouter};
use crate::kernels::norm::{GroupNorm, LayerNorm, QkNorm, RmsNorm, Softmax};
use crate::kernels::rope::{Rope, RopeKv};
use crate::kernels::sample::{RandNormal, Sample};
use crate::kernels::scheduler::{LatentBlend, SchedulerStep};
use crate::kernels::RUN_SCALARS;
use crate::tensor::{numel, Tensor};
use std::sync::Arc;

/// The two ways a gated unit gets its operands.
#[derive(Clone, Copy, Debug)]
pub enum GluInput {
    /// Separate gate and up tensors (Llama's MLP).
    Pair { gate: Value, up: Value },
    /// One tensor `[.., 2f]` split in halves (diffusers' GEGLU: hidden first, gate second).
    Halves { x: Value, gate_first: bool },
}

/// Masking and scaling of [`Graph::attention_with`] beyond the defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionOptions {
    /// Query `i` sees keys `j <= q_pos + i` only.
    pub causal: bool,
    /// Score scale (default `1 / sqrt(head_dim)`; Gemma's `query_pre_attn_scalar^-0.5`).
    pub scale: Option<f32>,
    /// Sliding window: query `i` sees only keys `j > q_pos + i - window`.
    pub window: Option<usize>,
    /// Soft-capping of the scaled scores: `cap * tanh(s / cap)` (Gemma 2).
    pub softcap: Option<f32>,
    /// The cache sequence batch row 0 reads (row `b` reads `seq + b`), or per row with
    /// [`Dyn::Rows`] (default: row `b` reads cache row `b`).
    pub seq: Option<Dyn>,
}

/// The values one [`Graph::scheduler_step`] reads and writes. `x`, `x0_prev` and `unet_in` are
/// state tensors (added with `Graph::tensor`) written in place.
#[derive(Clone, Copy, Debug)]
pub struct StepValues {
    /// Model output `[b, ..]`: `b` = batch of `x` (no guidance) or twice it (`[uncond, cond]`).
    pub model_out: Value,
    /// f32 `[steps, COEFFS]`, from `Schedule::coeff_table`.
    pub coeffs: Value,
    /// f32 `[1]`: the guidance scale (used when the model output has the CFG batch).
    pub guidance: Value,
    /// The scheduler's sample (unscaled latents), updated in place.
    pub x: Value,
    /// Previous step's x0 (DPM++ 2M's history), updated in place.
    pub x0_prev: Value,
    /// The next U-Net input: `k` copies of `x' * in_scale`, written in place.
    pub unet_in: Value,
    /// u32 `[1]` state: the first step whose model output or update was NaN or infinite (an
    /// atomic minimum; start it at `u32::MAX`, which means none).
    pub status: Value,
    /// Standard normal noise like `x` (Euler ancestral, LCM); `None` when the scheduler draws none.
    pub noise: Option<Value>,
}

/// A symbolic tensor in a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Value(pub(crate) usize);

#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// Written by the caller through `Plan::write`.
    Input,
    /// An existing GPU tensor (weights, caches, state); ops may write into it.
    Tensor(Arc<Tensor>),
    /// Produced by a node.
    Node,
    /// A reshaped view of another value (same buffer, no dispatch).
    Alias(Value),
}

#[derive(Clone, Debug)]
pub(crate) struct ValueInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub source: Source,
    pub output: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub op: Op,
    pub inputs: Vec<Value>,
    /// Values written in place (external tensors), besides `out`.
    pub writes: Vec<Value>,
    pub out: Option<Value>,
}

/// A graph under construction.
#[derive(Default, Clone, Debug)]
pub struct Graph {
    pub(crate) values: Vec<ValueInfo>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) scalars: Vec<String>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Shape of a value.
    pub fn shape(&self, v: Value) -> &[usize] {
        &self.values[v.0].shape
    }

    /// Dtype of a value.
    pub fn dtype(&self, v: Value) -> DType {
        self.values[v.0].dtype
    }

    pub(crate) fn info(&self, v: Value) -> &ValueInfo {
        &self.values[v.0]
    }

    fn add_value(&mut self, name: &str, shape: Vec<usize>, dtype: DType, source: Source) -> Value {
        self.values.push(ValueInfo {
            name: name.into(),
            shape,
            dtype,
            source,
            output: false,
        });
        Value(self.values.len() - 1)
    }

    /// An input the caller writes before each run (f32 or u32).
    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Value> {
        if !matches!(dtype, DType::F32 | DType::U32) {
            return Err(Error::DType {
                op: format!("input '{name}'"),
                expected: "f32 or u32".into(),
                found: dtype.to_string(),
            });
        }
        Ok(self.add_value(name, shape.to_vec(), dtype, Source::Input))
    }

    /// An existing GPU tensor (a weight, a cache).
    pub fn tensor(&mut self, t: &Arc<Tensor>) -> Value {
        self.add_value(&t.name, t.shape.clone(), t.dtype, Source::Tensor(t.clone()))
    }

    /// `n` per-run scalar slots in a row, `name0` .. (one per batch row of a [`Dyn::Rows`]):
    /// the first.
    pub fn scalars(&mut self, name: &str, n: usize) -> Result<Scalar> {
        let first = self.scalar(&format!("{name}0"))?;
        for i in 1..n {
            let s = self.scalar(&format!("{name}{i}"))?;
            if s.0 != first.0 + i as u32 {
                return Err(Error::Unsupported(format!(
                    "run scalars '{name}0..{n}' are not consecutive"
                )));
            }
        }
        Ok(first)
    }

    /// A per-run scalar slot.
    pub fn scalar(&mut self, name: &str) -> Result<Scalar> {
        if let Some(i) = self.scalars.iter().position(|s| s == name) {
            return Ok(Scalar(i as u32));
        }
        if self.scalars.len() >= RUN_SCALARS {
            return Err(Error::Unsupported(format!(
                "more than {RUN_SCALARS} run scalars (adding '{name}')"
            )));
        }
        self.scalars.push(name.into());
        Ok(Scalar(self.scalars.len() as u32 - 1))
    }

    /// Marks a value as an output: it keeps its own buffer and can be read after a run.
    pub fn output(&mut self, v: Value) {
        let r = self.root(v);
        self.values[r.0].output = true;
        self.values[v.0].output = true;
    }

    /// Adds a node after checking its shapes; returns its output value.
    pub(crate) fn push(
        &mut self,
        op: impl Into<Op>,
        inputs: Vec<Value>,
        writes: Vec<Value>,
    ) -> Result<Option<Value>> {
        let op = op.into();
        let shapes: Vec<(&[usize], DType)> = inputs
            .iter()
            .map(|v| (self.values[v.0].shape.as_slice(), self.values[v.0].dtype))
            .collect();
        let out = op.kernel().infer(&shapes)?;
        let out = out.map(|(shape, dtype)| self.add_value(op.name(), shape, dtype, Source::Node));
        self.nodes.push(Node {
            op,
            inputs,
            writes,
            out,
        });
        Ok(out)
    }

    /// An error unless every value in `vals` is (a view of) a tensor added with
    /// [`Graph::tensor`]: what an op writing in place needs.
    fn need_tensors(&self, op: &str, what: &str, vals: &[Value]) -> Result<()> {
        match vals
            .iter()
            .find(|&&v| !matches!(self.info(self.root(v)).source, Source::Tensor(_)))
        {
            Some(&v) => Err(shape_err(
                op,
                format!(
                    "{what} '{}' must be a tensor added with Graph::tensor",
                    self.info(v).name
                ),
            )),
            None => Ok(()),
        }
    }

    fn push1(&mut self, op: impl Into<Op>, inputs: Vec<Value>) -> Result<Value> {
        let op = op.into();
        let name = op.name();
        self.push(op, inputs, vec![])?
            .ok_or_else(|| shape_err(name, "op has no output"))
    }

    /// `x @ w^T (+ bias)`: x `[.., k]` f32, w `[n, k]` in any weight dtype (checkpoint layout),
    /// or an f32 value `[b, n, k]` for a batched product. Output `[.., n]`.
    pub fn linear(&mut self, x: Value, w: Value, bias: Option<Value>) -> Result<Value> {
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        self.push1(Linear::new(bias.is_some(), false), inputs)
    }

    /// `residual + x @ w^T (+ bias)` in one op: the residual connection of a transformer block
    /// added in the product's epilogue. `residual` has the output's shape.
    pub fn linear_add(
        &mut self,
        x: Value,
        w: Value,
        bias: Option<Value>,
        residual: Value,
    ) -> Result<Value> {
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        inputs.push(residual);
        self.push1(Linear::new(bias.is_some(), true), inputs)
    }

    /// Attention with online softmax. q `[b, lq, heads*d]`, k/v `[b, lk, kv_heads*d]` (or a
    /// cache with `lk` rows of which `kv_len` are valid). Causal: query `i` sees keys
    /// `j <= q_pos + i`. Output `[b, lq, heads*d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: Value,
        k: Value,
        v: Value,
        heads: usize,
        kv_heads: usize,
        causal: bool,
        q_pos: Dyn,
        kv_len: Dyn,
    ) -> Result<Value> {
        let opts = AttentionOptions {
            causal,
            ..Default::default()
        };
        self.attention_with(q, k, v, heads, kv_heads, q_pos, kv_len, &opts)
    }

    /// [`Graph::attention`] with a score scale other than `1 / sqrt(head_dim)`, a sliding
    /// window or soft-capped scores (see [`AttentionOptions`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with(
        &mut self,
        q: Value,
        k: Value,
        v: Value,
        heads: usize,
        kv_heads: usize,
        q_pos: Dyn,
        kv_len: Dyn,
        opts: &AttentionOptions,
    ) -> Result<Value> {
        let shape = self.shape(q);
        let head_dim = shape.last().copied().unwrap_or(0) / heads.max(1);
        let scale = opts.scale.unwrap_or_else(|| 1.0 / (head_dim as f32).sqrt());
        self.push1(
            Attention {
                heads,
                kv_heads,
                causal: opts.causal,
                scale,
                q_pos,
                kv_len,
                window: opts.window.unwrap_or(0),
                softcap: opts.softcap.unwrap_or(0.0),
                seq: opts.seq,
            },
            vec![q, k, v],
        )
    }

    /// Softmax over the last dimension.
    pub fn softmax(&mut self, x: Value) -> Result<Value> {
        self.push1(Softmax, vec![x])
    }

    /// RMSNorm over the last dimension with weight `w`.
    pub fn rms_norm(&mut self, x: Value, w: Value, eps: f32) -> Result<Value> {
        self.push1(RmsNorm { eps }, vec![x, w])
    }

    /// Per-head RMSNorm of the q and k heads of a stacked Q/K/V projection `[.., (heads + 2
    /// kv_heads) d]` with `w` `[2, d]` (q_norm, k_norm); v heads pass through.
    pub fn qk_norm(
        &mut self,
        qkv: Value,
        w: Value,
        heads: usize,
        kv_heads: usize,
        eps: f32,
    ) -> Result<Value> {
        self.push1(
            QkNorm {
                heads,
                kv_heads,
                eps,
            },
            vec![qkv, w],
        )
    }

    /// LayerNorm over the last dimension with weight and bias.
    pub fn layer_norm(&mut self, x: Value, w: Value, b: Value, eps: f32) -> Result<Value> {
        self.push1(LayerNorm { eps }, vec![x, w, b])
    }

    /// GroupNorm over `[b, c, ...]` with per-channel weight and bias, optionally followed by SiLU.
    pub fn group_norm(
        &mut self,
        x: Value,
        w: Value,
        b: Value,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<Value> {
        self.push1(GroupNorm { groups, eps, silu }, vec![x, w, b])
    }

    /// Rotary embedding on `[.., l, heads*d]`; `table` is `[positions, rot_dim/2, 2]` (cos, sin)
    /// from [`crate::kernels::rope::table`] (any frequency scaling already applied). Token `i`
    /// is at position `pos + i`, which must be below `positions`.
    pub fn rope(
        &mut self,
        x: Value,
        table: Value,
        heads: usize,
        interleaved: bool,
        pos: Dyn,
    ) -> Result<Value> {
        self.push1(
            Rope {
                heads,
                interleaved,
                pos,
            },
            vec![x, table],
        )
    }

    /// The rotary step of a decoder layer with a stacked Q/K/V projection (see
    /// [`crate::kernels::rope::RopeKv`]): returns rotated q and writes rotated k and v into the
    /// caches (tensors added with `Graph::tensor`) at row `pos + token`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv(
        &mut self,
        qkv: Value,
        table: Value,
        k_cache: Value,
        v_cache: Value,
        heads: usize,
        kv_heads: usize,
        interleaved: bool,
        pos: Dyn,
    ) -> Result<Value> {
        let heads = (heads, kv_heads);
        self.rope_kv_seq(
            qkv,
            table,
            k_cache,
            v_cache,
            heads,
            interleaved,
            pos,
            Dyn::Static(0),
        )
    }

    /// [`Graph::rope_kv`] into sequence `seq` of caches holding several (`[s, cap, kv_heads
    /// d]`); with per-row `pos` and `seq` ([`Dyn::Rows`]) qkv `[b, 1, ..]` is one token of each
    /// of `b` sequences.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_seq(
        &mut self,
        qkv: Value,
        table: Value,
        k_cache: Value,
        v_cache: Value,
        (heads, kv_heads): (usize, usize),
        interleaved: bool,
        pos: Dyn,
        seq: Dyn,
    ) -> Result<Value> {
        self.need_tensors("rope_kv", "cache", &[k_cache, v_cache])?;
        let op = RopeKv {
            heads,
            kv_heads,
            interleaved,
            pos,
            seq,
        };
        self.push(
            op,
            vec![qkv, table, k_cache, v_cache],
            vec![k_cache, v_cache],
        )?
        .ok_or_else(|| shape_err("rope_kv", "no output"))
    }

    /// The short causal convolution of a linear-attention layer with SiLU (see
    /// [`CausalConv`]): the first `channels` columns of x `[b, t, width]` convolved over time
    /// with `w` `[channels, k]`, continuing from and updating `state` `[seqs, k - 1, channels]`
    /// (a tensor added with `Graph::tensor`) for the first `valid` tokens of each row, of
    /// sequence `seq`. Output `[b, t, channels]`.
    pub fn causal_conv(
        &mut self,
        x: Value,
        w: Value,
        state: Value,
        channels: usize,
        valid: Dyn,
        seq: Dyn,
    ) -> Result<Value> {
        self.need_tensors("causal_conv", "state", &[state])?;
        let op = CausalConv {
            channels,
            valid,
            seq,
        };
        self.push(op, vec![x, w, state], vec![state])?
            .ok_or_else(|| shape_err("causal_conv", "no output"))
    }

    /// The gated delta rule and gated RMSNorm of a linear-attention layer (see [`GatedDelta`]
    /// for the inputs), updating `state` (a tensor added with `Graph::tensor`).
    #[allow(clippy::too_many_arguments)]
    pub fn gated_delta(
        &mut self,
        op: GatedDelta,
        qkv: Value,
        proj: Value,
        a: Value,
        dt: Value,
        norm_w: Value,
        state: Value,
    ) -> Result<Value> {
        self.need_tensors("gated_delta", "state", &[state])?;
        self.push(op, vec![qkv, proj, a, dt, norm_w, state], vec![state])?
            .ok_or_else(|| shape_err("gated_delta", "no output"))
    }

    /// Mixture-of-experts routing of router logits `[rows, experts]` (see [`MoeRouter`]): u32
    /// `[rows, 2 top_k]` (expert id, weight bits) pairs.
    pub fn moe_router(
        &mut self,
        logits: Value,
        scale: Value,
        top_k: usize,
        renorm: bool,
    ) -> Result<Value> {
        self.push1(MoeRouter { top_k, renorm }, vec![logits, scale])
    }

    /// A mixture-of-experts layer's experts on `x` `[rows, k]` (see [`crate::kernels::moe`]):
    /// `routes` (a [`Graph::moe_router`]'s), `gate_up` `[experts, 2 n, k]` (gate rows first),
    /// `down` `[experts, h, n]`; each row's `sum_j weight_j down_j(act(gate_j x) * up_j x)`,
    /// `[rows, h]`.
    pub fn moe_experts(
        &mut self,
        x: Value,
        routes: Value,
        gate_up: Value,
        down: Value,
        act: Act,
    ) -> Result<Value> {
        let (experts, top_k) = match (self.shape(gate_up), self.shape(routes)) {
            (&[e, _, _], &[_, k2]) => (e, k2 / 2),
            (w, r) => {
                return Err(shape_err(
                    "moe_experts",
                    format!("expert weights {w:?} and routes {r:?}: expected [experts, n, k] and [rows, 2 top_k]"),
                ))
            }
        };
        let lists = self.push1(MoeLists { experts, top_k }, vec![routes])?;
        let one = |per_pair| MoeLinear { top_k, per_pair };
        let gu = self.push1(one(false), vec![x, gate_up, lists, routes])?;
        let input = GluInput::Halves {
            x: gu,
            gate_first: true,
        };
        let m = self.glu(input, act)?;
        let y = self.push1(one(true), vec![m, down, lists, routes])?;
        self.push1(MoeCombine { top_k }, vec![y, routes])
    }

    /// 2D convolution, NCHW: x `[b, ci, h, w]`, w `[co, ci, kh, kw]`, optional bias `[co]`.
    pub fn conv2d(
        &mut self,
        x: Value,
        w: Value,
        bias: Option<Value>,
        stride: usize,
        pad: usize,
    ) -> Result<Value> {
        self.conv2d_padded(x, w, bias, stride, pad, 0)
    }

    /// [`Graph::conv2d`] with `pad_end` more zero rows and columns after the input (diffusers'
    /// `Downsample2D` with `padding=0` pads (0, 1, 0, 1)).
    pub fn conv2d_padded(
        &mut self,
        x: Value,
        w: Value,
        bias: Option<Value>,
        stride: usize,
        pad: usize,
        pad_end: usize,
    ) -> Result<Value> {
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        self.push1(
            Conv2d {
                stride,
                pad,
                pad_end,
                bias: bias.is_some(),
            },
            inputs,
        )
    }

    /// Nearest-neighbour 2x upsampling of `[b, c, h, w]`.
    pub fn upsample2x(&mut self, x: Value) -> Result<Value> {
        self.push1(Upsample2x, vec![x])
    }

    /// Concatenation along `axis`.
    pub fn concat(&mut self, a: Value, b: Value, axis: usize) -> Result<Value> {
        self.push1(Concat { axis }, vec![a, b])
    }

    /// An elementwise activation.
    pub fn unary(&mut self, x: Value, op: UnaryOp) -> Result<Value> {
        self.push1(op, vec![x])
    }

    /// `x * mul + add`.
    pub fn scale(&mut self, x: Value, mul: f32, add: f32) -> Result<Value> {
        self.push1(UnaryOp::Scale { mul, add }, vec![x])
    }

    /// Elementwise binary op with numpy broadcasting.
    pub fn binary(&mut self, a: Value, b: Value, op: BinaryOp) -> Result<Value> {
        self.push1(op, vec![a, b])
    }

    /// `a + b` with broadcasting.
    pub fn add(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(a, b, BinaryOp::Add)
    }

    /// `a * b` with broadcasting.
    pub fn mul(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(a, b, BinaryOp::Mul)
    }

    /// Gated unit `act(gate) * up`: SwiGLU (`Act::Silu`) or GEGLU (`Act::GeluErf`).
    pub fn glu(&mut self, input: GluInput, act: Act) -> Result<Value> {
        match input {
            GluInput::Pair { gate, up } => self.push1(Glu { act, split: None }, vec![gate, up]),
            GluInput::Halves { x, gate_first } => self.push1(
                Glu {
                    act,
                    split: Some(gate_first),
                },
                vec![x],
            ),
        }
    }

    /// Sinusoidal timestep embedding of `t` `[b]` → `[b, dim]` (diffusers' `get_timestep_embedding`).
    pub fn timestep_embedding(
        &mut self,
        t: Value,
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f32,
    ) -> Result<Value> {
        self.push1(
            TimestepEmbedding {
                dim,
                flip_sin_to_cos,
                shift,
                max_period: 10000.0,
            },
            vec![t],
        )
    }

    /// Embedding rows: table `[v, d]` (any weight dtype), ids `[n]` u32 → `[n, d]`.
    pub fn gather(&mut self, table: Value, ids: Value) -> Result<Value> {
        let n = self.shape(ids).first().copied().unwrap_or(0);
        self.push1(
            Gather {
                n,
                ids_offset: Dyn::Static(0),
            },
            vec![table, ids],
        )
    }

    /// Embedding rows for `n` ids read from `ids` starting at a run-time offset (e.g. the token
    /// history at the current position) → `[n, d]`; with a per-row offset ([`Dyn::Rows`]) row
    /// `i` reads `ids[offset[i]]` (one token of each of `n` sequences).
    pub fn gather_at(&mut self, table: Value, ids: Value, offset: Dyn, n: usize) -> Result<Value> {
        self.push1(
            Gather {
                n,
                ids_offset: offset,
            },
            vec![table, ids],
        )
    }

    /// A view of `v` with another shape of the same element count (no copy, no dispatch).
    pub fn reshape(&mut self, v: Value, shape: &[usize]) -> Result<Value> {
        if numel(shape) != numel(self.shape(v)) {
            return Err(shape_err(
                "reshape",
                format!(
                    "{:?} has {} elements, {shape:?} has {}",
                    self.shape(v),
                    numel(self.shape(v)),
                    numel(shape)
                ),
            ));
        }
        let root = self.root(v);
        let (name, dtype) = (self.info(v).name.clone(), self.dtype(v));
        Ok(self.add_value(&name, shape.to_vec(), dtype, Source::Alias(root)))
    }

    /// The value whose buffer `v` uses.
    pub(crate) fn root(&self, v: Value) -> Value {
        match self.values[v.0].source {
            Source::Alias(r) => r,
            _ => v,
        }
    }

    /// `[b, m, n]` → `[b, n, m]` (NCHW feature maps to token sequences and back).
    pub fn transpose(&mut self, x: Value) -> Result<Value> {
        self.push1(Transpose, vec![x])
    }

    /// Rows `[offset, offset + rows)` of `x` viewed as `[r, c]` (c = last dim) → `[rows, c]`.
    pub fn slice_rows(&mut self, x: Value, offset: Dyn, rows: usize) -> Result<Value> {
        self.push1(SliceRows { offset, rows }, vec![x])
    }

    /// Samples one token from logits `[v]` with the sampler settings in `settings` (an f32
    /// input of [`crate::kernels::sample::SETTINGS_LEN`] values, see [`crate::kernels::sample::SamplerSettings`]).
    /// `history` (u32 `[cap]`) holds previous ids for the repetition penalty; the drawn id is
    /// appended at index `counter` (which also selects the RNG stream). Output: u32
    /// `[SAMPLE_OUT_LEN]` = (token id, f32 bits of its log-probability under the unmodified
    /// logits), then the `top_logprobs` (id, log-probability bits) pairs. `constraint` (u32
    /// `[constraint_words(v)]`, [`crate::kernels::sample::constraint_words`]) holds the
    /// allowed-id bitmask and the logit biases the settings switch on.
    pub fn sample(
        &mut self,
        logits: Value,
        settings: Value,
        history: Value,
        constraint: Value,
        counter: Dyn,
        seed: Dyn,
    ) -> Result<Value> {
        self.sample_at(logits, settings, history, None, constraint, counter, seed)
    }

    /// [`Graph::sample`] for one of several sequences whose ids share `history`: its part is
    /// `history_at` = (first index, length), and `counter` counts from that index.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_at(
        &mut self,
        logits: Value,
        settings: Value,
        history: Value,
        history_at: Option<(Dyn, usize)>,
        constraint: Value,
        counter: Dyn,
        seed: Dyn,
    ) -> Result<Value> {
        let out = self.push(
            Sample {
                counter,
                seed,
                history_at,
            },
            vec![logits, settings, history, constraint],
            vec![history],
        )?;
        out.ok_or_else(|| shape_err("sample", "no output"))
    }

    /// Standard normal noise `[shape]` from the counter-based RNG (seeded per run).
    pub fn randn(&mut self, shape: &[usize], seed: Dyn, stream: u32) -> Result<Value> {
        self.push1(
            RandNormal {
                shape: shape.to_vec(),
                seed,
                stream,
            },
            vec![],
        )
    }

    /// One denoising step of a scheduler (see [`crate::diffusion::schedulers`]): reads row
    /// `step` of the coefficient table and updates the state tensors `x`, `x0_prev` and
    /// `unet_in` in place, so one compiled graph replays every step.
    pub fn scheduler_step(&mut self, v: &StepValues, step: Dyn) -> Result<()> {
        self.need_tensors(
            "scheduler_step",
            "state",
            &[v.x, v.x0_prev, v.unet_in, v.status],
        )?;
        let mut inputs = vec![
            v.model_out,
            v.coeffs,
            v.guidance,
            v.x,
            v.x0_prev,
            v.unet_in,
            v.status,
        ];
        inputs.extend(v.noise);
        self.push(
            SchedulerStep {
                step,
                noise: v.noise.is_some(),
            },
            inputs,
            vec![v.x, v.x0_prev, v.unet_in, v.status],
        )?;
        Ok(())
    }

    /// Inpainting with an ordinary U-Net, after [`Graph::scheduler_step`] at row `step`: the
    /// pixels outside `mask` go back to `init` noised as the table's row says (see
    /// [`LatentBlend`]); `x` and `unet_in` (tensors of the step state) are written in place.
    #[allow(clippy::too_many_arguments)]
    pub fn latent_blend(
        &mut self,
        table: Value,
        init: Value,
        noise: Value,
        mask: Value,
        x: Value,
        unet_in: Value,
        step: Dyn,
    ) -> Result<()> {
        self.need_tensors("latent_blend", "state", &[x, unet_in])?;
        self.push(
            LatentBlend { step },
            vec![table, init, noise, mask, x, unet_in],
            vec![x, unet_in],
        )?;
        Ok(())
    }

    /// Copies `src` into `dst` starting at element `offset` (a KV-cache write, a state update).
    pub fn copy_into(&mut self, src: Value, dst: Value, offset: Dyn) -> Result<()> {
        self.need_tensors("copy_into", "destination", &[dst])?;
        let (n, cap) = (numel(self.shape(src)), numel(self.shape(dst)));
        if let Dyn::Static(o) = offset {
            if o as usize + n > cap {
                return Err(shape_err(
                    "copy_into",
                    format!(
                        "{n} elements at offset {o} overflow '{}' of {cap}",
                        self.info(dst).name
                    ),
                ));
            }
        }
        self.push(CopyInto { offset, cap }, vec![src, dst], vec![dst])?;
        Ok(())
    }
}
