// Gated DeltaNet (Qwen 3.5's linear-attention layers): the short causal convolution and the
// gated delta rule, each carrying its state per sequence across runs.
//
// Rows: a run of t tokens of one sequence (b = 1, the first `valid` rows real, the rest padding
// that must not touch the state), or one token of each of b sequences (t = 1, per-row sequence
// through graph::Dyn::Rows). Row b's state is that of sequence seq(b).
//
// Variant CONV: y = silu(depthwise causal conv over time) of the first `c` columns of x.
// Bindings: 2 x: array<f32> [b, t, width], 3 w: array<f32> [c, k], 4 state: array<f32>
// [seqs, k - 1, c] (the previous k - 1 inputs, oldest first; updated to the last k - 1 valid
// inputs), 5 y: array<f32> [b, t, c]. One thread per (channel, row); grid over c, y = row.
//
// Variant RECUR: the gated delta rule one token after the other (decode), then the gated
// RMSNorm. Per value head h (query/key head h / (v_heads / k_heads), or h % k_heads where
// `tiled`) and token:
//   q, k l2-normalized (eps 1e-6), q scaled by dk^-1/2; decay = exp(a[h] * softplus(araw + dt[h]));
//   beta = sigmoid(braw); S = S * decay; delta = (v - S^T k) * beta; S += k delta^T; o = S^T q;
//   y = o / sqrt(mean(o^2) + eps) * norm_w * silu(z).
// Bindings: 2 qkv: array<f32> [b, t, 2 kd + vd] (the convolution's output: q | k | v),
// 3 proj: array<f32> [b, t, 2 kd + 2 vd + 2 vh] (the layer's input projection: qkv | z | b | a),
// 4 a: array<f32> [vh] (-exp(A_log)), 5 dt: array<f32> [vh], 6 norm_w: array<f32> [dv],
// 7 state: array<f32> [seqs, vh, dk, dv], 8 y: array<f32> [b, t, vd].
// One workgroup of 64 per (value head, row); a thread per state column (value dim).
//
// Variant CHUNK_PREP / CHUNK_SCAN: the same rule over chunks of CHUNK tokens (prefill), as
// flash-linear-attention and transformers' torch_chunk_gated_delta_rule compute it. PREP (a
// workgroup per (value head, chunk, row); chunks are independent) forms, with G the cumulative
// log decay within the chunk and L[i][j] = beta_i (k_i . k_j) exp(G_i - G_j) (j < i),
// T = (I + L)^-1 and writes to scratch: U = T (beta v), W = T (beta k exp(G)),
// Qe = q exp(G), Kd = k exp(G_last - G), QK[i][j] = (q_i . k_j) exp(G_i - G_j) (j <= i) and
// exp(G_last). SCAN (a workgroup per (value head, row), a thread per state column) walks the
// chunks in order: v' = U - W S; o = Qe S + QK v'; S = exp(G_last) S + Kd^T v'; then the gated
// RMSNorm of every row. Bindings as RECUR, plus 9 scratch: array<f32>.
#include "common.wgsl"

const WG: u32 = 64u;
const CHUNK: u32 = 32u;
// Largest key / value head dimension (kernels::delta::MAX_HEAD_DIM).
const MAX_D: u32 = 256u;

