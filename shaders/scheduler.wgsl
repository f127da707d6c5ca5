// One denoising step of any supported scheduler (diffusion::schedulers), elementwise over x.
//   Bindings: 2 m: array<f32> [cfg ? 2n : n]   model output; with CFG [uncond (n), cond (n)]
//             3 coeffs: array<f32> [rows, 9]   per-step [a, b, clip, p, q, r, s, t, in_scale]
//             4 guidance: array<f32> [1]
//             5 x: array<f32> [n]              read and written in place
//             6 x0_prev: array<f32> [n]        read and written in place
//             7 unet_in: array<f32> [copies, n] written
//             8 status: array<atomic<u32>> [1] the first step whose model output or update was
//                                              NaN/infinite (atomicMin of the row; start at 0xffffffff)
//             9 noise: array<f32> [n]          NOISE variant only
//   Params: n, cfg, copies, rows, step row as a Dyn (add, slot, mul).
//   Per element, with row = coeffs[step]:
//     m  = cfg && g > 1 ? m_u + g (m_c - m_u) : m_c
//     x0 = a x + b m, clamped to [-clip, clip] when clip > 0
//     x' = p x + q x0 + r x0_prev + s noise + t m   (terms with a zero coefficient are not read,
//                                                    so stale or uninitialized state is harmless)
//     x = x', x0_prev = x0, unet_in[k] = in_scale x' for k < copies.
//   A step past the table writes nothing.
//   Dispatch: ceil(n / 256) workgroups of 256, folded by grid().
//
// BLEND (inpainting with an ordinary U-Net, after each step): the kept pixels are put back,
// noised to the next step's level; the repainted ones keep the step's result.
//   Bindings: 2 table: array<f32> [rows, 3]  per-step [a, b, in_scale]
//             3 init: array<f32> [n]          the image's latents
//             4 noise: array<f32> [n]         the generation's initial noise
//             5 mask: array<f32> [hw]         1 = repaint, broadcast over the n / hw channels
//             6 x: array<f32> [n]             read and written in place
//             7 unet_in: array<f32> [copies, n] written
//     x = (1 - mask) (a init + b noise) + mask x,  unet_in[k] = in_scale x.
#include "common.wgsl"

#ifdef BLEND
struct Params { n: u32, hw: u32, copies: u32, rows: u32, step_add: u32, step_slot: u32, step_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read> init: array<f32>;
@group(0) @binding(4) var<storage, read> noise: array<f32>;
@group(0) @binding(5) var<storage, read> mask: array<f32>;
@group(0) @binding(6) var<storage, read_write> x: array<f32>;
@group(0) @binding(7) var<storage, read_write> unet_in: array<f32>;

@compute @workgroup_size(256)
fn blend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    let row = dyn_val(p.step_add, p.step_slot, p.step_mul);
    if (i >= p.n || row >= p.rows) { return; }
    let a = table[row * 3u];
    let b = table[row * 3u + 1u];
    let in_scale = table[row * 3u + 2u];
    let m = mask[i % p.hw];
    let y = (1.0 - m) * (a * init[i] + b * noise[i]) + m * x[i];
    x[i] = y;
    for (var k = 0u; k < p.copies; k++) {
        unet_in[k * p.n + i] = y * in_scale;
    }
}
#else

struct Params { n: u32, cfg: u32, copies: u32, rows: u32, step_add: u32, step_slot: u32, step_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> m: array<f32>;
@group(0) @binding(3) var<storage, read> coeffs: array<f32>;
@group(0) @binding(4) var<storage, read> guidance: array<f32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> x0_prev: array<f32>;
@group(0) @binding(7) var<storage, read_write> unet_in: array<f32>;
@group(0) @binding(8) var<storage, read_write> status: array<atomic<u32>>;
#ifdef NOISE
@group(0) @binding(9) var<storage, read> noise: array<f32>;
#endif

fn special(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) == 0x7f800000u;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wg, nwg) * 256u + li;
    let row = dyn_val(p.step_add, p.step_slot, p.step_mul);
    if (i >= p.n || row >= p.rows) { return; }
    let c = row * 9u;
    let a = coeffs[c];
    let b = coeffs[c + 1u];
    let clip = coeffs[c + 2u];
    let cp = coeffs[c + 3u];
    let cq = coeffs[c + 4u];
    let cr = coeffs[c + 5u];
    let cs = coeffs[c + 6u];
    let ct = coeffs[c + 7u];
    let in_scale = coeffs[c + 8u];

    var mv = m[i];
    if (p.cfg != 0u) {
        mv = m[p.n + i];
        let g = guidance[0];
        if (g > 1.0) {
            let u = m[i];
            mv = u + g * (mv - u);
        }
    }
    let xv = x[i];
    var x0 = a * xv + b * mv;
    if (clip > 0.0) { x0 = clamp(x0, -clip, clip); }
    var y = cp * xv + cq * x0;
    if (cr != 0.0) { y += cr * x0_prev[i]; }
#ifdef NOISE
    if (cs != 0.0) { y += cs * noise[i]; }
#endif
    if (ct != 0.0) { y += ct * mv; }
    // Checked before the clamp can hide a NaN; the atomic runs only on the failing path.
    if (special(mv) || special(y)) { atomicMin(&status[0], row); }
    x[i] = y;
    x0_prev[i] = x0;
    let u = y * in_scale;
    for (var k = 0u; k < p.copies; k++) {
        unet_in[k * p.n + i] = u;
    }
}
#endif
