// Decode matrix-vector product with fused dequantization: y[m, off + r] = W[r, :] . x[m, :] (+ bias)
// (+ res), for every weight dtype of weights.wgsl, with two optional fusions the graph's fusion
// pass chooses (graph/fuse.rs):
//   NORM  (GPU variant, m = 1) x is first RMS-normalized with weight nw: y = (W . (x * nw))
//         / rms(x). Each workgroup sums x^2 in a first pass and reads x * nw in the dots (no
//         staging, so no limit on k from workgroup memory).
//   glu   (p.glu = 1 + activation code, see common.wgsl's glu_act) output row r is
//         act(W[r + gate_row] . x) * (W[r + up_row] . x): a gated unit on a stacked gate/up
//         weight, with `rows` = the output rows.
//   ROPE  (m = 1) the rotary step of a stacked Q/K/V projection (rope.wgsl's KV variant) in
//         the epilogue: work item r is a rotary pair of rows of a q or k head (or a single row
//         past the rotary dims, or two rows of v heads); q goes to y [heads * d], k (rotated) and v
//         into the caches at row pos (not past cap_rows) of the sequence starting at cache row cache_row0. `rows` = the work items.
// Bindings: 2 w: array<u32> [rows x row_words] (one weight part)
//           3 x: array<f32> [m, k]   4 bias: array<f32> [n_total] (unused unless has_bias)
//           5 y: array<f32> [m, n_total]   6 res: array<f32> like y, added when has_res (a residual)
//           7 nw: array<f32> [k], the RMSNorm weight (NORM)
//           ROPE: 6 table: array<f32> [positions, half, 2] (cos, sin) in place of res,
//           8 k_cache, 9 v_cache: array<f32> [cap_rows, kv_heads * d] (F16KV: f16 pairs)
// Variants:
// ROWS_V4 (software adapters, rows of whole 16-byte units: f32/f16/bf16 with k a multiple of
//   4/8/8; Q8_0/Q4_0/Q4_1/Q5_0, whose rows are padded to 16 bytes; Q4_K's 36-word and Q6_K's
//   56-word super-blocks):
//   eight row dots per invocation in one loop, weights and x read 16 bytes at a time. llvmpipe
//   (Mesa 22.3) loads storage one lane at a time in a loop with a bounds check per element,
//   whether or not the address is uniform: a 16-byte load pays that loop once for four words,
//   and the eight dots share the loop and the x loads. See main for the dispatch.
//   With COLS (2, 4 or 8): m rows of x in one pass, see that main.
// SUBGROUP_ROWS (software adapters with subgroups, other dtypes): one row per subgroup at a time,
//   8 rows per workgroup of 64, one subgroupAdd per row. ceil(rows / 8) * m workgroups.
// ROWS (software adapters without subgroups): one invocation per output row, 64 per workgroup,
//   no workgroup memory; ceil(rows * m / 64) workgroups.
// Otherwise (GPUs): MV_R items per workgroup of MV_WG invocations sharing every x load, x read
//   16 bytes at a time where k is a multiple of 4 (X4), the weights too for f32/f16/bf16 rows
//   of whole 16-byte units and Q4_K/Q6_K (W4: binding 8, or 10 under ROPE, is w again as
//   vec4<u32>); see the variant's main.
#include "common.wgsl"
#ifndef ROWS_V4
#define WITH_DOT
#include "weights.wgsl"
#endif

