//! Attention family (`attention.wgsl`): flash attention with online softmax, grouped KV heads
//! (GQA/MQA), causal masking from a run-time query position, a run-time valid KV length, and
//! split-K over keys when the other dimensions give too few workgroups (decode over a cache).

use super::{
    dispatch, f32_out, grid, need_f32, u, Binding, Bound, Ctx, Dispatch, Dyn, Inferred, Kernel,
    KernelKey, Meta,
};
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};

/// Keys and values: f32, or an f16 cache (two elements to a word), both the same.
pub fn need_kv(op: &str, k: DType, v: DType) -> Result<()> {
    if k != v || !matches!(k, DType::F32 | DType::F16) {
        return Err(Error::DType {
            op: op.into(),
            expected: "f32 or f16 keys and values (the same)".into(),
            found: format!("{k} and {v}"),
        });
    }
    Ok(())
}

/// `key` with the F16KV define where the caches are f16.
pub fn kv_def(key: KernelKey, f16: bool) -> KernelKey {
    if f16 {
        key.def("F16KV", "")
    } else {
        key
    }
}

/// Largest head dimension the kernel supports.
pub const MAX_HEAD_DIM: usize = 512;

/// Workgroup memory the kernel may use, in f32 words (the WebGPU default of 16 KiB).
pub const SHARED_WORDS: usize = 4096;

/// Split-K is used until about this many workgroups are in flight: enough to fill a large
/// GPU several times over, so the split partials stay small.
const TARGET_GROUPS: usize = 512;

/// Fewest keys a split covers: below this the reduce pass and partial traffic cost more than
/// the parallelism gains.
const MIN_SPLIT_KEYS: usize = 256;

/// Invocations per workgroup of the software variant: one SIMD batch of a CPU thread, so that
/// decode's few rows (one per head and split) spread over the driver's threads instead of
/// filling one workgroup.
const ROWS_WG: usize = 8;
/// Rows (times key splits) the software attention makes at least, in workgroups of ROWS_WG.
const SPREAD_ROWS: usize = 64;

/// Static tile sizes of one attention variant (the shader's defines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// Head dimension.
    pub hd: usize,
    /// Rows (query, head-of-group pairs) per workgroup, a power of two <= 16.
    pub bq: usize,
    /// Keys per tile.
    pub bk: usize,
    /// Dims each thread accumulates: `ceil(hd / (256 / bq))`.
    pub dj: usize,
    /// Row stride of the K/V tile in workgroup memory (odd, against bank conflicts).
    pub kst: usize,
}

impl Tiles {
    /// Tile sizes for `rows` rows per (batch, kv head) and head dim `hd`: as many rows as there
    /// are, up to 16, and at most half the workgroup memory for the query block; the rest is
    /// the K/V tile and two `bq x bk` score/probability tiles.
    pub fn new(rows: usize, hd: usize) -> Self {
        let by_mem = (SHARED_WORDS / 2 / hd.max(1)).max(1);
        let bq = rows.next_power_of_two().min(16).min(1 << by_mem.ilog2());
        let kst = hd | 1;
        // A small margin keeps the total strictly under the limit whatever the rounding.
        let bk = ((SHARED_WORDS - 64 - bq * hd) / (kst + 2 * bq)).clamp(1, 64);
        let dj = hd.div_ceil(256 / bq);
        Tiles {
            hd,
            bq,
            bk,
            dj,
            kst,
        }
    }

    /// Workgroup memory in bytes.
    pub fn shared_bytes(&self) -> usize {
        4 * (self.bq * self.hd + self.bk * self.kst + 2 * self.bq * self.bk)
    }

    fn key(&self, entry: &'static str) -> KernelKey {
        KernelKey::new("attention.wgsl", entry)
            .def("HD", self.hd)
            .def("BQ", self.bq)
            .def("BK", self.bk)
            .def("DJ", self.dj)
            .def("KST", self.kst)
            .def("QS", self.bq * self.hd)
            .def("KS", self.bk * self.kst)
            .def("SS", self.bq * self.bk)
    }
}

