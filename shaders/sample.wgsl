// Token sampling on the GPU; the semantics are documented on kernels::sample::SamplerSettings
// and mirrored by reference::sample::sample.
// Bindings: 2 logits: array<f32> [V]; 3 settings: array<f32> [11] (SamplerSettings::to_f32s);
//           4 history: array<u32>, this sequence's [cap] ids from index hist_base(row) (window
//             read, then history[base + c] = id if c < cap);
//           5 out: array<u32> [42] = (id, f32 bits of log_softmax(raw logits)[id]), then
//             settings[row * SETTINGS_N + 8] (<= 20) pairs (id, log-probability bits) of the largest raw logits;
//             when any logit is NaN or infinite: (0xffffffff, how many), and no history write;
//           6 work: array<u32> scratch: [0, V) f32 bits of the penalized, scaled logits s,
//             [V, 2V) integer weights w = floor(exp(s - max s) * 2^31), then per-chunk
//             statistics (PART), per-chunk top_logprobs candidates (TOPS) and the state the
//             selection passes hand on (STATE);
//           7 hist: array<atomic<u32>> [8 * 512] digit histograms of the selections; all zero
//             between runs (the finish pass clears them; wgpu zeroes new buffers);
//           8 constraint: array<u32> [ceil(V / 32) + 2 * MAX_BIAS]: the allowed-id bitmask (bit
//             i % 32 of word i / 32; read when settings[row * SETTINGS_N + 9] != 0), then settings[row * SETTINGS_N + 10] (id, f32 bits
//             of a bias) pairs sorted by id (kernels::sample::constraint_words).
// Params: V, cap, counter c and seed as Dyn words (add, slot, mul); G chunks of `chunk` ids;
//         `round` of a selection pass.
//
// Dispatches (kernels::sample::Sample::encode), in order; each of G workgroups works on one
// contiguous chunk of the vocabulary. A pass with nothing to do (greedy decoding, top-k or
// top-p off) returns at once, and on GPUs is not even launched: prep writes the selection
// passes' workgroup counts (binding 9, `args`), which their indirect dispatches read, zero for
// those with nothing to do:
//   prep          s with the repetition penalty; per chunk: the max key of s and its first
//                 index, max and sum of exp of the raw logits, the non-finite count, the
//                 top_logprobs candidates; the top-k digit histogram, round 0
//   kround 1..3   resolve the previous top-k round; histogram of the next digit
//   weights       resolve top-k (tk); weights w; top-p mass histogram, round 0
//   pround 1..3   resolve the previous top-p round; histogram of the next digit
//   kept          resolve top-p (t); each chunk's kept weight
//   finish        one workgroup: merges the chunks (log Z, the greedy argmax, the draw in
//                 index order, top_logprobs), writes out and history, clears hist
//
// Thresholds are exact without sorting: f32 values map to order-preserving u32 keys, and a
// radix select (four 8-bit digits, most significant first) finds the largest key t with
// count(key >= t) >= k (the k-th largest: top-k) or mass(key >= t) >= need (the top-p cut).
// Every workgroup of a pass resolves the previous round from the global histogram itself (the
// same 256 bins, so the same answer) and workgroup 0 records it for the passes after. Masses,
// the top-p target and the draw are integer (64-bit as vec2<u32> (lo, hi)) sums of the weights,
// so they are exact and order-independent; the only floats are the scaling, exp() of each
// logit and the log-probability.
#include "common.wgsl"
#include "philox.wgsl"

struct Params {
    v: u32, cap: u32, c_add: u32, c_slot: u32, c_mul: u32, s_add: u32, s_slot: u32, s_mul: u32,
    groups: u32, chunk: u32, round: u32, h_add: u32, h_slot: u32, h_mul: u32, row: u32, cw: u32,
}
@group(0) @binding(0) var<uniform> p: Params;

