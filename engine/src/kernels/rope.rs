//! Rotary embedding (`rope.wgsl`), NeoX/rotate_half or interleaved pairing. The cos/sin table
//! is an input made on the CPU by [`table`], so frequency scaling (see [`llama3_inv_freq`]) lives
//! there and the result does not depend on the backend's `sin`/`cos` accuracy.

use super::{
    dispatch, elementwise_groups, f32_out, need_f32, u, Binding, Bound, Ctx, Dispatch, Dyn,
    Inferred, Kernel, KernelKey, Meta,
};
use crate::error::{shape_err, Result};

/// The rotary table `[positions, half, 2]` (cos, sin) must have a position and fit head dim `d`.
fn check_table(op: &str, t: &[usize], d: usize) -> Result<()> {
    if t.len() != 3 || t[2] != 2 || t[0] == 0 || t[1] == 0 || 2 * t[1] > d {
        return Err(shape_err(
            op,
            format!(
                "table {t:?} needs [positions, half, 2] (cos, sin) with 2 half <= head dim {d}"
            ),
        ));
    }
    Ok(())
}

super::params!(
    /// Uniforms of `rope.wgsl`.
    RopeParams, "rope.wgsl", [] {
        n: u32, seq: u32, heads: u32, d: u32, half: u32, positions: u32, interleaved: u32,
        pos_add: u32, pos_slot: u32, pos_mul: u32,
    }
);

/// Rotary embedding on x `[.., l, heads*d]` with a `[positions, half, 2]` (cos, sin) `table`
/// from [`table`]. Token `i` is at position `pos + i`, which must be below `positions`; with a
/// per-row `pos` ([`Dyn::Rows`]) batch row `b` starts at its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub heads: usize,
    pub interleaved: bool,
    pub pos: Dyn,
}

/// Bytes of a rotary table `[positions, half, 2]` (of `whole` bytes) that `tokens` consecutive
/// positions read: their rows.
pub fn table_bytes(whole: u64, table: &[usize], tokens: usize) -> u64 {
    let rows = table.first().copied().unwrap_or(1).max(1);
    whole / rows as u64 * tokens.min(rows) as u64
}

/// Rows of `x` (all dims but the last).
fn rows(x: &[usize]) -> usize {
    x[..x.len().saturating_sub(1)].iter().product()
}

impl Kernel for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    /// The table's rows of the run's positions (at most one per row of x).
    fn input_bytes(&self, i: usize, whole: u64, ins: &[Meta]) -> u64 {
        match i {
            1 => table_bytes(whole, ins[1].0, rows(ins[0].0)),
            _ => whole,
        }
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        let x = ins[0].0;
        need_f32(self.name(), ins[0].1)?;
        need_f32(self.name(), ins[1].1)?;
        let w = *x.last().unwrap_or(&0);
        let heads = self.heads;
        if x.len() < 2 || heads == 0 || !w.is_multiple_of(heads) {
            return Err(err(format!(
                "input {x:?} needs [.., l, heads*d] with {heads} heads"
            )));
        }
        let d = w / heads;
        check_table(self.name(), ins[1].0, d)?;
        f32_out(x)
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let x = &ins[0];
        let width = *x.shape.last().unwrap_or(&1);
        let seq = x.shape[x.shape.len() - 2];
        let [pos_add, pos_slot, pos_mul] = self.pos.words();
        let p = RopeParams {
            n: u(x.numel()),
            seq: u(seq),
            heads: u(self.heads),
            d: u(width / self.heads),
            half: u(ins[1].shape[1]),
            positions: u(ins[1].shape[0]),
            interleaved: self.interleaved as u32,
            pos_add,
            pos_slot,
            pos_mul,
        };
        Ok(vec![dispatch(
            KernelKey::new("rope.wgsl", "main"),
            &p,
            vec![
                Binding::read(x.buf()),
                Binding::read(ins[1].buf()),
                Binding::write(out.buf()),
            ],
            elementwise_groups(x.numel()),
        )])
    }
}

super::params!(
    /// Uniforms of `rope.wgsl`'s KV variant.
    RopeKvParams, "rope.wgsl", ["KV"] {
        n: u32, heads: u32, kv_heads: u32, d: u32, half: u32, positions: u32, interleaved: u32,
        pos_add: u32, pos_slot: u32, pos_mul: u32, cap_rows: u32, seq_len: u32, s_add: u32,
        s_slot: u32, s_mul: u32,
    }
);

