// GEMM: y[b, m, out_off + n] = x[b, m, :] . W[n, :] (+ bias[out_off + n]).
// W is a weight part in any dtype of weights.wgsl (checkpoint layout [n, k]), or an f32
// activation [b, n, k] (w_batch_words = n * k) for a batched product.
// Bindings: 2 w: array<u32>, 3 x: array<f32> [b, m, k], 4 bias: array<f32>, 5 y: array<f32> [b, m, n_total],
//           6 res: array<f32> like y, added to it (a residual connection) when has_res
// out_pix > 0 stores y as images [rows / out_pix, n_total, out_pix] instead, row m being row
// out_row0 + m of all images' pixels (NCHW: the GEMM of a convolution over a chunk of its
// windows, see conv2d.wgsl's IM2COL).
// IDS (a mixture-of-experts layer's expert-indexed product, llama.cpp's mul_mm_id): batch b is
// expert ids_e0 + b of the weight part (w [experts, n, k], w_batch_words = n * row_words), its
// rows the (token, choice) pairs moe.wgsl's LISTS sent it (7 lists: array<u32> [experts,
// m + 1]: a count, then pair indices; m = the tokens, the most an expert can get). Row i of an
// expert reads x row pair / ids_div (1: x has a row per pair; k: a row per token) and writes y
// row pair ([pairs, n_total]); workgroups past an expert's count return at once.
// Dispatch: see gemm.wgsl.
#include "common.wgsl"
#include "weights.wgsl"

struct Params { m: u32, n: u32, k: u32, row_words: u32, w_batch_words: u32, out_off: u32, n_total: u32, has_bias: u32, has_res: u32, out_pix: u32, out_row0: u32, ids_div: u32, ids_e0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
#ifdef X4
@group(0) @binding(3) var<storage, read> x4: array<vec4<f32>>;
#else
@group(0) @binding(3) var<storage, read> x: array<f32>;
#endif
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> res: array<f32>;
#ifdef IDS
@group(0) @binding(7) var<storage, read> lists: array<u32>;
// Rows (pairs) of batch b, and the x and y rows of its row m.
fn m_rows(b: u32) -> u32 { return lists[(p.ids_e0 + b) * (p.m + 1u)]; }
fn pair_of(b: u32, m: u32) -> u32 { return lists[(p.ids_e0 + b) * (p.m + 1u) + 1u + m]; }
fn x_row(b: u32, m: u32) -> u32 { return pair_of(b, m) / p.ids_div; }
fn y_row(b: u32, m: u32) -> u32 { return pair_of(b, m); }
#else
fn m_rows(b: u32) -> u32 { return p.m; }
fn x_row(b: u32, m: u32) -> u32 { return b * p.m + m; }
fn y_row(b: u32, m: u32) -> u32 { return b * p.m + m; }
#endif

#ifndef DIRECT
// The GEMM core's loads: x 16 bytes at a time with X4 (k a multiple of 4), the weights through
// w_run8 (w_tail8 for a plain row's last partial run).
fn load_a8(b: u32, m: u32, k: u32) -> Run8 {
    if (m >= m_rows(b)) { return Run8(vec4<f32>(0.0), vec4<f32>(0.0)); }
    let i = x_row(b, m) * p.k + k;
#ifdef X4
    var r = Run8(vec4<f32>(0.0), vec4<f32>(0.0));
    if (k < p.k) { r.lo = x4[i / 4u]; }
    if (k + 4u < p.k) { r.hi = x4[i / 4u + 1u]; }
    return r;
#else
    var e: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        if (k + j < p.k) { e[j] = x[i + j]; }
    }
    return run8(e);
#endif
}
fn load_b8(b: u32, n: u32, k: u32) -> Run8 {
    if (n >= p.n) { return Run8(vec4<f32>(0.0), vec4<f32>(0.0)); }
    let rb = b * p.w_batch_words + n * p.row_words;
    if (k + 8u <= p.k) { return w_run8(rb, k); }
    return w_tail8(rb, k, p.k);
}
#endif
fn store_c(b: u32, m: u32, n: u32, v: f32) {
    if (m >= m_rows(b)) { return; }
    let o = p.out_off + n;
    var r = v;
    if (p.has_bias == 1u) { r += bias[o]; }
    var i = y_row(b, m) * p.n_total + o;
    if (p.out_pix != 0u) {
        let g = p.out_row0 + m;
        i = ((g / p.out_pix) * p.n_total + o) * p.out_pix + g % p.out_pix;
    }
    if (p.has_res == 1u) { r += res[i]; }
    y[i] = r;
}

