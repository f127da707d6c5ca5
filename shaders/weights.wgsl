// Weight access for every weight dtype (packing spec in engine/src/dtype.rs). The includer
// declares `w: array<u32>` (the weight words) and, with WITH_DOT, the activation accessors
// `xq(o)` (x[o..o + 4] as a vec4, o a multiple of 4: one 16-byte load where x is bound as
// vec4s) and `xs(i)` (x[i]).
// One variant define selects the dtype: W_F32, W_F16, W_BF16, W_Q8_0, W_Q4_0, W_Q4_1, W_Q5_0,
// W_Q5_1, W_Q2_K, W_Q3_K, W_Q4_K, W_Q5_K, W_Q6_K, W_IQ4_NL, W_IQ4_XS.
//   w_elem(rb, k)      element k of the row starting at word rb
//   w_lane_dot(rb, blk, sub, xo) (block formats, WITH_DOT) lane sub's share (of W_LPB lanes) of
//                      the dot of block blk (W_BLOCK elements) with x[xo..]; scales applied once
//                      per group of elements
//   W_PLAIN            defined for f32/f16/bf16 (rows may end in a partial unit of 32)
//   w_word_dot(rb, wi, xo, k) (plain types, WITH_DOT) word wi of the row times its x elements
//   w_pair(rb, k)      elements k, k + 1 (k even) as a vec2
//   W_OCT, w_oct(rb, blk, s) (block formats but Q2_K/Q3_K) the s-th of W_BLOCK / 8 groups
//                      of eight elements of block blk (one quant word, or two for Q8_0),
//                      dequantized: four consecutive elements at block offset o.x and four at
//                      o.y (the GEMM's unit of weight reads)

fn byte_of(word: u32, i: u32) -> u32 { return (word >> (8u * i)) & 0xffu; }
fn sext8(v: u32) -> f32 { return f32(bitcast<i32>(v << 24u) >> 24u); }
#ifdef WITH_DOT
// Sum of the four bytes of `q` (as unsigned), each times x[xo + i], minus `zero` each.
fn dot4u(q: u32, xo: u32, zero: f32) -> f32 { return dot(bytes4(q) - zero, xq(xo)); }
// The sum of x[o..o + 4].
fn xsum4(o: u32) -> f32 { return dot(xq(o), vec4<f32>(1.0)); }
#endif

#ifdef W_F32
#define W_PLAIN
fn w_elem(rb: u32, k: u32) -> f32 { return bitcast<f32>(w[rb + k]); }
#ifdef WITH_DOT
// Word wi of the row (one element) times its x.
fn w_word_dot(rb: u32, wi: u32, xo: u32, k: u32) -> f32 { return bitcast<f32>(w[rb + wi]) * xs(xo + wi); }
#endif
#endif

#ifdef W_F16
#define W_PLAIN
// select() rather than a dynamic vector index: the latter spills to local memory on some GPUs.
fn w_elem(rb: u32, k: u32) -> f32 { let v = unpack2x16float(w[rb + k / 2u]); return select(v.x, v.y, (k & 1u) == 1u); }
#ifdef WITH_DOT
// Word wi of the row (elements 2wi, 2wi + 1) times x; an odd row's last word holds one element.
fn w_word_dot(rb: u32, wi: u32, xo: u32, k: u32) -> f32 {
    let v = unpack2x16float(w[rb + wi]);
    let e = 2u * wi;
    if (e + 1u < k) { return v.x * xs(xo + e) + v.y * xs(xo + e + 1u); }
    return v.x * xs(xo + e);
}
#endif
#endif

#ifdef W_BF16
#define W_PLAIN
fn bf16_pair(v: u32) -> vec2<f32> { return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u)); }
fn w_elem(rb: u32, k: u32) -> f32 { let v = w[rb + k / 2u]; return bitcast<f32>(select(v << 16u, v & 0xffff0000u, (k & 1u) == 1u)); }
#ifdef WITH_DOT
fn w_word_dot(rb: u32, wi: u32, xo: u32, k: u32) -> f32 {
    let v = bf16_pair(w[rb + wi]);
    let e = 2u * wi;
    if (e + 1u < k) { return v.x * xs(xo + e) + v.y * xs(xo + e + 1u); }
    return v.x * xs(xo + e);
}
#endif
#endif

struct Oct { lo: vec4<f32>, hi: vec4<f32>, o: vec2<u32> }

#ifdef W_Q8_0
fn w_elem(rb: u32, k: u32) -> f32 {
    let b = rb + (k / 32u) * 9u;
    let i = k % 32u;
    return bitcast<f32>(w[b]) * sext8(byte_of(w[b + 1u + i / 4u], i % 4u));
}
#define W_OCT
#define W_BLOCK 32
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let b = rb + blk * 9u;
    let d = bitcast<f32>(w[b]);
    return Oct(d * sb4(w[b + 1u + 2u * s]), d * sb4(w[b + 2u + 2u * s]), vec2<u32>(8u * s, 8u * s + 4u));
}
#ifdef WITH_DOT
// Lanes per block in the matvec: lane `sub` of a block takes its quant word `sub`.
#define W_LPB 8
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let b = rb + blk * 9u;
    let q = w[b + 1u + sub];
    let o = xo + 4u * sub;
    let v = vec4<f32>(sext8(q & 0xffu), sext8((q >> 8u) & 0xffu), sext8((q >> 16u) & 0xffu), sext8(q >> 24u));
    return bitcast<f32>(w[b]) * dot(v, xq(o));
}
#endif
#endif

