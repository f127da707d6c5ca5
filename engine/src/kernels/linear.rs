//! Linear family: decode matvec with fused dequantization (`matvec.wgsl`), tiled GEMM
//! (`matmul.wgsl` over `gemm.wgsl`) and embedding gathers (`gather.wgsl`), for every weight
//! dtype. A weight split into parts gets one dispatch per part, each writing its rows.

use super::elementwise::Act;
use super::rope::RopeKv;
use super::{
    dispatch, elementwise_groups, grid, last_dim, need_f32, u, Binding, Bound, Ctx, Dispatch, Dyn,
    Inferred, Kernel, KernelKey, Meta,
};
use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use std::sync::Arc;

/// Inputs with at most this many rows use the matvec kernel; more use the GEMM...
pub const MATVEC_MAX_ROWS: usize = 2;

/// ... except on software adapters, where plain products (no fused norm or epilogue) of up to
/// this many rows (a batch of decoding sequences) use the matvec's COLS variant, which loads
/// each weight step once for all rows: the GEMM's tiles would compute 64 rows for a few.
pub const MATVEC_COLS_MAX_ROWS: usize = 8;

/// Dots per invocation of the COLS variant (weight rows times x rows): 16 for plain rows, whose
/// weight and x units the variant loads once per step (lavapipe, text-kjv's f16 products for
/// four rows: 8 dots 6.3-7.5 ms, 16 dots 3.2-6.5, 32 dots 7.5-9.0: spilled); 8 for block
/// formats, whose dequantizing steps hold more (Q6_K's were slower at 16).
fn cols_dots(dtype: DType) -> usize {
    if matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        16
    } else {
        8
    }
}

super::params!(
    /// Uniforms of `matvec.wgsl`.
    MatvecParams, "matvec.wgsl", [] {
        rows: u32, k: u32, row_words: u32, out_off: u32, m: u32, n_total: u32, has_bias: u32,
        has_res: u32, glu: u32, gate_row: u32, up_row: u32, eps: f32, heads: u32, kv_heads: u32,
        d: u32, half: u32, positions: u32, interleaved: u32, pos_add: u32, pos_slot: u32,
        pos_mul: u32, cap_rows: u32, partials: u32, cache_row0: u32, ids_div: u32, ids_e0: u32,
        ids_experts: u32,
    }
);

super::params!(
    /// Uniforms of `matmul.wgsl`.
    MatmulParams, "matmul.wgsl", [] {
        m: u32, n: u32, k: u32, row_words: u32, w_batch_words: u32, out_off: u32, n_total: u32,
        has_bias: u32, has_res: u32, out_pix: u32, out_row0: u32, ids_div: u32, ids_e0: u32,
    }
);

super::params!(
    /// Uniforms of `gather.wgsl`.
    GatherParams, "gather.wgsl", [] {
        n: u32, d: u32, row_words: u32, row_start: u32, rows: u32, total_rows: u32,
        ids_add: u32, ids_slot: u32, ids_mul: u32,
    }
);

/// Adds the weight-dtype define of `weights.wgsl`.
pub fn weight_key(shader: &'static str, dtype: DType) -> Result<KernelKey> {
    if !DType::WEIGHTS.contains(&dtype) {
        return Err(Error::DType {
            op: shader.into(),
            expected: "a weight dtype".into(),
            found: dtype.to_string(),
        });
    }
    Ok(KernelKey::new(shader, "main").def(&format!("W_{}", dtype.name().to_uppercase()), ""))
}

/// Invocations per workgroup of the software matvec's ROWS_V4 variant: one SIMD batch of
/// llvmpipe's 8 lanes, so that the few hundred rows of a small model's products still make a
/// workgroup for every CPU thread (SmolLM2-shaped Q4_0 products per decode token: 4 invocations
/// 60-64 ms, half of each batch idle; 8 39 ms; 16 39-41 ms).
const V4_WG: usize = 8;

