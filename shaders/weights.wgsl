// Weight access for every weight dtype (packing spec in engine/src/dtype.rs). The includer
// declares `w: array<u32>` (the weight words) and, for w_dot32, `x: array<f32>`.
// One variant define selects the dtype: W_F32, W_F16, W_BF16, W_Q8_0, W_Q4_0, W_Q4_K, W_Q6_K.
//   w_elem(rb, k)      element k of the row starting at word rb
//   w_lane_dot(rb, blk, sub, xo) (Q8_0/Q4_0, WITH_DOT; W_LPB lanes per block) lane sub's share
//                      of block blk's dot with x[xo..xo+32]
//   w_dot32(rb, u, xo) (K-quants, WITH_DOT) dot of elements 32u..32u+32 of the row with x[xo..xo+32]; the block
//                      scale is applied once per 32 (or 16) elements
//   W_PLAIN            defined for f32/f16/bf16 (rows may end in a partial unit of 32)
//   w_word_dot(rb, wi, xo, k) (plain types, WITH_DOT) word wi of the row times its x elements

fn byte_of(word: u32, i: u32) -> u32 { return (word >> (8u * i)) & 0xffu; }
fn sext8(v: u32) -> f32 { return f32(bitcast<i32>(v << 24u) >> 24u); }
#ifdef WITH_DOT
// Sum of the four bytes of `q` (as unsigned), each times x[xo + i], minus `zero` each.
fn dot4u(q: u32, xo: u32, zero: f32) -> f32 {
    return (f32(q & 0xffu) - zero) * x[xo] + (f32((q >> 8u) & 0xffu) - zero) * x[xo + 1u]
         + (f32((q >> 16u) & 0xffu) - zero) * x[xo + 2u] + (f32(q >> 24u) - zero) * x[xo + 3u];
}
#endif

#ifdef W_F32
#define W_PLAIN
fn w_elem(rb: u32, k: u32) -> f32 { return bitcast<f32>(w[rb + k]); }
#ifdef WITH_DOT
// Word wi of the row (one element) times its x.
fn w_word_dot(rb: u32, wi: u32, xo: u32, k: u32) -> f32 { return bitcast<f32>(w[rb + wi]) * x[xo + wi]; }
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
    if (e + 1u < k) { return v.x * x[xo + e] + v.y * x[xo + e + 1u]; }
    return v.x * x[xo + e];
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
    if (e + 1u < k) { return v.x * x[xo + e] + v.y * x[xo + e + 1u]; }
    return v.x * x[xo + e];
}
#endif
#endif

#ifdef W_Q8_0
fn w_elem(rb: u32, k: u32) -> f32 {
    let b = rb + (k / 32u) * 9u;
    let i = k % 32u;
    return bitcast<f32>(w[b]) * sext8(byte_of(w[b + 1u + i / 4u], i % 4u));
}
#ifdef WITH_DOT
// Lanes per block in the matvec: lane `sub` of a block takes its quant word `sub`.
#define W_LPB 8
fn w_lane_dot(rb: u32, blk: u32, sub: u32, xo: u32) -> f32 {
    let b = rb + blk * 9u;
    let q = w[b + 1u + sub];
    let o = xo + 4u * sub;
    let v = vec4<f32>(sext8(q & 0xffu), sext8((q >> 8u) & 0xffu), sext8((q >> 16u) & 0xffu), sext8(q >> 24u));
    return bitcast<f32>(w[b]) * dot(v, vec4<f32>(x[o], x[o + 1u], x[o + 2u], x[o + 3u]));
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

#ifdef W_Q4_K
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
#ifdef WITH_DOT
fn w_dot32(rb: u32, u: u32, xo: u32) -> f32 {
    let sb = rb + (u / 8u) * 36u;
    let j = u % 8u;
    let dm = unpack2x16float(w[sb]);
    let sm = k4_scale_min(sb, j);
    let shift = 4u * (j & 1u);
    var s = 0.0;
    var xs = 0.0;
    for (var i = 0u; i < 8u; i++) {
        let q = (w[sb + 4u + (j / 2u) * 8u + i] >> shift) & 0x0f0f0f0fu;
        let o = xo + 4u * i;
        s += dot4u(q, o, 0.0);
        xs += x[o] + x[o + 1u] + x[o + 2u] + x[o + 3u];
    }
    return dm.x * sm.x * s - dm.y * sm.y * xs;
}
#endif
#endif

#ifdef W_Q6_K
// Words: ql 0..32, qh 32..48, scales (i8) 48..52, d (f32) 52.
fn k6_scale(sb: u32, i: u32) -> f32 { return sext8(byte_of(w[sb + 48u + i / 4u], i % 4u)); }
fn w_elem(rb: u32, k: u32) -> f32 {
    let sb = rb + (k / 256u) * 53u;
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
#ifdef WITH_DOT
fn w_dot32(rb: u32, u: u32, xo: u32) -> f32 {
    let sb = rb + (u / 8u) * 53u;
    let j = u % 8u;
    let h = j / 4u;
    let qd = j % 4u;
    let qlw = sb + (64u * h + (qd & 1u) * 32u) / 4u;
    let qhw = sb + (128u + 32u * h) / 4u;
    let lshift = 4u * (qd / 2u);
    let hshift = 2u * qd;
    var s0 = 0.0;
    var s1 = 0.0;
    for (var i = 0u; i < 8u; i++) {
        let q = ((w[qlw + i] >> lshift) & 0x0f0f0f0fu) | (((w[qhw + i] >> hshift) & 0x03030303u) << 4u);
        let part = dot4u(q, xo + 4u * i, 32.0);
        if (i < 4u) { s0 += part; } else { s1 += part; }
    }
    let sc = 8u * h + 2u * qd;
    return bitcast<f32>(w[sb + 52u]) * (k6_scale(sb, sc) * s0 + k6_scale(sb, sc + 1u) * s1);
}
#endif
#endif
