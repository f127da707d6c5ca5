// Mixture-of-experts layers (Gemma 4's and Qwen 3.5 MoE's, as transformers computes them), three
// entry points selected by defines:
// (router, no define) per row, softmax over the experts' logits (f32), the top k (ties to the
// lower index), their probabilities renormalized to sum to 1 when `renorm` is set, times
// `scale[expert]`. Bindings: 2 logits: array<f32> [rows, experts], 3 scale: array<f32> [experts]
// (ones where a router has none), 4 out: array<u32> [rows, 2 k]: (expert id, f32 bits of its
// weight) pairs, the most probable first. One workgroup of 64 per row.
// LISTS: the routes inverted, per expert the (token, choice) pairs sent to it, for the
// expert-indexed product (matmul.wgsl's IDS). Bindings: 2 routes: array<u32> [rows, 2 k] (the
// router's output), 3 lists: array<u32> [experts, rows + 1]: a count, then that many pair
// indices `row * k + choice`, in row order. One workgroup of 64 per expert.
// COMBINE: the experts' outputs summed with their weights: out[r, c] = sum_j weight(r, j)
// y[r * k + j, c]. Bindings: 2 y: array<f32> [rows * k, width], 3 routes, 4 out: array<f32>
// [rows, width]. 256 invocations per workgroup, one per output element.
#include "common.wgsl"

#ifdef LISTS
struct Params { experts: u32, k: u32, rows: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> routes: array<u32>;
@group(0) @binding(3) var<storage, read_write> lists: array<u32>;

// Inclusive prefix sums of one flag per invocation.
var<workgroup> scan: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = wg.x;
    let base = e * (p.rows + 1u);
    var total = 0u;
    for (var t0 = 0u; t0 < p.rows; t0 += 64u) {
        let t = t0 + li;
        var choice = p.k;
        if (t < p.rows) {
            for (var j = 0u; j < p.k; j++) {
                if (routes[t * 2u * p.k + 2u * j] == e) { choice = j; }
            }
        }
        let f = select(0u, 1u, choice < p.k);
        scan[li] = f;
        workgroupBarrier();
        for (var off = 1u; off < 64u; off *= 2u) {
            var v = 0u;
            if (li >= off) { v = scan[li - off]; }
            workgroupBarrier();
            scan[li] += v;
            workgroupBarrier();
        }
        if (f == 1u) { lists[base + total + scan[li]] = t * p.k + choice; }
        total += scan[63];
        workgroupBarrier();
    }
    if (li == 0u) { lists[base] = total; }
}
#else
#ifdef COMBINE
struct Params { k: u32, rows: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> routes: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    if (i >= p.rows * p.width) { return; }
    let r = i / p.width;
    let c = i % p.width;
    var s = 0.0;
    for (var j = 0u; j < p.k; j++) {
        let w = bitcast<f32>(routes[r * 2u * p.k + 2u * j + 1u]);
        s += w * y[(r * p.k + j) * p.width + c];
    }
    out[i] = s;
}
#else

struct Params { experts: u32, k: u32, renorm: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> scale: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

const WG: u32 = 64u;
// Largest top k (kernels::moe::MAX_TOP_K).
const MAX_K: u32 = 32u;
var<workgroup> red_v: array<f32, WG>;
var<workgroup> red_i: array<u32, WG>;
var<workgroup> chosen: array<u32, MAX_K>;

// The workgroup's maximum of (v, i) pairs, ties to the lower i (every thread gets it).
fn wg_argmax(v: f32, i: u32, li: u32) -> vec2<u32> {
    workgroupBarrier();
    red_v[li] = v;
    red_i[li] = i;
    workgroupBarrier();
    var bv = red_v[0];
    var bi = red_i[0];
    for (var t = 1u; t < WG; t++) {
        let tv = red_v[t];
        let ti = red_i[t];
        if (tv > bv || (tv == bv && ti < bi)) { bv = tv; bi = ti; }
    }
    return vec2<u32>(bitcast<u32>(bv), bi);
}

fn wg_sum(v: f32, li: u32) -> f32 {
    workgroupBarrier();
    red_v[li] = v;
    workgroupBarrier();
    var s = 0.0;
    for (var t = 0u; t < WG; t++) { s += red_v[t]; }
    return s;
}

fn was_chosen(e: u32, n: u32) -> bool {
    for (var j = 0u; j < n; j++) { if (chosen[j] == e) { return true; } }
    return false;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.x;
    let base = row * p.experts;
    var m = -3.4e38;
    for (var e = li; e < p.experts; e += WG) { m = max(m, logits[base + e]); }
    let mx = bitcast<f32>(wg_argmax(m, 0u, li).x);
    var s = 0.0;
    for (var e = li; e < p.experts; e += WG) { s += exp(logits[base + e] - mx); }
    let total = wg_sum(s, li);
    // The top k, one round each: the largest logit not chosen yet (softmax keeps the order).
    var picked_sum = 0.0;
    for (var j = 0u; j < p.k; j++) {
        var bv = -3.4e38;
        var bi = 0xffffffffu;
        for (var e = li; e < p.experts; e += WG) {
            let v = logits[base + e];
            if (!was_chosen(e, j) && (v > bv || (v == bv && e < bi))) { bv = v; bi = e; }
        }
        let best = wg_argmax(bv, bi, li);
        workgroupBarrier();
        if (li == 0u) { chosen[j] = best.y; }
        workgroupBarrier();
        picked_sum += exp(bitcast<f32>(best.x) - mx) / total;
    }
    if (li == 0u) {
        for (var j = 0u; j < p.k; j++) {
            let e = chosen[j];
            var w = exp(logits[base + e] - mx) / total;
            if (p.renorm != 0u) { w = w / picked_sum; }
            out[row * 2u * p.k + 2u * j] = e;
            out[row * 2u * p.k + 2u * j + 1u] = bitcast<u32>(w * scale[e]);
        }
    }
}
#endif
#endif