/// Whether the software matvec's ROWS_V4 variant serves rows of `k` elements of `dtype`: rows
/// of whole 16-byte units (`matvec.wgsl`).
pub fn rows_v4(dtype: DType, k: usize) -> bool {
    match dtype {
        DType::F32 => k.is_multiple_of(4),
        DType::F16 | DType::BF16 => k.is_multiple_of(8),
        // Rows padded to 16 bytes (DType::row_words); the last group of 4 (Q4_1, Q5_0: 2)
        // blocks may be partial.
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 => k.is_multiple_of(32),
        // 36- and 56-word super-blocks.
        DType::Q4_K | DType::Q6_K => true,
        _ => false,
    }
}

/// The key of `matmul.wgsl` for weights of `dtype` and rows of `k`: the shared GEMM core
/// (`gemm.wgsl`) on GPUs, the barrier-free DIRECT variant on software adapters, reading x 16
/// bytes at a time (X4) when `k` is a multiple of 4. llvmpipe loads storage one lane at a time,
/// so a 16-byte load pays that loop once for four words (lavapipe, 1024^3 f16 GEMM: 13.3 ->
/// 20.2 GFLOP/s). The same for the 16-bit weights (8 elements a load) measured slower: the
/// SmolLM2-135M-shaped f16 prefill chunk's products 732 -> 870 ms.
pub fn matmul_key(
    ctx: &Ctx,
    dtype: DType,
    k: usize,
    m: usize,
    n: usize,
    b: usize,
) -> Result<KernelKey> {
    let key = weight_key("matmul.wgsl", dtype)?;
    Ok(match ctx.gpu.features.software {
        true if k.is_multiple_of(4) => key.def("DIRECT", "").def("X4", ""),
        true => key.def("DIRECT", ""),
        false if k.is_multiple_of(4) => gemm_key(ctx.gpu, key, m, n, b).def("X4", ""),
        false => gemm_key(ctx.gpu, key, m, n, b),
    })
}

/// Workgroups of `matmul.wgsl` for an `m x n` output, `b` batches: the GEMM core's tiles
/// ([`gemm_groups`]), or (the software DIRECT variant) 256 weight rows by 8 activation rows.
pub fn matmul_groups(ctx: &Ctx, m: usize, n: usize, b: usize) -> [u32; 3] {
    if ctx.gpu.features.software {
        [u(n.div_ceil(256)), u(m.div_ceil(8)), u(b)]
    } else {
        gemm_groups(m, n, b)
    }
}

/// The GEMM core's (`gemm.wgsl`) register block (rows, columns per thread; the tile is 16 times
/// that) for an `m x n` output of `b` batches: the largest of 8 x 8 (128 x 128 tiles), 4 x 8
/// and 4 x 4 that still makes 64 workgroups, so a large GPU has work for every
/// multiprocessor; smaller products take smaller tiles and waste fewer edge threads.
pub fn gemm_block(m: usize, n: usize, b: usize) -> (usize, usize) {
    let groups = |tm: usize, tn: usize| m.div_ceil(16 * tm) * n.div_ceil(16 * tn) * b;
    [(8, 8), (4, 8), (4, 4)]
        .into_iter()
        .find(|&(tm, tn)| groups(tm, tn) >= 64)
        .unwrap_or((4, 4))
}

/// `key` (a shader including `gemm.wgsl`) with its register block for the product's size, f16
/// tiles (HALF) where the device allows them ([`crate::GpuFeatures::half_tiles`]), and for
/// 128 x 128 tiles cooperative matrices (COOP) where it has them
/// ([`crate::GpuFeatures::coop_matrix`]).
pub fn gemm_key(gpu: &Gpu, key: KernelKey, m: usize, n: usize, b: usize) -> KernelKey {
    let (tm, tn) = gemm_block(m, n, b);
    let key = key.def("TM", format!("{tm}u")).def("TN", format!("{tn}u"));
    if gpu.features.coop_matrix && (tm, tn) == (8, 8) {
        return key.def("HALF", "").def("COOP", "");
    }
    match gpu.features.half_tiles {
        true => key.def("HALF", ""),
        false => key,
    }
}

