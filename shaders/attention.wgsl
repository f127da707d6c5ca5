// Flash attention (online softmax) with grouped KV heads and optional split-K.
//   out[b, i, h*D + :] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h / G]) v[b, j, h / G]
//   G = heads / kv_heads; valid keys j < kv_end = min(kv_len, lk), and j <= q_pos + i if causal;
//   with a sliding window W > 0 also j > q_pos + i - W (the W newest positions, itself included,
//   as transformers' sliding_window_overlay), and when not causal also j < q_pos + i + W (a
//   bidirectional window: |q - j| < W); a query with no valid key outputs zeros.
//   Soft-capping (Gemma 2) replaces each scaled score s by cap * tanh(s / cap) when cap > 0.
// A workgroup owns one (batch, kv head, block of BQ rows, key split). Rows are (query, head of
// the group) pairs, row = i * G + hg, so the G query heads sharing a KV head read each K/V tile
// once (GQA/MQA decode has G rows per query). Per tile of BK keys: K tile -> workgroup memory,
// scores S = q.K (one thread per score), row max and P = exp(S - m) (threads of a row split the
// keys), V tile -> the same memory, then thread (r, c) of T = 256 / BQ lanes accumulates
// dims c, c + T, .. (DJ of them) in registers. Row max and sum are kept redundantly by every
// thread of a row (same reads in the same order, so they agree).
//
// Entry `main` (default): writes out directly.
//   Bindings: 2 q: array<f32> [b, lq, heads*D]   3 k: array<f32> [b, lk, kv_heads*D]
//             4 v: array<f32> [b, lk, kv_heads*D] 5 out: array<f32> [b, lq, heads*D]
//   (F16KV: k and v are f16 caches, two elements to a word, see common.wgsl's half_read.)
//   Dispatch: splits * b * kv_heads * ceil(lq * G / BQ) workgroups of 256 (grid()), block fastest.
// Variant SPLIT (entry `main`): split s takes keys [s*c, min((s+1)*c, kv_end)), c = ceil(kv_end /
//   splits), and binding 5 is part: array<f32> [splits, b*lq*heads, D + 2] = (max, sum, acc[D]),
//   unnormalized; an empty split writes (NEG, 0, 0..).
// Variant REDUCE (entry `reduce`): 2 part (as above), 3 out [b, lq, heads*D]; one thread per
//   output element, ceil(b*lq*heads*D / 256) workgroups (grid()).
// Defines (sizes, set by kernels::attention): HD head dim, BQ rows per workgroup (power of two
// <= 16), DJ = ceil(HD / (256 / BQ)), BK keys per tile, KST = K/V tile row stride (odd, so
// threads reading different keys hit different banks), QS = BQ*HD, KS = BK*KST, SS = BQ*BK.
#include "common.wgsl"

