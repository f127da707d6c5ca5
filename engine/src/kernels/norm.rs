//! Normalization family: RMSNorm, LayerNorm, GroupNorm (+SiLU) in `norm.wgsl`, row softmax in
//! `softmax.wgsl`. One workgroup per row (or per group).

use super::{
    dispatch, f32_out, grid, last_dim, need_f32, u, Binding, Bound, Ctx, Dispatch, Inferred,
    Kernel, KernelKey, Meta,
};
use crate::error::{shape_err, Result};

super::params!(
    /// Uniforms of `norm.wgsl` (every variant).
    NormParams, "norm.wgsl", ["RMS"] {
        rows: u32, d: u32, eps: f32, groups: u32, channels: u32, spatial: u32, silu: u32,
    }
);

super::params!(
    /// Uniforms of `softmax.wgsl`.
    SoftmaxParams, "softmax.wgsl", [] { rows: u32, d: u32 }
);

/// Inputs (x, then per-channel parameters) bound in order, then the output.
fn bindings(ins: &[Bound], out: &Bound) -> Vec<Binding> {
    let mut b: Vec<Binding> = ins.iter().map(|b| Binding::read(b.buf())).collect();
    b.push(Binding::write(out.buf()));
    b
}

/// (rows, d) of a tensor normalized over its last dimension.
fn rows_d(x: &Bound) -> (usize, usize) {
    let d = *x.shape.last().unwrap_or(&1);
    (x.numel() / d.max(1), d)
}

/// Shape rule of the norms over the last dimension: parameters `[d]`.
fn infer_last_dim(op: &str, ins: &[Meta]) -> Result<Inferred> {
    let x = ins[0].0;
    need_f32(op, ins[0].1)?;
    let d = last_dim(op, x)?;
    for i in &ins[1..] {
        need_f32(op, i.1)?;
        if i.0 != [d] {
            return Err(shape_err(
                op,
                format!("parameter shape {:?}, expected [{d}]", i.0),
            ));
        }
    }
    f32_out(x)
}

/// Softmax over the last dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct Softmax;

impl Kernel for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        infer_last_dim(self.name(), ins)
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (rows, d) = rows_d(&ins[0]);
        let p = SoftmaxParams {
            rows: u(rows),
            d: u(d),
        };
        Ok(vec![dispatch(
            KernelKey::new("softmax.wgsl", "main"),
            &p,
            bindings(ins, out),
            grid(u(rows)),
        )])
    }
}

/// RMSNorm over the last dimension: x, weight `[d]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    pub eps: f32,
}

/// The per-head RMSNorm of Qwen3 and Gemma 3 on a stacked Q/K/V projection `[.., (heads + 2
/// kv_heads) d]`: each q head is normalized over its `d` dims with `w[0]`, each k head with
/// `w[1]` (`w` is `[2, d]`, the checkpoint's q_norm and k_norm), v heads pass through. One
/// dispatch, one workgroup per head of every token.
#[derive(Clone, Debug, PartialEq)]
pub struct QkNorm {
    pub heads: usize,
    pub kv_heads: usize,
    pub eps: f32,
}

impl QkNorm {
    fn per_row(&self) -> usize {
        self.heads + 2 * self.kv_heads
    }
}

impl Kernel for QkNorm {
    fn name(&self) -> &'static str {
        "qk_norm"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let (x, w) = (ins[0].0, ins[1].0);
        need_f32(self.name(), ins[0].1)?;
        need_f32(self.name(), ins[1].1)?;
        let width = last_dim(self.name(), x)?;
        let n = self.per_row();
        let d = width / n.max(1);
        if self.heads == 0 || self.kv_heads == 0 || d == 0 || width != n * d || w != [2, d] {
            return Err(shape_err(
                self.name(),
                format!(
                    "input {x:?} and weights {w:?} need [.., ({} + 2 * {}) d] and [2, d]",
                    self.heads, self.kv_heads
                ),
            ));
        }
        f32_out(x)
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let n = self.per_row();
        let d = *ins[0].shape.last().unwrap_or(&1) / n;
        let rows = ins[0].numel() / d.max(1);
        let p = NormParams {
            rows: u(rows),
            d: u(d),
            eps: self.eps,
            groups: u(self.heads),
            channels: u(self.heads + self.kv_heads),
            spatial: u(n),
            silu: 0,
        };
        Ok(vec![dispatch(
            KernelKey::new("norm.wgsl", "main")
                .def("RMS", "")
                .def("QK", ""),
            &p,
            bindings(ins, out),
            grid(u(rows)),
        )])
    }
}

/// LayerNorm over the last dimension: x, weight `[d]`, bias `[d]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    pub eps: f32,
}

/// Rows from which software adapters take the barrier-free one-row-per-invocation variant
/// (ROWWISE; fewer rows would leave most of a 64-wide workgroup idle).
pub const ROWWISE_MIN_ROWS: usize = 64;

fn encode_row_norm(
    ctx: &Ctx,
    variant: &str,
    eps: f32,
    ins: &[Bound],
    out: &Bound,
) -> Vec<Dispatch> {
    let (rows, d) = rows_d(&ins[0]);
    let p = NormParams {
        rows: u(rows),
        d: u(d),
        eps,
        ..Default::default()
    };
    let key = KernelKey::new("norm.wgsl", "main").def(variant, "");
    let (key, groups) = if ctx.gpu.features.software && rows >= ROWWISE_MIN_ROWS {
        (key.def("ROWWISE", ""), rows.div_ceil(64))
    } else {
        (key, rows)
    };
    vec![dispatch(key, &p, bindings(ins, out), grid(u(groups)))]
}

impl Kernel for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        infer_last_dim(self.name(), ins)
    }
    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        Ok(encode_row_norm(
            ctx,
            "RMS",
            self.eps,
            ins,
            super::out(self, out)?,
        ))
    }
}

impl Kernel for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        infer_last_dim(self.name(), ins)
    }
    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        Ok(encode_row_norm(
            ctx,
            "LAYER",
            self.eps,
            ins,
            super::out(self, out)?,
        ))
    }
}

/// GroupNorm over `[b, c, ...]` with per-channel weight and bias `[c]`, optionally followed by
/// SiLU.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

impl Kernel for GroupNorm {
    fn name(&self) -> &'static str {
        "group_norm"
    }
    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let x = ins[0].0;
        let groups = self.groups;
        if x.len() < 2 || groups == 0 || !x[1].is_multiple_of(groups) {
            return Err(shape_err(
                self.name(),
                format!("input {x:?} needs [b, c, ...] with c divisible by {groups} groups"),
            ));
        }
        for i in ins {
            need_f32(self.name(), i.1)?;
        }
        for i in &ins[1..] {
            if i.0 != [x[1]] {
                return Err(shape_err(
                    self.name(),
                    format!("parameter shape {:?}, expected [{}]", i.0, x[1]),
                ));
            }
        }
        f32_out(x)
    }
    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let x = &ins[0];
        let (b, c) = (x.shape[0], x.shape[1]);
        let p = NormParams {
            rows: u(b * self.groups),
            d: 0,
            eps: self.eps,
            groups: u(self.groups),
            channels: u(c),
            spatial: u(x.numel() / (b * c).max(1)),
            silu: self.silu as u32,
        };
        Ok(vec![dispatch(
            KernelKey::new("norm.wgsl", "main").def("GROUP", ""),
            &p,
            bindings(ins, out),
            grid(u(b * self.groups)),
        )])
    }
}
