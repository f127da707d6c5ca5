//! Gated DeltaNet (`delta.wgsl`): the linear-attention layers of Qwen 3.5. Two ops, each
//! carrying a per-sequence state across runs in a tensor it writes in place:
//! [`CausalConv`] (the short depthwise convolution over time, with SiLU) and [`GatedDelta`]
//! (the gated delta rule with its recurrent state, then the gated RMSNorm). The delta rule runs
//! token by token (decode, batches of sequences) or over chunks of [`CHUNK`] tokens (prefill).
//!
//! Rows: `[b, t, ..]` is a run of `t` tokens of one sequence (`b = 1`) of which the first
//! `valid` are real (the rest is a prefill run's padding, which must not reach the state), or one
//! token of each of `b` sequences (`t = 1`, sequence per row through [`Dyn::Rows`]).

use super::{
    dispatch, f32_out, need_f32, u, Binding, Bound, Ctx, Dispatch, Dyn, Inferred, Kernel,
    KernelKey, Meta,
};
use crate::error::{shape_err, Result};

/// Tokens per chunk of the chunked delta rule (`CHUNK` in `delta.wgsl`).
pub const CHUNK: usize = 32;
/// Largest key or value head dimension (`MAX_D`).
pub const MAX_HEAD_DIM: usize = 256;
/// Largest convolution kernel (its taps are the shader's `TAPS` constant: a private window).
pub const MAX_CONV_KERNEL: usize = 8;

/// The batch rows and tokens of `[b, t, ..]`.
fn rows_tokens(op: &str, x: &[usize]) -> Result<(usize, usize)> {
    if x.len() != 3 {
        return Err(shape_err(op, format!("input {x:?} needs [b, t, width]")));
    }
    Ok((x[0], x[1]))
}

/// Sequences a state tensor `[seqs, ..]` holds, and an error when a static `seq` is past them.
fn check_seq(op: &str, state: &[usize], seq: Dyn) -> Result<()> {
    let seqs = state.first().copied().unwrap_or(0);
    if let Dyn::Static(s) = seq {
        if s as usize >= seqs {
            return Err(shape_err(
                op,
                format!("sequence {s} is past the state's {seqs} ({state:?})"),
            ));
        }
    }
    Ok(())
}

/// Several batch rows only with a sequence per row, each one token.
fn check_rows(op: &str, b: usize, t: usize, seq: Dyn) -> Result<()> {
    if b > 1 && !(seq.per_row() && t == 1) {
        return Err(shape_err(
            op,
            format!(
                "{b} rows of {t} tokens: several rows need a sequence per row and one token each"
            ),
        ));
    }
    Ok(())
}

super::params!(
    /// Uniforms of `delta.wgsl`'s convolution.
    ConvStateParams, "delta.wgsl", ["CONV"] {
        c: u32, k: u32, width: u32, t: u32, rows: u32, v_add: u32, v_slot: u32, v_mul: u32,
        s_add: u32, s_slot: u32, s_mul: u32,
    }
);

/// `y = silu(causal depthwise conv(x[.., :channels]))` over time with kernel `w` `[channels,
/// k]`, continuing from `state` `[seqs, k - 1, channels]` (the inputs before this run, oldest
/// first), which is left holding the last `k - 1` valid inputs. Inputs: x `[b, t, width]`
/// (the first `channels` columns are convolved), w, state. Output `[b, t, channels]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CausalConv {
    pub channels: usize,
    /// Valid tokens of each row (the run's, or 1 per row of a batch).
    pub valid: Dyn,
    /// The state's sequence of each row.
    pub seq: Dyn,
}