/// The GEMM core's workgroups for an `m x n` output of `b` batches.
pub fn gemm_groups(m: usize, n: usize, b: usize) -> [u32; 3] {
    let (tm, tn) = gemm_block(m, n, b);
    [u(n.div_ceil(16 * tn)), u(m.div_ceil(16 * tm)), u(b)]
}

/// Whether the matvec should compute an RMSNorm over rows of `k` in its prologue on this
/// adapter (the fusion pass asks): on GPUs (each workgroup sums x^2 in a first pass over x,
/// which the caches hold for the dots). Not on software adapters: there the prologue costs
/// more than the norm's own dispatch (lavapipe, SmolLM2-135M shapes, decode: Q4_0 10.3 -> 8.1
/// tok/s, f16 unchanged; a multiply per element in the loop instead of staging: 6.7).
pub fn fuses_norm(gpu: &Gpu) -> bool {
    !gpu.features.software
}

/// The GPU matvec's shape on this adapter: (invocations per workgroup, work items per
/// workgroup, whether one subgroup makes the workgroup). Where the adapter's subgroups have one
/// fixed size (NVIDIA, Apple: 32) the workgroup is one subgroup and sums with subgroupAdd;
/// otherwise 64 invocations sum in workgroup memory. Four items (rows, or two pairs of rows
/// under a gated unit or rotary epilogue) share every x load. `KILN_MATVEC=WG,ITEMS`
/// overrides the sizes (device tuning; WG a power of two up to 256, ignored where the
/// workgroup is one subgroup; ITEMS 1 to 16, as the tree's workgroup memory allows).
pub fn matvec_shape(gpu: &Gpu, paired: bool) -> (usize, usize, bool) {
    let (lo, hi) = (gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
    let one = gpu.features.subgroups && lo == hi && (4..=128).contains(&lo);
    let (mut wg, mut items) = (
        if one { lo as usize } else { 64 },
        if paired { 2 } else { 4 },
    );
    if let Some((w, r)) = std::env::var("KILN_MATVEC").ok().and_then(|v| {
        v.split_once(',')
            .map(|(a, b)| (a.parse().ok(), b.parse().ok()))
    }) {
        if let (Some(w), false) = (w, one) {
            wg = if usize::is_power_of_two(w) && w <= 256 {
                w
            } else {
                wg
            };
        }
        items = r.filter(|r: &usize| (1..=16).contains(r)).unwrap_or(items);
    }
    // The tree's workgroup memory (8 bytes per invocation and item) stays within 16 KiB.
    if !one {
        items = items.min(2048 / wg).max(1);
    }
    (wg, items, one)
}

/// An op computed in a decode product's epilogue (set by the fusion pass).
#[derive(Clone, Debug, PartialEq)]
pub enum Epilogue {
    /// A gated unit: the weight stacks the gate and up rows (`n` rows, gate first when
    /// `gate_first`), and the output is `act(gate) * up` `[.., n / 2]`.
    Glu { act: Act, gate_first: bool },
    /// The rotary step of a stacked Q/K/V projection ([`RopeKv`]), one token: the output is
    /// q rotated, and k (rotated) and v go into the caches. Three more inputs: the rotary table
    /// and the two caches (written in place).
    RopeKv(RopeKv),
}

/// `x @ w^T (+ bias) (+ residual)`: x `[.., k]` f32, w `[n, k]` in any weight dtype (checkpoint
/// layout), or an f32 value `[b, n, k]` for a batched product. Output `[.., n]`. Inputs: x, w,
/// then the bias `[n]` and the residual (shaped like the output) when present: the residual
/// add of a transformer block happens in the product's epilogue, not in a dispatch of its own.
///
/// More fusions serve the decode matvec (the graph's fusion pass sets them, see
/// `graph/fuse.rs`): `norm` RMS-normalizes x (one row) with epsilon `norm` and a weight `[k]`
/// (the input after the residual) first, and an [`Epilogue`] (its inputs last) turns the output
/// into a gated unit or runs the rotary step on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub bias: bool,
    pub residual: bool,
    pub norm: Option<f32>,
    pub epilogue: Option<Epilogue>,
    /// The fused norm's sums of squares handed from the product that made the hidden state
    /// to the products that normalize it (set by the fusion pass, GPU matvecs only).
    pub partials: NormPartials,
}

