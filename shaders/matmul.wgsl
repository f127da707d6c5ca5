// GEMM: y[b, m, out_off + n] = x[b, m, :] . W[n, :] (+ bias[out_off + n]).
// W is a weight part in any dtype of weights.wgsl (checkpoint layout [n, k]), or an f32
// activation [b, n, k] (w_batch_words = n * k) for a batched product.
// Bindings: 2 w: array<u32>, 3 x: array<f32> [b, m, k], 4 bias: array<f32>, 5 y: array<f32> [b, m, n_total]
// Dispatch: see gemm.wgsl.
#include "common.wgsl"
#include "weights.wgsl"

struct Params { m: u32, n: u32, k: u32, row_words: u32, w_batch_words: u32, out_off: u32, n_total: u32, has_bias: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

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
    y[(b * p.m + m) * p.n_total + o] = r;
}

#include "gemm.wgsl"