#ifdef CONV
struct Params { c: u32, k: u32, width: u32, t: u32, rows: u32, v_add: u32, v_slot: u32, v_mul: u32, s_add: u32, s_slot: u32, s_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> state: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

// The taps (p.k) as a constant, so that the window's loops unroll into registers.
const KT: u32 = TAPS;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    let b = gid.y;
    if (ch >= p.c || b >= p.rows) { return; }
    let valid = dyn_row(p.v_add, p.v_slot, p.v_mul, b);
    let sbase = dyn_row(p.s_add, p.s_slot, p.s_mul, b) * (KT - 1u) * p.c + ch;
    var wk: array<f32, KT>;
    var win: array<f32, KT>;
    for (var j = 0u; j < KT; j++) { wk[j] = w[ch * KT + j]; }
    for (var j = 0u; j + 1u < KT; j++) { win[j] = state[sbase + j * p.c]; }
    for (var i = 0u; i < p.t; i++) {
        let row = b * p.t + i;
        win[KT - 1u] = x[row * p.width + ch];
        var acc = 0.0;
        for (var j = 0u; j < KT; j++) { acc += wk[j] * win[j]; }
        y[row * p.c + ch] = silu(acc);
        for (var j = 0u; j + 1u < KT; j++) { win[j] = win[j + 1u]; }
        // The state after the last valid input: the k - 1 inputs up to it.
        if (i + 1u == valid) {
            for (var j = 0u; j + 1u < KT; j++) { state[sbase + j * p.c] = win[j]; }
        }
    }
}
#else
struct Params { kh: u32, vh: u32, dk: u32, dv: u32, t: u32, rows: u32, eps: f32, v_add: u32, v_slot: u32, v_mul: u32, s_add: u32, s_slot: u32, s_mul: u32, chunks: u32, tiled: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> proj: array<f32>;
@group(0) @binding(4) var<storage, read> a_neg: array<f32>;
@group(0) @binding(5) var<storage, read> dt: array<f32>;
@group(0) @binding(6) var<storage, read> norm_w: array<f32>;
@group(0) @binding(7) var<storage, read_write> state: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<f32>;
#ifdef CHUNK_PREP
@group(0) @binding(9) var<storage, read_write> scratch: array<f32>;
#endif
#ifdef CHUNK_SCAN
@group(0) @binding(9) var<storage, read_write> scratch: array<f32>;
#endif

var<workgroup> red: array<vec2<f32>, WG>;

// The sums over the workgroup of each thread's two values (every thread gets them). Each
// thread adds the partials in the same order, so all get the same sums; two barriers, not a
// tree's log2(WG) (a barrier is the costly part on a software adapter).
fn wg_sum2(v: vec2<f32>, li: u32) -> vec2<f32> {
    workgroupBarrier();
    red[li] = v;
    workgroupBarrier();
    var s = vec2<f32>(0.0);
    for (var i = 0u; i < WG; i++) { s += red[i]; }
    return s;
}
fn wg_sum(v: f32, li: u32) -> f32 { return wg_sum2(vec2<f32>(v, 0.0), li).x; }

fn qkv_width() -> u32 { return 2u * p.kh * p.dk + p.vh * p.dv; }
fn proj_width() -> u32 { return 2u * p.kh * p.dk + 2u * p.vh * p.dv + 2u * p.vh; }
// Offsets in a qkv row of head h's query, key and value.
// Value head h reads key head h / (vh / kh) (transformers' repeat_interleave), or h % kh where
// the value heads are tiled (llama.cpp's GGUF order).
fn key_head(h: u32) -> u32 { return select(h / (p.vh / p.kh), h % p.kh, p.tiled != 0u); }
fn q_at(row: u32, h: u32) -> u32 { return row * qkv_width() + key_head(h) * p.dk; }
fn k_at(row: u32, h: u32) -> u32 { return q_at(row, h) + p.kh * p.dk; }
fn v_at(row: u32, h: u32) -> u32 { return row * qkv_width() + 2u * p.kh * p.dk + h * p.dv; }
fn z_at(row: u32, h: u32) -> u32 { return row * proj_width() + 2u * p.kh * p.dk + p.vh * p.dv + h * p.dv; }
// The decay's log and beta of head h at a row.
fn log_decay(row: u32, h: u32) -> f32 {
    let xa = proj[row * proj_width() + 2u * p.kh * p.dk + 2u * p.vh * p.dv + p.vh + h] + dt[h];
    // torch's softplus (threshold 20).
    var sp = log(1.0 + exp(xa));
    if (xa > 20.0) { sp = xa; } else if (xa < -15.0) { sp = exp(xa); }
    return a_neg[h] * sp;
}
fn beta_of(row: u32, h: u32) -> f32 {
    let xb = proj[row * proj_width() + 2u * p.kh * p.dk + 2u * p.vh * p.dv + h];
    return 1.0 / (1.0 + exp(-xb));
}
// First element of row b's state of head h: [dk, dv].
fn state_at(b: u32, h: u32) -> u32 {
    return (dyn_row(p.s_add, p.s_slot, p.s_mul, b) * p.vh + h) * p.dk * p.dv;
}

// The gated RMSNorm of value head h at a row whose outputs o (columns li + WG m) this thread holds.
fn gated_norm(row: u32, h: u32, o: array<f32, 4>, li: u32) {
    var ss = 0.0;
    for (var m = 0u; m < 4u; m++) {
        let j = li + WG * m;
        if (j < p.dv) { ss += o[m] * o[m]; }
    }
    let inv = inverseSqrt(wg_sum(ss, li) / f32(p.dv) + p.eps);
    for (var m = 0u; m < 4u; m++) {
        let j = li + WG * m;
        if (j < p.dv) {
            y[row * p.vh * p.dv + h * p.dv + j] = o[m] * inv * norm_w[j] * silu(proj[z_at(row, h) + j]);
        }
    }
}

#ifdef RECUR
// The key head dim (p.dk) as a constant: a state column lives in registers.
const DKC: u32 = DK;
var<workgroup> sq: array<f32, MAX_D>;
var<workgroup> sk: array<f32, MAX_D>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let b = wg.y;
    let valid = dyn_row(p.v_add, p.v_slot, p.v_mul, b);
    let s0 = state_at(b, h);
    for (var i = 0u; i < p.t; i++) {
        let row = b * p.t + i;
        if (i >= valid) {
            // Padding rows: no state update, zeros out.
            for (var j = li; j < p.dv; j += WG) { y[row * p.vh * p.dv + h * p.dv + j] = 0.0; }
            continue;
        }
        var qq = 0.0;
        var kk = 0.0;
        for (var d = li; d < p.dk; d += WG) {
            let qv = qkv[q_at(row, h) + d];
            let kv = qkv[k_at(row, h) + d];
            sq[d] = qv;
            sk[d] = kv;
            qq += qv * qv;
            kk += kv * kv;
        }
        let sums = wg_sum2(vec2<f32>(qq, kk), li);
        let qn = inverseSqrt(sums.x + 1e-6) * inverseSqrt(f32(p.dk));
        let kn = inverseSqrt(sums.y + 1e-6);
        let decay = exp(log_decay(row, h));
        let beta = beta_of(row, h);
        var o: array<f32, 4>;
        for (var m = 0u; m < 4u; m++) {
            let j = li + WG * m;
            if (j >= p.dv) { break; }
            // The column in registers: one read and one write of the state per token.
            var s: array<f32, DKC>;
            var kv = 0.0;
            for (var d = 0u; d < DKC; d++) {
                s[d] = state[s0 + d * p.dv + j];
                kv += s[d] * sk[d];
            }
            let delta = (qkv[v_at(row, h) + j] - decay * kv * kn) * beta;
            var acc = 0.0;
            for (var d = 0u; d < DKC; d++) {
                let sd = s[d] * decay + sk[d] * kn * delta;
                state[s0 + d * p.dv + j] = sd;
                acc += sd * sq[d];
            }
            o[m] = acc * qn;
        }
        gated_norm(row, h, o, li);
    }
}
#endif