#ifdef DIRECT
// Software adapters (lavapipe, SwiftShader): no workgroup memory, no barrier. An invocation
// computes 8 weight rows (4 without X4) x 8 activation rows (the 8 from the workgroup index), so
// each weight read serves 8 rows and each x read 8 (4). llvmpipe (Mesa 22.3) loads storage one
// lane at a time in a loop with a bounds check per element, so fewer and wider loads are what
// counts (lavapipe, 1024^3 f16 GEMM: 4 weight rows 20.8, 8 rows 23.2 GFLOP/s). Block formats
// with w_oct read one quant word (eight elements) per row at a time and dequantize it once;
// the others read two elements (one word of f16/bf16) at a time. Rows past the edge are
// clamped for reading and not stored. Dispatch: (ceil(n / 256), ceil(m / MR), batch), 32
// threads with X4, 64 without.
// The accumulators (activation row i: c weight rows n0..n0 + 3, d n0 + 4..n0 + 7) and the
// activation rows' offsets.
var<private> c0: vec4<f32>;
var<private> c1: vec4<f32>;
var<private> c2: vec4<f32>;
var<private> c3: vec4<f32>;
var<private> c4: vec4<f32>;
var<private> c5: vec4<f32>;
var<private> c6: vec4<f32>;
var<private> c7: vec4<f32>;
var<private> d0: vec4<f32>;
var<private> d1: vec4<f32>;
var<private> d2: vec4<f32>;
var<private> d3: vec4<f32>;
var<private> d4: vec4<f32>;
var<private> d5: vec4<f32>;
var<private> d6: vec4<f32>;
var<private> d7: vec4<f32>;
var<private> x0: u32;
var<private> x1: u32;
var<private> x2: u32;
var<private> x3: u32;
var<private> x4_: u32;
var<private> x5: u32;
var<private> x6: u32;
var<private> x7: u32;
#ifdef X4
// With k a multiple of 4 (X4), x is read 16 bytes at a time: llvmpipe loads storage one lane
// at a time, and a vec4 load pays that loop once for four elements. x0.. are then in units.
// Elements k..k + 3 (k a multiple of 4) of the 8 weight rows (a..h) times those of each
// activation row.
fn fma_8(k: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>, e: vec4<f32>, f: vec4<f32>, g: vec4<f32>, h: vec4<f32>) {
    let e0 = vec4<f32>(a.x, b.x, c.x, d.x);
    let e1 = vec4<f32>(a.y, b.y, c.y, d.y);
    let e2 = vec4<f32>(a.z, b.z, c.z, d.z);
    let e3 = vec4<f32>(a.w, b.w, c.w, d.w);
    let f0 = vec4<f32>(e.x, f.x, g.x, h.x);
    let f1 = vec4<f32>(e.y, f.y, g.y, h.y);
    let f2 = vec4<f32>(e.z, f.z, g.z, h.z);
    let f3 = vec4<f32>(e.w, f.w, g.w, h.w);
    let u = k / 4u;
    var v = x4[x0 + u];
    c0 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d0 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
#ifndef ONE_ROW
    v = x4[x1 + u];
    c1 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d1 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
    v = x4[x2 + u];
    c2 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d2 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
    v = x4[x3 + u];
    c3 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d3 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
    v = x4[x4_ + u];
    c4 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d4 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
    v = x4[x5 + u];
    c5 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d5 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
    v = x4[x6 + u];
    c6 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d6 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
    v = x4[x7 + u];
    c7 += v.x * e0 + v.y * e1 + v.z * e2 + v.w * e3;
    d7 += v.x * f0 + v.y * f1 + v.z * f2 + v.w * f3;
#endif
}
#else
// Element k of the 4 weight rows (b) times element k of each activation row.
fn fma_k(k: u32, b: vec4<f32>) {
    c0 += x[x0 + k] * b;
#ifndef ONE_ROW
    c1 += x[x1 + k] * b;
    c2 += x[x2 + k] * b;
    c3 += x[x3 + k] * b;
    c4 += x[x4_ + k] * b;
    c5 += x[x5 + k] * b;
    c6 += x[x6 + k] * b;
    c7 += x[x7 + k] * b;
#endif
}
#endif
// Activation rows per invocation: 8, or with ONE_ROW 1 (a mixture-of-experts decode step, whose
// experts get a row or two: the other seven rows' multiply-adds would be wasted).
#ifdef ONE_ROW
const MR: u32 = 1u;
#else
const MR: u32 = 8u;
#endif

#ifdef X4
// With X4, 8 weight rows per invocation (c: n0..n0 + 3, d: n0 + 4..n0 + 7), 32 invocations.
@compute @workgroup_size(32)
#else
@compute @workgroup_size(64)
#endif
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
#ifdef X4
    let n0 = wg.x * 256u + li * 8u;
#else
    let n0 = wg.x * 256u + li * 4u;
#endif
    let m0 = wg.y * MR;
    let bi = wg.z;
    let mr = m_rows(bi);
    if (m0 >= mr || n0 >= p.n) { return; }