struct Params {
    rows: u32, k: u32, row_words: u32, out_off: u32, m: u32, n_total: u32, has_bias: u32, has_res: u32,
    glu: u32, gate_row: u32, up_row: u32, eps: f32,
    heads: u32, kv_heads: u32, d: u32, half: u32, positions: u32, interleaved: u32,
    pos_add: u32, pos_slot: u32, pos_mul: u32, cap_rows: u32, partials: u32, cache_row0: u32,
    ids_div: u32, ids_e0: u32, ids_experts: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
#ifdef ROWS_V4
@group(0) @binding(2) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> x4: array<vec4<f32>>;
#else
@group(0) @binding(2) var<storage, read> w: array<u32>;
#ifdef W4
// The weight words again, as 16-byte units (weights.wgsl's w_quad_dot), after the other
// bindings (W4_AT: the binding the encoder gave it).
@group(0) @binding(W4_AT) var<storage, read> w4: array<vec4<u32>>;
#endif
// Sums of squares of the hidden state, one per workgroup of the product that wrote it
// (PARTIALS_OUT), which the fused norm of the next products adds up instead of summing x^2
// itself (PARTIALS_IN, p.partials of them). PARTIALS_AT: the binding the encoder gave it.
#ifdef PARTIALS_OUT
@group(0) @binding(PARTIALS_AT) var<storage, read_write> partials: array<f32>;
#endif
#ifdef PARTIALS_IN
@group(0) @binding(PARTIALS_AT) var<storage, read> partials: array<f32>;
#endif
#ifdef X4
// x as 16-byte units (k a multiple of 4); under NORM each element times the norm weight (the
// 1 / rms factor is applied to the dot, once per row).
@group(0) @binding(3) var<storage, read> xv: array<vec4<f32>>;
#ifdef NORM
@group(0) @binding(7) var<storage, read> nwv: array<vec4<f32>>;
fn xq(o: u32) -> vec4<f32> { return xv[o >> 2u] * nwv[o >> 2u]; }
#else
fn xq(o: u32) -> vec4<f32> { return xv[o >> 2u]; }
#endif
fn xs(i: u32) -> f32 { return xq(i & ~3u)[i & 3u]; }
#else
@group(0) @binding(3) var<storage, read> x: array<f32>;
#ifdef NORM
@group(0) @binding(7) var<storage, read> nw: array<f32>;
fn xs(i: u32) -> f32 { return x[i] * nw[i]; }
#else
fn xs(i: u32) -> f32 { return x[i]; }
#endif
fn xq(o: u32) -> vec4<f32> { return vec4<f32>(xs(o), xs(o + 1u), xs(o + 2u), xs(o + 3u)); }
#endif
#endif
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
#ifdef ROPE
@group(0) @binding(6) var<storage, read> table: array<f32>;
#ifdef F16KV
@group(0) @binding(8) var<storage, read_write> k_cache: array<atomic<u32>>;
@group(0) @binding(9) var<storage, read_write> v_cache: array<atomic<u32>>;
fn put_k(i: u32, v: f32) { let h = half_write(i, v); atomicAnd(&k_cache[h.word], h.keep); atomicOr(&k_cache[h.word], h.bits); }
fn put_v(i: u32, v: f32) { let h = half_write(i, v); atomicAnd(&v_cache[h.word], h.keep); atomicOr(&v_cache[h.word], h.bits); }
#else
@group(0) @binding(8) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(9) var<storage, read_write> v_cache: array<f32>;
fn put_k(i: u32, v: f32) { k_cache[i] = v; }
fn put_v(i: u32, v: f32) { v_cache[i] = v; }
#endif

// Work item r: its rows (a, b) of the projection and what b is: 1 a rotary partner, 2 an
// independent row, 0 none (b = a). Each q and k head has d - half items (half pairs, then its
// dims past the rotary ones, one row each); the v rows go two to an item. Pairs are
// (i, i + half) (rotate_half) or (2i, 2i + 1) (interleaved).
fn rope_item(r: u32) -> vec3<u32> {
    let per = p.d - p.half;
    let rotated = (p.heads + p.kv_heads) * per;
    if (r >= rotated) {
        let v_end = (p.heads + 2u * p.kv_heads) * p.d;
        let row = (p.heads + p.kv_heads) * p.d + 2u * (r - rotated);
        if (row + 1u < v_end) { return vec3<u32>(row, row + 1u, 2u); }
        return vec3<u32>(row, row, 0u);
    }
    let base = (r / per) * p.d;
    let a = r % per;
    if (a >= p.half) { return vec3<u32>(base + a + p.half, base + a + p.half, 0u); }
    if (p.interleaved == 1u) { return vec3<u32>(base + 2u * a, base + 2u * a + 1u, 1u); }
    return vec3<u32>(base + a, base + a + p.half, 1u);
}

// Row `row` of the projection: q to y, k and v to the caches at the run's position.
fn put(row: u32, v: f32, at: u32) {
    let qw = p.heads * p.d;
    let kvw = p.kv_heads * p.d;
    if (row < qw) {
        y[row] = v;
    } else if (at < p.cap_rows) {
        let c = (p.cache_row0 + at) * kvw;
        if (row < qw + kvw) { put_k(c + row - qw, v); } else { put_v(c + row - qw - kvw, v); }
    }
}

fn store(mi: u32, r: u32, acc: vec2<f32>, inv: f32) {
    let it = rope_item(r);
    var a = acc.x * inv;
    var b = acc.y * inv;
    if (p.has_bias == 1u) { a += bias[it.x]; b += bias[it.y]; }
    let at = dyn_val(p.pos_add, p.pos_slot, p.pos_mul);
    if (it.z == 1u) {
        let t = 2u * (min(at, p.positions - 1u) * p.half + (r % (p.d - p.half)));
        let cs = table[t];
        let sn = table[t + 1u];
        put(it.y, b * cs + a * sn, at);
        a = a * cs - b * sn;
    }
    if (it.z == 2u) { put(it.y, b, at); }
    put(it.x, a, at);
}

fn rows_of(r: u32) -> vec2<u32> { return rope_item(r).xy; }
fn has_second(r: u32) -> bool { return rope_item(r).z != 0u; }
#else
@group(0) @binding(6) var<storage, read> res: array<f32>;

// `acc` (a row's dot, or a pair's under glu) scaled by `inv` (NORM), plus bias and residual.
fn out_value(mi: u32, r: u32, acc: vec2<f32>, inv: f32) -> f32 {
    let o = p.out_off + r;
    var v = acc.x * inv;
    if (p.glu != 0u) { v = glu_act(v, p.glu - 1u) * (acc.y * inv); }
    if (p.has_bias == 1u) { v += bias[o]; }
    if (p.has_res == 1u) { v += res[mi * p.n_total + o]; }
    return v;
}
fn store(mi: u32, r: u32, acc: vec2<f32>, inv: f32) {
    y[mi * p.n_total + p.out_off + r] = out_value(mi, r, acc, inv);
}

// The weight rows output row r reads: (r, -) or, under glu, (gate, up).
fn rows_of(r: u32) -> vec2<u32> {
    if (p.glu != 0u) { return vec2<u32>(r + p.gate_row, r + p.up_row); }
    return vec2<u32>(r, r);
}
fn has_second(r: u32) -> bool { return p.glu != 0u; }
#endif


// Whether each work item dots two rows (glu's gate and up, a rotary pair).
#ifdef ROPE
fn paired() -> bool { return true; }
#else
fn paired() -> bool { return p.glu != 0u; }
#endif

#ifdef ROWS_V4
fn hsum(v: vec4<f32>) -> f32 { return v.x + v.y + v.z + v.w; }
fn bf2(v: u32) -> vec2<f32> { return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u)); }
// Q4_K: (scale, min) of sub-block j from the 12 packed scale bytes in three words (ggml's
// get_scale_min_k4).
fn k4v_byte(sc: vec3<u32>, i: u32) -> u32 { return (sc[i / 4u] >> (8u * (i % 4u))) & 255u; }
fn k4v_scale_min(sc: vec3<u32>, j: u32) -> vec2<f32> {
    // Branch-free (j is the same for every lane, but a branch still costs both sides' masks).
    let lo = vec2<u32>(k4v_byte(sc, j) & 63u, k4v_byte(sc, j + 4u) & 63u);
    let jj = max(j, 4u);
    let hi = vec2<u32>((k4v_byte(sc, jj + 4u) & 15u) | ((k4v_byte(sc, jj - 4u) >> 6u) << 4u),
                       (k4v_byte(sc, jj + 4u) >> 4u) | ((k4v_byte(sc, jj) >> 6u) << 4u));
    return vec2<f32>(select(hi, lo, j < 4u));
}