struct Params {
    b: u32, lq: u32, lk: u32, heads: u32, kv_heads: u32, g: u32, nblk: u32, splits: u32,
    causal: u32, scale: f32, q_add: u32, q_slot: u32, q_mul: u32, kv_add: u32, kv_slot: u32, kv_mul: u32,
    total: u32, window: u32, softcap: f32, s_add: u32, s_slot: u32, s_mul: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

// Masked-score sentinel; finite because WGSL has no infinity literal, and tested explicitly so
// that a fully masked row never computes exp(NEG - NEG) = 1.
const NEG: f32 = -3.0e38;

// A scaled score after optional soft-capping. tanh saturates to +-1 in f32 past |x| = 9, so the
// clamp changes nothing but keeps exp-based tanh implementations away from inf / inf.
fn capped(s: f32) -> f32 {
    if (p.softcap > 0.0) { return p.softcap * tanh(clamp(s / p.softcap, -15.0, 15.0)); }
    return s;
}

// First key a query at position qp may see under the sliding window (0 without one).
fn window_start(qp: u32) -> u32 {
    if (p.window > 0u && qp + 1u > p.window) { return qp + 1u - p.window; }
    return 0u;
}

// Batch row bi's first query position, its valid keys, and the cache sequence it reads (bi
// itself by default; per-row values for a batch of decoding sequences, see graph::Dyn::Rows).
fn q_pos_of(bi: u32) -> u32 { return dyn_row(p.q_add, p.q_slot, p.q_mul, bi); }
fn kv_end_of(bi: u32) -> u32 { return min(dyn_row(p.kv_add, p.kv_slot, p.kv_mul, bi), p.lk); }
fn seq_of(bi: u32) -> u32 {
    return dyn_row(p.s_add, p.s_slot, p.s_mul, bi) + select(bi, 0u, is_rows(p.s_slot));
}

// One past the last key a query at position qp may see under a bidirectional window
// (non-causal with W > 0: |qp - j| < W, as transformers' bidirectional sliding layers).
fn window_end(qp: u32) -> u32 {
    if (p.causal == 0u && p.window > 0u) { return qp + p.window; }
    return 0xffffffffu;
}

// The keys [lo, hi) a query of batch row bi at position qp sees: the valid ones, past its
// window's start and (causal) not after it.
fn key_range(qp: u32, bi: u32) -> vec2<u32> {
    let kv_end = kv_end_of(bi);
    let lo = min(window_start(qp), kv_end);
    var hi = min(kv_end, window_end(qp));
    if (p.causal == 1u) { hi = min(hi, qp + 1u); }
    return vec2<u32>(lo, max(lo, hi));
}

// Splits in use for a decode query (LIVE_SPLIT_KEYS): as many as give each about that many of
// its live keys, at most the dispatched p.splits. The others stop at once and the reduce pass
// reads only these, so a short context in a long cache costs what its keys cost.
fn used_splits(bi: u32) -> u32 {
#ifdef LIVE_SPLIT_KEYS
    let r = key_range(q_pos_of(bi), bi);
    return clamp((r.y - r.x + LIVE_SPLIT_KEYS - 1u) / LIVE_SPLIT_KEYS, 1u, p.splits);
#else
    return p.splits;
#endif
}

#ifdef REDUCE
@group(0) @binding(2) var<storage, read> part: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = group_index(wg, nwg) * 256u + li;
    if (e >= p.total) { return; }
    let o = e / HD;
    let d = e % HD;
    let no = p.b * p.lq * p.heads;
    let st = HD + 2u;
    let ns = used_splits(o / (p.lq * p.heads));
    var m = NEG;
    for (var s = 0u; s < ns; s++) { m = max(m, part[(s * no + o) * st]); }
    var l = 0.0;
    var a = 0.0;
    for (var s = 0u; s < ns; s++) {
        let base = (s * no + o) * st;
        let w = exp(part[base] - m);
        l += part[base + 1u] * w;
        a += part[base + 2u + d] * w;
    }
    out[e] = select(0.0, a / l, l > 0.0);
}
#else
#ifdef ROWS
// Software adapters (lavapipe, SwiftShader): one invocation per output row (batch, query,
// head), ROWS_WG (8: one SIMD batch) per workgroup so that decode's few rows spread over the
// CPU threads, no workgroup memory and no barriers: the keys are a sequential loop with online
// softmax, the head's q and accumulator in private memory.
// lavapipe (Mesa's gallivm) stops every loop of an invocation after 65535 iterations in all, so
// the encoder splits the keys (SPLIT, reduced by `reduce`) to keep each invocation's share
// under that. Dispatch: ceil(splits * b * lq * heads / ROWS_WG) workgroups (grid()); `total` =
// splits * b * lq * heads, split slowest.
// K and V are read in units U of UNIT elements: vec4 when the head dim is a multiple of 4
// (HU = HD / 4 units per head; the encoder sets UNIT4), f32 otherwise. llvmpipe loads storage
// one lane at a time either way; a vec4 load pays that loop once for four elements.
#ifdef UNIT4
alias U = vec4<f32>;
const UNIT: u32 = 4u;
fn qload(i: u32) -> U { return vec4<f32>(q[i], q[i + 1u], q[i + 2u], q[i + 3u]); }
fn usum(u: U) -> f32 { return u.x + u.y + u.z + u.w; }
fn ustore(i: u32, u: U) { dst[i] = u.x; dst[i + 1u] = u.y; dst[i + 2u] = u.z; dst[i + 3u] = u.w; }
#ifdef F16KV
@group(0) @binding(3) var<storage, read> k4: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read> v4: array<vec2<u32>>;
fn kload(e: u32) -> U { return half4(k4[e / 4u]); }
fn vload(e: u32) -> U { return half4(v4[e / 4u]); }
#else
@group(0) @binding(3) var<storage, read> k4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v4: array<vec4<f32>>;
fn kload(e: u32) -> U { return k4[e / 4u]; }
fn vload(e: u32) -> U { return v4[e / 4u]; }
#endif
#else
alias U = f32;
const UNIT: u32 = 1u;
fn qload(i: u32) -> U { return q[i]; }
fn usum(u: U) -> f32 { return u; }
fn ustore(i: u32, u: U) { dst[i] = u; }
#ifdef F16KV
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> v: array<u32>;
fn kload(e: u32) -> U { return half_read(k[e >> 1u], e); }
fn vload(e: u32) -> U { return half_read(v[e >> 1u], e); }
#else
@group(0) @binding(3) var<storage, read> k: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;
fn kload(e: u32) -> U { return k[e]; }
fn vload(e: u32) -> U { return v[e]; }
#endif
#endif
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(5) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(ROWS_WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let idx = group_index(wg, nwg) * ROWS_WG + li;
    if (idx >= p.total) { return; }
    let rows = p.b * p.lq * p.heads;
    let o = idx % rows;
    let split = idx / rows;
    let h = o % p.heads;
    let i = (o / p.heads) % p.lq;
    let bi = o / (p.heads * p.lq);
    let kw = p.kv_heads * HD;
    let kh = (h / p.g) * HD;
    let kv_end = kv_end_of(bi);
    let qp = q_pos_of(bi) + i;
    // This row's keys [lo, hi), split evenly.
    let lo = min(window_start(qp), kv_end);
    var hi = min(kv_end, window_end(qp));
    if (p.causal == 1u) { hi = min(hi, qp + 1u); }
    hi = max(lo, hi);
    let chunk = (hi - lo + p.splits - 1u) / p.splits;
    let j_begin = min(lo + split * chunk, hi);
    let j_end = min(j_begin + chunk, hi);
    const HU = HD / UNIT;
    var qv: array<U, HU>;
    for (var d = 0u; d < HU; d++) { qv[d] = qload(o * HD + d * UNIT) * p.scale; }
    var acc: array<U, HU>; // zero-initialized
    var m = NEG;
    var l = 0.0;
    for (var j = j_begin; j < j_end; j++) {
        let kb = (seq_of(bi) * p.lk + j) * kw + kh;
        var su = U(0.0);
        for (var d = 0u; d < HU; d++) { su += qv[d] * kload(kb + d * UNIT); }
        let s = capped(usum(su));
        if (s > m) {
            // A new maximum: rescale what is summed so far (exp(NEG - s) = 0 the first time).
            let a = exp(m - s);
            l *= a;
            for (var d = 0u; d < HU; d++) { acc[d] *= a; }
            m = s;
        }
        let pk = exp(s - m);
        l += pk;
        for (var d = 0u; d < HU; d++) { acc[d] += pk * vload(kb + d * UNIT); }
    }
#ifdef SPLIT
    let base = (split * rows + o) * (HD + 2u);
    dst[base] = m;
    dst[base + 1u] = l;
    for (var d = 0u; d < HU; d++) { ustore(base + 2u + d * UNIT, acc[d]); }
#else
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var d = 0u; d < HU; d++) { ustore(o * HD + d * UNIT, acc[d] * inv); }
#endif
}
#else
#ifdef KV4
// DECODE and FLASH: K and V (e, a multiple of 4) read 16 bytes at a time, f32 or f16 caches.
#ifdef F16KV
@group(0) @binding(3) var<storage, read> k2: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read> v2: array<vec2<u32>>;
fn kload(e: u32) -> vec4<f32> { return half4(k2[e / 4u]); }
fn vload(e: u32) -> vec4<f32> { return half4(v2[e / 4u]); }
#else
@group(0) @binding(3) var<storage, read> k4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v4: array<vec4<f32>>;
fn kload(e: u32) -> vec4<f32> { return k4[e / 4u]; }
fn vload(e: u32) -> vec4<f32> { return v4[e / 4u]; }
#endif
@group(0) @binding(5) var<storage, read_write> dst: array<f32>;
#endif
#ifdef DECODE
// GPUs with a fixed subgroup size, decode (one query per batch and head), head dim a multiple
// of 4, GQ <= 8 query heads per KV head: one subgroup (SG invocations) per (batch, kv head, key
// split), no workgroup memory, no barrier. Lane l holds dims 4 l + 4 SG u (u < NU) of the GQ
// query rows (scaled) and of their accumulators. Per key: one 16-byte K load per unit, each
// row's partial dot summed with subgroupAdd (every lane gets the score), the online-softmax
// update kept alike by every lane, one 16-byte V load per unit and GQ multiply-adds. The keys
// of a split are [lo, hi) of the live ones, shared evenly, and only as many splits run as give
// each LIVE_SPLIT_KEYS of them (so the work follows the position); SPLIT writes (max, sum, acc)
// partials that `reduce` merges.
// Dispatch: splits * b * kv_heads workgroups (grid()), kv head fastest, split slowest.
@group(0) @binding(2) var<storage, read> q: array<f32>;