#ifdef W_Q4_0
fn w_elem(rb: u32, k: u32) -> f32 {
    let b = rb + (k / 32u) * 5u;
    let i = k % 32u;
    let j = i % 16u;
    let byte = byte_of(w[b + 1u + j / 4u], j % 4u);
    let q = select(byte & 15u, byte >> 4u, i >= 16u);
    return bitcast<f32>(w[b]) * (f32(q) - 8.0);
}
#define W_OCT
#define W_BLOCK 32
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let b = rb + blk * 5u;
    let d = bitcast<f32>(w[b]);
    let q = w[b + 1u + s];
    return Oct(d * (lo4(q) - 8.0), d * (lo4(q >> 4u) - 8.0), vec2<u32>(4u * s, 16u + 4u * s));
}
#ifdef WITH_DOT
// Lane `sub` of 4 takes quant word `sub`: elements 4sub.. (low nibbles) and 16 + 4sub.. (high).
#define W_LPB 4
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let b = rb + blk * 5u;
    let q = w[b + 1u + sub];
    let s = dot4u(q & 0x0f0f0f0fu, xo + 4u * sub, 8.0) + dot4u((q >> 4u) & 0x0f0f0f0fu, xo + 16u + 4u * sub, 8.0);
    return bitcast<f32>(w[b]) * s;
}
#endif
#endif

#ifdef W_Q4_1
// 6 words per block: d, m (f32), then 16 nibble bytes as Q4_0. Element = q * d + m.
fn w_elem(rb: u32, k: u32) -> f32 {
    let b = rb + (k / 32u) * 6u;
    let i = k % 32u;
    let j = i % 16u;
    let byte = byte_of(w[b + 2u + j / 4u], j % 4u);
    let q = select(byte & 15u, byte >> 4u, i >= 16u);
    return bitcast<f32>(w[b]) * f32(q) + bitcast<f32>(w[b + 1u]);
}
#define W_OCT
#define W_BLOCK 32
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let b = rb + blk * 6u;
    let d = bitcast<f32>(w[b]);
    let m = bitcast<f32>(w[b + 1u]);
    let q = w[b + 2u + s];
    return Oct(d * lo4(q) + m, d * lo4(q >> 4u) + m, vec2<u32>(4u * s, 16u + 4u * s));
}
#ifdef WITH_DOT
#define W_LPB 4
// Lane `sub` of 4 takes quant word `sub`: d * sum(q x) + m * sum(x).
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let b = rb + blk * 6u;
    let q = w[b + 2u + sub];
    let lo = xo + 4u * sub;
    let hi = xo + 16u + 4u * sub;
    let s = dot4u(q & 0x0f0f0f0fu, lo, 0.0) + dot4u((q >> 4u) & 0x0f0f0f0fu, hi, 0.0);
    let sx = xsum4(lo) + xsum4(hi);
    return bitcast<f32>(w[b]) * s + bitcast<f32>(w[b + 1u]) * sx;
}
#endif
#endif

#ifdef W_Q5_0
#define W_Q5
#define Q5_WORDS 6u
#define Q5_QH 1u
#endif
#ifdef W_Q5_1
#define W_Q5
#define Q5_WORDS 7u
#define Q5_QH 2u
#endif
#ifdef W_Q5
// Q5_0: d, qh, 16 nibble bytes (element = d * (q - 16)); Q5_1: d, m, qh, nibbles (q * d + m).
// The fifth bit of element j is bit j of qh.
fn w_elem(rb: u32, k: u32) -> f32 {
    let b = rb + (k / 32u) * Q5_WORDS;
    let i = k % 32u;
    let j = i % 16u;
    let byte = byte_of(w[b + Q5_QH + 1u + j / 4u], j % 4u);
    let q = select(byte & 15u, byte >> 4u, i >= 16u) | (((w[b + Q5_QH] >> i) & 1u) << 4u);
#ifdef W_Q5_0
    return bitcast<f32>(w[b]) * (f32(q) - 16.0);
#else
    return bitcast<f32>(w[b]) * f32(q) + bitcast<f32>(w[b + 1u]);
#endif
}
// Bits 0..3 of `h` moved to bit 4 of each byte.
fn q5_spread(h: u32) -> u32 {
    return ((h & 1u) << 4u) | ((h & 2u) << 11u) | ((h & 4u) << 18u) | ((h & 8u) << 25u);
}
#define W_OCT
#define W_BLOCK 32
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let b = rb + blk * Q5_WORDS;
    let q = w[b + Q5_QH + 1u + s];
    let qh = w[b + Q5_QH];
    let lo = bytes4((q & 0x0f0f0f0fu) | q5_spread((qh >> (4u * s)) & 15u));
    let hi = bytes4(((q >> 4u) & 0x0f0f0f0fu) | q5_spread((qh >> (16u + 4u * s)) & 15u));
    let d = bitcast<f32>(w[b]);
    let o = vec2<u32>(4u * s, 16u + 4u * s);
#ifdef W_Q5_0
    return Oct(d * (lo - 16.0), d * (hi - 16.0), o);