/// Number of key splits for `base` workgroups over a cache of `lk` keys. Chosen from the static
/// capacity because the valid length is only known at run time; each split then takes its
/// share of the valid keys in the shader.
pub fn splits(base: usize, lk: usize) -> usize {
    if base >= TARGET_GROUPS {
        return 1;
    }
    TARGET_GROUPS
        .div_ceil(base.max(1))
        .min(lk.div_ceil(MIN_SPLIT_KEYS))
        .max(1)
}

super::params!(
    /// Uniforms of `attention.wgsl` (both the main pass and the split reduce).
    AttentionParams, "attention.wgsl", [] {
        b: u32, lq: u32, lk: u32, heads: u32, kv_heads: u32, g: u32, nblk: u32, splits: u32,
        causal: u32, scale: f32, q_add: u32, q_slot: u32, q_mul: u32, kv_add: u32, kv_slot: u32,
        kv_mul: u32, total: u32, window: u32, softcap: f32, s_add: u32, s_slot: u32, s_mul: u32,
    }
);

/// Attention with online softmax. Inputs q `[b, lq, heads*d]`, k and v `[b, lk, kv_heads*d]`
/// (or a cache with `lk` rows of which `kv_len` are valid). Causal: query `i` sees keys
/// `j <= q_pos + i`; a sliding `window` (> 0) also hides keys `j <= q_pos + i - window`.
/// `softcap` (> 0) caps each scaled score `s` to `softcap * tanh(s / softcap)`. Output like q.
/// The caches may hold more sequences than q has batch rows: batch row `b` reads sequence
/// `seq + b`, or with a per-row `seq` ([`Dyn::Rows`]) sequence `seq[b]`; per-row `q_pos` and
/// `kv_len` give each row its own position and length (a batch of decoding sequences).
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub heads: usize,
    pub kv_heads: usize,
    pub causal: bool,
    pub scale: f32,
    pub q_pos: Dyn,
    pub kv_len: Dyn,
    /// Sliding-window size in keys (0: none).
    pub window: usize,
    /// Score soft-cap (0: none).
    pub softcap: f32,
    /// The cache sequence of batch row 0 (`None`: row b reads cache row b of as many).
    pub seq: Option<Dyn>,
}

