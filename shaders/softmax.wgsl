// Row softmax over the last dimension: y[r, :] = exp(x - max) / sum(exp(x - max)).
// Bindings: 2 x: array<f32> [rows, d], 3 y: array<f32> [rows, d].
// Dispatch: one workgroup of 256 threads per row (grid()).
#include "common.wgsl"

struct Params { rows: u32, d: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.d;
    var m = -3.4e38;
    for (var i = li; i < p.d; i += 256u) { m = max(m, x[base + i]); }
    red[li] = m;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) { red[li] = max(red[li], red[li + s]); }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var i = li; i < p.d; i += 256u) { sum += exp(x[base + i] - mx); }
    red[li] = sum;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) { red[li] += red[li + s]; }
        workgroupBarrier();
    }
    let inv = 1.0 / red[0];
    for (var i = li; i < p.d; i += 256u) { y[base + i] = exp(x[base + i] - mx) * inv; }
}