const NU: u32 = (HD + 4u * SG - 1u) / (4u * SG);

@compute @workgroup_size(SG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let gi = group_index(wg, nwg);
    if (gi >= p.total) { return; }
    let hk = gi % p.kv_heads;
    let bi = (gi / p.kv_heads) % p.b;
    let split = gi / (p.kv_heads * p.b);
    let ns = used_splits(bi);
    if (split >= ns) { return; }
    let kw = p.kv_heads * HD;
    let r = key_range(q_pos_of(bi), bi);
    let chunk = (r.y - r.x + ns - 1u) / ns;
    let j_begin = min(r.x + split * chunk, r.y);
    let j_end = min(j_begin + chunk, r.y);
    var qv: array<vec4<f32>, GQ * NU>;
    var acc: array<vec4<f32>, GQ * NU>;
    var m: array<f32, GQ>;
    var l: array<f32, GQ>;
    for (var g = 0u; g < GQ; g++) {
        m[g] = NEG;
        let qb = (bi * p.heads + hk * GQ + g) * HD;
        for (var u = 0u; u < NU; u++) {
            let d = 4u * lane + 4u * SG * u;
            if (d < HD) { qv[g * NU + u] = vec4<f32>(q[qb + d], q[qb + d + 1u], q[qb + d + 2u], q[qb + d + 3u]) * p.scale; }
        }
    }
    for (var j = j_begin; j < j_end; j++) {
        let kb = (seq_of(bi) * p.lk + j) * kw + hk * HD;
        var kv: array<vec4<f32>, NU>;
        for (var u = 0u; u < NU; u++) {
            let d = 4u * lane + 4u * SG * u;
            if (d < HD) { kv[u] = kload(kb + d); }
        }
        var pk: array<f32, GQ>;
        for (var g = 0u; g < GQ; g++) {
            var part = 0.0;
            for (var u = 0u; u < NU; u++) { part += dot(qv[g * NU + u], kv[u]); }
            let s = capped(subgroupAdd(part));
            if (s > m[g]) {
                // A new maximum: rescale what is summed so far (exp(NEG - s) = 0 the first time).
                let a = exp(m[g] - s);
                l[g] *= a;
                for (var u = 0u; u < NU; u++) { acc[g * NU + u] *= a; }
                m[g] = s;
            }
            pk[g] = exp(s - m[g]);
            l[g] += pk[g];
        }
        for (var u = 0u; u < NU; u++) {
            let d = 4u * lane + 4u * SG * u;
            if (d < HD) {
                let vv = vload(kb + d);
                for (var g = 0u; g < GQ; g++) { acc[g * NU + u] += pk[g] * vv; }
            }
        }
    }
    for (var g = 0u; g < GQ; g++) {
        let o = bi * p.heads + hk * GQ + g;
#ifdef SPLIT
        let base = (split * p.b * p.heads + o) * (HD + 2u);
        if (lane == 0u) {
            dst[base] = m[g];
            dst[base + 1u] = l[g];
        }
        for (var u = 0u; u < NU; u++) {
            let d = 4u * lane + 4u * SG * u;
            if (d < HD) {
                let a = acc[g * NU + u];
                dst[base + 2u + d] = a.x; dst[base + 3u + d] = a.y; dst[base + 4u + d] = a.z; dst[base + 5u + d] = a.w;
            }
        }
#else
        let inv = select(0.0, 1.0 / l[g], l[g] > 0.0);
        for (var u = 0u; u < NU; u++) {
            let d = 4u * lane + 4u * SG * u;
            if (d < HD) {
                let a = acc[g * NU + u] * inv;
                dst[o * HD + d] = a.x; dst[o * HD + d + 1u] = a.y; dst[o * HD + d + 2u] = a.z; dst[o * HD + d + 3u] = a.w;
            }
        }
#endif
    }
}
#else
#ifdef FLASH
// GPUs with subgroups (of a multiple of 4 invocations), head dim a multiple of 4 (HU = HD / 4
// vec4 units), prefill and U-Net attention: tiled flash attention. A workgroup of 256 owns 64
// rows (query, head of the group: row = i * G + hg, as above) of one (batch, kv head, key
// split); each row is a quad of consecutive invocations, lane t of the quad holding units
// t, t + 4, .. (NU of them) of the row's scaled q and of its f32 accumulator in registers.
// Per tile of BC keys: the K and V tiles go to workgroup memory (f16 with HALF, else f32; 16
// KiB together), then each key's score is the quad's partial dots summed by two subgroup
// shuffles (every row of a subgroup reads the same K unit: a broadcast), all BC scores of the
// tile stay in registers, the row's maximum moves once per tile, and the V tile is
// accumulated with the probabilities. Every invocation runs every shuffle (rows past the end
// compute masked scores and store nothing). SPLIT as for the tiled kernel below.
// Dispatch: splits * b * kv_heads * ceil(lq * G / 64) workgroups of 256 (grid()), block fastest.
@group(0) @binding(2) var<storage, read> q4: array<vec4<f32>>;