impl Kernel for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        let (q, k, v) = (ins[0].0, ins[1].0, ins[2].0);
        need_f32(self.name(), ins[0].1)?;
        need_kv(self.name(), ins[1].1, ins[2].1)?;
        if q.len() != 3 || k.len() != 3 || v != k {
            return Err(err(format!(
                "expected q [b, lq, h*d], k = v [b, lk, kvh*d]; found {q:?}, {k:?}, {v:?}"
            )));
        }
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || q[2] % heads != 0 {
            return Err(err(format!(
                "{heads} heads, {kv_heads} kv heads and width {} do not divide",
                q[2]
            )));
        }
        let d = q[2] / heads;
        let batch_fits = match self.seq {
            None => q[0] == k[0],
            Some(Dyn::Static(s)) => s as usize + q[0] <= k[0],
            Some(_) => k[0] >= 1,
        };
        if k[2] != kv_heads * d || !batch_fits {
            return Err(err(format!(
                "k {k:?} does not match {kv_heads} kv heads of dim {d} and batch {} (sequence {:?})",
                q[0], self.seq
            )));
        }
        if d > MAX_HEAD_DIM {
            return Err(err(format!("head dim {d} exceeds {MAX_HEAD_DIM}")));
        }
        f32_out(q)
    }

    /// One dispatch, or a split pass and a reduce pass.
    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (q, k) = (&ins[0], &ins[1]);
        let (b, lq, lk) = (q.shape[0], q.shape[1], k.shape[1]);
        let hd = q.shape[2] / self.heads;
        let g = self.heads / self.kv_heads;
        let rows = lq * g;
        let tiles = Tiles::new(rows, hd);
        let f16 = k.dtype == DType::F16;
        let nblk = rows.div_ceil(tiles.bq);
        let base = b * self.kv_heads * nblk;
        let ns = splits(base, lk);
        let total = base * ns;
        let [q_add, q_slot, q_mul] = self.q_pos.words();
        let [kv_add, kv_slot, kv_mul] = self.kv_len.words();
        let [s_add, s_slot, s_mul] = self.seq.unwrap_or(Dyn::Static(0)).words();
        let params = |total: usize| AttentionParams {
            b: u(b),
            lq: u(lq),
            lk: u(lk),
            heads: u(self.heads),
            kv_heads: u(self.kv_heads),
            g: u(g),
            nblk: u(nblk),
            splits: u(ns),
            causal: self.causal as u32,
            scale: self.scale,
            q_add,
            q_slot,
            q_mul,
            kv_add,
            kv_slot,
            kv_mul,
            total: u(total),
            window: u(self.window),
            softcap: self.softcap,
            s_add,
            s_slot,
            s_mul,
        };
        if ctx.gpu.features.software {
            return self.encode_rows(ctx, ins, out, params);
        }
        if let Some(sg) = decode_subgroup(ctx, lq, hd, g) {
            return self.encode_decode(ctx, ins, out, params, sg, f16);
        }
        if flash_serves(ctx.gpu, lq, hd) {
            return self.encode_flash(ctx, ins, out, params, f16);
        }
        let main = Pass {
            key: kv_def(tiles.key("main"), f16),
            params: params(total),
            groups: grid(u(total)),
        };
        main.finish(ctx, ins, out, b * lq * self.heads, hd, ns, None)
    }
}

/// The main pass of one attention variant: its key, uniforms and workgroups.
struct Pass {
    key: KernelKey,
    params: AttentionParams,
    groups: [u32; 3],
}

impl Pass {
    /// The pass reading q, k and v (`ins`) and writing `out` directly (one split), or writing
    /// the partials of `ns` splits (SPLIT) that the reduce pass merges into the `rows` outputs
    /// of `hd`. With `live`, both passes use only the splits the live keys fill at `live` keys
    /// each (LIVE_SPLIT_KEYS).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        self,
        ctx: &Ctx,
        ins: &[Bound],
        out: &Bound,
        rows: usize,
        hd: usize,
        ns: usize,
        live: Option<usize>,
    ) -> Result<Vec<Dispatch>> {
        let mut bindings: Vec<Binding> = ins[..3].iter().map(|t| Binding::read(t.buf())).collect();
        if ns == 1 {
            bindings.push(Binding::write(out.buf()));
            return Ok(vec![dispatch(
                self.key,
                &self.params,
                bindings,
                self.groups,
            )]);
        }
        let part = ctx.shared_scratch("attention-partials", (ns * rows * (hd + 2) * 4) as u64)?;
        bindings.push(Binding::write(&part));
        let elems = rows * hd;
        let mut key = self.key.def("SPLIT", "");
        let mut reduce = KernelKey::new("attention.wgsl", "reduce")
            .def("REDUCE", "")
            .def("HD", hd);
        if let Some(n) = live {
            key = key.def("LIVE_SPLIT_KEYS", format!("{n}u"));
            reduce = reduce.def("LIVE_SPLIT_KEYS", format!("{n}u"));
        }
        let reduce_params = AttentionParams {
            total: u(elems),
            ..self.params
        };
        Ok(vec![
            dispatch(key, &self.params, bindings, self.groups),
            dispatch(
                reduce,
                &reduce_params,
                vec![Binding::read(&part), Binding::write(out.buf())],
                grid(u(elems.div_ceil(256))),
            ),
        ])
    }
}

/// Most query heads per KV head the DECODE variant keeps in registers.
const DECODE_MAX_GROUP: usize = 8;