// Rows: one sampler per row of logits (a batch of decoding sequences), each with its own
// settings, constraint, output, scratch and history part; counter, seed and history start may
// be per row (graph::Dyn::Rows). GPU passes run once per row (p.row); `single` takes row =
// workgroup. The row goes to every function that indexes by it as a parameter (so that the
// uniformity analysis sees settings read at a uniform index: branches on them may precede
// barriers). ONE_ROW (one sampler) makes it the constant 0, and the code what it was before
// rows (llvmpipe: 0.5 ms a draw instead of 0.87).
fn row_of(r: u32) -> u32 {
#ifdef ONE_ROW
    return 0u;
#else
    return r;
#endif
}
const SETTINGS_N: u32 = 11u;
const OUT_N: u32 = 42u;
// Where this sequence's ids start in the history (several sequences may share one buffer).
fn hist_base(row: u32) -> u32 { return dyn_row(p.h_add, p.h_slot, p.h_mul, row); }
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> settings: array<f32>;
@group(0) @binding(4) var<storage, read_write> history: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;
// A row's scratch is work[row]: WW words (set by the encoder). (Written as one flat array at a
// run-time row offset, this shader made llvmpipe (Mesa 22.3) leak ~1.5 MB a dispatch.)
@group(0) @binding(6) var<storage, read_write> work: array<array<u32, WW>>;
@group(0) @binding(7) var<storage, read_write> hist: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read> constraint: array<u32>;

const WG: u32 = 256u;
const NEG_INF_BITS: u32 = 0xff800000u;
// Words of one chunk's statistics: max key of s, its first index, max key of the raw logits,
// f32 bits of sum(exp(raw - that max)), non-finite count, kept weight (lo, hi).
const PART_W: u32 = 8u;
// Words of one chunk's top_logprobs candidates: 20 (lo = ~index, hi = key) pairs.
const TOPS_W: u32 = 40u;
// STATE slots (4 words: prefix, need lo, need hi): r = the top-k select before round r
// (1..3), TK, 4 + r = the top-p select before round r (5..7), T.
const TK: u32 = 4u;
const T_CUT: u32 = 8u;
// hist: round q's 256 bins at q * 512 (counts: one word a bin; masses: (lo, hi) pairs);
// q = r for the top-k rounds, 4 + r for the top-p rounds.
const HIST_WORDS: u32 = 4096u;

var<workgroup> red_u: array<u32, 256>;
var<workgroup> red_f: array<f32, 256>;
var<workgroup> red64: array<vec2<u32>, 256>;
var<workgroup> h_lo: array<atomic<u32>, 256>;
var<workgroup> h_hi: array<atomic<u32>, 256>;
var<workgroup> pick: vec4<u32>;
var<workgroup> chosen: u32;

fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn sub64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x - b.x, a.y - b.y - select(0u, 1u, a.x < b.x));
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

fn is_neg_inf(x: f32) -> bool { return bitcast<u32>(x) == NEG_INF_BITS; }

// Whether the constraint's bitmask allows id i (every id when there is none).
fn allowed(i: u32, row: u32) -> bool {
    if (settings[row * SETTINGS_N + 9] == 0.0) { return true; }
    return ((constraint[row * p.cw + (i >> 5u)] >> (i & 31u)) & 1u) != 0u;
}

// The logit bias of id i: a binary search of the sorted (id, bias) pairs.
fn bias_of(i: u32, row: u32) -> f32 {
    let base = (p.v + 31u) / 32u;
    var lo = 0u;
    var hi = u32(max(settings[row * SETTINGS_N + 10], 0.0));
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        let id = constraint[row * p.cw + base + 2u * mid];
        if (id == i) { return bitcast<f32>(constraint[row * p.cw + base + 2u * mid + 1u]); }
        if (id < i) { lo = mid + 1u; } else { hi = mid; }
    }
    return 0.0;
}

// The sampling logit of id i from its (biased, penalized) logit x: scaled, or -inf where the
// constraint forbids i.
fn sampled(i: u32, x: f32, scale: f32, row: u32) -> f32 {
    return select(bitcast<f32>(NEG_INF_BITS | (bitcast<u32>(x) & 0u)), x * scale, allowed(i, row));
}

fn penalize(x: f32, r: f32, inv_r: f32) -> f32 {
    return select(x * r, x * inv_r, x > 0.0);
}

fn weight(s: f32, m: f32) -> u32 {
    if (is_neg_inf(s)) { return 0u; }
    return u32(ldexp(min(exp(s - m), 1.0), 31));
}