#else
    let m = bitcast<f32>(w[b + 1u]);
    return Oct(d * lo + m, d * hi + m, o);
#endif
}
#ifdef WITH_DOT
#define W_LPB 4
// Lane `sub` of 4 takes quant word `sub` and the matching eight bits of qh.
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let b = rb + blk * Q5_WORDS;
    let q = w[b + Q5_QH + 1u + sub];
    let qh = w[b + Q5_QH];
    let lo_q = (q & 0x0f0f0f0fu) | q5_spread((qh >> (4u * sub)) & 15u);
    let hi_q = ((q >> 4u) & 0x0f0f0f0fu) | q5_spread((qh >> (16u + 4u * sub)) & 15u);
    let lo = xo + 4u * sub;
    let hi = xo + 16u + 4u * sub;
#ifdef W_Q5_0
    return bitcast<f32>(w[b]) * (dot4u(lo_q, lo, 16.0) + dot4u(hi_q, hi, 16.0));
#else
    let sx = xsum4(lo) + xsum4(hi);
    return bitcast<f32>(w[b]) * (dot4u(lo_q, lo, 0.0) + dot4u(hi_q, hi, 0.0)) + bitcast<f32>(w[b + 1u]) * sx;
#endif
}
#endif
#endif

#ifdef W_Q2_K
// Words: scales 0..4 (byte g: low nibble scale, high nibble min of elements 16g..16g + 15),
// qs 4..20, d|dmin 20. Element 128h + 32s + l: bits 2s..2s + 1 of qs byte 32h + l.
fn w_elem(rb: u32, k: u32) -> f32 {
    let sb = rb + (k / 256u) * 21u;
    let r = k % 256u;
    let l = r % 32u;
    let qb = 32u * (r / 128u) + l;
    let q = (byte_of(w[sb + 4u + qb / 4u], qb % 4u) >> (2u * ((r % 128u) / 32u))) & 3u;
    let sc = byte_of(w[sb + r / 64u], (r / 16u) % 4u);
    let dm = unpack2x16float(w[sb + 20u]);
    return dm.x * f32(sc & 15u) * f32(q) - dm.y * f32(sc >> 4u);
}
#ifdef WITH_DOT
// 16 lanes per super-block: lane `sub` takes qs word `sub` (positions l0..l0 + 3 of half
// h = sub / 8), which holds 4 elements at each of the 4 shifts.
#define W_LPB 16
#define W_BLOCK 256
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let sb = rb + blk * 21u;
    let dm = unpack2x16float(w[sb + 20u]);
    let h = sub / 8u;
    let l0 = 4u * (sub % 8u);
    let q = w[sb + 4u + sub];
    var acc = 0.0;
    for (var s = 0u; s < 4u; s++) {
        let o = xo + 128u * h + 32u * s + l0;
        let g = 8u * h + 2u * s + l0 / 16u;
        let sc = byte_of(w[sb + g / 4u], g % 4u);
        let xsum = xsum4(o);
        acc += dm.x * f32(sc & 15u) * dot4u((q >> (2u * s)) & 0x03030303u, o, 0.0) - dm.y * f32(sc >> 4u) * xsum;
    }
    return acc;
}
#endif
#endif

#ifdef W_Q3_K
// Words: hmask 0..8, qs 8..24, scales (i8, minus 32 already) 24..28, d (f32) 28. Element
// 128h + 32s + l: bits 2s..2s + 1 of qs byte 32h + l, minus 4 unless bit 4h + s of hmask byte l.
fn k3_scale(sb: u32, g: u32) -> f32 { return sext8(byte_of(w[sb + 24u + g / 4u], g % 4u)); }
fn w_elem(rb: u32, k: u32) -> f32 {
    let sb = rb + (k / 256u) * 29u;
    let r = k % 256u;
    let h = r / 128u;
    let s = (r % 128u) / 32u;
    let l = r % 32u;
    let qb = 32u * h + l;
    let low = (byte_of(w[sb + 8u + qb / 4u], qb % 4u) >> (2u * s)) & 3u;
    let hi = (byte_of(w[sb + l / 4u], l % 4u) >> (4u * h + s)) & 1u;
    return bitcast<f32>(w[sb + 28u]) * k3_scale(sb, r / 16u) * (f32(low) - select(4.0, 0.0, hi == 1u));
}
#ifdef WITH_DOT
// 16 lanes per super-block: lane `sub` takes qs word `sub` (positions l0..l0 + 3 of half
// h = sub / 8) at the four shifts, with the hmask word of those positions.
#define W_LPB 16
#define W_BLOCK 256
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let sb = rb + blk * 29u;
    let h = sub / 8u;
    let l0 = 4u * (sub % 8u);
    let q = w[sb + 8u + sub];
    let m = w[sb + sub % 8u];
    var acc = 0.0;
    for (var s = 0u; s < 4u; s++) {
        let o = xo + 128u * h + 32u * s + l0;
        // (low | 4 * hbit) - 4 is the signed quant: add the high bit as 4, subtract 4 for all.
        let qv = ((q >> (2u * s)) & 0x03030303u) | (((m >> (4u * h + s)) & 0x01010101u) << 2u);
        acc += k3_scale(sb, 8u * h + 2u * s + l0 / 16u) * dot4u(qv, o, 4.0);
    }
    return bitcast<f32>(w[sb + 28u]) * acc;
}
#endif
#endif