/// A GPU matvec's part in handing on a fused RMSNorm's sum of squares (llama.cpp's partial
/// sums, PR 15281): the product writing the hidden state stores the sum of squares of each
/// workgroup's outputs, and the products whose fused norm reads that state add those up
/// instead of summing x^2 over the row in every workgroup. One buffer (`norm-partials`) holds
/// the latest producer's sums; the fusion pass pairs a reader with the producer just before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormPartials {
    #[default]
    None,
    /// Writes its workgroups' sums of squares.
    Write,
    /// Its fused norm reads them.
    Read,
}

impl Linear {
    /// The plain product (with optional bias and residual).
    pub fn new(bias: bool, residual: bool) -> Self {
        Linear {
            bias,
            residual,
            norm: None,
            epilogue: None,
            partials: NormPartials::None,
        }
    }

    /// Index of the norm weight input (after x, w, bias and residual).
    fn norm_input(&self) -> usize {
        2 + self.bias as usize + self.residual as usize
    }

    /// Index of the epilogue's first input (the rotary table).
    fn epilogue_input(&self) -> usize {
        self.norm_input() + self.norm.is_some() as usize
    }
}

impl Kernel for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    /// The rotary epilogue's table: the one row of the run's position.
    fn input_bytes(&self, i: usize, whole: u64, ins: &[Meta]) -> u64 {
        match &self.epilogue {
            Some(Epilogue::RopeKv(_)) if i == self.epilogue_input() => {
                super::rope::table_bytes(whole, ins[i].0, 1)
            }
            _ => whole,
        }
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        let (x, w) = (ins[0], ins[1]);
        need_f32(self.name(), x.1)?;
        let k = last_dim(self.name(), x.0)?;
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
        if self.bias {
            need_f32("linear bias", ins[2].1)?;
            if ins[2].0 != [n] {
                return Err(err(format!("bias shape {:?}, expected [{n}]", ins[2].0)));
            }
        }
        let rows = x.0.iter().product::<usize>() / k.max(1);
        if (self.norm.is_some() || self.epilogue.is_some()) && w.0.len() != 2 {
            return Err(err("a fused norm or epilogue needs a weight [n, k]".into()));
        }
        if let Some(eps) = self.norm {
            let nw = ins[self.norm_input()];
            need_f32("linear norm weight", nw.1)?;
            if nw.0 != [k] || rows != 1 || !eps.is_finite() {
                return Err(err(format!(
                    "a fused RMSNorm needs one row and a weight [{k}], found {rows} rows, weight {:?}",
                    nw.0
                )));
            }
        }
        let mut s = x.0.to_vec();
        if let Some(l) = s.last_mut() {
            *l = n;
        }
        match &self.epilogue {
            Some(Epilogue::Glu { .. }) => {
                if self.bias || n % 2 != 0 || rows > MATVEC_MAX_ROWS {
                    return Err(err(format!(
                        "a fused gated unit needs an even n without bias and at most \
                         {MATVEC_MAX_ROWS} rows, found n = {n}, {rows} rows"
                    )));
                }
                if let Some(l) = s.last_mut() {
                    *l = n / 2;
                }
            }
            Some(Epilogue::RopeKv(rope)) => {
                let e = self.epilogue_input();
                if self.residual || rows != 1 || ins.len() != e + 3 {
                    return Err(err(format!(
                        "a fused rotary step needs one row, no residual, and the table and \
                         caches as inputs, found {rows} rows"
                    )));
                }
                let mut rope_ins = vec![(s.as_slice(), DType::F32)];
                rope_ins.extend(ins[e..].iter().copied());
                return rope.infer(&rope_ins);
            }
            None => {}
        }
        if self.residual {
            let r = ins[2 + self.bias as usize];
            need_f32("linear residual", r.1)?;
            if r.0 != s.as_slice() {
                return Err(err(format!(
                    "residual shape {:?}, expected the output's {s:?}",
                    r.0
                )));
            }
        }
        Ok(Some((s, DType::F32)))
    }

    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let o = self.operands(ins);
        if o.w.shape.len() == 3 {
            return Ok(vec![self.batched(ctx, &o, out)?]);
        }
        self.check_fusable(ctx, &o)?;
        o.w.parts
            .iter()
            .map(|part| {
                let bindings = vec![
                    Binding::read(&part.buffer),
                    Binding::read(o.x.buf()),
                    Binding::read(o.bias),
                    Binding::write(out.buf()),
                    Binding::read(o.residual),
                ];
                if o.m_total <= MATVEC_MAX_ROWS || self.cols_serve(ctx, &o) {
                    self.matvec(ctx, ins, &o, part, bindings)
                } else {
                    Ok(matmul_part(ctx, &o, part, bindings)?)
                }
            })
            .collect()
    }
}

