// Elementwise kernels, one entry per variant define:
//   UNARY     y[i] = f(x[i])               f: 0 silu, 1 gelu(erf), 2 gelu(tanh), 3 quick-gelu, 4 x*mul+add,
//                                          5 mul * tanh(x / mul) (soft-capping; tanh saturates in f32 past 9),
//                                          6 relu, 7 sigmoid
//   BINARY    y = a (op) b, numpy broadcast over 4 dims (strides 0 on broadcast dims); op 0 add, 1 mul
//   GLU       y[r, c] = act(gate[r, c]) * up[r, c], gate/up at (offset + r*row_stride + c); act as UNARY codes 0..2
//   TIMESTEP  y[b, :] = sinusoidal embedding of t[b] (diffusers get_timestep_embedding)
//   COPY      dst[dst_off + i] = src[src_off + i] for i < n, never past `cap` or the end of src
//             (F16DST: f32 src into an f16 dst, two elements to a word: an f16 KV cache)
//   UPSAMPLE  y[bc, y, x] = x[bc, y/2, x/2]
//   TRANSPOSE y[b, j, i] = x[b, i, j] for x [b, m, n]
//   CONCAT    y[o, j] = j < A ? a[o, j] : b[o, j - A]  (rows of the outer dims)
// Bindings: 2.. as listed per variant. Dispatch: ceil(n / 256) workgroups of 256, folded by grid().
#include "common.wgsl"

#ifdef UNARY
struct Params { n: u32, op: u32, mul: f32, add: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
fn act(v: f32, op: u32) -> f32 {
    switch op {
        case 0u, 1u, 2u: { return glu_act(v, op); }
        case 3u: { return quick_gelu(v); }
        case 5u: { return p.mul * tanh(clamp(v / p.mul, -15.0, 15.0)); }
        case 6u: { return max(v, 0.0); }
        case 7u: { return glu_act(v, 3u); }
        default: { return v * p.mul + p.add; }
    }
}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    if (i >= p.n) { return; }
    y[i] = act(x[i], p.op);
}
#endif

#ifdef BINARY
struct Params {
    n: u32, op: u32, d1: u32, d2: u32,
    d3: u32, sa0: u32, sa1: u32, sa2: u32,
    sa3: u32, sb0: u32, sb1: u32, sb2: u32,
    sb3: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    if (i >= p.n) { return; }
    let i3 = i % p.d3;
    let i2 = (i / p.d3) % p.d2;
    let i1 = (i / (p.d3 * p.d2)) % p.d1;
    let i0 = i / (p.d3 * p.d2 * p.d1);
    let va = a[i0 * p.sa0 + i1 * p.sa1 + i2 * p.sa2 + i3 * p.sa3];
    let vb = b[i0 * p.sb0 + i1 * p.sb1 + i2 * p.sb2 + i3 * p.sb3];
    if (p.op == 0u) { y[i] = va + vb; } else { y[i] = va * vb; }
}
#endif

#ifdef GLU
struct Params { rows: u32, f: u32, g_off: u32, g_rs: u32, u_off: u32, u_rs: u32, act: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> u: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    if (i >= p.rows * p.f) { return; }
    let r = i / p.f;
    let c = i % p.f;
    y[i] = glu_act(g[p.g_off + r * p.g_rs + c], p.act) * u[p.u_off + r * p.u_rs + c];
}
#endif

#ifdef TIMESTEP
struct Params { b: u32, half: u32, flip: u32, shift: f32, log_max_period: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> t: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    if (i >= p.b * p.half) { return; }
    let bi = i / p.half;
    let j = i % p.half;
    let freq = exp(-p.log_max_period * f32(j) / (f32(p.half) - p.shift));
    let arg = reduce_2pi(t[bi] * freq);
    let s = sin(arg);
    let c = cos(arg);
    let base = bi * 2u * p.half;
    if (p.flip == 1u) {
        y[base + j] = c;
        y[base + p.half + j] = s;
    } else {
        y[base + j] = s;
        y[base + p.half + j] = c;
    }
}
#endif

#ifdef COPY
struct Params { n: u32, cap: u32, dst_add: u32, dst_slot: u32, dst_mul: u32, src_add: u32, src_slot: u32, src_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> src: array<u32>;
#ifdef F16DST
@group(0) @binding(3) var<storage, read_write> dst: array<atomic<u32>>;
fn put(o: u32, v: u32) { let h = half_write(o, bitcast<f32>(v)); atomicAnd(&dst[h.word], h.keep); atomicOr(&dst[h.word], h.bits); }
#else
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;
fn put(o: u32, v: u32) { dst[o] = v; }
#endif
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    let o = dyn_val(p.dst_add, p.dst_slot, p.dst_mul) + i;
    let s = dyn_val(p.src_add, p.src_slot, p.src_mul) + i;
    if (i >= p.n || o >= p.cap || s >= arrayLength(&src)) { return; }
    put(o, src[s]);
}
#endif

#ifdef UPSAMPLE
struct Params { n: u32, h: u32, w: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    if (i >= p.n) { return; }
    let w2 = 2u * p.w;
    let ox = i % w2;
    let oy = (i / w2) % (2u * p.h);
    let bc = i / (w2 * 2u * p.h);
    y[i] = x[(bc * p.h + oy / 2u) * p.w + ox / 2u];
}
#endif

#ifdef CONCAT
struct Params { n: u32, a: u32, b: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> a: array<u32>;
@group(0) @binding(3) var<storage, read> b: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    if (i >= p.n) { return; }
    let w = p.a + p.b;
    let o = i / w;
    let j = i % w;
    if (j < p.a) { y[i] = a[o * p.a + j]; } else { y[i] = b[o * p.b + j - p.a]; }
}
#endif

#ifdef TRANSPOSE
struct Params { n: u32, m: u32, k: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let o = group_index(wg, nwg) * 256u + li;
    if (o >= p.n) { return; }
    // Output [b, k, m]: o = (b * k + j) * m + i reads x[(b * m + i) * k + j].
    let i = o % p.m;
    let j = (o / p.m) % p.k;
    let b = o / (p.m * p.k);
    y[o] = x[(b * p.m + i) * p.k + j];
}
#endif