#ifdef HALF
alias T4 = vec4<f16>;
#else
alias T4 = vec4<f32>;
#endif
const HU: u32 = HD / 4u;
const NU: u32 = (HU + 3u) / 4u;
var<workgroup> kt: array<T4, BC * HU>;
var<workgroup> vt: array<T4, BC * HU>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let gi = group_index(wg, nwg);
    // The grid is exact in whole workgroups (total = its size), so no invocation leaves before
    // the shuffles; this only guards a padded 2D grid, whose extra groups are whole.
    if (gi >= p.total) { return; }
    let blk = gi % p.nblk;
    let hk = (gi / p.nblk) % p.kv_heads;
    let bi = (gi / (p.nblk * p.kv_heads)) % p.b;
    let split = gi / (p.nblk * p.kv_heads * p.b);
    let rows = p.lq * p.g;
    let row0 = blk * 64u;
    let row = row0 + li / 4u;
    let t = li % 4u;
    let kw = p.kv_heads * HD;
    let live = row < rows;
    let i = min(row, rows - 1u) / p.g;
    let h = hk * p.g + min(row, rows - 1u) % p.g;
    let o = (bi * p.lq + i) * p.heads + h;
    var qv: array<vec4<f32>, NU>;
    var acc: array<vec4<f32>, NU>;
    for (var n = 0u; n < NU; n++) {
        let u = t + 4u * n;
        if (u < HU) { qv[n] = q4[o * HU + u] * p.scale; }
    }

    let kv_end = kv_end_of(bi);
    let q_pos = q_pos_of(bi);
    let lo = min(window_start(q_pos + row0 / p.g), kv_end);
    let chunk = (kv_end - lo + p.splits - 1u) / p.splits;
    let j_begin = min(lo + split * chunk, kv_end);
    var j_end = min(j_begin + chunk, kv_end);
    if (p.causal == 1u) {
        let i_last = (min(row0 + 64u, rows) - 1u) / p.g;
        j_end = min(j_end, q_pos + i_last + 1u);
    }
    let qp = q_pos + i;
    let ws = window_start(qp);
    var m = NEG;
    var l = 0.0;
    for (var j0 = j_begin; j0 < j_end; j0 += BC) {
        workgroupBarrier();
        for (var idx = li; idx < BC * HU; idx += 256u) {
            let j = j0 + idx / HU;
            var kx = vec4<f32>(0.0);
            var vx = vec4<f32>(0.0);
            if (j < j_end) {
                let e = (seq_of(bi) * p.lk + j) * kw + hk * HD + 4u * (idx % HU);
                kx = kload(e);
                vx = vload(e);
            }
            kt[idx] = T4(kx);
            vt[idx] = T4(vx);
        }
        workgroupBarrier();
        var s: array<f32, BC>;
        var mt = m;
        for (var jj = 0u; jj < BC; jj++) {
            var part = 0.0;
            for (var n = 0u; n < NU; n++) {
                let u = t + 4u * n;
                if (u < HU) { part += dot(qv[n], vec4<f32>(kt[jj * HU + u])); }
            }
            part += subgroupShuffleXor(part, 1u);
            part += subgroupShuffleXor(part, 2u);
            let j = j0 + jj;
            let ok = live && j < j_end && (p.causal == 0u || j <= qp) && j >= ws && j < window_end(qp);
            s[jj] = select(NEG, capped(part), ok);
            mt = max(mt, s[jj]);
        }
        // A new maximum rescales what is summed so far (exp(NEG - x) = 0 the first time; a row
        // with nothing valid yet keeps l = 0 and acc = 0).
        let alpha = exp(m - mt);
        m = mt;
        l *= alpha;
        for (var n = 0u; n < NU; n++) { acc[n] *= alpha; }
        for (var jj = 0u; jj < BC; jj++) {
            let pk = select(exp(s[jj] - mt), 0.0, s[jj] == NEG);
            l += pk;
            for (var n = 0u; n < NU; n++) {
                let u = t + 4u * n;
                if (u < HU) { acc[n] += pk * vec4<f32>(vt[jj * HU + u]); }
            }
        }
    }

    if (!live) { return; }