/// What a [`Linear`]'s dispatches read: the operands, with `x` standing in for an absent
/// bias, residual or norm weight (their flags say they are absent), and the product's size.
struct Operands<'a> {
    x: &'a Bound,
    w: &'a Bound,
    bias: &'a Arc<wgpu::Buffer>,
    residual: &'a Arc<wgpu::Buffer>,
    norm_w: &'a Arc<wgpu::Buffer>,
    has_bias: u32,
    has_res: u32,
    k: usize,
    m_total: usize,
}

impl Linear {
    fn operands<'a>(&self, ins: &'a [Bound]) -> Operands<'a> {
        let (x, w) = (&ins[0], &ins[1]);
        let bias = self.bias.then(|| &ins[2]);
        let residual = self.residual.then(|| &ins[2 + self.bias as usize]);
        let norm_w = self.norm.map(|_| &ins[self.norm_input()]);
        let k = *x.shape.last().unwrap_or(&1);
        Operands {
            x,
            w,
            bias: bias.map_or(x.buf(), |b| b.buf()),
            residual: residual.map_or(x.buf(), |r| r.buf()),
            norm_w: norm_w.map_or(x.buf(), |n| n.buf()),
            has_bias: bias.is_some() as u32,
            has_res: residual.is_some() as u32,
            k,
            m_total: x.numel() / k.max(1),
        }
    }

    /// Batched product with an f32 activation as the second operand (`w` is `[b, n, k]`).
    fn batched(&self, ctx: &Ctx, o: &Operands, out: &Bound) -> Result<Dispatch> {
        let (b, n) = (o.w.shape[0], o.w.shape[1]);
        let m = o.m_total / b;
        let p = MatmulParams {
            m: u(m),
            n: u(n),
            k: u(o.k),
            row_words: u(o.k),
            w_batch_words: u(n * o.k),
            out_off: 0,
            n_total: u(n),
            has_bias: o.has_bias,
            has_res: o.has_res,
            out_pix: 0,
            out_row0: 0,
            ..Default::default()
        };
        Ok(dispatch(
            matmul_key(ctx, DType::F32, o.k, m, n, b)?,
            &p,
            vec![
                Binding::read(o.w.buf()),
                Binding::read(o.x.buf()),
                Binding::read(o.bias),
                Binding::write(out.buf()),
                Binding::read(o.residual),
            ],
            matmul_groups(ctx, m, n, b),
        ))
    }

    /// A fused norm runs in the GPU matvec only; a fused norm or epilogue needs the matvec and
    /// a weight in one part.
    fn check_fusable(&self, ctx: &Ctx, o: &Operands) -> Result<()> {
        if self.norm.is_some() && ctx.gpu.features.software {
            return Err(Error::Unsupported(
                "linear: a fused norm runs on the GPU matvec only (see fuses_norm)".into(),
            ));
        }
        if (self.norm.is_some() || self.epilogue.is_some())
            && (o.m_total > MATVEC_MAX_ROWS || o.w.parts.len() != 1)
        {
            return Err(Error::Unsupported(format!(
                "linear: a fused norm or epilogue needs the matvec ({} rows) and a \
                 weight in one part ({} parts)",
                o.m_total,
                o.w.parts.len()
            )));
        }
        Ok(())
    }

    /// Whether the matvec's COLS variant takes this product (see [`MATVEC_COLS_MAX_ROWS`]).
    fn cols_serve(&self, ctx: &Ctx, o: &Operands) -> bool {
        ctx.gpu.features.software
            && rows_v4(o.w.dtype, o.k)
            && o.m_total <= MATVEC_COLS_MAX_ROWS
            && self.norm.is_none()
            && self.epilogue.is_none()
    }

    /// The matvec of one weight part, with its fused norm and epilogue.
    fn matvec(
        &self,
        ctx: &Ctx,
        ins: &[Bound],
        o: &Operands,
        part: &crate::tensor::TensorPart,
        mut bindings: Vec<Binding>,
    ) -> Result<Dispatch> {
        let n_total = o.w.shape[0];
        bindings.push(Binding::read(o.norm_w));
        let mut p = MatvecParams {
            rows: u(part.rows),
            k: u(o.k),
            row_words: u(o.w.dtype.row_words(o.k)),
            out_off: u(part.row_start),
            m: u(o.m_total),
            n_total: u(n_total),
            has_bias: o.has_bias,
            has_res: o.has_res,
            eps: self.norm.unwrap_or(0.0),
            ..Default::default()
        };
        let rope = self.epilogue_params(ins, &mut p, &mut bindings, part.rows, n_total);
        let (mut key, groups) = matvec_variant(ctx, o, p.rows as usize, p.glu != 0 || rope)?;
        let storage = ctx.gpu.limits.max_storage_buffers_per_shader_stage as usize;
        if !ctx.gpu.features.software && self.partials != NormPartials::None {
            // The producer's workgroups: one partial sum each (one activation row).
            let (_, items, _) = matvec_shape(ctx.gpu, false);
            let (n, write) = match self.partials {
                NormPartials::Write => (part.rows.div_ceil(items), true),
                _ => (o.k.div_ceil(items), false),
            };
            let buf = ctx.shared_scratch("norm-partials", 4 * n as u64)?;
            let at = format!("{}", 2 + bindings.len());
            if write {
                bindings.push(Binding::write(&buf));
                key = key.def("PARTIALS_OUT", "").def("PARTIALS_AT", at);
            } else {
                bindings.push(Binding::read(&buf));
                key = key.def("PARTIALS_IN", "").def("PARTIALS_AT", at);
                p.partials = u(n);
            }
        }
        // 16-byte weight loads: the weight bound again after the others (one more storage
        // buffer, which the rotary epilogue's nine may not have).
        if !ctx.gpu.features.software && w4_serves(o.w.dtype, o.k) && bindings.len() < storage {
            let w = bindings[0].buffer.clone();
            let at = format!("{}", 2 + bindings.len());
            bindings.push(Binding::read(&w));
            key = key.def("W4", "").def("W4_AT", at);
        }
        let key = match self.norm {
            Some(_) => key.def("NORM", ""),
            None => key,
        };
        let key = match &self.epilogue {
            Some(Epilogue::RopeKv(_)) => {
                let f16 = ins[self.epilogue_input() + 1].dtype == DType::F16;
                super::attention::kv_def(key.def("ROPE", ""), f16)
            }
            _ => key,
        };
        Ok(dispatch(key, &p, bindings, groups))
    }

    /// The epilogue's fields and bindings; whether it is the rotary one.
    fn epilogue_params(
        &self,
        ins: &[Bound],
        p: &mut MatvecParams,
        bindings: &mut Vec<Binding>,
        rows: usize,
        n_total: usize,
    ) -> bool {
        match &self.epilogue {
            // Half as many (output) rows, each from a gate row and an up row.
            Some(Epilogue::Glu { act, gate_first }) => {
                let half = rows / 2;
                (p.rows, p.n_total, p.glu) = (u(half), u(n_total / 2), 1 + act.code());
                if *gate_first {
                    p.up_row = u(half);
                } else {
                    p.gate_row = u(half);
                }
                false
            }
            // Work items: a rotary pair or a single row each (see matvec.wgsl).
            Some(Epilogue::RopeKv(r)) => {
                let e = self.epilogue_input();
                let (table, kc, vc) = (&ins[e], &ins[e + 1], &ins[e + 2]);
                let d = n_total / (r.heads + 2 * r.kv_heads);
                let half = table.shape[1];
                let [pos_add, pos_slot, pos_mul] = r.pos.words();
                // The fusion pass takes one sequence at a static index (see RopeKv::fusable).
                let (cap, seq) = r.cache_rows(&kc.shape);
                // A rotary pair (or a single row past the rotary dims) of each q and k head,
                // two v rows.
                p.rows = u((r.heads + r.kv_heads) * (d - half) + (r.kv_heads * d).div_ceil(2));
                (p.heads, p.kv_heads, p.d, p.half) = (u(r.heads), u(r.kv_heads), u(d), u(half));
                (p.positions, p.interleaved) = (u(table.shape[0]), r.interleaved as u32);
                (p.pos_add, p.pos_slot, p.pos_mul) = (pos_add, pos_slot, pos_mul);
                (p.cap_rows, p.cache_row0) = (u(cap), u(seq * cap));
                bindings[4] = Binding::read(table.buf());
                bindings.push(Binding::write(kc.buf()));
                bindings.push(Binding::write(vc.buf()));
                true
            }
            None => false,
        }
    }
}

