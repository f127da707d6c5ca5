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

#ifdef DIRECT_PIXELS
#define SOFTWARE
#endif
#ifdef IM2COL
#define SOFTWARE
#endif
#ifdef SOFTWARE
fn pixel(xc: u32, iy: i32, ix: i32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) { return 0.0; }
    return x[(xc + u32(iy)) * p.w + u32(ix)];
}
#endif

#ifdef IM2COL
// Software adapters, outputs of fewer than 256 pixels (the U-Net's deep levels): the input
// windows as a matrix [n, k] in y, n = batch * m rows (image * m + output pixel), columns (ci,
// ky, kx) as W's, zero outside the input; matmul.wgsl's DIRECT GEMM then multiplies it by W
// and stores NCHW (out_pix). One invocation per element, ceil(n * k / 256) workgroups (grid()).
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = group_index(wg, nwg) * 256u + li;
    if (e >= p.n * p.k) { return; }
    let row = e / p.k;
    let col = e % p.k;
    let pix = row % p.m;
    let kk = p.ks * p.ks;
    let r = col % kk;
    let iy = i32((pix / p.wo) * p.stride + r / p.ks) - i32(p.pad);
    let ix = i32((pix % p.wo) * p.stride + r % p.ks) - i32(p.pad);
    y[e] = pixel(((row / p.m) * p.ci + col / kk) * p.h, iy, ix);
}
#else
#ifdef DIRECT_PIXELS
// Software adapters, outputs of at least 256 pixels: 4 output channels x 8 output pixels per
// invocation, straight from x and w, no workgroup memory, no barrier, and no integer division
// in the loop (CPUs have no vector division). The layout of matmul.wgsl's DIRECT: the 8 pixels
// come from the workgroup index, so every x load is workgroup-uniform, and each weight element
// read serves 8 pixels. Dispatch: (ceil(co / 256), ceil(ho * wo / 8), batch), 64 threads.

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * 256u + li * 4u;
    let m0 = wg.y * 8u;
    let bi = wg.z;
    if (m0 >= p.m || n0 >= p.n) { return; }
    // Window origin of each of the 8 output pixels (-pad may make it negative).
    let pm0 = min(m0 + 0u, p.m - 1u);
    let oy0 = i32((pm0 / p.wo) * p.stride) - i32(p.pad);
    let ox0 = i32((pm0 % p.wo) * p.stride) - i32(p.pad);
    let pm1 = min(m0 + 1u, p.m - 1u);
    let oy1 = i32((pm1 / p.wo) * p.stride) - i32(p.pad);
    let ox1 = i32((pm1 % p.wo) * p.stride) - i32(p.pad);
    let pm2 = min(m0 + 2u, p.m - 1u);
    let oy2 = i32((pm2 / p.wo) * p.stride) - i32(p.pad);
    let ox2 = i32((pm2 % p.wo) * p.stride) - i32(p.pad);
    let pm3 = min(m0 + 3u, p.m - 1u);
    let oy3 = i32((pm3 / p.wo) * p.stride) - i32(p.pad);
    let ox3 = i32((pm3 % p.wo) * p.stride) - i32(p.pad);
    let pm4 = min(m0 + 4u, p.m - 1u);
    let oy4 = i32((pm4 / p.wo) * p.stride) - i32(p.pad);
    let ox4 = i32((pm4 % p.wo) * p.stride) - i32(p.pad);
    let pm5 = min(m0 + 5u, p.m - 1u);
    let oy5 = i32((pm5 / p.wo) * p.stride) - i32(p.pad);
    let ox5 = i32((pm5 % p.wo) * p.stride) - i32(p.pad);
    let pm6 = min(m0 + 6u, p.m - 1u);
    let oy6 = i32((pm6 / p.wo) * p.stride) - i32(p.pad);
    let ox6 = i32((pm6 % p.wo) * p.stride) - i32(p.pad);
    let pm7 = min(m0 + 7u, p.m - 1u);
    let oy7 = i32((pm7 / p.wo) * p.stride) - i32(p.pad);
    let ox7 = i32((pm7 % p.wo) * p.stride) - i32(p.pad);
    let r0 = n0 * p.row_words;
    let r1 = min(n0 + 1u, p.n - 1u) * p.row_words;
    let r2 = min(n0 + 2u, p.n - 1u) * p.row_words;
    let r3 = min(n0 + 3u, p.n - 1u) * p.row_words;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    var kk = 0u;
    for (var c = 0u; c < p.ci; c++) {
        let xc = (bi * p.ci + c) * p.h;
        for (var ky = 0u; ky < p.ks; ky++) {
            for (var kx = 0u; kx < p.ks; kx++) {
                let bv = vec4<f32>(w_elem(r0, kk), w_elem(r1, kk), w_elem(r2, kk), w_elem(r3, kk));
                let dy = i32(ky);
                let dx = i32(kx);
                c0 += pixel(xc, oy0 + dy, ox0 + dx) * bv;
                c1 += pixel(xc, oy1 + dy, ox1 + dx) * bv;
                c2 += pixel(xc, oy2 + dy, ox2 + dx) * bv;
                c3 += pixel(xc, oy3 + dy, ox3 + dx) * bv;
                c4 += pixel(xc, oy4 + dy, ox4 + dx) * bv;
                c5 += pixel(xc, oy5 + dy, ox5 + dx) * bv;
                c6 += pixel(xc, oy6 + dy, ox6 + dx) * bv;
                c7 += pixel(xc, oy7 + dy, ox7 + dx) * bv;
                kk++;
            }
        }
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
#endif
