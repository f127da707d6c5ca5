//! Attention family (`attention.wgsl`): flash attention with online softmax, grouped KV heads
//! (GQA/MQA), causal masking from a run-time query position, a run-time valid KV length, and
//! split-K over keys when the other dimensions give too few workgroups (decode over a cache).

use super::{grid, Binding, Bound, Ctx, Dispatch, KernelKey, Params};
use crate::error::{shape_err, Result};
use crate::graph::Op;

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

/// Encodes attention: one dispatch, or a split pass and a reduce pass.
pub fn encode(ctx: &Ctx, op: &Op, ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
    let Op::Attention {
        heads,
        kv_heads,
        causal,
        scale,
        q_pos,
        kv_len,
    } = op
    else {
        return Err(shape_err(op.name(), "not attention"));
    };
    let (q, k, v) = (&ins[0], &ins[1], &ins[2]);
    let (b, lq, lk) = (q.shape[0], q.shape[1], k.shape[1]);
    let hd = q.shape[2] / heads;
    if hd == 0 {
        return Err(shape_err(op.name(), "head dim 0"));
    }
    let g = heads / kv_heads;
    let rows = lq * g;
    let tiles = Tiles::new(rows, hd);
    let nblk = rows.div_ceil(tiles.bq);
    let base = b * kv_heads * nblk;
    let ns = splits(base, lk);
    let total = base * ns;
    let [q_add, q_slot, q_mul] = q_pos.words();
    let [kv_add, kv_slot, kv_mul] = kv_len.words();
    let params = |total: usize| {
        Params::default()
            .u(b)
            .u(lq)
            .u(lk)
            .u(*heads)
            .u(*kv_heads)
            .u(g)
            .u(nblk)
            .u(ns)
            .u(*causal as u32)
            .f(*scale)
            .u(q_add)
            .u(q_slot)
            .u(q_mul)
            .u(kv_add)
            .u(kv_slot)
            .u(kv_mul)
            .u(total)
            .0
    };
    let inputs = [
        Binding::read(q.buf()),
        Binding::read(k.buf()),
        Binding::read(v.buf()),
    ];
    if ns == 1 {
        let mut bindings = inputs.to_vec();
        bindings.push(Binding::write(out.buf()));
        return Ok(vec![Dispatch {
            key: tiles.key("main"),
            params: params(total),
            bindings,
            groups: grid(total as u32),
        }]);
    }
    let outputs = b * lq * heads;
    let part = ctx.scratch("attention-partials", (ns * outputs * (hd + 2) * 4) as u64);
    let mut bindings = inputs.to_vec();
    bindings.push(Binding::write(&part));
    let elems = outputs * hd;
    Ok(vec![
        Dispatch {
            key: tiles.key("main").def("SPLIT", ""),
            params: params(total),
            bindings,
            groups: grid(total as u32),
        },
        Dispatch {
            key: KernelKey::new("attention.wgsl", "reduce")
                .def("REDUCE", "")
                .def("HD", hd),
            params: params(elems),
            bindings: vec![Binding::read(&part), Binding::write(out.buf())],
            groups: grid(elems.div_ceil(256) as u32),
        },
    ])
}