#ifdef SPLIT
    let base = (split * p.b * p.lq * p.heads + o) * (HD + 2u);
    if (t == 0u) {
        dst[base] = m;
        dst[base + 1u] = l;
    }
    for (var n = 0u; n < NU; n++) {
        let u = t + 4u * n;
        if (u < HU) {
            let a = acc[n];
            let d = base + 2u + 4u * u;
            dst[d] = a.x; dst[d + 1u] = a.y; dst[d + 2u] = a.z; dst[d + 3u] = a.w;
        }
    }
#else
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var n = 0u; n < NU; n++) {
        let u = t + 4u * n;
        if (u < HU) {
            let a = acc[n] * inv;
            let d = o * HD + 4u * u;
            dst[d] = a.x; dst[d + 1u] = a.y; dst[d + 2u] = a.z; dst[d + 3u] = a.w;
        }
    }
#endif
}
#else
@group(0) @binding(2) var<storage, read> q: array<f32>;
#ifdef F16KV
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> v: array<u32>;
fn kf(e: u32) -> f32 { return half_read(k[e >> 1u], e); }
fn vf(e: u32) -> f32 { return half_read(v[e >> 1u], e); }
#else
@group(0) @binding(3) var<storage, read> k: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;
fn kf(e: u32) -> f32 { return k[e]; }
fn vf(e: u32) -> f32 { return v[e]; }
#endif
@group(0) @binding(5) var<storage, read_write> dst: array<f32>;