/// Whether the GPU matvec reads rows of `k` elements of `dtype` 16 bytes at a time (W4,
/// `weights.wgsl`'s quads): plain rows of whole 16-byte units, and the K-quants whose
/// super-blocks are (Q4_K 36 words, Q6_K 56) with a quad layout written for them.
pub fn w4_serves(dtype: DType, k: usize) -> bool {
    match dtype {
        DType::F32 => k.is_multiple_of(4),
        DType::F16 | DType::BF16 => k.is_multiple_of(8),
        DType::Q4_K | DType::Q6_K => true,
        _ => false,
    }
}

/// The matvec variant for the adapter and its dispatch grid over `rows` work items; `paired`
/// items (gate/up or rotary pairs) take two rows each.
fn matvec_variant(
    ctx: &Ctx,
    o: &Operands,
    rows: usize,
    paired: bool,
) -> Result<(KernelKey, [u32; 3])> {
    let (dtype, m_total, software) = (o.w.dtype, o.m_total, ctx.gpu.features.software);
    let key = weight_key("matvec.wgsl", dtype)?;
    Ok(
        if software && rows_v4(dtype, o.k) && !paired && m_total > 1 {
            // `dots` per invocation: dots / cols weight rows with cols rows of x each.
            let (cols, dots) = (m_total.next_power_of_two().min(8), cols_dots(dtype));
            let key = key
                .def("ROWS_V4", "")
                .def("V4_WG", V4_WG)
                .def("COLS", format!("{cols}u"))
                .def("DOTS", format!("{dots}u"));
            let per_wg = V4_WG * (dots / cols);
            (key, grid(u(rows.div_ceil(per_wg) * m_total.div_ceil(cols))))
        } else if software && rows_v4(dtype, o.k) {
            // Eight dots per invocation (eight rows, or four pairs of rows), 16-byte loads.
            let items = if paired { 4 } else { 8 };
            let key = key.def("ROWS_V4", "").def("V4_WG", V4_WG);
            (key, grid(u(rows.div_ceil(V4_WG * items) * m_total)))
        } else if software && ctx.gpu.features.subgroups {
            // One row per subgroup, 8 rows per workgroup of 64.
            (
                key.def("SUBGROUP_ROWS", ""),
                grid(u(rows.div_ceil(8) * m_total)),
            )
        } else if software {
            // One invocation per output row, 64 per workgroup.
            (key.def("ROWS", ""), grid(u((rows * m_total).div_ceil(64))))
        } else {
            gpu_matvec(ctx.gpu, key, o.k, rows, m_total, paired)
        },
    )
}

