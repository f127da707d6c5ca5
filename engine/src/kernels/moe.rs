//! Mixture-of-experts layers (`moe.wgsl`, and `matmul.wgsl`'s IDS variant), as Gemma 4's and
//! Qwen 3.5 MoE's expert blocks run: [`MoeRouter`] picks each token's experts and weights on the
//! GPU, [`MoeLists`] inverts that into per-expert lists of (token, choice) pairs, [`MoeLinear`]
//! multiplies each expert's pairs by that expert's matrix only (llama.cpp's `mul_mat_id`: one
//! tiled product for all experts, batch = expert, empty tiles return at once), and [`MoeCombine`]
//! sums each token's expert outputs with its weights. Nothing goes back to the CPU, so a decode
//! step stays one submit.

use super::linear::{
    gemm_block, gemm_key, gpu_matvec, matmul_key, w4_serves, weight_key, MatmulParams,
    MatvecParams, MATVEC_MAX_ROWS,
};
use super::{
    dispatch, elementwise_groups, need_f32, u, Binding, Bound, Ctx, Dispatch, Inferred, Kernel,
    KernelKey, Meta,
};
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};

/// Largest top k (`MAX_K` in `moe.wgsl`).
pub const MAX_TOP_K: usize = 32;

super::params!(
    /// Uniforms of `moe.wgsl`'s router.
    RouterParams, "moe.wgsl", [] { experts: u32, k: u32, renorm: u32 }
);

super::params!(
    /// Uniforms of `moe.wgsl`'s LISTS.
    ListsParams, "moe.wgsl", ["LISTS"] { experts: u32, k: u32, rows: u32 }
);

super::params!(
    /// Uniforms of `moe.wgsl`'s COMBINE.
    CombineParams, "moe.wgsl", ["COMBINE"] { k: u32, rows: u32, width: u32 }
);

/// `routes` u32 `[rows, 2 top_k]` (a [`MoeRouter`]'s output), checked.
fn routes_rows(op: &str, routes: Meta, top_k: usize) -> Result<usize> {
    if routes.1 != DType::U32 || routes.0.len() != 2 || routes.0[1] != 2 * top_k || top_k == 0 {
        return Err(shape_err(
            op,
            format!(
                "routes {:?} {}: expected u32 [rows, {}] (top {top_k})",
                routes.0,
                routes.1,
                2 * top_k
            ),
        ));
    }
    Ok(routes.0[0])
}

/// Per row of router logits `[rows, experts]`: softmax (f32), the `top_k` most probable experts
/// (ties to the lower index), their probabilities renormalized to sum to 1 when `renorm`, times
/// `scale[expert]` (an f32 `[experts]` input: Gemma 4's per-expert scale, or ones). Output u32
/// `[rows, 2 top_k]`: (expert id, f32 bits of its weight) pairs, the most probable first.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeRouter {
    pub top_k: usize,
    pub renorm: bool,
}

impl Kernel for MoeRouter {
    fn name(&self) -> &'static str {
        "moe_router"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_f32(self.name(), ins[0].1)?;
        need_f32(self.name(), ins[1].1)?;
        let (x, s) = (ins[0].0, ins[1].0);
        let experts = x.last().copied().unwrap_or(0);
        if x.len() != 2 || s != [experts] || experts == 0 {
            return Err(shape_err(
                self.name(),
                format!("logits {x:?} and scale {s:?} need [rows, experts] and [experts]"),
            ));
        }
        if self.top_k == 0 || self.top_k > experts.min(MAX_TOP_K) {
            return Err(shape_err(
                self.name(),
                format!(
                    "top {} of {experts} experts (1 to {})",
                    self.top_k,
                    experts.min(MAX_TOP_K)
                ),
            ));
        }
        Ok(Some((vec![x[0], 2 * self.top_k], DType::U32)))
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let p = RouterParams {
            experts: u(ins[0].shape[1]),
            k: u(self.top_k),
            renorm: self.renorm as u32,
        };
        Ok(vec![dispatch(
            KernelKey::new("moe.wgsl", "main"),
            &p,
            vec![
                Binding::read(ins[0].buf()),
                Binding::read(ins[1].buf()),
                Binding::write(out.buf()),
            ],
            [u(ins[0].shape[0]), 1, 1],
        )])
    }
}

/// Per expert, the (row, choice) pairs routed to it: u32 `[experts, rows + 1]`, each a count,
/// then that many pair indices `row * top_k + choice` in row order (the rest unwritten). From
/// a [`MoeRouter`]'s routes `[rows, 2 top_k]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLists {
    pub experts: usize,
    pub top_k: usize,
}