const T: u32 = 256u / BQ;

var<workgroup> q_s: array<f32, QS>;
var<workgroup> kv_s: array<f32, KS>;
var<workgroup> s_s: array<f32, SS>;
var<workgroup> p_s: array<f32, SS>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let gi = group_index(wg, nwg);
    if (gi >= p.total) { return; }
    let blk = gi % p.nblk;
    let hk = (gi / p.nblk) % p.kv_heads;
    let bi = (gi / (p.nblk * p.kv_heads)) % p.b;
    let split = gi / (p.nblk * p.kv_heads * p.b);
    let rows = p.lq * p.g;
    let row0 = blk * BQ;
    let kw = p.kv_heads * HD;

    // The query scale is folded into q once, instead of into every score.
    for (var idx = li; idx < QS; idx += 256u) {
        let row = row0 + idx / HD;
        var x = 0.0;
        if (row < rows) {
            let i = row / p.g;
            let h = hk * p.g + row % p.g;
            x = q[((bi * p.lq + i) * p.heads + h) * HD + idx % HD] * p.scale;
        }
        q_s[idx] = x;
    }

    let kv_end = kv_end_of(bi);
    let q_pos = q_pos_of(bi);
    // The block's keys start where its first row's window does; the splits share [lo, kv_end).
    let lo = min(window_start(q_pos + row0 / p.g), kv_end);
    let chunk = (kv_end - lo + p.splits - 1u) / p.splits;
    let j_begin = min(lo + split * chunk, kv_end);
    var j_end = min(j_begin + chunk, kv_end);
    if (p.causal == 1u) {
        // Keys past the last row's causal limit are masked for every row of the block.
        let i_last = (min(row0 + BQ, rows) - 1u) / p.g;
        j_end = min(j_end, q_pos + i_last + 1u);
    }

    let r = li / T;
    let c = li % T;
    let my_row = row0 + r;
    var m = NEG;
    var l = 0.0;
    var acc: array<f32, DJ>; // zero-initialized

    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        workgroupBarrier();
        for (var idx = li; idx < BK * HD; idx += 256u) {
            let j = j0 + idx / HD;
            var x = 0.0;
            if (j < j_end) { x = kf((seq_of(bi) * p.lk + j) * kw + hk * HD + idx % HD); }
            kv_s[(idx / HD) * KST + idx % HD] = x;
        }
        workgroupBarrier();
        for (var idx = li; idx < SS; idx += 256u) {
            let sr = idx / BK;
            let sk = idx % BK;
            let row = row0 + sr;
            let j = j0 + sk;
            var s = NEG;
            let qp = q_pos + row / p.g;
            let ok = row < rows && j < j_end && (p.causal == 0u || j <= qp) && j >= window_start(qp) && j < window_end(qp);
            if (ok) {
                s = 0.0;
                for (var d = 0u; d < HD; d++) { s += q_s[sr * HD + d] * kv_s[sk * KST + d]; }
                s = capped(s);
            }
            s_s[idx] = s;
        }
        workgroupBarrier();
        var mt = m;
        for (var kk = 0u; kk < BK; kk++) { mt = max(mt, s_s[r * BK + kk]); }
        for (var kk = c; kk < BK; kk += T) {
            let s = s_s[r * BK + kk];
            p_s[r * BK + kk] = select(exp(s - mt), 0.0, s == NEG);
        }
        for (var idx = li; idx < BK * HD; idx += 256u) {
            let j = j0 + idx / HD;
            var x = 0.0;
            if (j < j_end) { x = vf((seq_of(bi) * p.lk + j) * kw + hk * HD + idx % HD); }
            kv_s[(idx / HD) * KST + idx % HD] = x;
        }
        workgroupBarrier();
        let alpha = exp(m - mt);
        m = mt;
        l *= alpha;
        for (var t = 0u; t < DJ; t++) { acc[t] *= alpha; }
        for (var kk = 0u; kk < BK; kk++) {
            let pk = p_s[r * BK + kk];
            l += pk;
            for (var t = 0u; t < DJ; t++) {
                let d = c + T * t;
                if (d < HD) { acc[t] += pk * kv_s[kk * KST + d]; }
            }
        }
    }

    if (my_row >= rows) { return; }
    let i = my_row / p.g;
    let h = hk * p.g + my_row % p.g;
    let o = (bi * p.lq + i) * p.heads + h;
#ifdef SPLIT
    let base = (split * p.b * p.lq * p.heads + o) * (HD + 2u);
    if (c == 0u) {
        dst[base] = m;
        dst[base + 1u] = l;
    }
    for (var t = 0u; t < DJ; t++) {
        let d = c + T * t;
        if (d < HD) { dst[base + 2u + d] = acc[t]; }
    }
#else
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var t = 0u; t < DJ; t++) {
        let d = c + T * t;
        if (d < HD) { dst[o * HD + d] = acc[t] * inv; }
    }
#endif
}
#endif
#endif
#endif
#endif