// The non-linear values of IQ4_NL / IQ4_XS (llama.cpp's kvalues_iq4nl) as i8 bytes, four per
// word; selected rather than indexed (a run-time index into a constant array is not portable).
#ifdef W_IQ4_NL
#define IQ4_TABLE
#endif
#ifdef W_IQ4_XS
#define IQ4_TABLE
#endif
#ifdef IQ4_TABLE
fn iq4(q: u32) -> f32 {
    let i = q / 4u;
    let word = select(select(0xbfad9881u, 0xf6eaddcfu, i == 1u), select(0x26190d01u, 0x71594535u, i == 3u), i >= 2u);
    return sext8(byte_of(word, q % 4u));
}
// The four nibbles in the low halves of q's bytes, as table values.
fn iq4x4(q: u32) -> vec4<f32> { return vec4<f32>(iq4(q & 15u), iq4((q >> 8u) & 15u), iq4((q >> 16u) & 15u), iq4((q >> 24u) & 15u)); }
#ifdef WITH_DOT
// The four nibbles in the low halves of q's bytes, as table values, times x[xo..xo + 3].
fn iq4_dot4(q: u32, xo: u32) -> f32 {
    return dot(iq4x4(q), xq(xo));
}
#endif
#endif

#ifdef W_IQ4_NL
// 5 words per block: d (f32), then 16 nibble bytes as Q4_0; element = d * iq4(q).
fn w_elem(rb: u32, k: u32) -> f32 {
    let b = rb + (k / 32u) * 5u;
    let i = k % 32u;
    let j = i % 16u;
    let byte = byte_of(w[b + 1u + j / 4u], j % 4u);
    return bitcast<f32>(w[b]) * iq4(select(byte & 15u, byte >> 4u, i >= 16u));
}
#define W_OCT
#define W_BLOCK 32
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let b = rb + blk * 5u;
    let d = bitcast<f32>(w[b]);
    let q = w[b + 1u + s];
    return Oct(d * iq4x4(q), d * iq4x4(q >> 4u), vec2<u32>(4u * s, 16u + 4u * s));
}
#ifdef WITH_DOT
#define W_LPB 4
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let b = rb + blk * 5u;
    let q = w[b + 1u + sub];
    let s = iq4_dot4(q & 0x0f0f0f0fu, xo + 4u * sub) + iq4_dot4((q >> 4u) & 0x0f0f0f0fu, xo + 16u + 4u * sub);
    return bitcast<f32>(w[b]) * s;
}
#endif
#endif

#ifdef W_IQ4_XS
// Words: d (f16, low half) | high scale bits (high half) 0, low scale nibbles 1, then 16 nibble
// bytes per 32-element sub-block i (words 2 + 4i..), as Q4_0. Scale of i: 6 bits minus 32.
fn ixs_scale(sb: u32, i: u32) -> f32 {
    let lo = (byte_of(w[sb + 1u], i / 2u) >> (4u * (i % 2u))) & 15u;
    let hi = (w[sb] >> (16u + 2u * i)) & 3u;
    return unpack2x16float(w[sb]).x * (f32(lo | (hi << 4u)) - 32.0);
}
fn w_elem(rb: u32, k: u32) -> f32 {
    let sb = rb + (k / 256u) * 34u;
    let r = k % 256u;
    let i = r / 32u;
    let j = r % 32u;
    let byte = byte_of(w[sb + 2u + 4u * i + (j % 16u) / 4u], j % 4u);
    return ixs_scale(sb, i) * iq4(select(byte & 15u, byte >> 4u, j >= 16u));
}
#define W_OCT
#define W_BLOCK 256
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let sb = rb + blk * 34u;
    let i = s / 4u;
    let q = w[sb + 2u + s];
    let sc = ixs_scale(sb, i);
    let o = 32u * i + 4u * (s % 4u);
    return Oct(sc * iq4x4(q), sc * iq4x4(q >> 4u), vec2<u32>(o, o + 16u));
}
#ifdef WITH_DOT
// 32 lanes per super-block: lane `sub` takes quant word `sub` of sub-block sub / 4.
#define W_LPB 32
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let sb = rb + blk * 34u;
    let i = sub / 4u;
    let q = w[sb + 2u + sub];
    let o = xo + 32u * i + 4u * (sub % 4u);
    return ixs_scale(sb, i) * (iq4_dot4(q & 0x0f0f0f0fu, o) + iq4_dot4((q >> 4u) & 0x0f0f0f0fu, o + 16u));
}
#endif
#endif

