// Shared declarations included by every kernel.
// binding 1: per-run scalars (positions, kv length, step index, seed), 64 u32 slots.
struct RunScalars { s: array<vec4<u32>, 16> }
@group(0) @binding(1) var<uniform> rs: RunScalars;

const NONE: u32 = 0xffffffffu;

// A per-run integer: `add` alone, or `add + mul * rs[slot]` (see graph::Dyn).
fn dyn_val(add: u32, slot: u32, mul: u32) -> u32 {
    if (slot == NONE) { return add; }
    return add + mul * rs.s[slot / 4u][slot % 4u];
}

// Slot words with this bit read one scalar per batch row (graph::Dyn::Rows).
const ROWS: u32 = 0x80000000u;
fn is_rows(slot: u32) -> bool { return slot != NONE && (slot & ROWS) != 0u; }

// A per-run integer of batch row r: `add + mul * rs[first + r]` for a per-row Dyn, else
// dyn_val (the same for every row).
fn dyn_row(add: u32, slot: u32, mul: u32, r: u32) -> u32 {
    if (!is_rows(slot)) { return dyn_val(add, slot, mul); }
    let s = (slot & ~ROWS) + r;
    return add + mul * rs.s[s / 4u][s % 4u];
}

// The four bytes of a quant word as floats: low nibbles, unsigned, signed.
fn lo4(q: u32) -> vec4<f32> { return vec4<f32>(f32(q & 15u), f32((q >> 8u) & 15u), f32((q >> 16u) & 15u), f32((q >> 24u) & 15u)); }
fn bytes4(q: u32) -> vec4<f32> { return vec4<f32>(f32(q & 255u), f32((q >> 8u) & 255u), f32((q >> 16u) & 255u), f32(q >> 24u)); }
fn sb4(q: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(q << 24u, q << 16u, q << 8u, q)) >> vec4<u32>(24u);
    return vec4<f32>(v);
}

// f16 KV caches hold two elements to a word (element i in the low half of word i / 2 when i
// is even, the high half when odd). Invocations writing the two halves of one word at once
// each clear their half and set it with two atomics (binding `array<atomic<u32>>`):
//   let h = half_write(i, v); atomicAnd(&c[h.word], h.keep); atomicOr(&c[h.word], h.bits);
struct HalfWrite { word: u32, keep: u32, bits: u32 }
fn half_write(i: u32, v: f32) -> HalfWrite {
    let s = 16u * (i & 1u);
    return HalfWrite(i >> 1u, ~(0xffffu << s), (pack2x16float(vec2<f32>(v, 0.0)) & 0xffffu) << s);
}
// Element i of an f16 cache from its word.
fn half_read(word: u32, i: u32) -> f32 { return unpack2x16float(word)[i & 1u]; }
// Four f16 elements (two words: one 8-byte load of an f16 cache).
fn half4(u: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack2x16float(u.x), unpack2x16float(u.y)); }

// Linear workgroup index of a dispatch folded over x and y (kernels::grid).
fn group_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

// erf with max abs error 1.5e-7 (Abramowitz & Stegun 7.1.26); WGSL has no erf builtin.
fn erf_approx(x: f32) -> f32 {
    let s = sign(x);
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-a * a);
    return s * y;
}

fn silu(x: f32) -> f32 { return x / (1.0 + exp(-x)); }
fn gelu_erf(x: f32) -> f32 { return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476)); }
fn gelu_tanh(x: f32) -> f32 {
    // tanh written through exp of a clamped argument: tanh() overflows on some drivers.
    let u = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0, 15.0);
    let e = exp(2.0 * u);
    return 0.5 * x * (1.0 + (e - 1.0) / (e + 1.0));
}
fn quick_gelu(x: f32) -> f32 { return x / (1.0 + exp(-1.702 * x)); }
// The activation of a gated unit (kernels::elementwise::Act codes): 0 silu, 1 gelu(erf),
// 2 gelu(tanh), 3 sigmoid (an output gate).
fn glu_act(v: f32, code: u32) -> f32 {
    switch code {
        case 0u: { return silu(v); }
        case 1u: { return gelu_erf(v); }
        case 2u: { return gelu_tanh(v); }
        default: { return 1.0 / (1.0 + exp(-v)); }
    }
}

// x mod 2*pi into [-pi, pi] with a two-constant (Cody-Waite) reduction: sin/cos of an angle of
// thousands of radians (rope positions, diffusion timesteps) keep f32 accuracy on every driver.
fn reduce_2pi(x: f32) -> f32 {
    let k = round(x * 0.15915494309189535);
    return (x - k * 6.28125) - k * 0.0019353071795864769;
}