// Workgroup reductions; the leading barrier keeps a new round from overwriting slot 0
// before every thread has read the previous result.
#ifdef HAS_SUBGROUPS
// With subgroups: each subgroup reduces in registers, and its first active invocation
// (subgroupBroadcastFirst(li) == li) folds the subgroup's result into a workgroup atomic — no
// assumption about which invocations share a subgroup, four barriers instead of ten. Integer
// results, so the same as the trees below bit for bit.
var<workgroup> red_at: array<atomic<u32>, 4>;

fn first_of_subgroup(li: u32) -> bool { return subgroupBroadcastFirst(li) == li; }

// u32 sum (op 0), max (1) or min (2).
fn reduce_u32(li: u32, v: u32, op: u32) -> u32 {
    let s = select(select(subgroupMin(v), subgroupMax(v), op == 1u), subgroupAdd(v), op == 0u);
    workgroupBarrier();
    if (li == 0u) { atomicStore(&red_at[0], select(select(0xffffffffu, 0u, op == 1u), 0u, op == 0u)); }
    workgroupBarrier();
    if (first_of_subgroup(li)) {
        if (op == 0u) {
            atomicAdd(&red_at[0], s);
        } else if (op == 1u) {
            atomicMax(&red_at[0], s);
        } else {
            atomicMin(&red_at[0], s);
        }
    }
    workgroupBarrier();
    if (li == 0u) { red_u[0] = atomicLoad(&red_at[0]); }
    return workgroupUniformLoad(&red_u[0]);
}

// 64-bit sums in 16-bit limbs: a subgroup's limb sums stay under 2^23 and the workgroup's
// under 2^24, so no carry is lost; the limbs are recombined once.
fn sum64(li: u32, v: vec2<u32>) -> vec2<u32> {
    let s = subgroupAdd(vec4<u32>(v.x & 0xffffu, v.x >> 16u, v.y & 0xffffu, v.y >> 16u));
    workgroupBarrier();
    if (li < 4u) { atomicStore(&red_at[li], 0u); }
    workgroupBarrier();
    if (first_of_subgroup(li)) {
        atomicAdd(&red_at[0], s.x);
        atomicAdd(&red_at[1], s.y);
        atomicAdd(&red_at[2], s.z);
        atomicAdd(&red_at[3], s.w);
    }
    workgroupBarrier();
    if (li == 0u) {
        let a1 = atomicLoad(&red_at[1]);
        let lo = add64(vec2<u32>(atomicLoad(&red_at[0]), 0u), vec2<u32>(a1 << 16u, a1 >> 16u));
        red64[0] = add64(lo, vec2<u32>(0u, atomicLoad(&red_at[2]) + (atomicLoad(&red_at[3]) << 16u)));
    }
    return workgroupUniformLoad(&red64[0]);
}

// The largest (hi, lo) pair, compared as one 64-bit number: the largest hi, then the largest
// lo among the pairs with that hi.
fn max64(li: u32, v: vec2<u32>) -> vec2<u32> {
    let hi = subgroupMax(v.y);
    let lo = subgroupMax(select(0u, v.x, v.y == hi));
    workgroupBarrier();
    if (li < 2u) { atomicStore(&red_at[li], 0u); }
    workgroupBarrier();
    if (first_of_subgroup(li)) { atomicMax(&red_at[0], hi); }
    workgroupBarrier();
    let top = atomicLoad(&red_at[0]);
    if (first_of_subgroup(li) && hi == top) { atomicMax(&red_at[1], lo); }
    workgroupBarrier();
    if (li == 0u) { red64[0] = vec2<u32>(atomicLoad(&red_at[1]), top); }
    return workgroupUniformLoad(&red64[0]);
}
#else
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

#endif

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

// Inclusive prefix sum over the invocations (Hillis-Steele); afterwards red64[255] is the total.
fn scan64(li: u32, v: vec2<u32>) -> vec2<u32> {
    workgroupBarrier();
    red64[li] = v;
    workgroupBarrier();
    var acc = v;
    for (var s = 1u; s < WG; s <<= 1u) {
        if (li >= s) { acc = add64(acc, red64[li - s]); }
        workgroupBarrier();
        red64[li] = acc;
        workgroupBarrier();
    }
    return acc;
}

