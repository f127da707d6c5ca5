// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), bit-identical to Random123's
// philox4x32 with 10 rounds (known-answer vectors checked by tests/tests/sample.rs, on the CPU
// and on the GPU). No bindings; included by sample.wgsl and noise.wgsl after common.wgsl.
//
// Everything here is integer arithmetic, so the same (counter, key) gives the same bits on
// every adapter. WGSL has no 64-bit multiply: the 32x32 -> 64 product is built from 16-bit
// halves, each partial product fitting in a u32.

const PHILOX_M0: u32 = 0xD2511F53u;
const PHILOX_M1: u32 = 0xCD9E8D57u;
const PHILOX_W0: u32 = 0x9E3779B9u;
const PHILOX_W1: u32 = 0xBB67AE85u;

// Full product a * b as (lo, hi).
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    // The middle column: three terms below 2^16 each, so it cannot overflow.
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let lo = (mid << 16u) | (p00 & 0xffffu);
    let hi = a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

fn philox_round(c: vec4<u32>, k: vec2<u32>) -> vec4<u32> {
    let p0 = mulhilo(PHILOX_M0, c.x);
    let p1 = mulhilo(PHILOX_M1, c.z);
    return vec4<u32>(p1.y ^ c.y ^ k.x, p1.x, p0.y ^ c.w ^ k.y, p0.x);
}

// Four random words for (counter, key).
fn philox4x32_10(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var r = 0u; r < 10u; r++) {
        c = philox_round(c, k);
        k += vec2<u32>(PHILOX_W0, PHILOX_W1);
    }
    return c;
}

// A uniform in (0, 1] from the top 24 bits: exact in f32 (no rounding), never 0 so log() is finite.
fn philox_unit_open0(x: u32) -> f32 {
    return ldexp(f32(x >> 8u) + 1.0, -24);
}
