//! The op enum: what each node computes, its shape rule, and which kernel family encodes it.

use super::Scalar;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::kernels::{self, Bound, Ctx, Dispatch};
use crate::tensor::numel;

/// A per-run integer: fixed at compile time, or `add + mul * scalar` read at run time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dyn {
    Static(u32),
    Slot { slot: Scalar, mul: u32, add: u32 },
}

impl Dyn {
    /// The value of scalar slot `s`.
    pub fn slot(s: Scalar) -> Self {
        Dyn::Slot {
            slot: s,
            mul: 1,
            add: 0,
        }
    }
    /// `add + mul * s`.
    pub fn affine(s: Scalar, mul: u32, add: u32) -> Self {
        Dyn::Slot { slot: s, mul, add }
    }
    /// The (add, slot, mul) words a shader's `dyn_val` reads; slot `0xffffffff` = static.
    pub fn words(self) -> [u32; 3] {
        match self {
            Dyn::Static(v) => [v, u32::MAX, 0],
            Dyn::Slot { slot, mul, add } => [add, slot.0, mul],
        }
    }
    /// The value given the run scalars (used by the CPU side and tests).
    pub fn eval(self, scalars: &[u32]) -> u32 {
        match self {
            Dyn::Static(v) => v,
            Dyn::Slot { slot, mul, add } => add + mul * scalars[slot.0 as usize],
        }
    }
}

/// Elementwise activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Silu,
    GeluErf,
    GeluTanh,
    QuickGelu,
    Scale { mul: f32, add: f32 },
}

/// Gate activations of [`Op::Glu`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Silu,
    GeluErf,
    GeluTanh,
}

/// Binary elementwise ops (numpy broadcasting).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BinaryOp {
    Add,
    Mul,
}

/// The two ways a gated unit gets its operands.
#[derive(Clone, Copy, Debug)]
pub enum GluInput {
    /// Separate gate and up tensors (Llama's MLP).
    Pair {
        gate: super::Value,
        up: super::Value,
    },
    /// One tensor `[.., 2f]` split in halves (diffusers' GEGLU: hidden first, gate second).
    Halves { x: super::Value, gate_first: bool },
}

/// One operation of the graph. Fused ops are explicit variants.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Linear {
        bias: bool,
    },
    Attention {
        heads: usize,
        kv_heads: usize,
        causal: bool,
        scale: f32,
        q_pos: Dyn,
        kv_len: Dyn,
    },
    Softmax,
    RmsNorm {
        eps: f32,
    },
    LayerNorm {
        eps: f32,
    },
    GroupNorm {
        groups: usize,
        eps: f32,
        silu: bool,
    },
    Rope {
        heads: usize,
        interleaved: bool,
        pos: Dyn,
    },
    Conv2d {
        stride: usize,
        pad: usize,
        bias: bool,
    },
    Upsample2x,
    Concat {
        axis: usize,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Glu {
        act: Act,
        split: Option<bool>,
    },
    TimestepEmbedding {
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f32,
        max_period: f32,
    },
    Gather {
        n: usize,
        ids_offset: Dyn,
    },
    SliceRows {
        offset: Dyn,
        rows: usize,
    },
    Transpose,
    Sample {
        counter: Dyn,
        seed: Dyn,
    },
    RandNormal {
        shape: Vec<usize>,
        seed: Dyn,
        stream: u32,
    },
    CopyInto {
        offset: Dyn,
        cap: usize,
    },
    /// One denoising step at coefficient row `step`; `noise` when the step reads a noise input.
    SchedulerStep {
        step: Dyn,
        noise: bool,
    },
}

fn need_f32(op: &str, dt: DType) -> Result<()> {
    if dt != DType::F32 {
        return Err(Error::DType {
            op: op.into(),
            expected: "f32".into(),
            found: dt.to_string(),
        });
    }
    Ok(())
}

/// Ops that move 32-bit words (copies, slices, transposes) need one element per word.
fn need_plain(op: &str, dt: DType) -> Result<()> {
    if !matches!(dt, DType::F32 | DType::U32) {
        return Err(Error::DType {
            op: op.into(),
            expected: "f32 or u32".into(),
            found: dt.to_string(),
        });
    }
    Ok(())
}

/// Numpy broadcasting of two shapes.
pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