// Bin b of round q as a 64-bit number.
fn bin(q: u32, b: u32, mass: bool, row: u32) -> vec2<u32> {
    let at = q * 512u;
    if (mass) { return vec2<u32>(atomicLoad(&hist[row * HIST_WORDS + at + 2u * b]), atomicLoad(&hist[row * HIST_WORDS + at + 2u * b + 1u])); }
    return vec2<u32>(atomicLoad(&hist[row * HIST_WORDS + at + b]), 0u);
}

// The total of round q's histogram.
fn hist_total(li: u32, q: u32, mass: bool, row: u32) -> vec2<u32> {
    scan64(li, bin(q, li, mass, row));
    return workgroupUniformLoad(&red64[255]);
}

// One radix step: the digit of round q holding the `need`-th unit counted from the top, and
// the need left inside that digit's bin: (digit, need lo, need hi).
fn resolve(li: u32, q: u32, mass: bool, need: vec2<u32>, row: u32) -> vec3<u32> {
    let d = 255u - li;
    let val = bin(q, d, mass, row);
    let incl = scan64(li, val);
    let excl = sub64(incl, val);
    if (!ge64(excl, need) && ge64(incl, need)) { pick = vec4<u32>(d, sub64(need, excl), 0u); }
    return workgroupUniformLoad(&pick).xyz;
}

fn state(slot: u32, row: u32) -> vec3<u32> {
    let at = 2u * p.v + p.groups * (PART_W + TOPS_W) + 4u * slot;
    return vec3<u32>(work[row][at], work[row][at + 1u], work[row][at + 2u]);
}

fn set_state(slot: u32, s: vec3<u32>, g: u32, li: u32, row: u32) {
    if (g == 0u && li == 0u) {
        let at = 2u * p.v + p.groups * (PART_W + TOPS_W) + 4u * slot;
        work[row][at] = s.x;
        work[row][at + 1u] = s.y;
        work[row][at + 2u] = s.z;
    }
}

fn part_at(g: u32) -> u32 { return 2u * p.v + g * PART_W; }
fn tops_at(g: u32) -> u32 { return 2u * p.v + p.groups * PART_W + g * TOPS_W; }

// The state after resolving round r - 1 of a select whose state before it is `prev`.
fn advance(li: u32, q: u32, mass: bool, r: u32, prev: vec3<u32>, row: u32) -> vec3<u32> {
    let got = resolve(li, q, mass, prev.yz, row);
    return vec3<u32>(prev.x | (got.x << (32u - 8u * r)), got.yz);
}

// Workgroup digit histogram, added into hist round q.
fn local_clear(li: u32) {
    atomicStore(&h_lo[li], 0u);
    atomicStore(&h_hi[li], 0u);
    workgroupBarrier();
}

fn local_add(b: u32, w: u32) {
    let old = atomicAdd(&h_lo[b], w);
    if (old + w < old) { atomicAdd(&h_hi[b], 1u); }
}

fn local_flush(li: u32, q: u32, mass: bool, row: u32) {
    workgroupBarrier();
    let lo = atomicLoad(&h_lo[li]);
    let hi = atomicLoad(&h_hi[li]);
    let at = q * 512u;
    if (mass) {
        if ((lo | hi) != 0u) {
            let old = atomicAdd(&hist[row * HIST_WORDS + at + 2u * li], lo);
            atomicAdd(&hist[row * HIST_WORDS + at + 2u * li + 1u], hi + select(0u, 1u, old + lo < old));
        }
    } else if (lo != 0u) {
        atomicAdd(&hist[row * HIST_WORDS + at + li], lo);
    }
}

struct Chunk { start: u32, end: u32 }
fn chunk_of(g: u32) -> Chunk {
    let start = min(g * p.chunk, p.v);
    return Chunk(start, min(start + p.chunk, p.v));
}

fn is_greedy(row: u32) -> bool { return !(settings[row * SETTINGS_N + 0] > 0.0); }
fn top_k(row: u32) -> u32 { return u32(max(settings[row * SETTINGS_N + 1], 0.0)); }
fn top_k_on(row: u32) -> bool { let k = top_k(row); return k > 0u && k < p.v; }
fn top_p_on(row: u32) -> bool { return settings[row * SETTINGS_N + 2] < 1.0; }