impl Kernel for MoeLists {
    fn name(&self) -> &'static str {
        "moe_lists"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let rows = routes_rows(self.name(), ins[0], self.top_k)?;
        if self.experts == 0 || self.top_k > self.experts {
            return Err(shape_err(
                self.name(),
                format!("top {} of {} experts", self.top_k, self.experts),
            ));
        }
        Ok(Some((vec![self.experts, rows + 1], DType::U32)))
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let p = ListsParams {
            experts: u(self.experts),
            k: u(self.top_k),
            rows: u(ins[0].shape[0]),
        };
        Ok(vec![dispatch(
            KernelKey::new("moe.wgsl", "main").def("LISTS", ""),
            &p,
            vec![Binding::read(ins[0].buf()), Binding::write(out.buf())],
            [u(self.experts), 1, 1],
        )])
    }
}

/// The expert-indexed product: for every (row, choice) pair `i = row * top_k + choice` of the
/// lists ([`MoeLists`] `[experts, rows + 1]`), `y[i] = x[i or row] . w[expert]^T`. Inputs: x
/// f32 `[rows * top_k, k]` (`per_pair`: the down projection's inputs, one row per pair) or
/// `[rows, k]` (one row per token), w `[experts, n, k]` in any weight dtype (uploaded with
/// [`crate::Tensor::upload_experts`]), the lists, the routes they came from. Output f32
/// `[rows * top_k, n]`. A GEMM over each expert's pairs (`matmul.wgsl` IDS); on GPUs a decode
/// step's few pairs take the matvec instead (`matvec.wgsl` IDS: a pair per activation row, its
/// expert read from the routes).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLinear {
    pub top_k: usize,
    pub per_pair: bool,
}

impl Kernel for MoeLinear {
    fn name(&self) -> &'static str {
        "moe_linear"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        let (x, w, lists) = (ins[0], ins[1], ins[2]);
        need_f32(self.name(), x.1)?;
        routes_rows(self.name(), ins[3], self.top_k)?;
        if !DType::WEIGHTS.contains(&w.1) || w.0.len() != 3 {
            return Err(err(format!(
                "expert weights {:?} {}: expected [experts, n, k] in a weight dtype",
                w.0, w.1
            )));
        }
        let (experts, n, k) = (w.0[0], w.0[1], w.0[2]);
        if lists.1 != DType::U32 || lists.0.len() != 2 || lists.0[0] != experts || lists.0[1] == 0 {
            return Err(err(format!(
                "lists {:?} {}: expected u32 [{experts}, rows + 1]",
                lists.0, lists.1
            )));
        }
        let rows = lists.0[1] - 1;
        let x_rows = if self.per_pair {
            rows * self.top_k
        } else {
            rows
        };
        if x.0 != [x_rows, k] || self.top_k == 0 || self.top_k > experts {
            return Err(err(format!(
                "x {:?}: expected [{x_rows}, {k}] ({rows} rows, top {} of {experts} experts{})",
                x.0,
                self.top_k,
                if self.per_pair {
                    ", a row per pair"
                } else {
                    ""
                }
            )));
        }
        Ok(Some((vec![rows * self.top_k, n], DType::F32)))
    }

    /// The experts a run can reach (`rows * top_k` at most).
    fn input_bytes(&self, i: usize, whole: u64, ins: &[Meta]) -> u64 {
        let (experts, rows) = (ins[1].0[0].max(1) as u64, ins[2].0[1] as u64 - 1);
        match i {
            1 => whole / experts * experts.min(rows * self.top_k as u64),
            _ => whole,
        }
    }

    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (x, w, lists) = (&ins[0], &ins[1], &ins[2]);
        let (experts, n, k) = (w.shape[0], w.shape[1], w.shape[2]);
        let rows = lists.shape[1] - 1;
        let row_words = w.dtype.row_words(k);
        if !ctx.gpu.features.software && rows <= MATVEC_MAX_ROWS {
            return self.matvec(ctx, ins, out);
        }
        // Tiles sized for the pairs an expert gets on average, among the experts in use; the
        // grid covers every row an expert could get.
        let (avg, used) = (
            (rows * self.top_k).div_ceil(experts).max(1),
            (rows * self.top_k).min(experts),
        );
        w.parts
            .iter()
            .map(|part| {
                let p = MatmulParams {
                    m: u(rows),
                    n: u(n),
                    k: u(k),
                    row_words: u(row_words),
                    w_batch_words: u(n * row_words),
                    out_off: 0,
                    n_total: u(n),
                    has_bias: 0,
                    has_res: 0,
                    out_pix: 0,
                    out_row0: 0,
                    ids_div: if self.per_pair { 1 } else { u(self.top_k) },
                    ids_e0: u(part.row_start),
                };
                let (key, groups) = if ctx.gpu.features.software {
                    // The DIRECT kernel's 8 activation rows an invocation, or one where the
                    // experts get a row each on average (decode): 1 / 8 of the multiply-adds
                    // (lavapipe, a Qwen 3.5 MoE-shaped Q8_0 decode step's expert products
                    // 217 -> 35 ms: docs/benchmarks.md).
                    let key = matmul_key(ctx, w.dtype, k, rows, n, part.rows)?;
                    let (key, per) = match avg <= 1 {
                        true => (key.def("ONE_ROW", ""), 1),
                        false => (key, 8),
                    };
                    (
                        key,
                        [u(n.div_ceil(256)), u(rows.div_ceil(per)), u(part.rows)],
                    )
                } else {
                    let (tm, tn) = gemm_block(avg, n, used);
                    let key = super::linear::weight_key("matmul.wgsl", w.dtype)?;
                    let key = gemm_key(ctx.gpu, key, avg, n, used);
                    let key = if k.is_multiple_of(4) {
                        key.def("X4", "")
                    } else {
                        key
                    };
                    let groups = [
                        u(n.div_ceil(16 * tn)),
                        u(rows.div_ceil(16 * tm)),
                        u(part.rows),
                    ];
                    (key, groups)
                };
                if groups[1] > super::MAX_GROUPS_X || groups[0] > super::MAX_GROUPS_X {
                    return Err(Error::Unsupported(format!(
                        "moe_linear: {rows} rows of {n} outputs exceed one dispatch"
                    )));
                }
                Ok(dispatch(
                    key.def("IDS", ""),
                    &p,
                    vec![
                        Binding::read(&part.buffer),
                        Binding::read(x.buf()),
                        Binding::read(x.buf()),
                        Binding::write(out.buf()),
                        Binding::read(x.buf()),
                        Binding::read(lists.buf()),
                    ],
                    groups,
                ))
            })
            .collect()
    }
}

