//! Elementwise family (`shaders/elementwise.wgsl`): activations, broadcast add/mul, gated
//! units, timestep embedding, copies and row slices, nearest upsampling, concatenation,
//! transposes. One thread per output element.

use super::{
    broadcast, dispatch, elementwise_groups, f32_out, last_dim, need_f32, need_plain, u, Binding,
    Bound, Ctx, Dispatch, Dyn, Inferred, Kernel, KernelKey, Meta, ShaderParams,
};
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::tensor::numel;

fn key(variant: &str) -> KernelKey {
    KernelKey::new("elementwise.wgsl", "main").def(variant, "")
}

/// The one dispatch of an elementwise variant over `n` outputs: inputs read, output written.
fn one<P: ShaderParams>(
    variant: &str,
    p: &P,
    ins: &[&Bound],
    out: &Bound,
    n: usize,
) -> Vec<Dispatch> {
    let mut b: Vec<Binding> = ins.iter().map(|x| Binding::read(x.buf())).collect();
    b.push(Binding::write(out.buf()));
    vec![dispatch(key(variant), p, b, elementwise_groups(n))]
}

super::params!(
    /// Uniforms of the `UNARY` variant.
    UnaryParams, "elementwise.wgsl", ["UNARY"] { n: u32, op: u32, mul: f32, add: f32 }
);
super::params!(
    /// Uniforms of the `BINARY` variant (shape and broadcast strides at rank 4).
    BinaryParams, "elementwise.wgsl", ["BINARY"] {
        n: u32, op: u32, d1: u32, d2: u32, d3: u32,
        sa0: u32, sa1: u32, sa2: u32, sa3: u32, sb0: u32, sb1: u32, sb2: u32, sb3: u32,
    }
);
super::params!(
    /// Uniforms of the `GLU` variant.
    GluParams, "elementwise.wgsl", ["GLU"] {
        rows: u32, f: u32, g_off: u32, g_rs: u32, u_off: u32, u_rs: u32, act: u32,
    }
);
super::params!(
    /// Uniforms of the `TIMESTEP` variant.
    TimestepParams, "elementwise.wgsl", ["TIMESTEP"] {
        b: u32, half: u32, flip: u32, shift: f32, log_max_period: f32,
    }
);
super::params!(
    /// Uniforms of the `COPY` variant.
    CopyParams, "elementwise.wgsl", ["COPY"] {
        n: u32, cap: u32, dst_add: u32, dst_slot: u32, dst_mul: u32, src_add: u32, src_slot: u32,
        src_mul: u32,
    }
);
super::params!(
    /// Uniforms of the `UPSAMPLE` variant.
    UpsampleParams, "elementwise.wgsl", ["UPSAMPLE"] { n: u32, h: u32, w: u32 }
);
super::params!(
    /// Uniforms of the `CONCAT` variant.
    ConcatParams, "elementwise.wgsl", ["CONCAT"] { n: u32, a: u32, b: u32 }
);
super::params!(
    /// Uniforms of the `TRANSPOSE` variant.
    TransposeParams, "elementwise.wgsl", ["TRANSPOSE"] { n: u32, m: u32, k: u32 }
);

/// Gate activations of [`Glu`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Silu,
    GeluErf,
    GeluTanh,
    /// `sigmoid(gate) * x`: an output gate (Qwen 3.5's gated attention).
    Sigmoid,
}