// The 6-bit scale/min packing Q4_K and Q5_K share.
#ifdef W_Q4_K
#define K4_SCALES
#endif
#ifdef W_Q5_K
#define K4_SCALES
#endif
#ifdef K4_SCALES
// Byte i of the 12 packed scale bytes of the super-block at word sb.
fn k4_sbyte(sb: u32, i: u32) -> u32 { return byte_of(w[sb + 1u + i / 4u], i % 4u); }
// (scale, min) of sub-block j, as ggml's get_scale_min_k4.
fn k4_scale_min(sb: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(k4_sbyte(sb, j) & 63u), f32(k4_sbyte(sb, j + 4u) & 63u));
    }
    let sc = (k4_sbyte(sb, j + 4u) & 15u) | ((k4_sbyte(sb, j - 4u) >> 6u) << 4u);
    let m = (k4_sbyte(sb, j + 4u) >> 4u) | ((k4_sbyte(sb, j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}
// Group s of the super-block at word sb (chunk c = s / 8): the quants q_lo of sub-block 2c and
// q_hi of sub-block 2c + 1 (one per byte), at positions 4 (s % 8).. of each, dequantized.
fn k4_oct(sb: u32, s: u32, q_lo: u32, q_hi: u32) -> Oct {
    let dm = unpack2x16float(w[sb]);
    let c = s / 8u;
    let a = k4_scale_min(sb, 2u * c);
    let b = k4_scale_min(sb, 2u * c + 1u);
    let o = 64u * c + 4u * (s % 8u);
    return Oct(dm.x * a.x * bytes4(q_lo) - dm.y * a.y, dm.x * b.x * bytes4(q_hi) - dm.y * b.y, vec2<u32>(o, o + 32u));
}
#define W_OCT
#define W_BLOCK 256
#ifdef WITH_DOT
// Lane `sub` of 32 in the super-block at word sb: q_lo / q_hi are its four quants (one per
// byte) of sub-blocks 2c and 2c + 1 (c = sub / 8), at positions 4 (sub % 8).. of each.
fn k4_lane(sb: u32, sub: u32, xo: u32, q_lo: u32, q_hi: u32) -> f32 {
    let dm = unpack2x16float(w[sb]);
    let c = sub / 8u;
    let o_lo = xo + 64u * c + 4u * (sub % 8u);
    let o_hi = o_lo + 32u;
    let sm_lo = k4_scale_min(sb, 2u * c);
    let sm_hi = k4_scale_min(sb, 2u * c + 1u);
    let s_lo = dot4u(q_lo, o_lo, 0.0);
    let s_hi = dot4u(q_hi, o_hi, 0.0);
    let x_lo = xsum4(o_lo);
    let x_hi = xsum4(o_hi);
    return dm.x * (sm_lo.x * s_lo + sm_hi.x * s_hi) - dm.y * (sm_lo.y * x_lo + sm_hi.y * x_hi);
}
#endif
#endif

#ifdef W_Q4_K
fn w_elem(rb: u32, k: u32) -> f32 {
    let sb = rb + (k / 256u) * 36u;
    let r = k % 256u;
    let j = r / 32u;
    let l = r % 32u;
    let byte = byte_of(w[sb + 4u + (j / 2u) * 8u + l / 4u], l % 4u);
    let q = select(byte & 15u, byte >> 4u, (j & 1u) == 1u);
    let dm = unpack2x16float(w[sb]);
    let sm = k4_scale_min(sb, j);
    return dm.x * sm.x * f32(q) - dm.y * sm.y;
}
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let q = w[rb + blk * 36u + 4u + s];
    return k4_oct(rb + blk * 36u, s, q & 0x0f0f0f0fu, (q >> 4u) & 0x0f0f0f0fu);
}
#ifdef WITH_DOT
// 32 lanes per super-block: lane `sub` takes quant word `sub` (chunk sub / 8 of 64 elements):
// its low nibbles belong to sub-block 2c, its high nibbles to sub-block 2c + 1.
#define W_LPB 32
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let q = w[rb + blk * 36u + 4u + sub];
    return k4_lane(rb + blk * 36u, sub, xo, q & 0x0f0f0f0fu, (q >> 4u) & 0x0f0f0f0fu);
}
#endif
#endif

#ifdef W_Q5_K
// Words: d|dmin 0, scales 1..4, qh 4..12, qs 12..44. Element 64c + 32h + l: nibble h of qs byte
// 32c + l, fifth bit = bit 2c + h of qh byte l, sub-block 2c + h.
fn w_elem(rb: u32, k: u32) -> f32 {
    let sb = rb + (k / 256u) * 44u;
    let r = k % 256u;
    let j = r / 32u;
    let l = r % 32u;
    let byte = byte_of(w[sb + 12u + (j / 2u) * 8u + l / 4u], l % 4u);
    let lo = select(byte & 15u, byte >> 4u, (j & 1u) == 1u);
    let hi = (byte_of(w[sb + 4u + l / 4u], l % 4u) >> j) & 1u;
    let dm = unpack2x16float(w[sb]);
    let sm = k4_scale_min(sb, j);
    return dm.x * sm.x * f32(lo | (hi << 4u)) - dm.y * sm.y;
}
// qs word `sub` (positions l0..l0 + 3 of chunk c = sub / 8) with the fifth bits from the qh
// word of those positions: the quants of sub-blocks 2c and 2c + 1.
fn k5_quants(sb: u32, sub: u32) -> vec2<u32> {
    let c = sub / 8u;
    let q = w[sb + 12u + sub];
    let h = w[sb + 4u + sub % 8u];
    return vec2<u32>((q & 0x0f0f0f0fu) | (((h >> (2u * c)) & 0x01010101u) << 4u),
                     ((q >> 4u) & 0x0f0f0f0fu) | (((h >> (2u * c + 1u)) & 0x01010101u) << 4u));
}
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let q = k5_quants(rb + blk * 44u, s);
    return k4_oct(rb + blk * 44u, s, q.x, q.y);
}
#ifdef WITH_DOT
// 32 lanes per super-block, as Q4_K.
#define W_LPB 32
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let q = k5_quants(rb + blk * 44u, sub);
    return k4_lane(rb + blk * 44u, sub, xo, q.x, q.y);
}
#endif
#endif