// A Q4_0/Q4_1 block's 4 quant words q (word s: elements 4s.. in the low nibbles, 16 + 4s.. in
// the high ones), as unsigned quants, dotted with its 8 x units from xb.
fn nib_dot(q: vec4<u32>, xb: u32) -> f32 {
    return dot(lo4(q.x), x4[xb]) + dot(lo4(q.y), x4[xb + 1u]) + dot(lo4(q.z), x4[xb + 2u]) + dot(lo4(q.w), x4[xb + 3u])
         + dot(lo4(q.x >> 4u), x4[xb + 4u]) + dot(lo4(q.y >> 4u), x4[xb + 5u]) + dot(lo4(q.z >> 4u), x4[xb + 6u]) + dot(lo4(q.w >> 4u), x4[xb + 7u]);
}
// The sum of the 32 elements of x units xb..xb + 8: the zero-point and min terms (a block's dot
// is d * (q . x) - zero * d * sum(x)), computed once per step for the invocation's rows.
fn x_sum8(xb: u32) -> f32 {
    return dot(x4[xb] + x4[xb + 1u] + x4[xb + 2u] + x4[xb + 3u] + x4[xb + 4u] + x4[xb + 5u] + x4[xb + 6u] + x4[xb + 7u], vec4<f32>(1.0));
}