// Scratch block of (row b, head h, chunk c): U [CHUNK, dv], W, Qe, Kd [CHUNK, dk] each,
// QK [CHUNK, CHUNK], exp(G_last).
fn block_len() -> u32 { return CHUNK * (p.dv + 3u * p.dk + CHUNK) + 4u; }
fn block_at(b: u32, h: u32, c: u32) -> u32 { return ((b * p.vh + h) * p.chunks + c) * block_len(); }
fn u_off() -> u32 { return 0u; }
fn w_off() -> u32 { return CHUNK * p.dv; }
fn qe_off() -> u32 { return CHUNK * (p.dv + p.dk); }
fn kd_off() -> u32 { return CHUNK * (p.dv + 2u * p.dk); }
fn qk_off() -> u32 { return CHUNK * (p.dv + 3u * p.dk); }
fn glast_off() -> u32 { return CHUNK * (p.dv + 3u * p.dk + CHUNK); }

#ifdef CHUNK_PREP
var<workgroup> lmat: array<f32, 1024>; // L, then T = (I + L)^-1, [CHUNK, CHUNK]
var<workgroup> tmat: array<f32, 1024>;
var<workgroup> gcum: array<f32, CHUNK>;
var<workgroup> betas: array<f32, CHUNK>;
var<workgroup> qinv: array<f32, CHUNK>;
var<workgroup> kinv: array<f32, CHUNK>;
var<workgroup> expg: array<f32, CHUNK>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let c = wg.y;
    let b = wg.z;
    let valid = dyn_row(p.v_add, p.v_slot, p.v_mul, b);
    let first = c * CHUNK;
    let blk = block_at(b, h, c);
    // Per token: norms, beta and the log decay (zero past the valid rows: no update, no decay).
    if (li < CHUNK) {
        let i = first + li;
        var qi = 0.0;
        var ki = 0.0;
        var be = 0.0;
        var gl = 0.0;
        if (i < valid && i < p.t) {
            let row = b * p.t + i;
            var qq = 0.0;
            var kk = 0.0;
            for (var d = 0u; d < p.dk; d++) {
                let qv = qkv[q_at(row, h) + d];
                let kv = qkv[k_at(row, h) + d];
                qq += qv * qv;
                kk += kv * kv;
            }
            qi = inverseSqrt(qq + 1e-6) * inverseSqrt(f32(p.dk));
            ki = inverseSqrt(kk + 1e-6);
            be = beta_of(row, h);
            gl = log_decay(row, h);
        }
        qinv[li] = qi;
        kinv[li] = ki;
        betas[li] = be;
        gcum[li] = gl;
    }
    workgroupBarrier();
    if (li == 0u) {
        for (var i = 1u; i < CHUNK; i++) { gcum[i] += gcum[i - 1u]; }
    }
    workgroupBarrier();
    if (li < CHUNK) { expg[li] = exp(gcum[li]); }
    // L (strictly lower) and QK (lower with the diagonal), over the chunk's normalized q and k.
    for (var e = li; e < CHUNK * CHUNK; e += WG) {
        let i = e / CHUNK;
        let j = e % CHUNK;
        var lv = 0.0;
        var qk = 0.0;
        if (j <= i && kinv[i] != 0.0 && kinv[j] != 0.0) {
            let ri = b * p.t + first + i;
            let rj = b * p.t + first + j;
            var kk = 0.0;
            var qkd = 0.0;
            for (var d = 0u; d < p.dk; d++) {
                let kj = qkv[k_at(rj, h) + d];
                kk += qkv[k_at(ri, h) + d] * kj;
                qkd += qkv[q_at(ri, h) + d] * kj;
            }
            let dec = exp(gcum[i] - gcum[j]);
            if (j < i) { lv = betas[i] * kk * kinv[i] * kinv[j] * dec; }
            qk = qkd * qinv[i] * kinv[j] * dec;
        }
        lmat[e] = lv;
        scratch[blk + qk_off() + e] = qk;
        tmat[e] = select(0.0, 1.0, i == j);
    }
    workgroupBarrier();
    // T = (I + L)^-1 by forward substitution, a row at a time: T[i][j] = -sum_{j<=m<i} L[i][m] T[m][j].
    for (var i = 1u; i < CHUNK; i++) {
        if (li < i) {
            var acc = 0.0;
            for (var m = li; m < i; m++) { acc += lmat[i * CHUNK + m] * tmat[m * CHUNK + li]; }
            tmat[i * CHUNK + li] = -acc;
        }
        workgroupBarrier();
    }
    let glast = gcum[CHUNK - 1u];
    // U = T (beta v): [CHUNK, dv].
    for (var e = li; e < CHUNK * p.dv; e += WG) {
        let i = e / p.dv;
        let col = e % p.dv;
        var acc = 0.0;
        for (var m = 0u; m <= i; m++) {
            if (betas[m] != 0.0) { acc += tmat[i * CHUNK + m] * betas[m] * qkv[v_at(b * p.t + first + m, h) + col]; }
        }
        scratch[blk + u_off() + e] = acc;
    }
    // W = T (beta k exp(G)), Qe = q exp(G), Kd = k exp(G_last - G): [CHUNK, dk] each.
    for (var e = li; e < CHUNK * p.dk; e += WG) {
        let i = e / p.dk;
        let d = e % p.dk;
        var acc = 0.0;
        for (var m = 0u; m <= i; m++) {
            if (betas[m] != 0.0) {
                acc += tmat[i * CHUNK + m] * betas[m] * qkv[k_at(b * p.t + first + m, h) + d] * kinv[m] * expg[m];
            }
        }
        scratch[blk + w_off() + e] = acc;
        var qe = 0.0;
        var kd = 0.0;
        if (kinv[i] != 0.0) {
            let ri = b * p.t + first + i;
            qe = qkv[q_at(ri, h) + d] * qinv[i] * expg[i];
            kd = qkv[k_at(ri, h) + d] * kinv[i] * exp(glast - gcum[i]);
        }
        scratch[blk + qe_off() + e] = qe;
        scratch[blk + kd_off() + e] = kd;
    }
    if (li == 0u) { scratch[blk + glast_off()] = exp(glast); }
}
#endif

