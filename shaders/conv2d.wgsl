// 2D convolution (NCHW) as implicit GEMM over the shared tile loop of gemm.wgsl:
//   y[b, co, oy, ox] = bias[co] + sum_{ci,ky,kx} W[co, ci, ky, kx] x[b, ci, oy*s + ky - pad, ox*s + kx - pad]
// GEMM view: m = oy * wo + ox, n = co, k = (ci, ky, kx) flattened — W in checkpoint layout is
// already [n, k]. Kernel 1x1 or 3x3, stride 1 or 2, zero padding.
// Bindings: 2 w: array<u32> (weights.wgsl dtype), 3 x: array<f32>, 4 bias: array<f32>, 5 y: array<f32>.
// Dispatch: (ceil(co / 64), ceil(ho * wo / 64), batch).
#include "common.wgsl"
#include "weights.wgsl"

struct Params {
    m: u32, n: u32, k: u32, ci: u32,
    h: u32, w: u32, wo: u32, ks: u32,
    stride: u32, pad: u32, row_words: u32, has_bias: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

fn load_a(b: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
    let kk = p.ks * p.ks;
    let c = k / kk;
    let r = k % kk;
    let iy = i32((m / p.wo) * p.stride + r / p.ks) - i32(p.pad);
    let ix = i32((m % p.wo) * p.stride + r % p.ks) - i32(p.pad);
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) { return 0.0; }
    return x[((b * p.ci + c) * p.h + u32(iy)) * p.w + u32(ix)];
}
fn load_b(b: u32, n: u32, k: u32) -> f32 {
    if (n >= p.n || k >= p.k) { return 0.0; }
    return w_elem(n * p.row_words, k);
}
fn store_c(b: u32, m: u32, n: u32, v: f32) {
    var r = v;
    if (p.has_bias == 1u) { r += bias[n]; }
    y[(b * p.n + n) * p.m + m] = r;
}

#include "gemm.wgsl"
