//! Normalization family: RMSNorm, LayerNorm, GroupNorm (+SiLU) in `norm.wgsl`, row softmax in
//! `softmax.wgsl`.

use super::{grid, Binding, Bound, Dispatch, KernelKey, Params};
use crate::error::{shape_err, Result};
use crate::graph::Op;

/// Encodes softmax and the norms.
pub fn encode(op: &Op, ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
    let x = &ins[0];
    let d = *x.shape.last().unwrap_or(&1);
    let rows = x.numel() / d.max(1);
    let (key, p, groups) = match op {
        Op::Softmax => (
            KernelKey::new("softmax.wgsl", "main"),
            Params::default().u(rows).u(d),
            rows,
        ),
        Op::RmsNorm { eps } => (
            KernelKey::new("norm.wgsl", "main").def("RMS", ""),
            Params::default().u(rows).u(d).f(*eps),
            rows,
        ),
        Op::LayerNorm { eps } => (
            KernelKey::new("norm.wgsl", "main").def("LAYER", ""),
            Params::default().u(rows).u(d).f(*eps),
            rows,
        ),
        Op::GroupNorm { groups, eps, silu } => {
            let (b, c) = (x.shape[0], x.shape[1]);
            let spatial = x.numel() / (b * c).max(1);
            let p = Params::default()
                .u(b * groups)
                .u(0)
                .f(*eps)
                .u(*groups)
                .u(c)
                .u(spatial)
                .u(*silu as u32);
            (
                KernelKey::new("norm.wgsl", "main").def("GROUP", ""),
                p,
                b * groups,
            )
        }
        other => return Err(shape_err(other.name(), "not a norm op")),
    };
    let mut bindings: Vec<Binding> = ins.iter().map(|b| Binding::read(b.buf())).collect();
    bindings.push(Binding::write(out.buf()));
    Ok(vec![Dispatch {
        key,
        params: p.0,
        bindings,
        groups: grid(groups as u32),
    }])
}