impl Act {
    /// Shader code of the activation (`glu_act` in `common.wgsl`; `UNARY` shares 0-2).
    pub fn code(self) -> u32 {
        match self {
            Act::Silu => 0,
            Act::GeluErf => 1,
            Act::GeluTanh => 2,
            Act::Sigmoid => 3,
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
    Scale {
        mul: f32,
        add: f32,
    },
    /// `cap * tanh(x / cap)`: Gemma 2's soft-capping of the final logits.
    Softcap {
        cap: f32,
    },
    /// `max(x, 0)` (the tiny autoencoder's activation).
    Relu,
    /// `1 / (1 + exp(-x))` (Qwen 3.5 MoE's shared-expert gate).
    Sigmoid,
}

impl Kernel for UnaryOp {
    fn name(&self) -> &'static str {
        "unary"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_f32(self.name(), ins[0].1)?;
        f32_out(ins[0].0)
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let n = out.numel();
        let (op, mul, add) = match *self {
            UnaryOp::Silu => (Act::Silu.code(), 1.0, 0.0),
            UnaryOp::GeluErf => (Act::GeluErf.code(), 1.0, 0.0),
            UnaryOp::GeluTanh => (Act::GeluTanh.code(), 1.0, 0.0),
            UnaryOp::QuickGelu => (3, 1.0, 0.0),
            UnaryOp::Scale { mul, add } => (4, mul, add),
            UnaryOp::Softcap { cap } => (5, cap, 0.0),
            UnaryOp::Relu => (6, 1.0, 0.0),
            UnaryOp::Sigmoid => (7, 1.0, 0.0),
        };
        let p = UnaryParams {
            n: u(n),
            op,
            mul,
            add,
        };
        Ok(one("UNARY", &p, &[&ins[0]], out, n))
    }
}

/// Binary elementwise ops with numpy broadcasting (rank <= 4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BinaryOp {
    Add,
    Mul,
}

/// Strides of `shape` broadcast to a rank-4 `out` (0 where broadcast).
fn bstrides(shape: &[usize], out: &[usize; 4]) -> [u32; 4] {
    let mut s = [0u32; 4];
    let mut stride = 1usize;
    for i in (0..4).rev() {
        let j = i as isize - (4 - shape.len()) as isize;
        if j >= 0 {
            let d = shape[j as usize];
            if d == out[i] && d != 1 {
                s[i] = u(stride);
            }
            stride *= d;
        }
    }
    s
}

impl Kernel for BinaryOp {
    fn name(&self) -> &'static str {
        "binary"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_f32(self.name(), ins[0].1)?;
        need_f32(self.name(), ins[1].1)?;
        let s = broadcast(ins[0].0, ins[1].0)
            .filter(|s| s.len() <= 4)
            .ok_or_else(|| {
                shape_err(
                    self.name(),
                    format!(
                        "shapes {:?} and {:?} do not broadcast (rank <= 4)",
                        ins[0].0, ins[1].0
                    ),
                )
            })?;
        f32_out(&s)
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let n = out.numel();
        let mut o4 = [1usize; 4];
        let r = out.shape.len();
        o4[4 - r..].copy_from_slice(&out.shape);
        let (sa, sb) = (bstrides(&ins[0].shape, &o4), bstrides(&ins[1].shape, &o4));
        let p = BinaryParams {
            n: u(n),
            op: match self {
                BinaryOp::Add => 0,
                BinaryOp::Mul => 1,
            },
            d1: u(o4[1]),
            d2: u(o4[2]),
            d3: u(o4[3]),
            sa0: sa[0],
            sa1: sa[1],
            sa2: sa[2],
            sa3: sa[3],
            sb0: sb[0],
            sb1: sb[1],
            sb2: sb[2],
            sb3: sb[3],
        };
        Ok(one("BINARY", &p, &[&ins[0], &ins[1]], out, n))
    }
}

/// Gated unit `act(gate) * up`: inputs (gate, up) of one shape when `split` is `None`; one
/// input `[.., 2f]` split in halves otherwise (`Some(gate_first)`; diffusers' GEGLU has the
/// hidden half first, the gate second).
#[derive(Clone, Debug, PartialEq)]
pub struct Glu {
    pub act: Act,
    pub split: Option<bool>,
}