// The mask of the digits above round r's (r = 1..3).
fn high_mask(r: u32) -> u32 { return 0xffffffffu << (32u - 8u * r); }

fn prep_pass(li: u32, g: u32, row: u32) {
    let ch = chunk_of(g);
    let c = dyn_row(p.c_add, p.c_slot, p.c_mul, row);
    let greedy = is_greedy(row);
    let scale = select(settings[row * SETTINGS_N + 6], 1.0, greedy);
    let r = settings[row * SETTINGS_N + 4];
    let inv_r = settings[row * SETTINGS_N + 7];

    // s = logits * scale; non-finite logits (overflowed activations) are counted and
    // reported instead of a draw.
    var raw_max = 0u;
    var bad = 0u;
    for (var i = ch.start + li; i < ch.end; i += WG) {
        let x = clean(logits[row * p.v + i]);
        work[row][i] = bitcast<u32>(sampled(i, x, scale, row));
        raw_max = max(raw_max, key_of(bitcast<u32>(x)));
        bad += select(0u, 1u, (bitcast<u32>(logits[row * p.v + i]) & 0x7f800000u) == 0x7f800000u);
    }
    let rm = reduce_u32(li, raw_max, 1u);
    let m = bitcast<f32>(bits_of_key(rm));
    let n_bad = reduce_u32(li, bad, 0u);
    storageBarrier();
    // Logit bias on this chunk's ids, then the repetition penalty on the biased logits:
    // duplicates in the window write identical bits, so each distinct id is penalized once
    // without deduplication.
    let n_bias = u32(max(settings[row * SETTINGS_N + 10], 0.0));
    let base = (p.v + 31u) / 32u;
    for (var j = li; j < n_bias; j += WG) {
        let id = constraint[row * p.cw + base + 2u * j];
        if (id >= ch.start && id < ch.end) {
            let x = clean(logits[row * p.v + id]) + bitcast<f32>(constraint[row * p.cw + base + 2u * j + 1u]);
            work[row][id] = bitcast<u32>(sampled(id, x, scale, row));
        }
    }
    storageBarrier();
    let win = u32(max(settings[row * SETTINGS_N + 5], 0.0));
    let hi = min(c, p.cap);
    let lo = c - min(c, win);
    for (var j = lo + li; j < hi; j += WG) {
        let id = history[hist_base(row) + j];
        if (id >= ch.start && id < ch.end) {
            let x = clean(logits[row * p.v + id]) + select(0.0, bias_of(id, row), n_bias > 0u);
            work[row][id] = bitcast<u32>(sampled(id, penalize(x, r, inv_r), scale, row));
        }
    }
    storageBarrier();

    // The max key of s with its first index, as one 64-bit (key, ~index); the normalizer of
    // the raw logits.
    var best = vec2<u32>(0u, 0u);
    var raw_sum = 0.0;
    for (var i = ch.start + li; i < ch.end; i += WG) {
        let cand = vec2<u32>(~i, key_of(work[row][i]));
        if (!ge64(best, cand)) { best = cand; }
        let x = clean(logits[row * p.v + i]);
        raw_sum += select(exp(x - m), 0.0, is_neg_inf(x));
    }
    best = max64(li, best);
    raw_sum = sum_f32(li, raw_sum);
    if (li == 0u) {
        let at = part_at(g);
        work[row][at] = best.y;
        work[row][at + 1u] = ~best.x;
        work[row][at + 2u] = rm;
        work[row][at + 3u] = bitcast<u32>(raw_sum);
        work[row][at + 4u] = n_bad;
    }

    // This chunk's top_logprobs candidates: round n finds the largest (key, ~index) below
    // the one of round n - 1.
    let top_n = min(u32(max(settings[row * SETTINGS_N + 8], 0.0)), min(p.v, 20u));
    var prev = vec2<u32>(0xffffffffu, 0xffffffffu);
    for (var n = 0u; n < top_n; n++) {
        var cand_best = vec2<u32>(0u, 0u);
        for (var i = ch.start + li; i < ch.end; i += WG) {
            let cand = vec2<u32>(~i, key_of(bitcast<u32>(clean(logits[row * p.v + i]))));
            if (!ge64(cand, prev) && ge64(cand, cand_best)) { cand_best = cand; }
        }
        prev = max64(li, cand_best);
        if (li == 0u) {
            work[row][tops_at(g) + 2u * n] = prev.x;
            work[row][tops_at(g) + 2u * n + 1u] = prev.y;
        }
    }

    // Round 0 of the top-k select: the top digit of every key.
    if (!greedy && top_k_on(row)) {
        local_clear(li);
        for (var i = ch.start + li; i < ch.end; i += WG) { local_add(key_of(work[row][i]) >> 24u, 1u); }
        local_flush(li, 0u, false, row);
    }
}

