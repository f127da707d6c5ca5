// Token sampling on the GPU; the semantics are documented on kernels::sample::SamplerSettings
// and mirrored by reference::sample::sample.
// Bindings: 2 logits: array<f32> [V]; 3 settings: array<f32> [9] (SamplerSettings::to_f32s);
//           4 history: array<u32> [cap] (window read, then history[c] = id if c < cap);
//           5 out: array<u32> [42] = (id, f32 bits of log_softmax(raw logits)[id]), then
//             settings[8] (<= 20) pairs (id, log-probability bits) of the largest raw logits;
//             when any logit is NaN or infinite: (0xffffffff, how many), and no history write;
//           6 work: array<u32> [2V] scratch: [0, V) f32 bits of the penalized, scaled logits s,
//             [V, 2V) integer weights w = floor(exp(s - max s) * 2^31).
// Params: V, cap, counter c and seed as Dyn words (add, slot, mul).
// Dispatch: one workgroup of 256 threads (no variants).
//
// Thresholds are exact without sorting: f32 values map to order-preserving u32 keys and a
// 32-step bisection over the key bits, each step one counting pass over V, finds the k-th
// largest key (top-k) and the top-p cut. Masses, the top-p target and the draw are integer
// (64-bit as vec2<u32> (lo, hi)) sums of the weights, so they are exact and order-independent;
// the only floats are the scaling, exp() of each logit and the log-probability.
#include "common.wgsl"
#include "philox.wgsl"

struct Params { v: u32, cap: u32, c_add: u32, c_slot: u32, c_mul: u32, s_add: u32, s_slot: u32, s_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> settings: array<f32>;
@group(0) @binding(4) var<storage, read_write> history: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;
@group(0) @binding(6) var<storage, read_write> work: array<u32>;

const WG: u32 = 256u;
const NEG_INF_BITS: u32 = 0xff800000u;

var<workgroup> red_u: array<u32, 256>;
var<workgroup> red_f: array<f32, 256>;
var<workgroup> red64: array<vec2<u32>, 256>;
var<workgroup> pre64: array<vec2<u32>, 256>;
var<workgroup> target64: vec2<u32>;
var<workgroup> chosen: u32;

fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn ge64(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y > b.y || (a.y == b.y && a.x >= b.x);
}

// floor(x * f / 2^32) and whether the dropped low word was nonzero (for a ceiling).
fn mul64_frac(x: vec2<u32>, f: u32) -> vec3<u32> {
    let a = mulhilo(x.x, f);
    let b = mulhilo(x.y, f);
    let lo = b.x + a.y;
    return vec3<u32>(lo, b.y + select(0u, 1u, lo < a.y), a.x);
}

// Order-preserving map f32 -> u32 (-inf < ... < -0 < +0 < ... < +inf).
fn key_of(bits: u32) -> u32 {
    return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

fn bits_of_key(k: u32) -> u32 {
    return select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u);
}

// NaN logits count as -inf so they are never chosen and never poison the sums. The -inf is
// made from a run-time value: a constant expression may not be infinite (Tint, the browser's
// compiler, rejects the folded bitcast; naga accepts it).
fn clean(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    return select(x, bitcast<f32>(NEG_INF_BITS | (b & 0u)), (b & 0x7fffffffu) > 0x7f800000u);
}

fn penalize(x: f32, r: f32, inv_r: f32) -> f32 {
    return select(x * r, x * inv_r, x > 0.0);
}

fn weight(s: f32, m: f32) -> u32 {
    if (bitcast<u32>(s) == NEG_INF_BITS) { return 0u; }
    return u32(ldexp(min(exp(s - m), 1.0), 31));
}

// Workgroup reductions; the leading barrier keeps a new round from overwriting slot 0
// before every thread has read the previous result.
fn reduce_u32(li: u32, v: u32, op: u32) -> u32 {
    workgroupBarrier();
    red_u[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            let a = red_u[li];
            let b = red_u[li + s];
            red_u[li] = select(select(min(a, b), max(a, b), op == 1u), a + b, op == 0u);
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red_u[0]);
}

fn sum_f32(li: u32, v: f32) -> f32 {
    workgroupBarrier();
    red_f[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) { red_f[li] += red_f[li + s]; }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red_f[0]);
}

