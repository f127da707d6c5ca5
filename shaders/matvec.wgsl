// Decode matrix-vector product with fused dequantization: y[m, off + r] = W[r, :] . x[m, :] (+ bias)
// Bindings: 2 w: array<u32> [rows x row_words] (one weight part, any dtype of weights.wgsl)
//           3 x: array<f32> [m, k]   4 bias: array<f32> [n_total] (unused unless has_bias)
//           5 y: array<f32> [m, n_total]
// Dispatch: ceil(rows / 4) * m workgroups (folded by grid()); 256 threads = 4 rows x 64 lanes,
// plain dtypes: each lane takes every 64th word; block formats: W_LPB lanes share a block, one
// word each. Either way consecutive lanes read consecutive words. Partial sums are reduced in
// workgroup memory.
#include "common.wgsl"
#define WITH_DOT
#include "weights.wgsl"

struct Params { rows: u32, k: u32, row_words: u32, out_off: u32, m: u32, n_total: u32, has_bias: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

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
        let o = p.out_off + r;
        var v = partial[li];
        if (p.has_bias == 1u) { v += bias[o]; }
        y[mi * p.n_total + o] = v;
    }
}