/// Key splits the DECODE variant dispatches, in one-subgroup workgroups: enough to fill a
/// large GPU several times over (each is 32 invocations where the tiled kernel's are 256)...
const DECODE_TARGET_GROUPS: usize = 1024;
/// ... but no more than give each this many of the cache's keys; at run time only the splits
/// that the live keys fill this way run (`used_splits` in `attention.wgsl`).
const DECODE_MIN_SPLIT_KEYS: usize = 32;

/// The subgroup size the DECODE variant (`attention.wgsl`) runs with, where it serves: GPUs
/// whose subgroups have one fixed size, one query row per head (decode), a head dim of whole
/// vec4s and at most [`DECODE_MAX_GROUP`] query heads per KV head.
fn decode_subgroup(ctx: &Ctx, lq: usize, hd: usize, g: usize) -> Option<u32> {
    let info = &ctx.gpu.info;
    let (lo, hi) = (info.subgroup_min_size, info.subgroup_max_size);
    let fixed = ctx.gpu.features.subgroups && lo == hi && (4..=128).contains(&lo);
    (fixed && lq == 1 && hd.is_multiple_of(4) && g <= DECODE_MAX_GROUP).then_some(lo)
}

/// Rows (query, head-of-group pairs) per workgroup of the FLASH variant: 64 quads of lanes.
const FLASH_ROWS: usize = 64;

/// Whether the FLASH variant (`attention.wgsl`) serves: GPUs with subgroups of a multiple of
/// 4 invocations (a row's quad of lanes must share one) and head dims of whole vec4s up to 256
/// (its registers: half the head's q and accumulator per lane, plus one tile's scores).
fn flash_ok(gpu: &crate::Gpu, hd: usize) -> bool {
    let lo = gpu.info.subgroup_min_size;
    !gpu.features.software
        && gpu.features.subgroups
        && lo >= 4
        && lo.is_power_of_two()
        && hd.is_multiple_of(4)
        && hd <= 256
}

/// Whether attention with `lq` queries of head dim `hd` runs the FLASH variant on `gpu` (a
/// prefill: decode keeps its own kernels). Its tiles hold f32 keys and values as f16 where
/// [`crate::GpuFeatures::half_tiles`].
pub fn flash_serves(gpu: &crate::Gpu, lq: usize, hd: usize) -> bool {
    lq > 1 && flash_ok(gpu, hd)
}

/// Keys per tile of the FLASH variant for head dim `hd`: the K and V tiles together fill the
/// WebGPU default of 16 KiB of workgroup memory (f16 tiles: twice the keys), at most 64.
pub fn flash_keys(hd: usize, half: bool) -> usize {
    let elem = if half { 2 } else { 4 };
    (SHARED_WORDS * 4 / (2 * hd * elem)).clamp(1, 64)
}

impl Attention {
    /// The FLASH variant: 64 rows per workgroup of 256, a quad of lanes per row, the key splits
    /// as for the tiled kernel.
    fn encode_flash(
        &self,
        ctx: &Ctx,
        ins: &[Bound],
        out: &Bound,
        params: impl Fn(usize) -> AttentionParams,
        f16: bool,
    ) -> Result<Vec<Dispatch>> {
        let (q, k) = (&ins[0], &ins[1]);
        let (b, lq, lk) = (q.shape[0], q.shape[1], k.shape[1]);
        let hd = q.shape[2] / self.heads;
        let g = self.heads / self.kv_heads;
        let nblk = (lq * g).div_ceil(FLASH_ROWS);
        let base = b * self.kv_heads * nblk;
        let ns = splits(base, lk);
        let half = ctx.gpu.features.half_tiles;
        let mut key = KernelKey::new("attention.wgsl", "main")
            .def("FLASH", "")
            .def("KV4", "")
            .def("HD", format!("{hd}u"))
            .def("BC", format!("{}u", flash_keys(hd, half)));
        if half {
            key = key.def("HALF", "");
        }
        let main = Pass {
            key: kv_def(key, f16),
            params: AttentionParams {
                nblk: u(nblk),
                splits: u(ns),
                ..params(base * ns)
            },
            groups: grid(u(base * ns)),
        };
        main.finish(ctx, ins, out, b * lq * self.heads, hd, ns, None)
    }

