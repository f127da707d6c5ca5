// Decode matrix-vector product with fused dequantization: y[m, off + r] = W[r, :] . x[m, :] (+ bias)
// Bindings: 2 w: array<u32> [rows x row_words] (one weight part, any dtype of weights.wgsl)
//           3 x: array<f32> [m, k]   4 bias: array<f32> [n_total] (unused unless has_bias)
//           5 y: array<f32> [m, n_total]   6 res: array<f32> like y, added when has_res (a residual)
// Two variants. ROWS (software adapters: lavapipe, SwiftShader, which run invocations as SIMD
// lanes of CPU threads and pay dearly for barriers): one invocation per output row, 64 per
// workgroup, no workgroup memory; ceil(rows * m / 64) workgroups.
// Otherwise: ceil(rows / 4) * m workgroups (folded by grid()); 256 threads = 4 rows x 64 lanes,
// plain dtypes: each lane takes every 64th word; block formats: W_LPB lanes share a block, one
// word each. Either way consecutive lanes read consecutive words. Partial sums are reduced in
// workgroup memory.
#include "common.wgsl"
#define WITH_DOT
#include "weights.wgsl"

struct Params { rows: u32, k: u32, row_words: u32, out_off: u32, m: u32, n_total: u32, has_bias: u32, has_res: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> res: array<f32>;

fn store(mi: u32, r: u32, acc: f32) {
    let o = p.out_off + r;
    var v = acc;
    if (p.has_bias == 1u) { v += bias[o]; }
    let i = mi * p.n_total + o;
    if (p.has_res == 1u) { v += res[i]; }
    y[i] = v;
}

#ifdef SUBGROUP_ROWS
// One row per subgroup at a time (8 rows per workgroup of 64): lanes read consecutive words of
// the row and x, and one subgroupAdd reduces them, with no barrier and no workgroup memory.
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg: u32) {
    let g = group_index(wg, nwg);
    let row_groups = (p.rows + 7u) / 8u;
    let mi = g / row_groups;
    let first = (g % row_groups) * 8u;
    let nsg = (64u + sg - 1u) / sg;
    for (var j = li / sg; j < 8u; j += nsg) {
        let r = first + j;
        var acc = 0.0;
        if (r < p.rows && mi < p.m) {
            let rb = r * p.row_words;
            let xo = mi * p.k;
#ifdef W_PLAIN
            for (var wi = lane; wi < p.row_words; wi += sg) {
                acc += w_word_dot(rb, wi, xo, p.k);
            }
#else
            for (var t = lane; t < (p.k / W_BLOCK) * W_LPB; t += sg) {
                let u = t / W_LPB;
                acc += w_lane_dot(rb, u, t % W_LPB, xo + W_BLOCK * u);
            }
#endif
        }
        let sum = subgroupAdd(acc);
        if (lane == 0u && r < p.rows && mi < p.m) {
            store(mi, r, sum);
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
    let rb = r * p.row_words;
    let xo = mi * p.k;
    var acc = 0.0;
#ifdef W_PLAIN
    for (var wi = 0u; wi < p.row_words; wi++) {
        acc += w_word_dot(rb, wi, xo, p.k);
    }
#else
    for (var u = 0u; u < p.k / W_BLOCK; u++) {
        for (var sub = 0u; sub < W_LPB; sub++) {
            acc += w_lane_dot(rb, u, sub, xo + W_BLOCK * u);
        }
    }
#endif
    store(mi, r, acc);
}
#else
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let g = group_index(wg, nwg);
    let row_groups = (p.rows + 3u) / 4u;
    let mi = g / row_groups;
    let r = (g % row_groups) * 4u + li / 64u;
    let lane = li % 64u;
    var acc = 0.0;
    if (r < p.rows && mi < p.m) {
        let rb = r * p.row_words;
        let xo = mi * p.k;
#ifdef W_PLAIN
        // Lanes take consecutive words, so each step of the loop reads one contiguous span.
        for (var wi = lane; wi < p.row_words; wi += 64u) {
            acc += w_word_dot(rb, wi, xo, p.k);
        }
#else
        // W_LPB lanes share a block, each reading one of its words: consecutive lanes read
        // consecutive words.
        let sub = lane % W_LPB;
        for (var u = lane / W_LPB; u < p.k / W_BLOCK; u += 64u / W_LPB) {
            acc += w_lane_dot(rb, u, sub, xo + W_BLOCK * u);
        }
#endif
    }
    partial[li] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lane < s) { partial[li] += partial[li + s]; }
        workgroupBarrier();
    }
    if (lane == 0u && r < p.rows && mi < p.m) {
        store(mi, r, partial[li]);
    }
}
#endif
#endif