impl MoeLinear {
    /// The GPU matvec over a decode step's pairs, a dispatch per weight part (pairs whose
    /// expert another part holds store nothing there).
    fn matvec(&self, ctx: &Ctx, ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
        let (x, w, routes) = (&ins[0], &ins[1], &ins[3]);
        let (n, k) = (w.shape[1], w.shape[2]);
        let pairs = routes.shape[0] * self.top_k;
        let storage = ctx.gpu.limits.max_storage_buffers_per_shader_stage as usize;
        w.parts
            .iter()
            .map(|part| {
                let p = MatvecParams {
                    rows: u(n),
                    k: u(k),
                    row_words: u(w.dtype.row_words(k)),
                    m: u(pairs),
                    n_total: u(n),
                    ids_div: if self.per_pair { 1 } else { u(self.top_k) },
                    ids_e0: u(part.row_start),
                    ids_experts: u(part.rows),
                    ..Default::default()
                };
                let key = weight_key("matvec.wgsl", w.dtype)?;
                let (mut key, groups) = gpu_matvec(ctx.gpu, key, k, n, pairs, false);
                // w, x, bias, y, residual, norm weight (x standing in for the absent ones).
                let mut bindings = vec![
                    Binding::read(&part.buffer),
                    Binding::read(x.buf()),
                    Binding::read(x.buf()),
                    Binding::write(out.buf()),
                    Binding::read(x.buf()),
                    Binding::read(x.buf()),
                ];
                if w4_serves(w.dtype, k) && bindings.len() + 1 < storage {
                    let at = format!("{}", 2 + bindings.len());
                    bindings.push(Binding::read(&part.buffer));
                    key = key.def("W4", "").def("W4_AT", at);
                }
                let at = format!("{}", 2 + bindings.len());
                bindings.push(Binding::read(routes.buf()));
                Ok(dispatch(
                    key.def("IDS", "").def("IDS_AT", at),
                    &p,
                    bindings,
                    groups,
                ))
            })
            .collect()
    }
}

/// Each row's expert outputs summed with its routing weights: y f32 `[rows * top_k, n]` (a
/// [`MoeLinear`]'s output) and the routes `[rows, 2 top_k]` → `[rows, n]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeCombine {
    pub top_k: usize,
}

impl Kernel for MoeCombine {
    fn name(&self) -> &'static str {
        "moe_combine"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_f32(self.name(), ins[0].1)?;
        let rows = routes_rows(self.name(), ins[1], self.top_k)?;
        let y = ins[0].0;
        if y.len() != 2 || y[0] != rows * self.top_k {
            return Err(shape_err(
                self.name(),
                format!("expert outputs {y:?}: expected [{}, n]", rows * self.top_k),
            ));
        }
        Ok(Some((vec![rows, y[1]], DType::F32)))
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (rows, width) = (ins[1].shape[0], ins[0].shape[1]);
        let p = CombineParams {
            k: u(self.top_k),
            rows: u(rows),
            width: u(width),
        };
        Ok(vec![dispatch(
            KernelKey::new("moe.wgsl", "main").def("COMBINE", ""),
            &p,
            vec![
                Binding::read(ins[0].buf()),
                Binding::read(ins[1].buf()),
                Binding::write(out.buf()),
            ],
            elementwise_groups(rows * width),
        )])
    }
}
