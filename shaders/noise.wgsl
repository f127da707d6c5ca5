// Seeded standard normal noise (diffusion latents) and a Philox known-answer entry.
//
// main (no define): y[i] ~ N(0, 1), i < n.
//   Bindings: 2 y: array<f32> [n].
//   Params: n, seed as a Dyn (add, slot, mul), stream.
//   Thread t owns elements 4t .. 4t+3: Philox4x32-10 with key (seed, 0) and counter
//   (t, stream, 0, 0) gives words x0..x3 -> uniforms u_k = (x_k >> 8 + 1) / 2^24 in (0, 1]
//   -> two Box-Muller pairs: r = sqrt(-2 ln u0), a = pi (2 u1 - 1), z0 = r cos a, z1 = r sin a,
//   and (u2, u3) -> z2, z3 likewise. Element i is z[i % 4] of thread i / 4.
//   The angle lies in (-pi, pi], the range where WGSL bounds the error of cos/sin.
//   Dispatch: ceil(ceil(n / 4) / 256) workgroups of 256, folded by grid().
//
// kat (define PHILOX_KAT): raw Philox blocks, for the adapter self-check.
//   Bindings: 2 inp: array<u32> [n, 6] = counter (4 words), key (2 words); 3 out: array<u32> [n, 4].
//   Params: n. Dispatch: ceil(n / 64) workgroups of 64.
#include "common.wgsl"
#include "philox.wgsl"

#ifdef PHILOX_KAT
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> inp: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(64)
fn kat(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= p.n) { return; }
    let c = vec4<u32>(inp[6u * b], inp[6u * b + 1u], inp[6u * b + 2u], inp[6u * b + 3u]);
    let r = philox4x32_10(c, vec2<u32>(inp[6u * b + 4u], inp[6u * b + 5u]));
    out[4u * b] = r.x;
    out[4u * b + 1u] = r.y;
    out[4u * b + 2u] = r.z;
    out[4u * b + 3u] = r.w;
}
#else
struct Params { n: u32, seed_add: u32, seed_slot: u32, seed_mul: u32, stream: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const PI: f32 = 3.14159265358979;

fn box_muller(u0: f32, u1: f32) -> vec2<f32> {
    let r = sqrt(-2.0 * log(u0));
    let a = PI * (2.0 * u1 - 1.0);
    return vec2<f32>(r * cos(a), r * sin(a));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = group_index(wg, nwg) * 256u + li;
    let i = 4u * t;
    if (i >= p.n) { return; }
    let seed = dyn_val(p.seed_add, p.seed_slot, p.seed_mul);
    let x = philox4x32_10(vec4<u32>(t, p.stream, 0u, 0u), vec2<u32>(seed, 0u));
    let a = box_muller(philox_unit_open0(x.x), philox_unit_open0(x.y));
    let b = box_muller(philox_unit_open0(x.z), philox_unit_open0(x.w));
    let z = vec4<f32>(a, b);
    for (var k = 0u; k < 4u; k++) {
        if (i + k < p.n) { y[i + k] = z[k]; }
    }
}
#endif