fn kround_pass(li: u32, g: u32, r: u32, row: u32) {
    if (is_greedy(row) || !top_k_on(row)) { return; }
    let ch = chunk_of(g);
    let prev = select(state(r - 1u, row), vec3<u32>(0u, top_k(row), 0u), r == 1u);
    let st = advance(li, r - 1u, false, r, prev, row);
    set_state(r, st, g, li, row);
    let mask = high_mask(r);
    let shift = 24u - 8u * r;
    local_clear(li);
    for (var i = ch.start + li; i < ch.end; i += WG) {
        let key = key_of(work[row][i]);
        if ((key & mask) == st.x) { local_add((key >> shift) & 255u, 1u); }
    }
    local_flush(li, r, false, row);
}

// The max s of all chunks (its key).
fn max_key(li: u32, row: u32) -> u32 {
    var k = 0u;
    for (var g = li; g < p.groups; g += WG) { k = max(k, work[row][part_at(g)]); }
    return reduce_u32(li, k, 1u);
}

fn weights_pass(li: u32, g: u32, row: u32) {
    if (is_greedy(row)) { return; }
    let ch = chunk_of(g);
    let m = bitcast<f32>(bits_of_key(max_key(li, row)));
    var tk = 0u;
    if (top_k_on(row)) { tk = advance(li, 3u, false, 4u, state(3u, row), row).x; }
    set_state(TK, vec3<u32>(tk, 0u, 0u), g, li, row);
    let mass = top_p_on(row);
    if (mass) { local_clear(li); }
    for (var i = ch.start + li; i < ch.end; i += WG) {
        let key = key_of(work[row][i]);
        let w = weight(bitcast<f32>(work[row][i]), m);
        work[row][p.v + i] = w;
        if (mass && key >= tk) { local_add(key >> 24u, w); }
    }
    if (mass) { local_flush(li, 4u, true, row); }
}

fn pround_pass(li: u32, g: u32, r: u32, row: u32) {
    if (is_greedy(row) || !top_p_on(row)) { return; }
    let ch = chunk_of(g);
    let tk = state(TK, row).x;
    var prev: vec3<u32>;
    if (r == 1u) {
        // The target: ceil(P * mass_k / 2^32), at least 1 (so the maximum always survives);
        // p enters as a 32-bit binary fraction.
        let pf = u32(ldexp(max(settings[row * SETTINGS_N + 2], 0.0), 32));
        let q = mul64_frac(hist_total(li, 4u, true, row), pf);
        var need = add64(q.xy, vec2<u32>(select(0u, 1u, q.z != 0u), 0u));
        need = select(need, vec2<u32>(1u, 0u), need.x == 0u && need.y == 0u);
        prev = vec3<u32>(0u, need);
    } else {
        prev = state(4u + r - 1u, row);
    }
    let st = advance(li, 4u + r - 1u, true, r, prev, row);
    set_state(4u + r, st, g, li, row);
    let mask = high_mask(r);
    let shift = 24u - 8u * r;
    local_clear(li);
    for (var i = ch.start + li; i < ch.end; i += WG) {
        let key = key_of(work[row][i]);
        if (key >= tk && (key & mask) == st.x) { local_add((key >> shift) & 255u, work[row][p.v + i]); }
    }
    local_flush(li, 4u + r, true, row);
}

// Min-p on the integer weights: keep w >= ceil(min_p * 2^31) (the max has w = 2^31).
fn min_p_weight(row: u32) -> u32 { return u32(ceil(ldexp(clamp(settings[row * SETTINGS_N + 3], 0.0, 1.0), 31))); }