impl Kernel for CausalConv {
    fn name(&self) -> &'static str {
        "causal_conv"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        for i in ins.iter().take(3) {
            need_f32(self.name(), i.1)?;
        }
        let (x, w, s) = (ins[0].0, ins[1].0, ins[2].0);
        let (b, t) = rows_tokens(self.name(), x)?;
        let c = self.channels;
        if c == 0 || x[2] < c {
            return Err(err(format!("input {x:?} has fewer than {c} channels")));
        }
        if w.len() != 2 || w[0] != c || w[1] < 2 || w[1] > MAX_CONV_KERNEL {
            return Err(err(format!(
                "kernel {w:?} needs [{c}, k] with 2 <= k <= {MAX_CONV_KERNEL}"
            )));
        }
        if s.len() != 3 || s[1] != w[1] - 1 || s[2] != c {
            return Err(err(format!("state {s:?} needs [seqs, {}, {c}]", w[1] - 1)));
        }
        check_seq(self.name(), s, self.seq)?;
        check_rows(self.name(), b, t, self.seq)?;
        f32_out(&[b, t, c])
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let x = &ins[0];
        let [v_add, v_slot, v_mul] = self.valid.words();
        let [s_add, s_slot, s_mul] = self.seq.words();
        let p = ConvStateParams {
            c: u(self.channels),
            k: u(ins[1].shape[1]),
            width: u(x.shape[2]),
            t: u(x.shape[1]),
            rows: u(x.shape[0]),
            v_add,
            v_slot,
            v_mul,
            s_add,
            s_slot,
            s_mul,
        };
        Ok(vec![dispatch(
            KernelKey::new("delta.wgsl", "main")
                .def("CONV", "")
                .def("TAPS", format!("{}u", ins[1].shape[1])),
            &p,
            vec![
                Binding::read(x.buf()),
                Binding::read(ins[1].buf()),
                Binding::write(ins[2].buf()),
                Binding::write(out.buf()),
            ],
            [u(self.channels).div_ceil(64), u(x.shape[0]), 1],
        )])
    }
}

super::params!(
    /// Uniforms of `delta.wgsl`'s delta rule (every variant).
    DeltaParams, "delta.wgsl", ["RECUR"] {
        kh: u32, vh: u32, dk: u32, dv: u32, t: u32, rows: u32, eps: f32, v_add: u32, v_slot: u32,
        v_mul: u32, s_add: u32, s_slot: u32, s_mul: u32, chunks: u32, tiled: u32,
    }
);

/// The gated delta rule of one linear-attention layer and its gated RMSNorm:
///
/// - per value head `h` (query/key head `h / (v_heads / k_heads)`, or `h % k_heads` when
///   `tiled`: llama.cpp orders the value heads so in a GGUF) and token: q and k
///   l2-normalized (eps 1e-6), q scaled by `dk^-1/2`, `decay = exp(a[h] * softplus(a_in + dt[h]))`,
///   `beta = sigmoid(b_in)`; `S = decay S; S += k ((v - S^T k) beta)^T; o = S^T q`;
/// - `y = o / sqrt(mean(o^2) + eps) * norm_w * silu(z)` per head.
///
/// Inputs: qkv `[b, t, 2 kd + vd]` (the convolution's output: q | k | v, `kd = k_heads dk`,
/// `vd = v_heads dv`), proj `[b, t, 2 kd + 2 vd + 2 v_heads]` (the layer's input projection:
/// qkv | z | b_in | a_in), a `[v_heads]` (`-exp(A_log)`), dt `[v_heads]`, norm_w `[dv]`, state
/// `[seqs, v_heads, dk, dv]` (written). Output `[b, t, vd]`. `chunked`: the chunked form
/// (prefill); else token by token (decode).
#[derive(Clone, Debug, PartialEq)]
pub struct GatedDelta {
    pub k_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
    pub eps: f32,
    /// Value heads in llama.cpp's tiled order (value head `h` reads key head `h % k_heads`).
    pub tiled: bool,
    pub valid: Dyn,
    pub seq: Dyn,
    pub chunked: bool,
}