impl Kernel for Glu {
    fn name(&self) -> &'static str {
        "glu"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        for i in ins {
            need_f32(self.name(), i.1)?;
        }
        match self.split {
            None => {
                if ins[0].0 != ins[1].0 {
                    return Err(shape_err(
                        self.name(),
                        format!("gate {:?} and up {:?} differ", ins[0].0, ins[1].0),
                    ));
                }
                f32_out(ins[0].0)
            }
            Some(_) => {
                let mut s = ins[0].0.to_vec();
                let last = last_dim(self.name(), &s)?;
                if !last.is_multiple_of(2) {
                    return Err(shape_err(self.name(), format!("last dim {last} is odd")));
                }
                *s.last_mut().unwrap_or(&mut 0) = last / 2;
                f32_out(&s)
            }
        }
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let n = out.numel();
        let f = *out.shape.last().unwrap_or(&1);
        let (g, up, g_off, g_rs, u_off, u_rs) = match self.split {
            None => (&ins[0], &ins[1], 0, f, 0, f),
            Some(gate_first) => {
                let (go, uo) = if gate_first { (0, f) } else { (f, 0) };
                (&ins[0], &ins[0], go, 2 * f, uo, 2 * f)
            }
        };
        let p = GluParams {
            rows: u(n / f.max(1)),
            f: u(f),
            g_off: u(g_off),
            g_rs: u(g_rs),
            u_off: u(u_off),
            u_rs: u(u_rs),
            act: self.act.code(),
        };
        Ok(one("GLU", &p, &[g, up], out, n))
    }
}

/// Sinusoidal timestep embedding of `t` `[b]` → `[b, dim]` (diffusers' `get_timestep_embedding`).
#[derive(Clone, Debug, PartialEq)]
pub struct TimestepEmbedding {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub shift: f32,
    pub max_period: f32,
}

impl Kernel for TimestepEmbedding {
    fn name(&self) -> &'static str {
        "timestep_embedding"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_f32(self.name(), ins[0].1)?;
        if ins[0].0.len() != 1 || !self.dim.is_multiple_of(2) {
            return Err(shape_err(
                self.name(),
                format!(
                    "expected t [b] and an even dim, found {:?}, {}",
                    ins[0].0, self.dim
                ),
            ));
        }
        f32_out(&[ins[0].0[0], self.dim])
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (b, half) = (ins[0].shape[0], self.dim / 2);
        let p = TimestepParams {
            b: u(b),
            half: u(half),
            flip: self.flip_sin_to_cos as u32,
            shift: self.shift,
            log_max_period: self.max_period.ln(),
        };
        Ok(one("TIMESTEP", &p, &[&ins[0]], out, b * half))
    }
}

/// Nearest-neighbour 2x upsampling of `[b, c, h, w]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Upsample2x;

impl Kernel for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample2x"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let x = ins[0].0;
        need_f32(self.name(), ins[0].1)?;
        if x.len() != 4 {
            return Err(shape_err(
                self.name(),
                format!("expected [b, c, h, w], found {x:?}"),
            ));
        }
        f32_out(&[x[0], x[1], 2 * x[2], 2 * x[3]])
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (n, s) = (out.numel(), &ins[0].shape);
        let p = UpsampleParams {
            n: u(n),
            h: u(s[2]),
            w: u(s[3]),
        };
        Ok(one("UPSAMPLE", &p, &[&ins[0]], out, n))
    }
}

/// Concatenation of two tensors of one dtype along `axis`.
#[derive(Clone, Debug, PartialEq)]
pub struct Concat {
    pub axis: usize,
}

impl Kernel for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let (a, b, axis) = (ins[0].0, ins[1].0, self.axis);
        need_plain(self.name(), ins[0].1)?;
        let ok =
            a.len() == b.len() && axis < a.len() && (0..a.len()).all(|i| i == axis || a[i] == b[i]);
        if !ok || ins[0].1 != ins[1].1 {
            return Err(shape_err(
                self.name(),
                format!("cannot concatenate {a:?} and {b:?} along axis {axis}"),
            ));
        }
        let mut s = a.to_vec();
        s[axis] += b[axis];
        Ok(Some((s, ins[0].1)))
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let n = out.numel();
        let inner: usize = out.shape[self.axis + 1..].iter().product();
        let p = ConcatParams {
            n: u(n),
            a: u(ins[0].shape[self.axis] * inner),
            b: u(ins[1].shape[self.axis] * inner),
        };
        Ok(one("CONCAT", &p, &[&ins[0], &ins[1]], out, n))
    }
}