// One loop step of a row's dot: v4_steps() steps cover the row starting at unit rb; step i's
// partial dot with x4[xo..] (any split over the four lanes of the result). step_x(i, xo) is
// what the step needs from x alone (sums of x per block), shared by the invocation's rows.
// (Formats without one get a zero step_x; those with one define HAS_STEP_X.)
#ifdef W_F32
fn v4_steps() -> u32 { return p.row_words / 4u; }
fn step_dot(rb: u32, i: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> { return bitcast<vec4<f32>>(w4[rb + i]) * x4[xo + i]; }
#endif
#ifdef W_F16
fn v4_steps() -> u32 { return p.row_words / 4u; }
fn step_dot(rb: u32, i: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let q = w4[rb + i];
    return vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)) * x4[xo + 2u * i] + vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)) * x4[xo + 2u * i + 1u];
}
#endif
#ifdef W_BF16
fn v4_steps() -> u32 { return p.row_words / 4u; }
fn step_dot(rb: u32, i: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let q = w4[rb + i];
    return vec4<f32>(bf2(q.x), bf2(q.y)) * x4[xo + 2u * i] + vec4<f32>(bf2(q.z), bf2(q.w)) * x4[xo + 2u * i + 1u];
}
#endif
#ifdef W_Q8_0
// Four blocks (4 x 9 words = 9 units) per step: block j is words 9j..9j+8 = scale, 8 quant
// words; quant word s holds elements 4s..4s+3.
// The last group may hold fewer than 4 blocks: its other words are padding or the next
// row (or, past the buffer's end, whatever robust access returns), so those blocks are
// dropped with select (their scale words may be any bits, NaN included).
fn v4_steps() -> u32 { return (p.k / 32u + 3u) / 4u; }
fn step_dot(rb: u32, gi: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let u = rb + 9u * gi;
    let v0 = w4[u]; let v1 = w4[u + 1u]; let v2 = w4[u + 2u]; let v3 = w4[u + 3u]; let v4 = w4[u + 4u];
    let v5 = w4[u + 5u]; let v6 = w4[u + 6u]; let v7 = w4[u + 7u]; let v8 = w4[u + 8u];
    let xb = xo + 32u * gi;
    let s0 = dot(sb4(v0.y), x4[xb]) + dot(sb4(v0.z), x4[xb + 1u]) + dot(sb4(v0.w), x4[xb + 2u]) + dot(sb4(v1.x), x4[xb + 3u])
           + dot(sb4(v1.y), x4[xb + 4u]) + dot(sb4(v1.z), x4[xb + 5u]) + dot(sb4(v1.w), x4[xb + 6u]) + dot(sb4(v2.x), x4[xb + 7u]);
    let s1 = dot(sb4(v2.z), x4[xb + 8u]) + dot(sb4(v2.w), x4[xb + 9u]) + dot(sb4(v3.x), x4[xb + 10u]) + dot(sb4(v3.y), x4[xb + 11u])
           + dot(sb4(v3.z), x4[xb + 12u]) + dot(sb4(v3.w), x4[xb + 13u]) + dot(sb4(v4.x), x4[xb + 14u]) + dot(sb4(v4.y), x4[xb + 15u]);
    let s2 = dot(sb4(v4.w), x4[xb + 16u]) + dot(sb4(v5.x), x4[xb + 17u]) + dot(sb4(v5.y), x4[xb + 18u]) + dot(sb4(v5.z), x4[xb + 19u])
           + dot(sb4(v5.w), x4[xb + 20u]) + dot(sb4(v6.x), x4[xb + 21u]) + dot(sb4(v6.y), x4[xb + 22u]) + dot(sb4(v6.z), x4[xb + 23u]);
    let s3 = dot(sb4(v7.x), x4[xb + 24u]) + dot(sb4(v7.y), x4[xb + 25u]) + dot(sb4(v7.z), x4[xb + 26u]) + dot(sb4(v7.w), x4[xb + 27u])
           + dot(sb4(v8.x), x4[xb + 28u]) + dot(sb4(v8.y), x4[xb + 29u]) + dot(sb4(v8.z), x4[xb + 30u]) + dot(sb4(v8.w), x4[xb + 31u]);
    let t = vec4<u32>(4u * gi) + vec4<u32>(0u, 1u, 2u, 3u);
    return select(vec4<f32>(0.0), vec4<f32>(bitcast<f32>(v0.x) * s0, bitcast<f32>(v2.y) * s1, bitcast<f32>(v4.z) * s2, bitcast<f32>(v6.w) * s3), t < vec4<u32>(p.k / 32u));
}
#endif
#ifdef W_Q4_0
// Four blocks (4 x 5 words = 5 units) per step: block j is words 5j..5j+4 = scale, 4 quant
// words; quant word s holds elements 4s.. (low nibbles) and 16 + 4s.. (high), each minus 8.
// A partial last group: as Q8_0's.
fn v4_steps() -> u32 { return (p.k / 32u + 3u) / 4u; }
#define HAS_STEP_X
fn step_x(gi: u32, xo: u32) -> vec4<f32> {
    let xb = xo + 32u * gi;
    return 8.0 * vec4<f32>(x_sum8(xb), x_sum8(xb + 8u), x_sum8(xb + 16u), x_sum8(xb + 24u));
}
fn step_dot(rb: u32, gi: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let u = rb + 5u * gi;
    let v0 = w4[u]; let v1 = w4[u + 1u]; let v2 = w4[u + 2u]; let v3 = w4[u + 3u]; let v4 = w4[u + 4u];
    let xb = xo + 32u * gi;
    let q = vec4<f32>(nib_dot(vec4<u32>(v0.yzw, v1.x), xb), nib_dot(vec4<u32>(v1.zw, v2.xy), xb + 8u),
                      nib_dot(vec4<u32>(v2.w, v3.xyz), xb + 16u), nib_dot(v4, xb + 24u));
    let d = vec4<f32>(bitcast<f32>(v0.x), bitcast<f32>(v1.y), bitcast<f32>(v2.z), bitcast<f32>(v3.w));
    let t = vec4<u32>(4u * gi) + vec4<u32>(0u, 1u, 2u, 3u);
    return select(vec4<f32>(0.0), d * (q - sx), t < vec4<u32>(p.k / 32u));
}
#endif
#ifdef W_Q4_1
// Two blocks (2 x 6 words = 3 units) per step: block j is words 6j..6j+5 = d, m (f32), then
// 4 quant words as Q4_0's; element = q * d + m. An odd last block pairs with the row's
// padding (or the next row): that half is dropped with select.
fn v4_steps() -> u32 { return (p.k / 32u + 1u) / 2u; }
#define HAS_STEP_X
fn step_x(gi: u32, xo: u32) -> vec4<f32> {
    let xb = xo + 16u * gi;
    return vec4<f32>(x_sum8(xb), x_sum8(xb + 8u), 0.0, 0.0);
}
fn step_dot(rb: u32, gi: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let u = rb + 3u * gi;
    let v0 = w4[u]; let v1 = w4[u + 1u]; let v2 = w4[u + 2u];
    let xb = xo + 16u * gi;
    let q = vec2<f32>(nib_dot(vec4<u32>(v0.zw, v1.xy), xb), nib_dot(v2, xb + 8u));
    let part = vec2<f32>(bitcast<f32>(v0.x), bitcast<f32>(v1.z)) * q + vec2<f32>(bitcast<f32>(v0.y), bitcast<f32>(v1.w)) * sx.xy;
    let t = vec2<u32>(2u * gi) + vec2<u32>(0u, 1u);
    return vec4<f32>(select(vec2<f32>(0.0), part, t < vec2<u32>(p.k / 32u)), 0.0, 0.0);
}
#endif
#ifdef W_Q5_0
// Bits 0..3 of h moved to bit 4 of each byte (the fifth bits of four elements).
fn spread4(h: u32) -> u32 { return ((h & 1u) << 4u) | ((h & 2u) << 11u) | ((h & 4u) << 18u) | ((h & 8u) << 25u); }
// A Q5_0 block's quant words q (as Q4_0's) with its fifth bits qh (bit j: element j), as
// unsigned quants, dotted with its 8 x units from xb.
fn q5_dot(q: vec4<u32>, qh: u32, xb: u32) -> f32 {
    let m = 0x0f0f0f0fu;
    return dot(bytes4((q.x & m) | spread4(qh)), x4[xb]) + dot(bytes4((q.y & m) | spread4(qh >> 4u)), x4[xb + 1u])
         + dot(bytes4((q.z & m) | spread4(qh >> 8u)), x4[xb + 2u]) + dot(bytes4((q.w & m) | spread4(qh >> 12u)), x4[xb + 3u])
         + dot(bytes4(((q.x >> 4u) & m) | spread4(qh >> 16u)), x4[xb + 4u]) + dot(bytes4(((q.y >> 4u) & m) | spread4(qh >> 20u)), x4[xb + 5u])
         + dot(bytes4(((q.z >> 4u) & m) | spread4(qh >> 24u)), x4[xb + 6u]) + dot(bytes4(((q.w >> 4u) & m) | spread4(qh >> 28u)), x4[xb + 7u]);
}
// Two blocks (2 x 6 words = 3 units) per step: block j is words 6j..6j+5 = d (f32), qh, then
// 4 quant words as Q4_0's. An odd last block: as Q4_1's.
fn v4_steps() -> u32 { return (p.k / 32u + 1u) / 2u; }
#define HAS_STEP_X
fn step_x(gi: u32, xo: u32) -> vec4<f32> {
    let xb = xo + 16u * gi;
    return 16.0 * vec4<f32>(x_sum8(xb), x_sum8(xb + 8u), 0.0, 0.0);
}
fn step_dot(rb: u32, gi: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let u = rb + 3u * gi;
    let v0 = w4[u]; let v1 = w4[u + 1u]; let v2 = w4[u + 2u];
    let xb = xo + 16u * gi;
    let q = vec2<f32>(q5_dot(vec4<u32>(v0.zw, v1.xy), v0.y, xb), q5_dot(v2, v1.w, xb + 8u));
    let part = vec2<f32>(bitcast<f32>(v0.x), bitcast<f32>(v1.z)) * (q - sx.xy);
    let t = vec2<u32>(2u * gi) + vec2<u32>(0u, 1u);
    return vec4<f32>(select(vec2<f32>(0.0), part, t < vec2<u32>(p.k / 32u)), 0.0, 0.0);
}
#endif
#ifdef W_Q4_K
// One chunk c of 64 elements per step, 4 per super-block of 9 units: unit 0 = d|dmin (f16
// pair) and the 12 scale bytes; units 1 + 2c, 2 + 2c = the chunk's 8 quant words: byte l holds
// element 64c + l (sub-block 2c) low and 64c + 32 + l (sub-block 2c + 1) high.
fn v4_steps() -> u32 { return p.row_words / 9u; }
#define HAS_STEP_X
fn step_x(i: u32, xo: u32) -> vec4<f32> {
    let xl = xo + 16u * i;
    return vec4<f32>(x_sum8(xl), x_sum8(xl + 8u), 0.0, 0.0);
}
fn step_dot(rb: u32, i: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let c = i % 4u;
    let u = rb + 9u * (i / 4u);
    let h = w4[u];
    let qa = w4[u + 1u + 2u * c];
    let qb = w4[u + 2u + 2u * c];
    let xl = xo + 16u * i;
    let s_lo = dot(lo4(qa.x), x4[xl]) + dot(lo4(qa.y), x4[xl + 1u]) + dot(lo4(qa.z), x4[xl + 2u]) + dot(lo4(qa.w), x4[xl + 3u])
             + dot(lo4(qb.x), x4[xl + 4u]) + dot(lo4(qb.y), x4[xl + 5u]) + dot(lo4(qb.z), x4[xl + 6u]) + dot(lo4(qb.w), x4[xl + 7u]);
    let s_hi = dot(lo4(qa.x >> 4u), x4[xl + 8u]) + dot(lo4(qa.y >> 4u), x4[xl + 9u]) + dot(lo4(qa.z >> 4u), x4[xl + 10u]) + dot(lo4(qa.w >> 4u), x4[xl + 11u])
             + dot(lo4(qb.x >> 4u), x4[xl + 12u]) + dot(lo4(qb.y >> 4u), x4[xl + 13u]) + dot(lo4(qb.z >> 4u), x4[xl + 14u]) + dot(lo4(qb.w >> 4u), x4[xl + 15u]);
    let sc = vec3<u32>(h.y, h.z, h.w);
    let a = k4v_scale_min(sc, 2u * c);
    let b = k4v_scale_min(sc, 2u * c + 1u);
    let dm = unpack2x16float(h.x);
    return vec4<f32>(dm.x * (a.x * s_lo + b.x * s_hi) - dm.y * (a.y * sx.x + b.y * sx.y), 0.0, 0.0, 0.0);
}
#endif
#ifdef W_Q6_K
// One half (128 elements) of a 14-unit super-block per step: units 0..8 = ql, 8..12 = qh,
// 12 = the 16 i8 scales, 13 = d (f32) and padding. ql word r of half h (units 4h..4h + 4)
// holds positions l0 = 4 (r % 8).. of quarter qd = r / 8 (low nibbles) and qd + 2 (high), with
// their high bit pairs in qh word 8h + r % 8 at shifts 2 qd and 2 qd + 4; each 16 elements
// have a scale.
fn q6_bytes(ql: u32, qh: u32, shift: u32) -> vec4<f32> {
    return bytes4((ql & 0x0f0f0f0fu) | (((qh >> shift) & 0x03030303u) << 4u)) - 32.0;
}
fn v4_steps() -> u32 { return p.row_words / 56u * 2u; }
fn step_dot(rb: u32, i: u32, xo: u32, sx: vec4<f32>) -> vec4<f32> {
    let h = i % 2u;
    let u = rb + 14u * (i / 2u);
    let sc = w4[u + 12u];
    let xb = xo + 32u * i;
    var acc = 0.0;
    for (var t = 0u; t < 4u; t++) {
        // ql words 4t.. of the half: quarter qd = t / 2, positions 16 (t % 2)..
        let ql = w4[u + 4u * h + t];
        let qh = w4[u + 8u + 2u * h + t % 2u];
        let qd = t / 2u;
        let xl = xb + 4u * (t % 2u) + 8u * qd;
        let s_lo = dot(q6_bytes(ql.x, qh.x, 2u * qd), x4[xl]) + dot(q6_bytes(ql.y, qh.y, 2u * qd), x4[xl + 1u])
                 + dot(q6_bytes(ql.z, qh.z, 2u * qd), x4[xl + 2u]) + dot(q6_bytes(ql.w, qh.w, 2u * qd), x4[xl + 3u]);
        let s_hi = dot(q6_bytes(ql.x >> 4u, qh.x, 2u * qd + 4u), x4[xl + 16u]) + dot(q6_bytes(ql.y >> 4u, qh.y, 2u * qd + 4u), x4[xl + 17u])
                 + dot(q6_bytes(ql.z >> 4u, qh.z, 2u * qd + 4u), x4[xl + 18u]) + dot(q6_bytes(ql.w >> 4u, qh.w, 2u * qd + 4u), x4[xl + 19u]);
        // Scales 8h + t % 2 + 2 qd (low) and 4 more (high): bytes of sc's words.
        let j = 8u * h + t % 2u + 2u * qd;
        let lo = bitcast<i32>(sc[j / 4u] << (24u - 8u * (j % 4u))) >> 24u;
        let hi = bitcast<i32>(sc[j / 4u + 1u] << (24u - 8u * (j % 4u))) >> 24u;
        acc += f32(lo) * s_lo + f32(hi) * s_hi;
    }
    return vec4<f32>(bitcast<f32>(w4[u + 13u].x) * acc, 0.0, 0.0, 0.0);
}
#endif
#ifndef HAS_STEP_X
fn step_x(i: u32, xo: u32) -> vec4<f32> { return vec4<f32>(0.0); }
#endif