#ifdef CHUNK_SCAN
// The key head dim (p.dk) as a constant: a state column lives in registers.
const DKC: u32 = DK;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let b = wg.y;
    let valid = dyn_row(p.v_add, p.v_slot, p.v_mul, b);
    let s0 = state_at(b, h);
    let hv = p.vh * p.dv;
    // Each thread owns state columns j: one at a time, in registers through every chunk.
    for (var j = li; j < p.dv; j += WG) {
        var s: array<f32, DKC>;
        for (var d = 0u; d < DKC; d++) { s[d] = state[s0 + d * p.dv + j]; }
        for (var c = 0u; c < p.chunks; c++) {
            let blk = block_at(b, h, c);
            let first = c * CHUNK;
            let n = min(CHUNK, p.t - first);
            let gl = scratch[blk + glast_off()];
            // v' = U - W S, in place of U.
            for (var i = 0u; i < CHUNK; i++) {
                var ws = 0.0;
                for (var d = 0u; d < DKC; d++) { ws += scratch[blk + w_off() + i * DKC + d] * s[d]; }
                scratch[blk + u_off() + i * p.dv + j] -= ws;
            }
            // o = Qe S + QK v' (before the norm), into y.
            for (var i = 0u; i < n; i++) {
                var acc = 0.0;
                for (var d = 0u; d < DKC; d++) { acc += scratch[blk + qe_off() + i * DKC + d] * s[d]; }
                for (var m = 0u; m <= i; m++) { acc += scratch[blk + qk_off() + i * CHUNK + m] * scratch[blk + u_off() + m * p.dv + j]; }
                y[(b * p.t + first + i) * hv + h * p.dv + j] = acc;
            }
            // S = exp(G_last) S + Kd^T v'.
            for (var d = 0u; d < DKC; d++) {
                var acc = s[d] * gl;
                for (var i = 0u; i < CHUNK; i++) { acc += scratch[blk + kd_off() + i * DKC + d] * scratch[blk + u_off() + i * p.dv + j]; }
                s[d] = acc;
            }
        }
        for (var d = 0u; d < DKC; d++) { state[s0 + d * p.dv + j] = s[d]; }
    }
    // The gated RMSNorm of every row (padding rows: zeros).
    for (var i = 0u; i < p.t; i++) {
        let row = b * p.t + i;
        var o: array<f32, 4>;
        for (var m = 0u; m < 4u; m++) {
            let j = li + WG * m;
            if (j < p.dv) { o[m] = select(0.0, y[row * hv + h * p.dv + j], i < valid); }
        }
        gated_norm(row, h, o, li);
    }
}
#endif
#endif