fn sum64(li: u32, v: vec2<u32>) -> vec2<u32> {
    workgroupBarrier();
    red64[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) { red64[li] = add64(red64[li], red64[li + s]); }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red64[0]);
}

// The largest (hi, lo) pair, compared as one 64-bit number.
fn max64(li: u32, v: vec2<u32>) -> vec2<u32> {
    workgroupBarrier();
    red64[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s && !ge64(red64[li], red64[li + s])) { red64[li] = red64[li + s]; }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red64[0]);
}

fn s_at(i: u32) -> f32 { return bitcast<f32>(work[i]); }

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    let v = p.v;
    let c = dyn_val(p.c_add, p.c_slot, p.c_mul);
    let temp = settings[0];
    let greedy = !(temp > 0.0);
    let scale = select(settings[6], 1.0, greedy);
    let r = settings[4];
    let inv_r = settings[7];

    // Pass 1: s = logits * scale, and the max of the raw logits for the log-probability.
    // Non-finite logits (overflowed activations) are counted and reported instead of a draw.
    var raw_max = 0u;
    var bad = 0u;
    for (var i = li; i < v; i += WG) {
        let x = clean(logits[i]);
        work[i] = bitcast<u32>(x * scale);
        raw_max = max(raw_max, key_of(bitcast<u32>(x)));
        bad += select(0u, 1u, (bitcast<u32>(logits[i]) & 0x7f800000u) == 0x7f800000u);
    }
    let raw_m = bitcast<f32>(bits_of_key(reduce_u32(li, raw_max, 1u)));
    let n_bad = reduce_u32(li, bad, 0u);
    storageBarrier();

    // Repetition penalty: duplicates in the window write identical bits, so each distinct id
    // is penalized once without deduplication.
    let win = u32(max(settings[5], 0.0));
    let hi = min(c, p.cap);
    let lo = c - min(c, win);
    for (var j = lo + li; j < hi; j += WG) {
        let id = history[j];
        if (id < v) { work[id] = bitcast<u32>(penalize(clean(logits[id]), r, inv_r) * scale); }
    }
    storageBarrier();

    // Pass 2: max key of s; the normalizer of the raw logits.
    var kmax = 0u;
    var raw_sum = 0.0;
    for (var i = li; i < v; i += WG) {
        kmax = max(kmax, key_of(work[i]));
        raw_sum += exp(clean(logits[i]) - raw_m);
    }
    kmax = reduce_u32(li, kmax, 1u);
    let log_z = raw_m + log(sum_f32(li, raw_sum));

    if (greedy) {
        var first = 0xffffffffu;
        for (var i = li; i < v; i += WG) {
            if (key_of(work[i]) == kmax) { first = min(first, i); }
        }
        first = reduce_u32(li, first, 2u);
        if (li == 0u) { chosen = first; }
    } else {
        // top-k: the largest key t with count(key >= t) >= k is the k-th largest value.
        let k = u32(max(settings[1], 0.0));
        var tk = 0u;
        if (k > 0u && k < v) {
            for (var b = 0u; b < 32u; b++) {
                let cand = tk | (0x80000000u >> b);
                var n = 0u;
                for (var i = li; i < v; i += WG) { n += select(0u, 1u, key_of(work[i]) >= cand); }
                tk = select(tk, cand, reduce_u32(li, n, 0u) >= k);
            }
        }
        let m = bitcast<f32>(bits_of_key(kmax));
        var mass = vec2<u32>(0u, 0u);
        for (var i = li; i < v; i += WG) {
            let w = weight(s_at(i), m);
            work[v + i] = w;
            if (key_of(work[i]) >= tk) { mass = add64(mass, vec2<u32>(w, 0u)); }
        }
        let mass_k = sum64(li, mass);
        storageBarrier();

        // top-p: the largest cut t whose kept mass still reaches ceil(p * mass_k) (at least 1,
        // so the maximum always survives); p enters as a 32-bit binary fraction.
        let top_p = settings[2];
        var t = tk;
        if (top_p < 1.0) {
            let pf = u32(ldexp(max(top_p, 0.0), 32));
            let q = mul64_frac(mass_k, pf);
            var need = add64(q.xy, vec2<u32>(select(0u, 1u, q.z != 0u), 0u));
            need = select(need, vec2<u32>(1u, 0u), need.x == 0u && need.y == 0u);
            var tp = 0u;
            for (var b = 0u; b < 32u; b++) {
                let cand = tp | (0x80000000u >> b);
                let cut = max(cand, tk);
                var acc = vec2<u32>(0u, 0u);
                for (var i = li; i < v; i += WG) {
                    if (key_of(work[i]) >= cut) { acc = add64(acc, vec2<u32>(work[v + i], 0u)); }
                }
                tp = select(tp, cand, ge64(sum64(li, acc), need));
            }
            t = max(tk, tp);
        }
        // min-p on the integer weights: keep w >= ceil(min_p * 2^31) (the max has w = 2^31).
        let mp = u32(ceil(ldexp(clamp(settings[3], 0.0, 1.0), 31)));

        // The draw: contiguous chunks so that chunk order is index order.
        let chunk = (v + WG - 1u) / WG;
        let start = min(li * chunk, v);
        let end = min(start + chunk, v);
        var part = vec2<u32>(0u, 0u);
        for (var i = start; i < end; i++) {
            let w = work[v + i];
            if (key_of(work[i]) >= t && w >= mp) { part = add64(part, vec2<u32>(w, 0u)); }
        }
        workgroupBarrier();
        pre64[li] = part;
        workgroupBarrier();
        if (li == 0u) {
            var acc = vec2<u32>(0u, 0u);
            for (var j = 0u; j < WG; j++) {
                let x = pre64[j];
                pre64[j] = acc;
                acc = add64(acc, x);
            }
            let seed = dyn_val(p.s_add, p.s_slot, p.s_mul);
            let u = philox4x32_10(vec4<u32>(c, 0u, 1u, 0u), vec2<u32>(seed, 0u)).x;
            target64 = mul64_frac(acc, u).xy;
            chosen = v;
        }
        workgroupBarrier();
        let tg = target64;
        let base = pre64[li];
        if (ge64(tg, base) && !ge64(tg, add64(base, part))) {
            var run = base;
            for (var i = start; i < end; i++) {
                let w = work[v + i];
                if (key_of(work[i]) >= t && w >= mp) {
                    run = add64(run, vec2<u32>(w, 0u));
                    if (!ge64(tg, run)) {
                        chosen = i;
                        break;
                    }
                }
            }
        }
    }
    // The most likely ids for top_logprobs: round r finds the largest (key, -index) below the
    // one of round r - 1, so ties go to the lower index as in the greedy path.
    let top_n = min(u32(max(settings[8], 0.0)), min(v, 20u));
    var prev = vec2<u32>(0xffffffffu, 0xffffffffu);
    for (var r = 0u; r < top_n; r++) {
        var best = vec2<u32>(0u, 0u);
        for (var i = li; i < v; i += WG) {
            let cand = vec2<u32>(~i, key_of(bitcast<u32>(clean(logits[i]))));
            if (!ge64(cand, prev) && ge64(cand, best)) { best = cand; }
        }
        prev = max64(li, best);
        if (li == 0u) {
            let id = ~prev.x;
            out[2u + 2u * r] = id;
            out[3u + 2u * r] = bitcast<u32>(clean(logits[id]) - log_z);
        }
    }

    workgroupBarrier();
    if (li == 0u) {
        if (n_bad > 0u) {
            out[0] = 0xffffffffu;
            out[1] = n_bad;
        } else {
            let id = min(chosen, v - 1u);
            out[0] = id;
            out[1] = bitcast<u32>(clean(logits[id]) - log_z);
            if (c < p.cap) { history[c] = id; }
        }
    }
}