#ifdef COLS
// A step's eight elements of a plain row as two units (f32 rows: one, the other zero), and the
// x units they meet: step_dot's products, split so that the batch loads each once.
struct Units { a: vec4<f32>, b: vec4<f32> }
#ifdef W_F32
#define HAS_UNITS
fn w_units(rb: u32, i: u32) -> Units { return Units(bitcast<vec4<f32>>(w4[rb + i]), vec4<f32>(0.0)); }
fn x_units(xo: u32, i: u32) -> Units { return Units(x4[xo + i], vec4<f32>(0.0)); }
#endif
#ifdef W_F16
#define HAS_UNITS
fn w_units(rb: u32, i: u32) -> Units {
    let q = w4[rb + i];
    return Units(vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)), vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)));
}
fn x_units(xo: u32, i: u32) -> Units { return Units(x4[xo + 2u * i], x4[xo + 2u * i + 1u]); }
#endif
#ifdef W_BF16
#define HAS_UNITS
fn w_units(rb: u32, i: u32) -> Units {
    let q = w4[rb + i];
    return Units(vec4<f32>(bf2(q.x), bf2(q.y)), vec4<f32>(bf2(q.z), bf2(q.w)));
}
fn x_units(xo: u32, i: u32) -> Units { return Units(x4[xo + 2u * i], x4[xo + 2u * i + 1u]); }
#endif
// A batch of COLS x rows (one token of each of several decoding sequences, plain rows only): an
// invocation makes DOTS dots (8 or 16, kernels::linear::cols_dots), R = DOTS / COLS weight rows
// with COLS x rows, so each weight step is loaded once for all the sequences. Every dot adds its steps in the order main's does, so a
// row's outputs are the same bits as in a product of its own. x rows past m are clamped for
// reading and not stored. ceil(rows / (V4_WG * R)) * ceil(m / COLS) workgroups.
const R = DOTS / COLS;
@compute @workgroup_size(V4_WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let g = group_index(wg, nwg);
    let per_wg = R * V4_WG;
    let per_m = (p.rows + per_wg - 1u) / per_wg;
    let m0 = (g / per_m) * COLS;
    let r = (g % per_m) * per_wg + li * R;
    if (r >= p.rows || m0 >= p.m) { return; }
    var rb: array<u32, R>;
    for (var j = 0u; j < R; j++) { rb[j] = min(r + j, p.rows - 1u) * (p.row_words / 4u); }
    var xo: array<u32, COLS>;
    for (var c = 0u; c < COLS; c++) { xo[c] = min(m0 + c, p.m - 1u) * (p.k / 4u); }
    var acc: array<vec4<f32>, DOTS>;
#ifdef HAS_UNITS
    // Plain rows: each step's weight units and x units loaded once, then every dot.
    for (var i = 0u; i < v4_steps(); i++) {
        var xs: array<Units, COLS>;
        for (var c = 0u; c < COLS; c++) { xs[c] = x_units(xo[c], i); }
        for (var j = 0u; j < R; j++) {
            let w = w_units(rb[j], i);
            for (var c = 0u; c < COLS; c++) { acc[j * COLS + c] += w.a * xs[c].a + w.b * xs[c].b; }
        }
    }
#else
    for (var i = 0u; i < v4_steps(); i++) {
        for (var c = 0u; c < COLS; c++) {
            let sx = step_x(i, xo[c]);
            for (var j = 0u; j < R; j++) { acc[j * COLS + c] += step_dot(rb[j], i, xo[c], sx); }
        }
    }
#endif
    for (var j = 0u; j < R; j++) {
        for (var c = 0u; c < COLS; c++) {
            if (r + j < p.rows && m0 + c < p.m) { store(m0 + c, r + j, vec2<f32>(hsum(acc[j * COLS + c]), 0.0), 1.0); }
        }
    }
}
#else
// An invocation makes eight dots in one loop, so the loop's overhead and every x load (the same
// for the eight) are paid once per eight rows: eight output rows, or four rows of pairs (glu's
// gate and up, a rotary pair; a ROPE item without a partner dots its row twice). Rows past the
// end are clamped for reading and not stored. (lavapipe, SmolLM2-135M-shaped Q4_0 products
// per decode token: 1 dot 74 ms, 4 dots 54 ms, 8 dots 40 ms, 16 dots 53 ms.)
// ceil(rows / (V4_WG * items)) * m workgroups.
@compute @workgroup_size(V4_WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let g = group_index(wg, nwg);
    let items = select(8u, 4u, paired());
    let per_wg = items * V4_WG;
    let per_m = (p.rows + per_wg - 1u) / per_wg;
    let mi = g / per_m;
    let r = (g % per_m) * per_wg + li * items;
    if (r >= p.rows || mi >= p.m) { return; }
    let last = p.rows - 1u;
    var s: vec4<u32>;
    var t: vec4<u32>;
    if (paired()) {
        s = vec4<u32>(rows_of(r), rows_of(min(r + 1u, last)));
        t = vec4<u32>(rows_of(min(r + 2u, last)), rows_of(min(r + 3u, last)));
    } else {
        s = vec4<u32>(r, min(r + 1u, last), min(r + 2u, last), min(r + 3u, last));
        t = vec4<u32>(min(r + 4u, last), min(r + 5u, last), min(r + 6u, last), min(r + 7u, last));
    }
    s *= p.row_words / 4u;
    t *= p.row_words / 4u;
    let xo = mi * (p.k / 4u);
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var a4 = vec4<f32>(0.0);
    var a5 = vec4<f32>(0.0);
    var a6 = vec4<f32>(0.0);
    var a7 = vec4<f32>(0.0);
    for (var i = 0u; i < v4_steps(); i++) {
        let sx = step_x(i, xo);
        a0 += step_dot(s.x, i, xo, sx);
        a1 += step_dot(s.y, i, xo, sx);
        a2 += step_dot(s.z, i, xo, sx);
        a3 += step_dot(s.w, i, xo, sx);
        a4 += step_dot(t.x, i, xo, sx);
        a5 += step_dot(t.y, i, xo, sx);
        a6 += step_dot(t.z, i, xo, sx);
        a7 += step_dot(t.w, i, xo, sx);
    }
    let d = vec4<f32>(hsum(a0), hsum(a1), hsum(a2), hsum(a3));
    let e = vec4<f32>(hsum(a4), hsum(a5), hsum(a6), hsum(a7));
    if (paired()) {
        store(mi, r, d.xy, 1.0);
        if (r + 1u < p.rows) { store(mi, r + 1u, d.zw, 1.0); }
        if (r + 2u < p.rows) { store(mi, r + 2u, e.xy, 1.0); }
        if (r + 3u < p.rows) { store(mi, r + 3u, e.zw, 1.0); }
    } else {
        store(mi, r, vec2<f32>(d.x, 0.0), 1.0);
        if (r + 1u < p.rows) { store(mi, r + 1u, vec2<f32>(d.y, 0.0), 1.0); }
        if (r + 2u < p.rows) { store(mi, r + 2u, vec2<f32>(d.z, 0.0), 1.0); }
        if (r + 3u < p.rows) { store(mi, r + 3u, vec2<f32>(d.w, 0.0), 1.0); }
        if (r + 4u < p.rows) { store(mi, r + 4u, vec2<f32>(e.x, 0.0), 1.0); }
        if (r + 5u < p.rows) { store(mi, r + 5u, vec2<f32>(e.y, 0.0), 1.0); }
        if (r + 6u < p.rows) { store(mi, r + 6u, vec2<f32>(e.z, 0.0), 1.0); }
        if (r + 7u < p.rows) { store(mi, r + 7u, vec2<f32>(e.w, 0.0), 1.0); }
    }
}
#endif
#else
// Lane `lane` of `nl`'s share of the dot of the row starting at word rb with x[xo..]: plain
// dtypes take every nl-th word, block formats give W_LPB lanes one block (one word each), so
// consecutive lanes read consecutive words.
fn lane_dot(rb: u32, xo: u32, lane: u32, nl: u32) -> f32 {
    var acc = 0.0;
#ifdef W_PLAIN
    for (var wi = lane; wi < p.row_words; wi += nl) {
        acc += w_word_dot(rb, wi, xo, p.k);
    }
#else
    for (var t = lane; t < (p.k / W_BLOCK) * W_LPB; t += nl) {
        let u = t / W_LPB;
        acc += w_lane_dot(rb, u, t % W_LPB, xo + W_BLOCK * u);
    }
#endif
    return acc;
}