impl GatedDelta {
    fn params(&self, b: usize, t: usize) -> DeltaParams {
        let [v_add, v_slot, v_mul] = self.valid.words();
        let [s_add, s_slot, s_mul] = self.seq.words();
        DeltaParams {
            kh: u(self.k_heads),
            vh: u(self.v_heads),
            dk: u(self.dk),
            dv: u(self.dv),
            t: u(t),
            rows: u(b),
            eps: self.eps,
            v_add,
            v_slot,
            v_mul,
            s_add,
            s_slot,
            s_mul,
            chunks: u(t.div_ceil(CHUNK)),
            tiled: self.tiled as u32,
        }
    }

    /// f32 words of one (row, head, chunk) scratch block (`block_len` in the shader).
    fn block_len(&self) -> usize {
        CHUNK * (self.dv + 3 * self.dk + CHUNK) + 4
    }
}

impl Kernel for GatedDelta {
    fn name(&self) -> &'static str {
        "gated_delta"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        for i in ins.iter().take(6) {
            need_f32(self.name(), i.1)?;
        }
        let (kh, vh, dk, dv) = (self.k_heads, self.v_heads, self.dk, self.dv);
        if kh == 0 || vh == 0 || !vh.is_multiple_of(kh) {
            return Err(err(format!(
                "{vh} value heads over {kh} key heads (a multiple of them)"
            )));
        }
        if dk == 0 || dv == 0 || dk > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
            return Err(err(format!(
                "head dims {dk} (keys) and {dv} (values): at most {MAX_HEAD_DIM}"
            )));
        }
        let (kd, vd) = (kh * dk, vh * dv);
        let (x, proj) = (ins[0].0, ins[1].0);
        let (b, t) = rows_tokens(self.name(), x)?;
        if x[2] != 2 * kd + vd {
            return Err(err(format!("qkv {x:?} needs [b, t, {}]", 2 * kd + vd)));
        }
        let pw = 2 * kd + 2 * vd + 2 * vh;
        if proj != [b, t, pw] {
            return Err(err(format!("projection {proj:?} needs [{b}, {t}, {pw}]")));
        }
        for (what, i, want) in [("a", 2, vh), ("dt", 3, vh), ("norm weight", 4, dv)] {
            if ins[i].0 != [want] {
                return Err(err(format!("{what} {:?} needs [{want}]", ins[i].0)));
            }
        }
        let s = ins[5].0;
        if s.len() != 4 || s[1..] != [vh, dk, dv] {
            return Err(err(format!("state {s:?} needs [seqs, {vh}, {dk}, {dv}]")));
        }
        check_seq(self.name(), s, self.seq)?;
        check_rows(self.name(), b, t, self.seq)?;
        f32_out(&[b, t, vd])
    }

    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (b, t) = (ins[0].shape[0], ins[0].shape[1]);
        let p = self.params(b, t);
        let mut bindings = vec![
            Binding::read(ins[0].buf()),
            Binding::read(ins[1].buf()),
            Binding::read(ins[2].buf()),
            Binding::read(ins[3].buf()),
            Binding::read(ins[4].buf()),
            Binding::write(ins[5].buf()),
            Binding::write(out.buf()),
        ];
        // The variant first (it names the kernel in profiles), then the key head dim.
        let dk = format!("{}u", self.dk);
        let key = |variant: &str| {
            KernelKey::new("delta.wgsl", "main")
                .def(variant, "")
                .def("DK", &dk)
        };
        let vh = u(self.v_heads);
        if !self.chunked {
            return Ok(vec![dispatch(key("RECUR"), &p, bindings, [vh, u(b), 1])]);
        }
        let words = b * self.v_heads * t.div_ceil(CHUNK) * self.block_len();
        let scratch = ctx.shared_scratch("delta_chunks", 4 * words as u64)?;
        bindings.push(Binding::write(&scratch));
        Ok(vec![
            dispatch(
                key("CHUNK_PREP"),
                &p,
                bindings.clone(),
                [vh, p.chunks, u(b)],
            ),
            dispatch(key("CHUNK_SCAN"), &p, bindings, [vh, u(b), 1]),
        ])
    }
}