#ifdef W_Q6_K
// Words: ql 0..32, qh 32..48, scales (i8) 48..52, d (f32) 52, zero 53..56.
fn k6_scale(sb: u32, i: u32) -> f32 { return sext8(byte_of(w[sb + 48u + i / 4u], i % 4u)); }
fn w_elem(rb: u32, k: u32) -> f32 {
    let sb = rb + (k / 256u) * 56u;
    let r = k % 256u;
    let h = r / 128u;
    let qd = (r % 128u) / 32u;
    let l = r % 32u;
    let qlb = 64u * h + (qd & 1u) * 32u + l;
    let ql = (byte_of(w[sb + qlb / 4u], qlb % 4u) >> (4u * (qd / 2u))) & 15u;
    let qhb = 128u + 32u * h + l;
    let qh = (byte_of(w[sb + qhb / 4u], qhb % 4u) >> (2u * qd)) & 3u;
    let q = f32(ql | (qh << 4u)) - 32.0;
    return bitcast<f32>(w[sb + 52u]) * k6_scale(sb, 8u * h + 2u * qd + l / 16u) * q;
}
// ql word `sub` of the super-block at word sb: in half h = sub / 16, words 0..7 hold q1 (low
// nibbles) and q3 (high), words 8..15 q2 and q4, for 4 positions l0..l0 + 3. Returns the two
// groups' 6-bit quants (one per byte) and their element offsets in the super-block.
struct K6 { q: vec2<u32>, o: vec2<u32>, scale: vec2<f32> }
fn k6_group(sb: u32, sub: u32) -> K6 {
    let h = sub / 16u;
    let r = sub % 16u;
    let l0 = 4u * (r % 8u);
    let qd_lo = r / 8u;
    let qd_hi = qd_lo + 2u;
    let ql = w[sb + sub];
    let qh = w[sb + 32u + 8u * h + r % 8u];
    let q_lo = (ql & 0x0f0f0f0fu) | (((qh >> (2u * qd_lo)) & 0x03030303u) << 4u);
    let q_hi = ((ql >> 4u) & 0x0f0f0f0fu) | (((qh >> (2u * qd_hi)) & 0x03030303u) << 4u);
    let base = 128u * h + l0;
    let sc = 8u * h + l0 / 16u;
    return K6(vec2<u32>(q_lo, q_hi), vec2<u32>(base + 32u * qd_lo, base + 32u * qd_hi),
              vec2<f32>(k6_scale(sb, sc + 2u * qd_lo), k6_scale(sb, sc + 2u * qd_hi)));
}
#define W_OCT
#define W_BLOCK 256
fn w_oct(rb: u32, blk: u32, s: u32) -> Oct {
    let sb = rb + blk * 56u;
    let g = k6_group(sb, s);
    let d = bitcast<f32>(w[sb + 52u]);
    return Oct(d * g.scale.x * (bytes4(g.q.x) - 32.0), d * g.scale.y * (bytes4(g.q.y) - 32.0), g.o);
}
#ifdef WITH_DOT
// 32 lanes per super-block: lane `sub` takes ql word `sub`.
#define W_LPB 32
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let sb = rb + blk * 56u;
    let g = k6_group(sb, sub);
    let s = g.scale.x * dot4u(g.q.x, xo + g.o.x, 32.0) + g.scale.y * dot4u(g.q.y, xo + g.o.y, 32.0);
    return bitcast<f32>(w[sb + 52u]) * s;
}
#endif
#endif

// Elements k and k + 1 (k even, k + 1 < the row length) of the row at word rb: one word for
// the 16-bit types.
#ifdef W_F16
fn w_pair(rb: u32, k: u32) -> vec2<f32> { return unpack2x16float(w[rb + k / 2u]); }
#else
#ifdef W_BF16
fn w_pair(rb: u32, k: u32) -> vec2<f32> { return bf16_pair(w[rb + k / 2u]); }
#else
#ifdef W_Q8_0
// Both elements sit in one quant word of one block.
fn w_pair(rb: u32, k: u32) -> vec2<f32> {
    let b = rb + (k / 32u) * 9u;
    let i = k % 32u;
    let q = w[b + 1u + i / 4u];
    return bitcast<f32>(w[b]) * vec2<f32>(sext8(byte_of(q, i % 4u)), sext8(byte_of(q, i % 4u + 1u)));
}
#else
#ifdef W_Q4_0
// Both elements sit in one quant word of one block (low nibbles: 0..15, high: 16..31).
fn w_pair(rb: u32, k: u32) -> vec2<f32> {
    let b = rb + (k / 32u) * 5u;
    let i = k % 32u;
    let j = i % 16u;
    let q = w[b + 1u + j / 4u] >> (4u * u32(i >= 16u));
    let lo = byte_of(q, j % 4u) & 15u;
    let hi = byte_of(q, j % 4u + 1u) & 15u;
    return bitcast<f32>(w[b]) * (vec2<f32>(f32(lo), f32(hi)) - 8.0);
}
#else
fn w_pair(rb: u32, k: u32) -> vec2<f32> { return vec2<f32>(w_elem(rb, k), w_elem(rb, k + 1u)); }
#endif
#endif
#endif
#endif