fn kept_pass(li: u32, g: u32, row: u32) {
    if (is_greedy(row)) { return; }
    let ch = chunk_of(g);
    // The top-p cut is the largest key whose kept mass reaches the target; it is never
    // below tk (the select only counts keys >= tk).
    var t = state(TK, row).x;
    if (top_p_on(row)) { t = advance(li, 7u, true, 4u, state(7u, row), row).x; }
    set_state(T_CUT, vec3<u32>(t, 0u, 0u), g, li, row);
    let mp = min_p_weight(row);
    var mass = vec2<u32>(0u, 0u);
    for (var i = ch.start + li; i < ch.end; i += WG) {
        let w = work[row][p.v + i];
        if (key_of(work[row][i]) >= t && w >= mp) { mass = add64(mass, vec2<u32>(w, 0u)); }
    }
    mass = sum64(li, mass);
    if (li == 0u) {
        work[row][part_at(g) + 5u] = mass.x;
        work[row][part_at(g) + 6u] = mass.y;
    }
}

fn finish_pass(li: u32, row: u32) {
    let v = p.v;
    let c = dyn_row(p.c_add, p.c_slot, p.c_mul, row);
    let ng = p.groups;

    // Merge the chunks: the argmax of s (lowest index on ties), log Z of the raw logits.
    var best = vec2<u32>(0u, 0u);
    var rmax = 0u;
    var bad = 0u;
    for (var g = li; g < ng; g += WG) {
        let at = part_at(g);
        let cand = vec2<u32>(~work[row][at + 1u], work[row][at]);
        if (!ge64(best, cand)) { best = cand; }
        rmax = max(rmax, work[row][at + 2u]);
        bad += work[row][at + 4u];
    }
    best = max64(li, best);
    rmax = reduce_u32(li, rmax, 1u);
    let n_bad = reduce_u32(li, bad, 0u);
    let raw_m = bitcast<f32>(bits_of_key(rmax));
    var raw_sum = 0.0;
    for (var g = li; g < ng; g += WG) {
        let at = part_at(g);
        let mg = bitcast<f32>(bits_of_key(work[row][at + 2u]));
        raw_sum += select(bitcast<f32>(work[row][at + 3u]) * exp(mg - raw_m), 0.0, is_neg_inf(mg));
    }
    let log_z = raw_m + log(sum_f32(li, raw_sum));

    if (is_greedy(row)) {
        if (li == 0u) { chosen = ~best.x; }
    } else {
        let t = state(T_CUT, row).x;
        let mp = min_p_weight(row);
        // The draw: the chunk holding the target in index order, then the thread's run in it.
        var kept_g = vec2<u32>(0u, 0u);
        if (li < ng) { kept_g = vec2<u32>(work[row][part_at(li) + 5u], work[row][part_at(li) + 6u]); }
        let incl = scan64(li, kept_g);
        let total = workgroupUniformLoad(&red64[255]);
        let seed = dyn_row(p.s_add, p.s_slot, p.s_mul, row);
        let u = philox4x32_10(vec4<u32>(c, 0u, 1u, 0u), vec2<u32>(seed, 0u)).x;
        let tg = mul64_frac(total, u).xy;
        let excl = sub64(incl, kept_g);
        if (li < ng && ge64(tg, excl) && !ge64(tg, incl)) { pick = vec4<u32>(li, sub64(tg, excl), 0u); }
        let sel = workgroupUniformLoad(&pick).xyz;
        let ch = chunk_of(sel.x);
        let local_tg = sel.yz;
        let sub = (ch.end - ch.start + WG - 1u) / WG;
        let start = min(ch.start + li * sub, ch.end);
        let end = min(start + sub, ch.end);
        var part = vec2<u32>(0u, 0u);
        for (var i = start; i < end; i++) {
            let w = work[row][v + i];
            if (key_of(work[row][i]) >= t && w >= mp) { part = add64(part, vec2<u32>(w, 0u)); }
        }
        if (li == 0u) { chosen = v; }
        let base = sub64(scan64(li, part), part);
        if (ge64(local_tg, base) && !ge64(local_tg, add64(base, part))) {
            var run = base;
            for (var i = start; i < end; i++) {
                let w = work[row][v + i];
                if (key_of(work[row][i]) >= t && w >= mp) {
                    run = add64(run, vec2<u32>(w, 0u));
                    if (!ge64(local_tg, run)) {
                        chosen = i;
                        break;
                    }
                }
            }
        }
    }

    // The most likely ids for top_logprobs, from the chunks' candidates: round n finds the
    // largest (key, ~index) below the one of round n - 1, so ties go to the lower index as in
    // the greedy path.
    let top_n = min(u32(max(settings[row * SETTINGS_N + 8], 0.0)), min(v, 20u));
    var prev = vec2<u32>(0xffffffffu, 0xffffffffu);
    for (var n = 0u; n < top_n; n++) {
        var cand_best = vec2<u32>(0u, 0u);
        for (var e = li; e < ng * top_n; e += WG) {
            let at = tops_at(e / top_n) + 2u * (e % top_n);
            let cand = vec2<u32>(work[row][at], work[row][at + 1u]);
            if (!ge64(cand, prev) && ge64(cand, cand_best)) { cand_best = cand; }
        }
        prev = max64(li, cand_best);
        if (li == 0u) {
            let id = ~prev.x;
            out[row * OUT_N + 2u + 2u * n] = id;
            out[row * OUT_N + 3u + 2u * n] = bitcast<u32>(clean(logits[row * p.v + id]) - log_z);
        }
    }

    workgroupBarrier();
    if (li == 0u) {
        if (n_bad > 0u) {
            out[row * OUT_N + 0] = 0xffffffffu;
            out[row * OUT_N + 1] = n_bad;
        } else {
            let id = min(chosen, v - 1u);
            out[row * OUT_N + 0] = id;
            out[row * OUT_N + 1] = bitcast<u32>(clean(logits[row * p.v + id]) - log_z);
            if (c < p.cap) { history[hist_base(row) + c] = id; }
        }
    }
    for (var i = li; i < HIST_WORDS; i += WG) { atomicStore(&hist[row * HIST_WORDS + i], 0u); }
}

