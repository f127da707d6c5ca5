//! Rotary embedding (`rope.wgsl`), NeoX/rotate_half or interleaved pairing. The cos/sin table
//! is an input made on the CPU by [`table`], so frequency scaling (see [`llama3_inv_freq`]) lives
//! there and the result does not depend on the backend's `sin`/`cos` accuracy.

use super::{elementwise_groups, Binding, Bound, Dispatch, KernelKey, Params};
use crate::error::{shape_err, Result};
use crate::graph::Op;

/// Encodes rope.
pub fn encode(op: &Op, ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
    let Op::Rope {
        heads,
        interleaved,
        pos,
    } = op
    else {
        return Err(shape_err(op.name(), "not rope"));
    };
    let x = &ins[0];
    let width = *x.shape.last().unwrap_or(&1);
    let seq = x.shape[x.shape.len() - 2];
    let d = width / heads;
    let (positions, half) = (ins[1].shape[0], ins[1].shape[1]);
    let [add, slot, mul] = pos.words();
    let p = Params::default()
        .u(x.numel())
        .u(seq)
        .u(*heads)
        .u(d)
        .u(half)
        .u(positions)
        .u(*interleaved as u32)
        .u(add)
        .u(slot)
        .u(mul);
    Ok(vec![Dispatch {
        key: KernelKey::new("rope.wgsl", "main"),
        params: p.0,
        bindings: vec![
            Binding::read(x.buf()),
            Binding::read(ins[1].buf()),
            Binding::write(out.buf()),
        ],
        groups: elementwise_groups(x.numel()),
    }])
}

/// The rotary table `[positions, half, 2]` of (cos, sin) of the angle `p * inv_freq[i]` for
/// every position `p < positions`. The angle is rounded to f32 as transformers forms it
/// (`inv_freq.float() @ position_ids.float()`); cos and sin are evaluated in f64 and rounded, so
/// each entry is the correctly rounded value of what transformers computes.
pub fn table(inv_freq: &[f32], positions: usize) -> Vec<f32> {
    let mut t = Vec::with_capacity(positions * inv_freq.len() * 2);
    for p in 0..positions {
        for &f in inv_freq {
            let (s, c) = ((p as f32 * f) as f64).sin_cos();
            t.extend([c as f32, s as f32]);
        }
    }
    t
}

/// Inverse frequencies `1 / theta^(2i / rot_dim)` for `i < rot_dim / 2`, computed in f32 as HF does.
pub fn inv_freq(rot_dim: usize, theta: f32) -> Vec<f32> {
    (0..rot_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / rot_dim as f32))
        .collect()
}

/// Llama-3 frequency scaling (`rope_scaling.rope_type = "llama3"`), as HF's
/// `_compute_llama3_parameters`.
pub fn llama3_inv_freq(
    base: &[f32],
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_pos: f32,
) -> Vec<f32> {
    let low_wavelen = original_max_pos / low_freq_factor;
    let high_wavelen = original_max_pos / high_freq_factor;
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (original_max_pos / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}