/// A decoder layer's rotary step on the output of its stacked Q/K/V projection, rows of `[q |
/// k | v]` for tokens at `pos + row`: returns q rotated (`[.., t, heads*d]`) and writes rotated
/// k and plain v into the KV caches at row `pos + row`, in one dispatch (instead of two
/// rotations and two copies). Inputs: qkv `[1, t, (heads + 2 kv_heads) d]` (or `[t, ..]`), the
/// `[positions, half, 2]` table, then the caches `[1, cap, kv_heads d]`, written in place.
///
/// The caches may hold several sequences (`[s, cap, kv_heads d]`): the tokens go to sequence
/// `seq`. A batch of decoding sequences passes qkv `[b, 1, ..]` with per-row `pos` and `seq`
/// ([`Dyn::Rows`]): row `r` is the token at `pos[r]` of sequence `seq[r]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeKv {
    pub heads: usize,
    pub kv_heads: usize,
    pub interleaved: bool,
    pub pos: Dyn,
    /// The cache sequence (`Static(0)` for a one-sequence cache).
    pub seq: Dyn,
}

impl RopeKv {
    fn head_dim(&self, width: usize) -> usize {
        width / (self.heads + 2 * self.kv_heads).max(1)
    }

    /// Rows per sequence of a cache of `shape` (`[.., cap, width]`) and the sequence written
    /// when it is the same for every token (0 otherwise).
    pub fn cache_rows(&self, shape: &[usize]) -> (usize, usize) {
        let cap = shape.len().checked_sub(2).map_or(1, |i| shape[i]);
        let seq = match self.seq {
            Dyn::Static(s) => s as usize,
            _ => 0,
        };
        (cap, seq)
    }

    /// Whether one matvec's epilogue can do this step (one token, one sequence known when the
    /// graph is built: see `graph::fuse`).
    pub fn fusable(&self) -> bool {
        matches!(self.seq, Dyn::Static(_)) && !self.pos.per_row()
    }
}

impl Kernel for RopeKv {
    fn name(&self) -> &'static str {
        "rope_kv"
    }

    /// The table's rows of the run's tokens.
    fn input_bytes(&self, i: usize, whole: u64, ins: &[Meta]) -> u64 {
        match i {
            1 => table_bytes(whole, ins[1].0, rows(ins[0].0)),
            _ => whole,
        }
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        need_f32(self.name(), ins[0].1)?;
        need_f32(self.name(), ins[1].1)?;
        super::attention::need_kv(self.name(), ins[2].1, ins[3].1)?;
        let (x, t, kc, vc) = (ins[0].0, ins[1].0, ins[2].0, ins[3].0);
        let width = *x.last().unwrap_or(&0);
        let d = self.head_dim(width);
        // Several batch rows only with a sequence per row (each its own position).
        let batch_ok = x.len() == 2 || (x.len() == 3 && (x[0] == 1 || self.seq.per_row()));
        if self.heads == 0
            || self.kv_heads == 0
            || d == 0
            || width != (self.heads + 2 * self.kv_heads) * d
            || !batch_ok
        {
            return Err(err(format!(
                "input {x:?} needs [1, t, (heads + 2 kv_heads) * d] with {} heads and {} kv heads",
                self.heads, self.kv_heads
            )));
        }
        check_table(self.name(), t, d)?;
        let kvw = self.kv_heads * d;
        if kc != vc || kc.last() != Some(&kvw) || kc.len() < 2 {
            return Err(err(format!(
                "caches {kc:?} and {vc:?} need [.., cap, {kvw}]"
            )));
        }
        let seqs = kc[..kc.len() - 2].iter().product::<usize>();
        if let Dyn::Static(s) = self.seq {
            if s as usize >= seqs {
                return Err(err(format!(
                    "sequence {s} is past the caches' {seqs} ({kc:?})"
                )));
            }
        }
        let rows = x.len() - 2;
        let mut out = x[..rows + 1].to_vec();
        out.push(self.heads * d);
        f32_out(&out)
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let x = &ins[0];
        let d = self.head_dim(*x.shape.last().unwrap_or(&1));
        let [pos_add, pos_slot, pos_mul] = self.pos.words();
        let [s_add, s_slot, s_mul] = self.seq.words();
        let seq_len = x.shape[x.shape.len() - 2];
        let p = RopeKvParams {
            n: u(x.numel()),
            heads: u(self.heads),
            kv_heads: u(self.kv_heads),
            d: u(d),
            half: u(ins[1].shape[1]),
            positions: u(ins[1].shape[0]),
            interleaved: self.interleaved as u32,
            pos_add,
            pos_slot,
            pos_mul,
            cap_rows: u(self.cache_rows(&ins[2].shape).0),
            seq_len: u(seq_len),
            s_add,
            s_slot,
            s_mul,
        };
        Ok(vec![dispatch(
            super::attention::kv_def(
                KernelKey::new("rope.wgsl", "main").def("KV", ""),
                ins[2].dtype == crate::dtype::DType::F16,
            ),
            &p,
            vec![
                Binding::read(x.buf()),
                Binding::read(ins[1].buf()),
                Binding::write(out.buf()),
                Binding::write(ins[2].buf()),
                Binding::write(ins[3].buf()),
            ],
            elementwise_groups(x.numel()),
        )])
    }
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
