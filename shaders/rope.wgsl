// Rotary position embedding on x [rows, heads * d] where row r is token (r % seq) at position
// pos + r % seq. The first 2 * half dims of each head rotate by angle position * inv_freq[i]:
//   NeoX / rotate_half (HF): pairs (i, i + half);   interleaved (GGUF, GPT-J): pairs (2i, 2i + 1).
// Dims past 2 * half pass through. cos/sin come from a table made once on the CPU
// (kernels::rope::table: the angle in f32 as HF forms it, cos/sin in f64), so the result does
// not depend on the backend's sin/cos, which WGSL lets be off by 2^-11 (SwiftShader's are).
// Bindings: 2 x: array<f32>, 3 table: array<f32> [positions, half, 2] (cos, sin),
//           4 y: array<f32> (same shape as x). Positions past the table read its last row.
// Dispatch: one thread per output element (grid()).
// Variant KV (decoder layers with stacked Q/K/V): x is the output of the stacked projection,
// rows of [q (heads * d) | k (kv_heads * d) | v (kv_heads * d)] for tokens at pos + row. One
// dispatch rotates q into y [rows, heads * d], and writes rotated k and plain v into the KV
// caches at row pos + row (rows past cap_rows are not written) of cache sequence seq; x
// [b, seq_len, ..] with per-row pos and seq is a batch of sequences (see graph::Dyn::Rows).
// Bindings: 2 x, 3 table, 4 y, 5 k_cache, 6 v_cache: array<f32> [seqs, cap_rows, kv_heads * d] (F16KV: f16, two to a word,
// see common.wgsl's half_write). One thread per element of x.
#include "common.wgsl"

// Rotates element c (of d) of the head starting at x[head_base] at table position pos.
fn rotated(head_base: u32, c: u32, pos: u32) -> f32 {
    var i: u32;
    var partner: u32;
    var first: bool;
    if (p.interleaved == 1u) {
        i = c / 2u;
        first = (c % 2u) == 0u;
        partner = select(c - 1u, c + 1u, first);
    } else {
        i = c % p.half;
        first = c < p.half;
        partner = select(c - p.half, c + p.half, first);
    }
    let t = 2u * (pos * p.half + i);
    let cs = table[t];
    let sn = table[t + 1u];
    let v = x[head_base + c];
    let o = x[head_base + partner];
    return select(v * cs + o * sn, v * cs - o * sn, first);
}

#ifdef KV
struct Params { n: u32, heads: u32, kv_heads: u32, d: u32, half: u32, positions: u32, interleaved: u32, pos_add: u32, pos_slot: u32, pos_mul: u32, cap_rows: u32, seq_len: u32, s_add: u32, s_slot: u32, s_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
#ifdef F16KV
@group(0) @binding(5) var<storage, read_write> k_cache: array<atomic<u32>>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<atomic<u32>>;
fn put_k(i: u32, v: f32) { let h = half_write(i, v); atomicAnd(&k_cache[h.word], h.keep); atomicOr(&k_cache[h.word], h.bits); }
fn put_v(i: u32, v: f32) { let h = half_write(i, v); atomicAnd(&v_cache[h.word], h.keep); atomicOr(&v_cache[h.word], h.bits); }
#else
@group(0) @binding(5) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<f32>;
fn put_k(i: u32, v: f32) { k_cache[i] = v; }
fn put_v(i: u32, v: f32) { v_cache[i] = v; }
#endif

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = group_index(wg, nwg) * 256u + li;
    if (e >= p.n) { return; }
    let qw = p.heads * p.d;
    let kvw = p.kv_heads * p.d;
    let width = qw + 2u * kvw;
    let row = e / width;
    let col = e % width;
    // Token i of batch row b sits at pos[b] + i of cache sequence seq[b] (one sequence and
    // position for all rows unless they are per-row, see graph::Dyn::Rows).
    let b = row / p.seq_len;
    let at = dyn_row(p.pos_add, p.pos_slot, p.pos_mul, b) + row % p.seq_len;
    let c = (dyn_row(p.s_add, p.s_slot, p.s_mul, b) * p.cap_rows + at) * kvw;
    if (col >= qw + kvw) {
        if (at < p.cap_rows) { put_v(c + col - qw - kvw, x[e]); }
        return;
    }
    let hc = col % p.d;
    var v = x[e];
    if (hc < 2u * p.half) { v = rotated(e - hc, hc, min(at, p.positions - 1u)); }
    if (col < qw) {
        y[row * qw + col] = v;
    } else if (at < p.cap_rows) {
        put_k(c + col - qw, v);
    }
}
#else
struct Params { n: u32, seq: u32, heads: u32, d: u32, half: u32, positions: u32, interleaved: u32, pos_add: u32, pos_slot: u32, pos_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = group_index(wg, nwg) * 256u + li;
    if (e >= p.n) { return; }
    let c = e % p.d;
    let row = e / (p.heads * p.d);
    if (c >= 2u * p.half) { y[e] = x[e]; return; }
    // Rows of batch row b = row / seq at pos[b] + row % seq (a per-row position: one token of
    // each of several sequences, graph::Dyn::Rows).
    let pos = min(dyn_row(p.pos_add, p.pos_slot, p.pos_mul, row / p.seq) + row % p.seq, p.positions - 1u);
    y[e] = rotated(e - c, c, pos);
}
#endif