#ifdef SUBGROUP_ROWS
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg: u32) {
    let g = group_index(wg, nwg);
    let row_groups = (p.rows + 7u) / 8u;
    let mi = g / row_groups;
    let first = (g % row_groups) * 8u;
    let xo = mi * p.k;
    let nsg = (64u + sg - 1u) / sg;
    // The loop runs the same steps in every invocation (subgroupAdd needs uniform control
    // flow, which the browser's compiler checks); subgroup s takes row jj + s of each step.
    for (var jj = 0u; jj < 8u; jj += nsg) {
        let j = jj + li / sg;
        let r = first + j;
        let live = j < 8u && r < p.rows && mi < p.m;
        var acc = vec2<f32>(0.0);
        if (live) {
            let rr = rows_of(r) * p.row_words;
            acc.x = lane_dot(rr.x, xo, lane, sg);
            if (has_second(r)) { acc.y = lane_dot(rr.y, xo, lane, sg); }
        }
        let sum = vec2<f32>(subgroupAdd(acc.x), subgroupAdd(acc.y));
        if (lane == 0u && live) {
            store(mi, r, sum, 1.0);
        }
    }
}
#else
#ifdef ROWS
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 64u + li;
    if (i >= p.rows * p.m) { return; }
    let mi = i / p.rows;
    let r = i % p.rows;
    let xo = mi * p.k;
    let rr = rows_of(r) * p.row_words;
    var acc = vec2<f32>(lane_dot(rr.x, xo, 0u, 1u), 0.0);
    if (has_second(r)) { acc.y = lane_dot(rr.y, xo, 0u, 1u); }
    store(mi, r, acc, 1.0);
}
#else
// The GPU variant: MV_R work items (rows, or pairs) per workgroup of MV_WG invocations. The
// invocations stride over the row's units (W_LPB-lane shares of blocks, or words) so that
// consecutive invocations read consecutive weight words and x units; each invocation loads
// a unit's x once (16-byte loads) for all MV_R items, whose dots it keeps in registers.
// ONE_SUBGROUP (MV_WG = the adapter's fixed subgroup size): the dots are summed with
// subgroupAdd, no workgroup memory or barrier. Otherwise a tree in workgroup memory sums all
// MV_R at once. NORM: the invocations first sum x^2 the same way. ceil(rows / MV_R) * m
// workgroups.
#ifdef W4
// W4: the units are weights.wgsl's quads, four words read at once.
fn units() -> u32 { return w_quads(p.k); }
fn unit_dot(rb: u32, t: u32, xo: u32) -> f32 { return w_quad_dot(rb, t, xo); }
#else
#ifdef W_PLAIN
fn units() -> u32 { return p.row_words; }
fn unit_dot(rb: u32, t: u32, xo: u32) -> f32 { return w_word_dot(rb, t, xo, p.k); }
#else
fn units() -> u32 { return (p.k / W_BLOCK) * W_LPB; }
fn unit_dot(rb: u32, t: u32, xo: u32) -> f32 {
    let u = t / W_LPB;
    return w_lane_dot(rb, u, t % W_LPB, xo + W_BLOCK * u);
}
#endif
#endif