// The GPU variant's workgroup counts for the passes a run may skip (read by indirect
// dispatches): [0..3) the top-k rounds, [3..6) weights and kept, [6..9) the top-p rounds; zero
// groups where the pass would return at once (greedy decoding, top-k or top-p off).
@group(0) @binding(9) var<storage, read_write> args: array<u32>;

fn write_args(row: u32) {
    let sampling = !is_greedy(row);
    args[0] = select(0u, p.groups, sampling && top_k_on(row));
    args[3] = select(0u, p.groups, sampling);
    args[6] = select(0u, p.groups, sampling && top_p_on(row));
    for (var i = 0u; i < 3u; i++) {
        args[3u * i + 1u] = 1u;
        args[3u * i + 2u] = 1u;
    }
}

@compute @workgroup_size(256)
fn prep(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = row_of(p.row);
    if (wid.x == 0u && li == 0u) { write_args(row); }
    prep_pass(li, wid.x, row);
}
@compute @workgroup_size(256)
fn kround(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) { let row = row_of(p.row); kround_pass(li, wid.x, p.round, row); }
@compute @workgroup_size(256)
fn weights(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) { let row = row_of(p.row); weights_pass(li, wid.x, row); }
@compute @workgroup_size(256)
fn pround(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) { let row = row_of(p.row); pround_pass(li, wid.x, p.round, row); }
@compute @workgroup_size(256)
fn kept(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) { let row = row_of(p.row); kept_pass(li, wid.x, row); }
@compute @workgroup_size(256)
fn finish(@builtin(local_invocation_index) li: u32) { let row = row_of(p.row); finish_pass(li, row); }

// Every pass in one workgroup and one dispatch (one chunk: G = 1), for software adapters,
// where a dispatch costs more than the parallelism buys; a workgroup per row.
@compute @workgroup_size(256)
fn single(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = row_of(wid.x);
    prep_pass(li, 0u, row);
    for (var r = 1u; r < 4u; r++) {
        storageBarrier();
        kround_pass(li, 0u, r, row);
    }
    storageBarrier();
    weights_pass(li, 0u, row);
    for (var r = 1u; r < 4u; r++) {
        storageBarrier();
        pround_pass(li, 0u, r, row);
    }
    storageBarrier();
    kept_pass(li, 0u, row);
    storageBarrier();
    finish_pass(li, row);
}