/// The GPU matvec's key (`key`: `matvec.wgsl` with its weight define) and grid for `rows` work
/// items of `m` activation rows of `k` ([`matvec_shape`]).
pub fn gpu_matvec(
    gpu: &Gpu,
    key: KernelKey,
    k: usize,
    rows: usize,
    m: usize,
    paired: bool,
) -> (KernelKey, [u32; 3]) {
    let (wg, items, one) = matvec_shape(gpu, paired);
    let mut key = key
        .def("MV_WG", format!("{wg}u"))
        .def("MV_R", format!("{items}u"));
    if one {
        key = key.def("ONE_SUBGROUP", "");
    }
    if k.is_multiple_of(4) {
        key = key.def("X4", "");
    }
    (key, grid(u(rows.div_ceil(items) * m)))
}

/// The tiled GEMM of one weight part (more rows than the matvec takes).
fn matmul_part(
    ctx: &Ctx,
    o: &Operands,
    part: &crate::tensor::TensorPart,
    bindings: Vec<Binding>,
) -> Result<Dispatch> {
    let p = MatmulParams {
        m: u(o.m_total),
        n: u(part.rows),
        k: u(o.k),
        row_words: u(o.w.dtype.row_words(o.k)),
        w_batch_words: 0,
        out_off: u(part.row_start),
        n_total: u(o.w.shape[0]),
        has_bias: o.has_bias,
        has_res: o.has_res,
        out_pix: 0,
        out_row0: 0,
        ..Default::default()
    };
    Ok(dispatch(
        matmul_key(ctx, o.w.dtype, o.k, o.m_total, part.rows, 1)?,
        &p,
        bindings,
        matmul_groups(ctx, o.m_total, part.rows, 1),
    ))
}

