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

#ifdef DIRECT
// Software adapters: a 4 x 4 tile of (pixels, output channels) per invocation straight from
// x and w, no workgroup memory, no barrier, and no integer division in the loop (CPUs have no
// vector division): the window is walked channel by row by column. Same dispatch as the GEMM.
fn pixel(xc: u32, iy: i32, ix: i32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) { return 0.0; }
    return x[(xc + u32(iy)) * p.w + u32(ix)];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * 64u + (li % 16u) * 4u;
    let m0 = wg.y * 64u + (li / 16u) * 4u;
    let bi = wg.z;
    if (m0 >= p.m || n0 >= p.n) { return; }
    // Window origin of each of the 4 output pixels (-pad may make it negative).
    var oy: array<i32, 4>;
    var ox: array<i32, 4>;
    for (var i = 0u; i < 4u; i++) {
        let m = min(m0 + i, p.m - 1u);
        oy[i] = i32((m / p.wo) * p.stride) - i32(p.pad);
        ox[i] = i32((m % p.wo) * p.stride) - i32(p.pad);
    }
    var rows: array<u32, 4>;
    for (var j = 0u; j < 4u; j++) { rows[j] = min(n0 + j, p.n - 1u) * p.row_words; }
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }
    var kk = 0u;
    for (var c = 0u; c < p.ci; c++) {
        let xc = (bi * p.ci + c) * p.h;
        for (var ky = 0u; ky < p.ks; ky++) {
            for (var kx = 0u; kx < p.ks; kx++) {
                // Unrolled: lavapipe caps an invocation's loop iterations at 65535 in all.
                let av = vec4<f32>(
                    pixel(xc, oy[0] + i32(ky), ox[0] + i32(kx)),
                    pixel(xc, oy[1] + i32(ky), ox[1] + i32(kx)),
                    pixel(xc, oy[2] + i32(ky), ox[2] + i32(kx)),
                    pixel(xc, oy[3] + i32(ky), ox[3] + i32(kx)),
                );
                let bv = vec4<f32>(w_elem(rows[0], kk), w_elem(rows[1], kk), w_elem(rows[2], kk), w_elem(rows[3], kk));
                acc[0] += av.x * bv;
                acc[1] += av.y * bv;
                acc[2] += av.z * bv;
                acc[3] += av.w * bv;
                kk++;
            }
        }
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (m0 + i < p.m && n0 + j < p.n) { store_c(bi, m0 + i, n0 + j, acc[i][j]); }
        }
    }
}
#else
#include "gemm.wgsl"
#endif
