// Normalizations, one variant define each:
//   RMS    y[r, :] = x[r, :] / sqrt(mean(x^2) + eps) * w                       one workgroup per row
//   RMS+QK per-head RMSNorm of a stacked Q/K/V projection (Qwen3, Gemma 3): x is rows of
//          spatial = heads + 2 kv_heads heads of d; row r is head r % spatial of a token. Heads
//          below groups (= heads, the q heads) use w[0, :], the next ones below channels
//          (= heads + kv_heads, the k heads) use w[1, :], v heads are copied. w: [2, d].
//                                                                              one workgroup per head
//   LAYER  y[r, :] = (x - mean) / sqrt(var + eps) * w + b                      one workgroup per row
//   GROUP  x [b, c, s]: per (b, group of c/groups channels) mean/var over (c/groups) * s elements,
//          y = (x - mean) / sqrt(var + eps) * w[c] + b[c], then SiLU if silu == 1
//                                                                              one workgroup per (b, group)
// Statistics use two passes (mean, then centred variance) for accuracy. 256 threads.
// ROWWISE (with RMS or LAYER, software adapters, many rows): one invocation per row, 64 rows a
// workgroup, no barriers (a software rasterizer runs a workgroup's barriers as loops over its
// invocations: 256 of them per row cost more than the row's arithmetic).
// Bindings: 2 x: array<f32>, 3 w: array<f32>, 4 b: array<f32> (LAYER/GROUP), last y: array<f32>.
// Dispatch: rows (or b * groups) workgroups, folded by grid().
#include "common.wgsl"

struct Params { rows: u32, d: u32, eps: f32, groups: u32, channels: u32, spatial: u32, silu: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
#ifdef RMS
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
#else
@group(0) @binding(4) var<storage, read> b: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
#endif

#ifdef ROWWISE
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg) * 64u + li;
    if (row >= p.rows) { return; }
    let n = p.d;
    let base = row * p.d;
#ifdef RMS
    var ss = 0.0;
    for (var i = 0u; i < n; i++) { let v = x[base + i]; ss += v * v; }
    let inv = inverseSqrt(ss / f32(n) + p.eps);
    for (var i = 0u; i < n; i++) { y[base + i] = x[base + i] * inv * w[i]; }
#else
    var s = 0.0;
    for (var i = 0u; i < n; i++) { s += x[base + i]; }
    let mean = s / f32(n);
    var vs = 0.0;
    for (var i = 0u; i < n; i++) { let dv = x[base + i] - mean; vs += dv * dv; }
    let inv = inverseSqrt(vs / f32(n) + p.eps);
    for (var i = 0u; i < n; i++) { y[base + i] = (x[base + i] - mean) * inv * w[i] + b[i]; }
#endif
}
#else
var<workgroup> red: array<f32, 256>;

fn wg_sum(v: f32, li: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) { red[li] += red[li + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
#ifdef GROUP
    if (row >= p.rows) { return; }
    let cpg = p.channels / p.groups;
    let n = cpg * p.spatial;
    let bi = row / p.groups;
    let gi = row % p.groups;
    let base = (bi * p.channels + gi * cpg) * p.spatial;
#else
    if (row >= p.rows) { return; }
    let n = p.d;
    let base = row * p.d;
#endif
#ifdef RMS
#ifdef QK
    let head = row % p.spatial;
    if (head >= p.channels) {
        for (var i = li; i < n; i += 256u) { y[base + i] = x[base + i]; }
        return;
    }
    let wo = select(0u, p.d, head >= p.groups);
#else
    let wo = 0u;
#endif
    var ss = 0.0;
    for (var i = li; i < n; i += 256u) { let v = x[base + i]; ss += v * v; }
    let inv = inverseSqrt(wg_sum(ss, li) / f32(n) + p.eps);
    for (var i = li; i < n; i += 256u) { y[base + i] = x[base + i] * inv * w[wo + i]; }
#else
    var s = 0.0;
    for (var i = li; i < n; i += 256u) { s += x[base + i]; }
    let mean = wg_sum(s, li) / f32(n);
    var vs = 0.0;
    for (var i = li; i < n; i += 256u) { let dv = x[base + i] - mean; vs += dv * dv; }
    let inv = inverseSqrt(wg_sum(vs, li) / f32(n) + p.eps);
    for (var i = li; i < n; i += 256u) {
#ifdef GROUP
        let c = gi * cpg + i / p.spatial;
#else
        let c = i;
#endif
        var v = (x[base + i] - mean) * inv * w[c] + b[c];
#ifdef GROUP
        if (p.silu == 1u) { v = silu(v); }
#endif
        y[base + i] = v;
    }
#endif
}
#endif