#ifdef ONE_SUBGROUP
fn sum_all(li: u32, acc: array<vec2<f32>, MV_R>) -> array<vec2<f32>, MV_R> {
    var out: array<vec2<f32>, MV_R>;
    for (var j = 0u; j < MV_R; j++) { out[j] = subgroupAdd(acc[j]); }
    return out;
}
#else
var<workgroup> red: array<vec2<f32>, MV_R * MV_WG>;
// The workgroup's sums of acc, slot by slot (log2(MV_WG) barriers for all MV_R together).
fn sum_all(li: u32, acc: array<vec2<f32>, MV_R>) -> array<vec2<f32>, MV_R> {
    workgroupBarrier();
    for (var j = 0u; j < MV_R; j++) { red[j * MV_WG + li] = acc[j]; }
    workgroupBarrier();
    for (var h = MV_WG / 2u; h > 0u; h >>= 1u) {
        if (li < h) {
            for (var j = 0u; j < MV_R; j++) { red[j * MV_WG + li] += red[j * MV_WG + li + h]; }
        }
        workgroupBarrier();
    }
    var out: array<vec2<f32>, MV_R>;
    for (var j = 0u; j < MV_R; j++) { out[j] = red[j * MV_WG]; }
    return out;
}
#endif

#ifdef IDS
// IDS (a mixture-of-experts decode step's expert-indexed product, llama.cpp's mul_mat_vec_id):
// activation row mi is (token, choice) pair mi of the router's routes (IDS_AT: u32 [tokens,
// 2 k], (expert, weight bits) pairs, so pair mi's expert is word 2 mi); the weight part holds
// experts ids_e0.. (ids_experts of them, `rows` rows each), x has a row per pair (ids_div 1)
// or per token (ids_div k), y a row per pair. Pairs whose expert is in another part store
// nothing.
@group(0) @binding(IDS_AT) var<storage, read> routes: array<u32>;
#endif