// Elements k..k + 7 (k a multiple of 8, k + 7 < the row length) of the row at word rb, each
// scale read once (the GEMM's unit of weight loads).
struct Run8 { lo: vec4<f32>, hi: vec4<f32> }
fn run8(e: array<f32, 8>) -> Run8 { return Run8(vec4<f32>(e[0], e[1], e[2], e[3]), vec4<f32>(e[4], e[5], e[6], e[7])); }
// Elements k..k + 7 of a row of `len` elements, zeros past its end.
fn w_tail8(rb: u32, k: u32, len: u32) -> Run8 {
    var e: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        if (k + j < len) { e[j] = w_elem(rb, k + j); }
    }
    return run8(e);
}
#ifdef W_F32
fn w_run8(rb: u32, k: u32) -> Run8 {
    let i = rb + k;
    return Run8(bitcast<vec4<f32>>(vec4<u32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u])),
                bitcast<vec4<f32>>(vec4<u32>(w[i + 4u], w[i + 5u], w[i + 6u], w[i + 7u])));
}
#else
#ifdef W_F16
fn w_run8(rb: u32, k: u32) -> Run8 {
    let i = rb + k / 2u;
    return Run8(half4(vec2<u32>(w[i], w[i + 1u])), half4(vec2<u32>(w[i + 2u], w[i + 3u])));
}
#else
#ifdef W_BF16
fn w_run8(rb: u32, k: u32) -> Run8 {
    let i = rb + k / 2u;
    return Run8(vec4<f32>(bf16_pair(w[i]), bf16_pair(w[i + 1u])), vec4<f32>(bf16_pair(w[i + 2u]), bf16_pair(w[i + 3u])));
}
#else
#ifdef W_Q8_0
// The run is one oct: quant words 2s, 2s + 1 of its block.
fn w_run8(rb: u32, k: u32) -> Run8 { let o = w_oct(rb, k / 32u, (k % 32u) / 8u); return Run8(o.lo, o.hi); }
#else
#ifdef W_Q4_0
// Elements j..j + 7 of a half (low nibbles: 0..15, high: 16..31) are two quant words' nibbles.
fn w_run8(rb: u32, k: u32) -> Run8 {
    let b = rb + (k / 32u) * 5u;
    let i = k % 32u;
    let q = b + 1u + (i % 16u) / 4u;
    let sh = 4u * u32(i >= 16u);
    let d = bitcast<f32>(w[b]);
    return Run8(d * (lo4(w[q] >> sh) - 8.0), d * (lo4(w[q + 1u] >> sh) - 8.0));
}
#else
#ifdef W_Q4_1
fn w_run8(rb: u32, k: u32) -> Run8 {
    let b = rb + (k / 32u) * 6u;
    let i = k % 32u;
    let q = b + 2u + (i % 16u) / 4u;
    let sh = 4u * u32(i >= 16u);
    let d = bitcast<f32>(w[b]);
    let m = bitcast<f32>(w[b + 1u]);
    return Run8(d * lo4(w[q] >> sh) + m, d * lo4(w[q + 1u] >> sh) + m);
}
#else
#ifdef W_Q4_K
// Sub-block j = r / 32 (chunk j / 2, nibble j % 2) positions l..l + 7: qs bytes 32 (j / 2) + l..
fn w_run8(rb: u32, k: u32) -> Run8 {
    let sb = rb + (k / 256u) * 36u;
    let r = k % 256u;
    let j = r / 32u;
    let q = sb + 4u + (j / 2u) * 8u + (r % 32u) / 4u;
    let sh = 4u * (j & 1u);
    let dm = unpack2x16float(w[sb]);
    let sm = k4_scale_min(sb, j);
    let a = dm.x * sm.x;
    let c = dm.y * sm.y;
    return Run8(a * bytes4((w[q] >> sh) & 0x0f0f0f0fu) - c, a * bytes4((w[q + 1u] >> sh) & 0x0f0f0f0fu) - c);
}
#else
#ifdef W_Q6_K
// Half h = r / 128, quarter qd = (r % 128) / 32, positions l..l + 7 (one 16-element scale).
fn w_run8(rb: u32, k: u32) -> Run8 {
    let sb = rb + (k / 256u) * 56u;
    let r = k % 256u;
    let h = r / 128u;
    let qd = (r % 128u) / 32u;
    let l = r % 32u;
    let ql = sb + (64u * h + (qd & 1u) * 32u + l) / 4u;
    let qh = sb + 32u + 8u * h + l / 4u;
    let s1 = 4u * (qd / 2u);
    let s2 = 2u * qd;
    let q0 = ((w[ql] >> s1) & 0x0f0f0f0fu) | (((w[qh] >> s2) & 0x03030303u) << 4u);
    let q1 = ((w[ql + 1u] >> s1) & 0x0f0f0f0fu) | (((w[qh + 1u] >> s2) & 0x03030303u) << 4u);
    let d = bitcast<f32>(w[sb + 52u]) * k6_scale(sb, 8u * h + 2u * qd + l / 16u);
    return Run8(d * (bytes4(q0) - 32.0), d * (bytes4(q1) - 32.0));
}
#else
fn w_run8(rb: u32, k: u32) -> Run8 {
    return Run8(vec4<f32>(w_elem(rb, k), w_elem(rb, k + 1u), w_elem(rb, k + 2u), w_elem(rb, k + 3u)),
                vec4<f32>(w_elem(rb, k + 4u), w_elem(rb, k + 5u), w_elem(rb, k + 6u), w_elem(rb, k + 7u)));
}
#endif
#endif
#endif
#endif
#endif
#endif
#endif
#endif

