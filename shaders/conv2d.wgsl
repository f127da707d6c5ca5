// 2D convolution (NCHW) as implicit GEMM over the shared tile loop of gemm.wgsl:
//   y[b, co, oy, ox] = bias[co] + sum_{ci,ky,kx} W[co, ci, ky, kx] x[b, ci, oy*s + ky - pad, ox*s + kx - pad]
// GEMM view: m = oy * wo + ox, n = co, k = (ci, ky, kx) flattened — W in checkpoint layout is
// already [n, k]. Kernel 1x1 or 3x3, stride 1 or 2, zero padding.
// Bindings: 2 w: array<u32> (weights.wgsl dtype), 3 x: array<f32>, 4 bias: array<f32>, 5 y: array<f32>.
// The GEMM's A rows are windows read by load_a8: eight consecutive (ci, ky, kx) per load, found
// with one set of divisions and then stepped (no division per element).
// Dispatch: gemm.wgsl's over m = ho * wo, n = co. Software adapters use IM2COL below.
#include "common.wgsl"
#include "weights.wgsl"

struct Params {
    m: u32, n: u32, k: u32, ci: u32,
    h: u32, w: u32, wo: u32, ks: u32,
    stride: u32, pad: u32, row_words: u32, has_bias: u32,
    row0: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

// Elements k..k + 7 of window row m: (channel, ky, kx) found once by division, then stepped.
fn load_a8(b: u32, m: u32, k: u32) -> Run8 {
    var e: array<f32, 8>;
    if (m < p.m) {
        let kk = p.ks * p.ks;
        var c = k / kk;
        let r = k % kk;
        var ky = r / p.ks;
        var kx = r % p.ks;
        let oy = i32((m / p.wo) * p.stride) - i32(p.pad);
        let ox = i32((m % p.wo) * p.stride) - i32(p.pad);
        for (var j = 0u; j < 8u; j++) {
            let iy = oy + i32(ky);
            let ix = ox + i32(kx);
            if (k + j < p.k && iy >= 0 && ix >= 0 && iy < i32(p.h) && ix < i32(p.w)) {
                e[j] = x[((b * p.ci + c) * p.h + u32(iy)) * p.w + u32(ix)];
            }
            kx += 1u;
            if (kx == p.ks) {
                kx = 0u;
                ky += 1u;
                if (ky == p.ks) { ky = 0u; c += 1u; }
            }
        }
    }
    return run8(e);
}
fn load_b8(b: u32, n: u32, k: u32) -> Run8 {
    if (n >= p.n) { return Run8(vec4<f32>(0.0), vec4<f32>(0.0)); }
    if (k + 8u <= p.k) { return w_run8(n * p.row_words, k); }
    return w_tail8(n * p.row_words, k, p.k);
}
fn store_c(b: u32, m: u32, n: u32, v: f32) {
    var r = v;
    if (p.has_bias == 1u) { r += bias[n]; }
    y[(b * p.n + n) * p.m + m] = r;
}

#ifdef IM2COL
fn pixel(xc: u32, iy: i32, ix: i32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) { return 0.0; }
    return x[(xc + u32(iy)) * p.w + u32(ix)];
}

// Software adapters: rows row0..row0 + n of the input windows as a matrix [n, k] in y (row
// image * m + output pixel over all images, columns (ci, ky, kx) as W's, zero outside the
// input); matmul.wgsl's DIRECT GEMM then multiplies it by W and stores NCHW (out_pix). One
// invocation per element, ceil(n * k / 256) workgroups (grid()).
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = group_index(wg, nwg) * 256u + li;
    if (e >= p.n * p.k) { return; }
    let row = p.row0 + e / p.k;
    let col = e % p.k;
    let pix = row % p.m;
    let kk = p.ks * p.ks;
    let r = col % kk;
    let iy = i32((pix / p.wo) * p.stride + r / p.ks) - i32(p.pad);
    let ix = i32((pix % p.wo) * p.stride + r % p.ks) - i32(p.pad);
    y[e] = pixel(((row / p.m) * p.ci + col / kk) * p.h, iy, ix);
}
#else
#include "gemm.wgsl"
#endif