/// Embedding rows: table `[v, d]` (any weight dtype), u32 ids; `n` ids are read starting at
/// `ids_offset` (the token history at the current position) → `[n, d]`. Ids past the table
/// give zero rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Gather {
    pub n: usize,
    pub ids_offset: Dyn,
}

impl Kernel for Gather {
    fn name(&self) -> &'static str {
        "gather"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let (t, ids) = (ins[0].0, ins[1]);
        let err = |m: String| shape_err(self.name(), m);
        if t.len() != 2 || ids.0.len() != 1 || ids.1 != DType::U32 {
            return Err(err(format!(
                "expected table [v, d] and u32 ids [n], found {t:?}, {:?} {}",
                ids.0, ids.1
            )));
        }
        if let Dyn::Static(o) = self.ids_offset {
            if o as usize + self.n > ids.0[0] {
                return Err(err(format!(
                    "{} ids at offset {o} overflow ids of length {}",
                    self.n, ids.0[0]
                )));
            }
        }
        Ok(Some((vec![self.n, t[1]], DType::F32)))
    }

    /// The table's `n` rows (all of the ids).
    fn input_bytes(&self, i: usize, whole: u64, ins: &[Meta]) -> u64 {
        let rows = ins[0].0.first().copied().unwrap_or(1).max(1) as u64;
        match i {
            0 => whole / rows * (self.n as u64).min(rows),
            _ => whole,
        }
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (table, ids) = (&ins[0], &ins[1]);
        let (total, d) = (table.shape[0], table.shape[1]);
        let n = out.shape[0];
        let [ids_add, ids_slot, ids_mul] = self.ids_offset.words();
        let row_words = table.dtype.row_words(d);
        table
            .parts
            .iter()
            .map(|part| {
                let p = GatherParams {
                    n: u(n),
                    d: u(d),
                    row_words: u(row_words),
                    row_start: u(part.row_start),
                    rows: u(part.rows),
                    total_rows: u(total),
                    ids_add,
                    ids_slot,
                    ids_mul,
                };
                Ok(dispatch(
                    weight_key("gather.wgsl", table.dtype)?,
                    &p,
                    vec![
                        Binding::read(&part.buffer),
                        Binding::read(ids.buf()),
                        Binding::write(out.buf()),
                    ],
                    elementwise_groups(n * d),
                ))
            })
            .collect()
    }
}