#ifdef W4
#ifdef WITH_DOT
// Sixteen-byte weight loads for the GPU matvec (W4): lane share t of w_quads(k) per row is
// four consecutive words, the includer binding the weight words a second time as
// `w4: array<vec4<u32>>` (rows start on 16-byte boundaries: see w4_serves in kernels/linear.rs).
#ifdef W_F32
fn w_quads(k: u32) -> u32 { return k / 4u; }
fn w_quad_dot(rb: u32, t: u32, xo: u32) -> f32 { return dot(bitcast<vec4<f32>>(w4[rb / 4u + t]), xq(xo + 4u * t)); }
#endif
#ifdef W_F16
fn w_quads(k: u32) -> u32 { return k / 8u; }
fn w_quad_dot(rb: u32, t: u32, xo: u32) -> f32 {
    let q = w4[rb / 4u + t];
    let o = xo + 8u * t;
    return dot(half4(q.xy), xq(o)) + dot(half4(q.zw), xq(o + 4u));
}
#endif
#ifdef W_BF16
fn w_quads(k: u32) -> u32 { return k / 8u; }
fn w_quad_dot(rb: u32, t: u32, xo: u32) -> f32 {
    let q = w4[rb / 4u + t];
    let o = xo + 8u * t;
    return dot(vec4<f32>(bf16_pair(q.x), bf16_pair(q.y)), xq(o)) + dot(vec4<f32>(bf16_pair(q.z), bf16_pair(q.w)), xq(o + 4u));
}
#endif
#ifdef W_Q4_K
// Eight quads per super-block: quad s holds quant words 4s.. of chunk c = s / 2, positions
// 16 (s % 2).. of sub-blocks 2c (low nibbles) and 2c + 1 (high): two runs of 16 elements,
// one pair of scales.
fn w_quads(k: u32) -> u32 { return k / 256u * 8u; }
fn w_quad_dot(rb: u32, t: u32, xo: u32) -> f32 {
    let s = t % 8u;
    let sb = rb + (t / 8u) * 36u;
    let q = w4[(sb + 4u) / 4u + s];
    let c = s / 2u;
    let o_lo = xo + (t / 8u) * 256u + 64u * c + 16u * (s % 2u);
    let o_hi = o_lo + 32u;
    var d_lo = 0.0;
    var d_hi = 0.0;
    var x_lo = 0.0;
    var x_hi = 0.0;
    for (var i = 0u; i < 4u; i++) {
        d_lo += dot4u(q[i] & 0x0f0f0f0fu, o_lo + 4u * i, 0.0);
        d_hi += dot4u((q[i] >> 4u) & 0x0f0f0f0fu, o_hi + 4u * i, 0.0);
        x_lo += xsum4(o_lo + 4u * i);
        x_hi += xsum4(o_hi + 4u * i);
    }
    let dm = unpack2x16float(w[sb]);
    let a = k4_scale_min(sb, 2u * c);
    let b = k4_scale_min(sb, 2u * c + 1u);
    return dm.x * (a.x * d_lo + b.x * d_hi) - dm.y * (a.y * x_lo + b.y * x_hi);
}
#endif
#ifdef W_Q6_K
// Eight quads per super-block over its 32 ql words: quad s (half h = s / 4) holds ql words
// 4s.. and takes the aligned quad of qh words 32 + 8h + 4 (s % 2)..; its elements are two
// runs of 16, 128h + 16 (s % 2) + 32 qd.. for qd = (s % 4) / 2 and qd + 2, one scale each.
fn w_quads(k: u32) -> u32 { return k / 256u * 8u; }
fn w_quad_dot(rb: u32, t: u32, xo: u32) -> f32 {
    let s = t % 8u;
    let sb = rb + (t / 8u) * 56u;
    let h = s / 4u;
    let ql = w4[sb / 4u + s];
    let qh = w4[(sb + 32u + 8u * h + 4u * (s % 2u)) / 4u];
    let qd = (s % 4u) / 2u;
    let o_lo = xo + (t / 8u) * 256u + 128u * h + 16u * (s % 2u) + 32u * qd;
    let o_hi = o_lo + 64u;
    var d_lo = 0.0;
    var d_hi = 0.0;
    for (var i = 0u; i < 4u; i++) {
        let q_lo = (ql[i] & 0x0f0f0f0fu) | (((qh[i] >> (2u * qd)) & 0x03030303u) << 4u);
        let q_hi = ((ql[i] >> 4u) & 0x0f0f0f0fu) | (((qh[i] >> (2u * qd + 4u)) & 0x03030303u) << 4u);
        d_lo += dot4u(q_lo, o_lo + 4u * i, 32.0);
        d_hi += dot4u(q_hi, o_hi + 4u * i, 32.0);
    }
    let sc = 8u * h + s % 2u;
    return bitcast<f32>(w[sb + 52u]) * (k6_scale(sb, sc + 2u * qd) * d_lo + k6_scale(sb, sc + 2u * qd + 4u) * d_hi);
}
#endif
#endif
#endif
