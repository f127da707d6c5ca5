//! Elementwise family (`shaders/elementwise.wgsl`): activations, broadcast add/mul, gated
//! units, timestep embedding, copies, nearest upsampling, concatenation.

use super::{elementwise_groups, Binding, Bound, Dispatch, KernelKey, Params};
use crate::error::{shape_err, Result};
use crate::graph::{Act, BinaryOp, Dyn, Op, UnaryOp};

fn key(variant: &str) -> KernelKey {
    KernelKey::new("elementwise.wgsl", "main").def(variant, "")
}

/// Shader code of an activation (shared by UNARY and GLU).
pub fn act_code(a: Act) -> u32 {
    match a {
        Act::Silu => 0,
        Act::GeluErf => 1,
        Act::GeluTanh => 2,
    }
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
                s[i] = stride as u32;
            }
            stride *= d;
        }
    }
    s
}

/// Encodes the elementwise ops.
pub fn encode(op: &Op, ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
    let n = out.numel();
    let d = match op {
        Op::Unary(u) => {
            let (code, mul, add) = match *u {
                UnaryOp::Silu => (0, 1.0, 0.0),
                UnaryOp::GeluErf => (1, 1.0, 0.0),
                UnaryOp::GeluTanh => (2, 1.0, 0.0),
                UnaryOp::QuickGelu => (3, 1.0, 0.0),
                UnaryOp::Scale { mul, add } => (4, mul, add),
            };
            Dispatch {
                key: key("UNARY"),
                params: Params::default().u(n).u(code).f(mul).f(add).0,
                bindings: vec![Binding::read(ins[0].buf()), Binding::write(out.buf())],
                groups: elementwise_groups(n),
            }
        }
        Op::Binary(b) => {
            let mut o4 = [1usize; 4];
            let r = out.shape.len();
            o4[4 - r..].copy_from_slice(&out.shape);
            let (sa, sb) = (bstrides(&ins[0].shape, &o4), bstrides(&ins[1].shape, &o4));
            let code = match b {
                BinaryOp::Add => 0,
                BinaryOp::Mul => 1,
            };
            let mut p = Params::default().u(n).u(code).u(o4[1]).u(o4[2]).u(o4[3]);
            for s in sa.iter().chain(&sb) {
                p = p.u(*s);
            }
            Dispatch {
                key: key("BINARY"),
                params: p.0,
                bindings: vec![
                    Binding::read(ins[0].buf()),
                    Binding::read(ins[1].buf()),
                    Binding::write(out.buf()),
                ],
                groups: elementwise_groups(n),
            }
        }
        Op::Glu { act, split } => {
            let f = *out.shape.last().unwrap_or(&1);
            let rows = n / f.max(1);
            let (g, u, go, gr, uo, ur) = match split {
                None => (&ins[0], &ins[1], 0, f, 0, f),
                Some(gate_first) => {
                    let (go, uo) = if *gate_first { (0, f) } else { (f, 0) };
                    (&ins[0], &ins[0], go, 2 * f, uo, 2 * f)
                }
            };
            Dispatch {
                key: key("GLU"),
                params: Params::default()
                    .u(rows)
                    .u(f)
                    .u(go)
                    .u(gr)
                    .u(uo)
                    .u(ur)
                    .u(act_code(*act))
                    .0,
                bindings: vec![
                    Binding::read(g.buf()),
                    Binding::read(u.buf()),
                    Binding::write(out.buf()),
                ],
                groups: elementwise_groups(n),
            }
        }
        Op::TimestepEmbedding {
            dim,
            flip_sin_to_cos,
            shift,
            max_period,
        } => {
            let half = dim / 2;
            let b = ins[0].shape[0];
            Dispatch {
                key: key("TIMESTEP"),
                params: Params::default()
                    .u(b)
                    .u(half)
                    .u(*flip_sin_to_cos as u32)
                    .f(*shift)
                    .f(max_period.ln())
                    .0,
                bindings: vec![Binding::read(ins[0].buf()), Binding::write(out.buf())],
                groups: elementwise_groups(b * half),
            }
        }
        Op::Upsample2x => {
            let s = &ins[0].shape;
            Dispatch {
                key: key("UPSAMPLE"),
                params: Params::default().u(n).u(s[2]).u(s[3]).0,
                bindings: vec![Binding::read(ins[0].buf()), Binding::write(out.buf())],
                groups: elementwise_groups(n),
            }
        }
        Op::Transpose => {
            let (m, nn) = (ins[0].shape[1], ins[0].shape[2]);
            Dispatch {
                key: key("TRANSPOSE"),
                params: Params::default().u(n).u(m).u(nn).0,
                bindings: vec![Binding::read(ins[0].buf()), Binding::write(out.buf())],
                groups: elementwise_groups(n),
            }
        }
        Op::Concat { axis } => {
            let inner: usize = out.shape[axis + 1..].iter().product();
            let (a, b) = (ins[0].shape[*axis] * inner, ins[1].shape[*axis] * inner);
            Dispatch {
                key: key("CONCAT"),
                params: Params::default().u(n).u(a).u(b).0,
                bindings: vec![
                    Binding::read(ins[0].buf()),
                    Binding::read(ins[1].buf()),
                    Binding::write(out.buf()),
                ],
                groups: elementwise_groups(n),
            }
        }
        other => return Err(shape_err(other.name(), "not an elementwise op")),
    };
    Ok(vec![d])
}

/// `dst[dst_off + i] = src[src_off + i]` for every element of `src` (or of `dst` when
/// slicing), never writing past `cap`.
pub fn copy(
    src: &Bound,
    dst: &Bound,
    src_off: Dyn,
    dst_off: Dyn,
    cap: usize,
) -> Result<Vec<Dispatch>> {
    let n = src.numel().min(dst.numel());
    let [da, ds, dm] = dst_off.words();
    let [sa, ss, sm] = src_off.words();
    Ok(vec![Dispatch {
        key: key("COPY"),
        params: Params::default()
            .u(n)
            .u(cap)
            .u(da)
            .u(ds)
            .u(dm)
            .u(sa)
            .u(ss)
            .u(sm)
            .0,
        bindings: vec![Binding::read(src.buf()), Binding::write(dst.buf())],
        groups: elementwise_groups(n),
    }])
}

/// Rows of `x` (as `[r, c]`) starting at a run-time row offset.
pub fn slice_rows(x: &Bound, offset: Dyn, out: &Bound) -> Result<Vec<Dispatch>> {
    let c = *x.shape.last().unwrap_or(&1) as u32;
    let src_off = match offset {
        Dyn::Static(o) => Dyn::Static(o * c),
        Dyn::Slot { slot, mul, add } => Dyn::Slot {
            slot,
            mul: mul * c,
            add: add * c,
        },
    };
    copy(x, out, src_off, Dyn::Static(0), out.numel())
}