#ifdef X4
    let xs = p.k / 4u;
#else
    let xs = p.k;
#endif
    x0 = x_row(bi, m0) * xs;
    x1 = x_row(bi, min(m0 + 1u, mr - 1u)) * xs;
    x2 = x_row(bi, min(m0 + 2u, mr - 1u)) * xs;
    x3 = x_row(bi, min(m0 + 3u, mr - 1u)) * xs;
    x4_ = x_row(bi, min(m0 + 4u, mr - 1u)) * xs;
    x5 = x_row(bi, min(m0 + 5u, mr - 1u)) * xs;
    x6 = x_row(bi, min(m0 + 6u, mr - 1u)) * xs;
    x7 = x_row(bi, min(m0 + 7u, mr - 1u)) * xs;
    let wb = bi * p.w_batch_words;
    let w0 = wb + n0 * p.row_words;
    let w1 = wb + min(n0 + 1u, p.n - 1u) * p.row_words;
    let w2 = wb + min(n0 + 2u, p.n - 1u) * p.row_words;
    let w3 = wb + min(n0 + 3u, p.n - 1u) * p.row_words;
#ifdef X4
    let w4 = wb + min(n0 + 4u, p.n - 1u) * p.row_words;
    let w5 = wb + min(n0 + 5u, p.n - 1u) * p.row_words;
    let w6 = wb + min(n0 + 6u, p.n - 1u) * p.row_words;
    let w7 = wb + min(n0 + 7u, p.n - 1u) * p.row_words;
#endif
#ifdef X4
#ifdef W_OCT
    for (var blk = 0u; blk < p.k / W_BLOCK; blk++) {
        for (var s = 0u; s < W_BLOCK / 8u; s++) {
            let a = w_oct(w0, blk, s);
            let b = w_oct(w1, blk, s);
            let c = w_oct(w2, blk, s);
            let d = w_oct(w3, blk, s);
            let e = w_oct(w4, blk, s);
            let f = w_oct(w5, blk, s);
            let g = w_oct(w6, blk, s);
            let h = w_oct(w7, blk, s);
            let o = blk * W_BLOCK + a.o;
            fma_8(o.x, a.lo, b.lo, c.lo, d.lo, e.lo, f.lo, g.lo, h.lo);
            fma_8(o.y, a.hi, b.hi, c.hi, d.hi, e.hi, f.hi, g.hi, h.hi);
        }
    }
#else
    for (var kk = 0u; kk < p.k; kk += 4u) {
        fma_8(kk, vec4<f32>(w_pair(w0, kk), w_pair(w0, kk + 2u)), vec4<f32>(w_pair(w1, kk), w_pair(w1, kk + 2u)),
              vec4<f32>(w_pair(w2, kk), w_pair(w2, kk + 2u)), vec4<f32>(w_pair(w3, kk), w_pair(w3, kk + 2u)),
              vec4<f32>(w_pair(w4, kk), w_pair(w4, kk + 2u)), vec4<f32>(w_pair(w5, kk), w_pair(w5, kk + 2u)),
              vec4<f32>(w_pair(w6, kk), w_pair(w6, kk + 2u)), vec4<f32>(w_pair(w7, kk), w_pair(w7, kk + 2u)));
    }
#endif
#else
    // Rows of any length (every block format's rows are whole blocks, so X4 serves them).
    let k2 = p.k / 2u * 2u;
    for (var kk = 0u; kk < k2; kk += 2u) {
        let b0 = w_pair(w0, kk);
        let b1 = w_pair(w1, kk);
        let b2 = w_pair(w2, kk);
        let b3 = w_pair(w3, kk);
        fma_k(kk, vec4<f32>(b0.x, b1.x, b2.x, b3.x));
        fma_k(kk + 1u, vec4<f32>(b0.y, b1.y, b2.y, b3.y));
    }
    if (k2 < p.k) {
        fma_k(k2, vec4<f32>(w_elem(w0, k2), w_elem(w1, k2), w_elem(w2, k2), w_elem(w3, k2)));
    }
#endif
    let acc = array<vec4<f32>, 8>(c0, c1, c2, c3, c4, c5, c6, c7);
    for (var i = 0u; i < MR; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (m0 + i < p.m && n0 + j < p.n) { store_c(bi, m0 + i, n0 + j, acc[i][j]); }
        }
    }
#ifdef X4
    let acc2 = array<vec4<f32>, 8>(d0, d1, d2, d3, d4, d5, d6, d7);
    for (var i = 0u; i < MR; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (m0 + i < p.m && n0 + 4u + j < p.n) { store_c(bi, m0 + i, n0 + 4u + j, acc2[i][j]); }
        }
    }
#endif
}
#else
#include "gemm.wgsl"
#endif