impl Op {
    /// Short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::Attention { .. } => "attention",
            Op::Softmax => "softmax",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::GroupNorm { .. } => "group_norm",
            Op::Rope { .. } => "rope",
            Op::Conv2d { .. } => "conv2d",
            Op::Upsample2x => "upsample2x",
            Op::Concat { .. } => "concat",
            Op::Unary(_) => "unary",
            Op::Binary(_) => "binary",
            Op::Glu { .. } => "glu",
            Op::TimestepEmbedding { .. } => "timestep_embedding",
            Op::Gather { .. } => "gather",
            Op::SliceRows { .. } => "slice_rows",
            Op::Transpose => "transpose",
            Op::Sample { .. } => "sample",
            Op::RandNormal { .. } => "randn",
            Op::CopyInto { .. } => "copy_into",
            Op::SchedulerStep { .. } => "scheduler_step",
        }
    }

    /// Output shape and dtype from input shapes and dtypes (`None` for in-place ops).
    pub(crate) fn infer(&self, ins: &[(&[usize], DType)]) -> Result<Option<(Vec<usize>, DType)>> {
        let name = self.name();
        let err = |m: String| shape_err(name, m);
        let f32_out = |s: &[usize]| Ok(Some((s.to_vec(), DType::F32)));
        match self {
            Op::Linear { bias } => {
                let (x, w) = (ins[0], ins[1]);
                need_f32(name, x.1)?;
                let k = *x.0.last().ok_or_else(|| err("input is a scalar".into()))?;
                let (n, wk) = match w.0.len() {
                    2 => (w.0[0], w.0[1]),
                    3 if w.1 == DType::F32 => (w.0[1], w.0[2]),
                    _ => {
                        return Err(err(format!(
                            "weight shape {:?}: expected [n, k] (or f32 [b, n, k])",
                            w.0
                        )))
                    }
                };
                if wk != k {
                    return Err(err(format!(
                        "input {:?} has k = {k}, weight {:?} has k = {wk}",
                        x.0, w.0
                    )));
                }
                if w.0.len() == 3 && (x.0.len() != 3 || x.0[0] != w.0[0]) {
                    return Err(err(format!(
                        "batched product needs x [b, m, k] with b = {}, found {:?}",
                        w.0[0], x.0
                    )));
                }
                if *bias {
                    need_f32("linear bias", ins[2].1)?;
                    if ins[2].0 != [n] {
                        return Err(err(format!("bias shape {:?}, expected [{n}]", ins[2].0)));
                    }
                }
                let mut s = x.0.to_vec();
                *s.last_mut().unwrap_or(&mut 0) = n;
                f32_out(&s)
            }
            Op::Attention {
                heads, kv_heads, ..
            } => {
                let (q, k, v) = (ins[0].0, ins[1].0, ins[2].0);
                for i in ins {
                    need_f32(name, i.1)?;
                }
                if q.len() != 3 || k.len() != 3 || v != k {
                    return Err(err(format!(
                        "expected q [b, lq, h*d], k = v [b, lk, kvh*d]; found {q:?}, {k:?}, {v:?}"
                    )));
                }
                if *heads == 0 || *kv_heads == 0 || heads % kv_heads != 0 || q[2] % heads != 0 {
                    return Err(err(format!(
                        "{heads} heads, {kv_heads} kv heads and width {} do not divide",
                        q[2]
                    )));
                }
                let d = q[2] / heads;
                if k[2] != kv_heads * d || k[0] != q[0] {
                    return Err(err(format!(
                        "k {k:?} does not match {kv_heads} kv heads of dim {d} and batch {}",
                        q[0]
                    )));
                }
                if d > kernels::attention::MAX_HEAD_DIM {
                    return Err(err(format!(
                        "head dim {d} exceeds {}",
                        kernels::attention::MAX_HEAD_DIM
                    )));
                }
                f32_out(q)
            }
            Op::Softmax => {
                need_f32(name, ins[0].1)?;
                f32_out(ins[0].0)
            }
            Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
                let x = ins[0].0;
                let d = *x.last().ok_or_else(|| err("input is a scalar".into()))?;
                for i in &ins[1..] {
                    need_f32(name, i.1)?;
                    if i.0 != [d] {
                        return Err(err(format!("parameter shape {:?}, expected [{d}]", i.0)));
                    }
                }
                f32_out(x)
            }
            Op::GroupNorm { groups, .. } => {
                let x = ins[0].0;
                if x.len() < 2 || *groups == 0 || !x[1].is_multiple_of(*groups) {
                    return Err(err(format!(
                        "input {x:?} needs [b, c, ...] with c divisible by {groups} groups"
                    )));
                }
                for i in &ins[1..] {
                    if i.0 != [x[1]] {
                        return Err(err(format!(
                            "parameter shape {:?}, expected [{}]",
                            i.0, x[1]
                        )));
                    }
                }
                f32_out(x)
            }
            Op::Rope { heads, .. } => {
                let x = ins[0].0;
                let w = *x.last().unwrap_or(&0);
                if x.len() < 2 || *heads == 0 || !w.is_multiple_of(*heads) {
                    return Err(err(format!(
                        "input {x:?} needs [.., l, heads*d] with {heads} heads"
                    )));
                }
                let d = w / heads;
                let t = ins[1].0;
                if t.len() != 3 || t[2] != 2 || t[0] == 0 {
                    return Err(err(format!(
                        "table {t:?} needs [positions, half, 2] (cos, sin)"
                    )));
                }
                let half = t[1];
                if 2 * half > d || half == 0 {
                    return Err(err(format!("{half} frequencies do not fit head dim {d}")));
                }
                f32_out(x)
            }
            Op::Conv2d { stride, bias, .. } => {
                let (x, w) = (ins[0].0, ins[1].0);
                need_f32(name, ins[0].1)?;
                if x.len() != 4
                    || w.len() != 4
                    || w[1] != x[1]
                    || w[2] != w[3]
                    || !matches!(w[2], 1 | 3)
                {
                    return Err(err(format!("expected x [b, ci, h, w], w [co, ci, k, k] with k 1 or 3; found {x:?}, {w:?}")));
                }
                if !matches!(stride, 1 | 2) {
                    return Err(err(format!("stride {stride} (1 or 2 supported)")));
                }
                if *bias && ins[2].0 != [w[0]] {
                    return Err(err(format!(
                        "bias shape {:?}, expected [{}]",
                        ins[2].0, w[0]
                    )));
                }
                let (ho, wo) = kernels::conv::out_hw(self, x[2], x[3], w[2])
                    .ok_or_else(|| err(format!("input {x:?} too small")))?;
                f32_out(&[x[0], w[0], ho, wo])
            }
            Op::Upsample2x => {
                let x = ins[0].0;
                if x.len() != 4 {
                    return Err(err(format!("expected [b, c, h, w], found {x:?}")));
                }
                f32_out(&[x[0], x[1], 2 * x[2], 2 * x[3]])
            }
            Op::Concat { axis } => {
                let (a, b) = (ins[0].0, ins[1].0);
                let ok = a.len() == b.len()
                    && *axis < a.len()
                    && (0..a.len()).all(|i| i == *axis || a[i] == b[i]);
                if !ok || ins[0].1 != ins[1].1 {
                    return Err(err(format!(
                        "cannot concatenate {a:?} and {b:?} along axis {axis}"
                    )));
                }
                let mut s = a.to_vec();
                s[*axis] += b[*axis];
                Ok(Some((s, ins[0].1)))
            }
            Op::Unary(_) => {
                need_f32(name, ins[0].1)?;
                f32_out(ins[0].0)
            }
            Op::Binary(_) => {
                let s = broadcast(ins[0].0, ins[1].0)
                    .filter(|s| s.len() <= 4)
                    .ok_or_else(|| {
                        err(format!(
                            "shapes {:?} and {:?} do not broadcast (rank <= 4)",
                            ins[0].0, ins[1].0
                        ))
                    })?;
                f32_out(&s)
            }
            Op::Glu { split, .. } => match split {
                None => {
                    if ins[0].0 != ins[1].0 {
                        return Err(err(format!(
                            "gate {:?} and up {:?} differ",
                            ins[0].0, ins[1].0
                        )));
                    }
                    f32_out(ins[0].0)
                }
                Some(_) => {
                    let mut s = ins[0].0.to_vec();
                    let last = s
                        .last_mut()
                        .ok_or_else(|| err("input is a scalar".into()))?;
                    if *last % 2 != 0 {
                        return Err(err(format!("last dim {} is odd", *last)));
                    }
                    *last /= 2;
                    f32_out(&s)
                }
            },
            Op::TimestepEmbedding { dim, .. } => {
                if ins[0].0.len() != 1 || dim % 2 != 0 {
                    return Err(err(format!(
                        "expected t [b] and an even dim, found {:?}, {dim}",
                        ins[0].0
                    )));
                }
                f32_out(&[ins[0].0[0], *dim])
            }
            Op::Gather { n, ids_offset } => {
                let (t, ids) = (ins[0].0, ins[1]);
                if t.len() != 2 || ids.0.len() != 1 || ids.1 != DType::U32 {
                    return Err(err(format!(
                        "expected table [v, d] and u32 ids [n], found {t:?}, {:?} {}",
                        ids.0, ids.1
                    )));
                }
                if let Dyn::Static(o) = ids_offset {
                    if *o as usize + n > ids.0[0] {
                        return Err(err(format!(
                            "{n} ids at offset {o} overflow ids of length {}",
                            ids.0[0]
                        )));
                    }
                }
                f32_out(&[*n, t[1]])
            }
            Op::Transpose => {
                let x = ins[0].0;
                need_plain(name, ins[0].1)?;
                if x.len() != 3 {
                    return Err(err(format!("expected [b, m, n], found {x:?}")));
                }
                Ok(Some((vec![x[0], x[2], x[1]], ins[0].1)))
            }
            Op::SliceRows { offset, rows } => {
                need_plain(name, ins[0].1)?;
                let c = *ins[0]
                    .0
                    .last()
                    .ok_or_else(|| err("input is a scalar".into()))?;
                let r = numel(ins[0].0) / c.max(1);
                if let Dyn::Static(o) = offset {
                    if *o as usize + rows > r {
                        return Err(err(format!("rows {o}..{} of {r}", *o as usize + rows)));
                    }
                }
                Ok(Some((vec![*rows, c], ins[0].1)))
            }
            Op::Sample { .. } => {
                need_f32(name, ins[0].1)?;
                if ins[0].0.len() != 1
                    || ins[1].0 != [kernels::sample::SETTINGS_LEN]
                    || ins[2].1 != DType::U32
                {
                    return Err(err(format!(
                        "expected logits [v], settings [{}], u32 history; found {:?}, {:?}, {}",
                        kernels::sample::SETTINGS_LEN,
                        ins[0].0,
                        ins[1].0,
                        ins[2].1
                    )));
                }
                Ok(Some((vec![2], DType::U32)))
            }
            Op::RandNormal { shape, .. } => f32_out(shape),
            Op::CopyInto { .. } => {
                if ins[0].1 != ins[1].1 {
                    return Err(Error::DType {
                        op: name.into(),
                        expected: ins[1].1.to_string(),
                        found: ins[0].1.to_string(),
                    });
                }
                Ok(None)
            }
            Op::SchedulerStep { noise, .. } => {
                kernels::scheduler::check(ins, *noise)?;
                Ok(None)
            }
        }
    }

    /// The dispatches that compute this op.
    pub(crate) fn encode(
        &self,
        ctx: &Ctx,
        ins: &[Bound],
        out: Option<&Bound>,
    ) -> Result<Vec<Dispatch>> {
        let o = || out.ok_or_else(|| shape_err(self.name(), "missing output"));
        match self {
            Op::Linear { .. } => kernels::linear::linear(ins, o()?),
            Op::Gather { ids_offset, .. } => {
                kernels::linear::gather(&ins[0], &ins[1], *ids_offset, o()?)
            }
            Op::SliceRows { offset, .. } => {
                kernels::elementwise::slice_rows(&ins[0], *offset, o()?)
            }
            Op::Attention { .. } => kernels::attention::encode(ctx, self, ins, o()?),
            Op::Softmax | Op::RmsNorm { .. } | Op::LayerNorm { .. } | Op::GroupNorm { .. } => {
                kernels::norm::encode(self, ins, o()?)
            }
            Op::Conv2d { .. } => kernels::conv::conv2d(self, ins, o()?),
            Op::Rope { .. } => kernels::rope::encode(self, ins, o()?),
            Op::Sample { .. } | Op::RandNormal { .. } => {
                kernels::sample::encode(ctx, self, ins, o()?)
            }
            Op::SchedulerStep { .. } => kernels::scheduler::encode(self, ins),
            Op::CopyInto { offset, cap } => {
                kernels::elementwise::copy(&ins[0], &ins[1], Dyn::Static(0), *offset, *cap)
            }
            _ => kernels::elementwise::encode(self, ins, o()?),
        }
    }
}