    /// The DECODE variant: one subgroup per (batch, kv head, key split), scores summed with
    /// subgroupAdd, then the split partials' reduce pass where there are several.
    fn encode_decode(
        &self,
        ctx: &Ctx,
        ins: &[Bound],
        out: &Bound,
        params: impl Fn(usize) -> AttentionParams,
        sg: u32,
        f16: bool,
    ) -> Result<Vec<Dispatch>> {
        let (q, k) = (&ins[0], &ins[1]);
        let (b, lk) = (q.shape[0], k.shape[1]);
        let hd = q.shape[2] / self.heads;
        let g = self.heads / self.kv_heads;
        let base = b * self.kv_heads;
        let ns = DECODE_TARGET_GROUPS
            .div_ceil(base.max(1))
            .min(lk.div_ceil(DECODE_MIN_SPLIT_KEYS))
            .max(1);
        let key = KernelKey::new("attention.wgsl", "main")
            .def("DECODE", "")
            .def("KV4", "")
            .def("HD", format!("{hd}u"))
            .def("GQ", format!("{g}u"))
            .def("SG", format!("{sg}u"));
        let key = kv_def(key, f16);
        let main = Pass {
            key,
            params: AttentionParams {
                splits: u(ns),
                ..params(base * ns)
            },
            groups: grid(u(base * ns)),
        };
        // Both passes use only the splits the live keys fill (`used_splits`).
        let live = Some(DECODE_MIN_SPLIT_KEYS);
        main.finish(ctx, ins, out, b * self.heads, hd, ns, live)
    }

    /// The software-adapter variant (`ROWS` in `attention.wgsl`): one invocation per output
    /// row, the keys split only as far as the driver's loop limit requires.
    fn encode_rows(
        &self,
        ctx: &Ctx,
        ins: &[Bound],
        out: &Bound,
        params: impl Fn(usize) -> AttentionParams,
    ) -> Result<Vec<Dispatch>> {
        let (q, k) = (&ins[0], &ins[1]);
        let (b, lq, lk) = (q.shape[0], q.shape[1], k.shape[1]);
        let hd = q.shape[2] / self.heads;
        let rows = b * lq * self.heads;
        // K and V rows in vec4 units where the head dim allows (their offsets are then
        // multiples of 4 elements).
        let unit = if hd.is_multiple_of(4) { 4 } else { 1 };
        // Loop iterations per key (dot, rescale, accumulate) and per row (q load, store),
        // against the limit with a margin.
        let per_key = 3 * (hd / unit) + 2;
        let ns = match ctx.gpu.features.loop_limit {
            Some(limit) => {
                let budget = (limit as usize * 9 / 10).saturating_sub(2 * (hd / unit) + 16);
                lk.div_ceil((budget / per_key).max(1)).max(1)
            }
            None => 1,
        };
        // Few rows (decode: one per head) fill few SIMD batches: split the keys so that there
        // are at least SPREAD_ROWS, for every CPU thread to take a share (lavapipe, SmolLM2-135M
        // shapes, 9 heads: the 8 + 1 rows of two workgroups left one thread with 8 / 9 of it).
        let ns = ns.max(SPREAD_ROWS.div_ceil(rows.max(1))).min(lk.max(1));
        let key = KernelKey::new("attention.wgsl", "main")
            .def("ROWS", "")
            .def("HD", format!("{hd}u"))
            .def("ROWS_WG", format!("{ROWS_WG}u"));
        let key = if unit == 4 { key.def("UNIT4", "") } else { key };
        let main = Pass {
            key: kv_def(key, k.dtype == DType::F16),
            params: AttentionParams {
                splits: u(ns),
                ..params(rows * ns)
            },
            groups: grid(u((rows * ns).div_ceil(ROWS_WG))),
        };
        main.finish(ctx, ins, out, rows, hd, ns, None)
    }
}
