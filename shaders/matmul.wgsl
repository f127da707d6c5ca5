// GEMM: y[b, m, out_off + n] = x[b, m, :] . W[n, :] (+ bias[out_off + n]).
// W is a weight part in any dtype of weights.wgsl (checkpoint layout [n, k]), or an f32
// activation [b, n, k] (w_batch_words = n * k) for a batched product.
// Bindings: 2 w: array<u32>, 3 x: array<f32> [b, m, k], 4 bias: array<f32>, 5 y: array<f32> [b, m, n_total],
//           6 res: array<f32> like y, added to it (a residual connection) when has_res
// Dispatch: see gemm.wgsl.
#include "common.wgsl"
#include "weights.wgsl"

struct Params { m: u32, n: u32, k: u32, row_words: u32, w_batch_words: u32, out_off: u32, n_total: u32, has_bias: u32, has_res: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> res: array<f32>;

fn load_a(b: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
    return x[(b * p.m + m) * p.k + k];
}
fn load_b(b: u32, n: u32, k: u32) -> f32 {
    if (n >= p.n || k >= p.k) { return 0.0; }
    return w_elem(b * p.w_batch_words + n * p.row_words, k);
}
fn store_c(b: u32, m: u32, n: u32, v: f32) {
    let o = p.out_off + n;
    var r = v;
    if (p.has_bias == 1u) { r += bias[o]; }
    let i = (b * p.m + m) * p.n_total + o;
    if (p.has_res == 1u) { r += res[i]; }
    y[i] = r;
}

#ifdef DIRECT
// Software adapters (lavapipe, SwiftShader): no workgroup memory, no barrier. An invocation
// computes 4 weight rows x 8 activation rows, two k at a time (one word of f16/bf16 weights).
// The 8 activation rows come from the workgroup index, so every x load is workgroup-uniform:
// llvmpipe turns a load whose address differs per lane into a loop over the lanes and a uniform
// one into one load; and each weight pair read serves 8 rows. Rows past the edge are clamped
// for reading and not stored. Dispatch: (ceil(n / 256), ceil(m / 8), batch), 64 threads.
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * 256u + li * 4u;
    let m0 = wg.y * 8u;
    let bi = wg.z;
    if (m0 >= p.m || n0 >= p.n) { return; }
    let xb = bi * p.m;
    let x0 = (xb + m0) * p.k;
    let x1 = (xb + min(m0 + 1u, p.m - 1u)) * p.k;
    let x2 = (xb + min(m0 + 2u, p.m - 1u)) * p.k;
    let x3 = (xb + min(m0 + 3u, p.m - 1u)) * p.k;
    let x4 = (xb + min(m0 + 4u, p.m - 1u)) * p.k;
    let x5 = (xb + min(m0 + 5u, p.m - 1u)) * p.k;
    let x6 = (xb + min(m0 + 6u, p.m - 1u)) * p.k;
    let x7 = (xb + min(m0 + 7u, p.m - 1u)) * p.k;
    let wb = bi * p.w_batch_words;
    let w0 = wb + n0 * p.row_words;
    let w1 = wb + min(n0 + 1u, p.n - 1u) * p.row_words;
    let w2 = wb + min(n0 + 2u, p.n - 1u) * p.row_words;
    let w3 = wb + min(n0 + 3u, p.n - 1u) * p.row_words;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    let k2 = p.k / 2u * 2u;
    for (var kk = 0u; kk < k2; kk += 2u) {
        let b0 = w_pair(w0, kk);
        let b1 = w_pair(w1, kk);
        let b2 = w_pair(w2, kk);
        let b3 = w_pair(w3, kk);
        let be = vec4<f32>(b0.x, b1.x, b2.x, b3.x);
        let bo = vec4<f32>(b0.y, b1.y, b2.y, b3.y);
        c0 += x[x0 + kk] * be + x[x0 + kk + 1u] * bo;
        c1 += x[x1 + kk] * be + x[x1 + kk + 1u] * bo;
        c2 += x[x2 + kk] * be + x[x2 + kk + 1u] * bo;
        c3 += x[x3 + kk] * be + x[x3 + kk + 1u] * bo;
        c4 += x[x4 + kk] * be + x[x4 + kk + 1u] * bo;
        c5 += x[x5 + kk] * be + x[x5 + kk + 1u] * bo;
        c6 += x[x6 + kk] * be + x[x6 + kk + 1u] * bo;
        c7 += x[x7 + kk] * be + x[x7 + kk + 1u] * bo;
    }
    if (k2 < p.k) {
        let b = vec4<f32>(w_elem(w0, k2), w_elem(w1, k2), w_elem(w2, k2), w_elem(w3, k2));
        c0 += x[x0 + k2] * b;
        c1 += x[x1 + k2] * b;
        c2 += x[x2 + k2] * b;
        c3 += x[x3 + k2] * b;
        c4 += x[x4 + k2] * b;
        c5 += x[x5 + k2] * b;
        c6 += x[x6 + k2] * b;
        c7 += x[x7 + k2] * b;
    }
    let acc = array<vec4<f32>, 8>(c0, c1, c2, c3, c4, c5, c6, c7);
    for (var i = 0u; i < 8u; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (m0 + i < p.m && n0 + j < p.n) { store_c(bi, m0 + i, n0 + j, acc[i][j]); }
        }
    }
}
#else
#include "gemm.wgsl"
#endif