/// `[b, m, n]` → `[b, n, m]` (NCHW feature maps to token sequences and back).
#[derive(Clone, Debug, PartialEq)]
pub struct Transpose;

impl Kernel for Transpose {
    fn name(&self) -> &'static str {
        "transpose"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let x = ins[0].0;
        need_plain(self.name(), ins[0].1)?;
        if x.len() != 3 {
            return Err(shape_err(
                self.name(),
                format!("expected [b, m, n], found {x:?}"),
            ));
        }
        Ok(Some((vec![x[0], x[2], x[1]], ins[0].1)))
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let n = out.numel();
        let p = TransposeParams {
            n: u(n),
            m: u(ins[0].shape[1]),
            k: u(ins[0].shape[2]),
        };
        Ok(one("TRANSPOSE", &p, &[&ins[0]], out, n))
    }
}

/// `dst[dst_off + i] = src[src_off + i]` for `n` elements, never writing past `cap`.
fn copy(src: &Bound, dst: &Bound, n: usize, src_off: Dyn, dst_off: Dyn, cap: usize) -> Dispatch {
    let [dst_add, dst_slot, dst_mul] = dst_off.words();
    let [src_add, src_slot, src_mul] = src_off.words();
    let p = CopyParams {
        n: u(n),
        cap: u(cap),
        dst_add,
        dst_slot,
        dst_mul,
        src_add,
        src_slot,
        src_mul,
    };
    dispatch(
        key("COPY"),
        &p,
        vec![Binding::read(src.buf()), Binding::write(dst.buf())],
        elementwise_groups(n),
    )
}

/// Rows `[offset, offset + rows)` of x viewed as `[r, c]` (c = last dim) → `[rows, c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceRows {
    pub offset: Dyn,
    pub rows: usize,
}

impl Kernel for SliceRows {
    fn name(&self) -> &'static str {
        "slice_rows"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_plain(self.name(), ins[0].1)?;
        let c = last_dim(self.name(), ins[0].0)?;
        let r = numel(ins[0].0) / c.max(1);
        if let Dyn::Static(o) = self.offset {
            if o as usize + self.rows > r {
                return Err(shape_err(
                    self.name(),
                    format!("rows {o}..{} of {r}", o as usize + self.rows),
                ));
            }
        }
        Ok(Some((vec![self.rows, c], ins[0].1)))
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let c = *ins[0].shape.last().unwrap_or(&1);
        let n = out.numel();
        let src_off = self.offset.times(u(c));
        Ok(vec![copy(&ins[0], out, n, src_off, Dyn::Static(0), n)])
    }
}

/// Copies src into dst (an existing tensor, written in place) starting at element `offset`
/// (a KV-cache write, a state update). `cap` = elements of dst.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyInto {
    pub offset: Dyn,
    pub cap: usize,
}

impl Kernel for CopyInto {
    fn name(&self) -> &'static str {
        "copy_into"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        // Same types, or f32 into an f16 KV cache.
        let into_f16 = ins[0].1 == DType::F32 && ins[1].1 == DType::F16;
        if ins[0].1 != ins[1].1 && !into_f16 {
            return Err(Error::DType {
                op: self.name().into(),
                expected: ins[1].1.to_string(),
                found: ins[0].1.to_string(),
            });
        }
        need_plain(self.name(), ins[0].1)?;
        let n = numel(ins[0].0);
        if let Dyn::Static(o) = self.offset {
            if o as usize + n > self.cap {
                return Err(shape_err(
                    self.name(),
                    format!(
                        "{n} elements at offset {o} overflow a destination of {}",
                        self.cap
                    ),
                ));
            }
        }
        Ok(None)
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], _: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let (src, dst) = (&ins[0], &ins[1]);
        let n = src.numel().min(dst.numel());
        let mut d = copy(src, dst, n, Dyn::Static(0), self.offset, self.cap);
        if dst.dtype == DType::F16 {
            d.key = d.key.def("F16DST", "");
        }
        Ok(vec![d])
    }
}