@compute @workgroup_size(MV_WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let g = group_index(wg, nwg);
    let groups = (p.rows + MV_R - 1u) / MV_R;
    // Workgroups past the end read valid rows and store nothing (barriers stay uniform).
    var live = g < groups * p.m;
    let mi = min(g / groups, p.m - 1u);
    let first = (g % groups) * MV_R;
#ifdef IDS
    let e = routes[2u * mi];
    let here = e >= p.ids_e0 && e < p.ids_e0 + p.ids_experts;
    live = live && here;
    let w_off = select(0u, e - p.ids_e0, here) * p.rows * p.row_words;
#else
    let w_off = 0u;
#endif
#ifdef NORM
    var ss: array<vec2<f32>, MV_R>;
#ifdef PARTIALS_IN
    for (var i = li; i < p.partials; i += MV_WG) { ss[0].x += partials[i]; }
#else
#ifdef X4
    for (var i = li; i < p.k / 4u; i += MV_WG) { let v = xv[i]; ss[0].x += dot(v, v); }
#else
    for (var i = li; i < p.k; i += MV_WG) { let v = x[i]; ss[0].x += v * v; }
#endif
#endif
    let inv = inverseSqrt(sum_all(li, ss)[0].x / f32(p.k) + p.eps);
    let xo = 0u;
#else
    let inv = 1.0;
#ifdef IDS
    let xo = (mi / p.ids_div) * p.k;
#else
    let xo = mi * p.k;
#endif
#endif
    var rb: array<vec2<u32>, MV_R>;
    for (var j = 0u; j < MV_R; j++) { rb[j] = rows_of(min(first + j, p.rows - 1u)) * p.row_words + w_off; }
    var acc: array<vec2<f32>, MV_R>;
    let n = units();
    if (paired()) {
        for (var t = li; t < n; t += MV_WG) {
            for (var j = 0u; j < MV_R; j++) {
                acc[j] += vec2<f32>(unit_dot(rb[j].x, t, xo), unit_dot(rb[j].y, t, xo));
            }
        }
    } else {
        for (var t = li; t < n; t += MV_WG) {
            for (var j = 0u; j < MV_R; j++) { acc[j].x += unit_dot(rb[j].x, t, xo); }
        }
    }
    let sums = sum_all(li, acc);
    // Every invocation holds every sum; invocation j % MV_WG stores item j.
    for (var j = 0u; j < MV_R; j++) {
        if (li == j % MV_WG && live && first + j < p.rows) { store(mi, first + j, sums[j], inv); }
    }
#ifdef PARTIALS_OUT
    // The squares of this workgroup's outputs (one activation row: g is its row group).
    if (li == 0u && live) {
        var q = 0.0;
        for (var j = 0u; j < MV_R; j++) {
            if (first + j < p.rows) { let v = out_value(mi, first + j, sums[j], inv); q += v * v; }
        }
        partials[g] = q;
    }
#endif
}
#endif
#endif
#endif
