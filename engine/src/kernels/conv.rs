//! Convolution (`conv2d.wgsl`, implicit GEMM on the shared tile loop).

use super::{Binding, Bound, Dispatch, Params};
use crate::error::{shape_err, Result};
use crate::graph::Op;

/// Output height and width of a convolution op for an `h x w` input and kernel size `k`.
pub fn out_hw(op: &Op, h: usize, w: usize, k: usize) -> Option<(usize, usize)> {
    let Op::Conv2d { stride, pad, .. } = op else {
        return None;
    };
    let ho = (h + 2 * pad).checked_sub(k)? / stride + 1;
    let wo = (w + 2 * pad).checked_sub(k)? / stride + 1;
    Some((ho, wo))
}

/// Encodes a convolution.
pub fn conv2d(op: &Op, ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
    let Op::Conv2d { stride, pad, .. } = op else {
        return Err(shape_err(op.name(), "not a convolution"));
    };
    let (x, w) = (&ins[0], &ins[1]);
    if w.parts.len() != 1 {
        return Err(shape_err(
            "conv2d",
            format!(
                "weight '{:?}' is split across bindings; convolution weights must fit one",
                w.shape
            ),
        ));
    }
    let (b, ci, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (co, ks) = (w.shape[0], w.shape[2]);
    let (ho, wo) = (out.shape[2], out.shape[3]);
    let k = ci * ks * ks;
    let m = ho * wo;
    let bias = ins.get(2);
    let p = Params::default()
        .u(m)
        .u(co)
        .u(k)
        .u(ci)
        .u(h)
        .u(wd)
        .u(wo)
        .u(ks)
        .u(*stride)
        .u(*pad)
        .u(w.dtype.row_words(k))
        .u(bias.is_some() as u32);
    Ok(vec![Dispatch {
        key: super::linear::weight_key("conv2d.wgsl", w.dtype)?,
        params: p.0,
        bindings: vec![
            Binding::read(w.buf()),
            Binding::read(x.buf()),
            Binding::read(bias.map(|b| b.buf()).unwrap_or(x.buf())),
            Binding::write(out.buf()),
        ],
        groups: [co.div_ceil(64) as u32, m.div_ceil(64) as u32, b as u32],
    }])
}
