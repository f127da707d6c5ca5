// Tiled GEMM core shared by matmul.wgsl and conv2d.wgsl: C[b, m, n] = sum_k A[b, m, k] B[b, n, k].
// The includer defines Params (with fields m, n, k), load_a8(b, m, k) and load_b8(b, n, k)
// (elements k..k + 7 of a row as a Run8, k a multiple of 8, zeros outside the matrix) and
// store_c(b, m, n, v).
// Tiles: BM = 16 TM rows by BN = 16 TN columns per workgroup (TM, TN = 4 or 8: 128 x 128 tiles
// with 8 x 8 blocks for large products, 64 x 64 with 4 x 4 for small ones), k in steps of
// BK = 16; 256 threads as a 16 x 16 grid, each accumulating a TM x TN block in registers (f32).
// Thread (ty, tx) owns rows 4 ty.. (and 64 + 4 ty.. with TM = 8) and the same columns by tx, so
// its inner step is TM / 4 + TN / 4 vec4 loads from workgroup memory for TM * TN multiply-adds
// (8 x 8: 4 loads for 64), consecutive threads reading consecutive vec4s.
// Loads: each k-step, thread li < 2 BM loads 8 consecutive k of row li / 2 of A (two 16-byte
// loads where the includer can) and thread li < 2 BN the same of B, dequantized once
// (weights.wgsl's w_run8: one scale per run); the next step's loads are issued before the
// current step's multiply-adds, so their latency overlaps the arithmetic.
// Workgroup memory: HALF (adapters with shader-f16, unless the device keeps f32 math) stores the
// tiles as f16 (converted back to f32 for the f32 multiply-adds) and double-buffers them, one
// barrier per k-step: 2 x (BM + BN) x 16 x 2 bytes = 16 KiB at 128 x 128. Without HALF the f32
// tiles fit once (16 KiB), with a second barrier before they are overwritten.
// COOP (with HALF and TM = TN = 8, where the device has wgpu's experimental cooperative
// matrices and subgroups of 32): the same loads and tiles, multiplied as 16 x 16 x 16 f16
// matrices with f32 accumulators — subgroup s of 8 owns rows 32 (s / 2).. and columns
// 64 (s % 2).. of the tile, 2 x 4 blocks — and each block goes out through an 8 KiB f32
// staging area to store_c (24 KiB of workgroup memory in all).
// Dispatch: (ceil(n / BN), ceil(m / BM), batch).
const BM: u32 = 16u * TM;
const BN: u32 = 16u * TN;
const BK: u32 = 16u;
#ifdef HALF
alias T = f16;
alias T4 = vec4<f16>;
const NBUF: u32 = 2u;
#else
alias T = f32;
alias T4 = vec4<f32>;
const NBUF: u32 = 1u;
#endif
const A_WORDS: u32 = BK * BM / 4u; // one buffer of the A tile, [BK][BM / 4] vec4s
const B_WORDS: u32 = BK * BN / 4u;
#ifdef COOP
// The same tiles as scalars, for coopLoad's element pointers: A[k][m] (a column-major M x K
// matrix of stride BM), B[k][n] (a row-major K x N matrix of stride BN).
var<workgroup> a_tile: array<T, 4u * NBUF * A_WORDS>;
var<workgroup> b_tile: array<T, 4u * NBUF * B_WORDS>;
fn set_a(i: u32, c: u32, v: f32) { a_tile[4u * i + c] = T(v); }
fn set_b(i: u32, c: u32, v: f32) { b_tile[4u * i + c] = T(v); }
#else
var<workgroup> a_tile: array<T4, NBUF * A_WORDS>;
var<workgroup> b_tile: array<T4, NBUF * B_WORDS>;
fn set_a(i: u32, c: u32, v: f32) { a_tile[i][c] = T(v); }
fn set_b(i: u32, c: u32, v: f32) { b_tile[i][c] = T(v); }
#endif

// Writes a loaded run (row `row`, k offsets kq..kq + 7 of the step) into buffer `base`.
fn put_a(base: u32, row: u32, kq: u32, v: Run8) {
    let c = row % 4u;
    let i = base + kq * (BM / 4u) + row / 4u;
    set_a(i, c, v.lo.x); set_a(i + BM / 4u, c, v.lo.y);
    set_a(i + 2u * (BM / 4u), c, v.lo.z); set_a(i + 3u * (BM / 4u), c, v.lo.w);
    set_a(i + 4u * (BM / 4u), c, v.hi.x); set_a(i + 5u * (BM / 4u), c, v.hi.y);
    set_a(i + 6u * (BM / 4u), c, v.hi.z); set_a(i + 7u * (BM / 4u), c, v.hi.w);
}
fn put_b(base: u32, row: u32, kq: u32, v: Run8) {
    let c = row % 4u;
    let i = base + kq * (BN / 4u) + row / 4u;
    set_b(i, c, v.lo.x); set_b(i + BN / 4u, c, v.lo.y);
    set_b(i + 2u * (BN / 4u), c, v.lo.z); set_b(i + 3u * (BN / 4u), c, v.lo.w);
    set_b(i + 4u * (BN / 4u), c, v.hi.x); set_b(i + 5u * (BN / 4u), c, v.hi.y);
    set_b(i + 6u * (BN / 4u), c, v.hi.z); set_b(i + 7u * (BN / 4u), c, v.hi.w);
}

#ifdef COOP
// The epilogue's staging: one 16 x 16 f32 block per subgroup (8 KiB).
var<workgroup> stage: array<f32, 8u * 256u>;
alias MA = coop_mat16x16<f16, A>;
alias MB = coop_mat16x16<f16, B>;
alias MC = coop_mat16x16<f32, C>;
// Stores accumulator block c (rows r0.., columns c0.. of the output) through subgroup sg's
// staging block: every subgroup calls it alike (workgroup barriers), lane l stores 8 elements.
fn store_block(bi: u32, sg: u32, lane: u32, c: MC, r0: u32, c0: u32) {
    coopStoreT(c, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var e = 0u; e < 8u; e++) {
        let i = lane + 32u * e;
        let m = r0 + i / 16u;
        let n = c0 + i % 16u;
        if (m < p.m && n < p.n) { store_c(bi, m, n, stage[sg * 256u + i]); }
    }
    workgroupBarrier();
}
#endif

@compute @workgroup_size(256)
#ifdef COOP
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32) {
#else
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
#endif
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    let bi = wg.z;
#ifdef IDS
    // An expert with fewer pairs than this tile's first row (matmul.wgsl's IDS).
    if (m0 >= m_rows(bi)) { return; }
#endif
    let tx = li % 16u;
    let ty = li / 16u;
    // This thread's share of the loads: row li / 2, k offsets 8 (li % 2)..
    let lr = li / 2u;
    let lk = 8u * (li % 2u);
    let loads_a = lr < BM;
    let loads_b = lr < BN;
    var ra = Run8(vec4<f32>(0.0), vec4<f32>(0.0));
    var rb = Run8(vec4<f32>(0.0), vec4<f32>(0.0));
    if (loads_a) { ra = load_a8(bi, m0 + lr, lk); }
    if (loads_b) { rb = load_b8(bi, n0 + lr, lk); }
#ifdef COOP
    // Subgroup sg (of 8) owns rows 32 (sg / 2).. (two blocks) and columns 64 (sg % 2).. (four).
    let sr = 32u * (sg / 2u);
    let sc = 64u * (sg % 2u);
    // The accumulators start as a zeroed staging block (a loaded matrix rather than a null
    // constant, which not every driver takes for cooperative matrices).
    for (var i = li; i < 8u * 256u; i += 256u) { stage[i] = 0.0; }
    workgroupBarrier();
    var c0 = coopLoad<MC>(&stage[0], 16u);
    var c1 = c0;
    var c2 = c0;
    var c3 = c0;
    var c4 = c0;
    var c5 = c0;
    var c6 = c0;
    var c7 = c0;
    workgroupBarrier();
#else
    var acc: array<vec4<f32>, TM * TN / 4u>;
#endif
    let steps = (p.k + BK - 1u) / BK;
    for (var s = 0u; s < steps; s++) {
        let buf = s % NBUF;
#ifndef HALF
        // One buffer: everyone must be done reading the previous step's tiles.
        workgroupBarrier();
#endif
        if (loads_a) { put_a(buf * A_WORDS, lr, lk, ra); }
        if (loads_b) { put_b(buf * B_WORDS, lr, lk, rb); }
        workgroupBarrier();
        if (s + 1u < steps) {
            let k1 = (s + 1u) * BK + lk;
            if (loads_a) { ra = load_a8(bi, m0 + lr, k1); }
            if (loads_b) { rb = load_b8(bi, n0 + lr, k1); }
        }
        let ab = buf * A_WORDS;
        let bb = buf * B_WORDS;
#ifdef COOP
        let a0 = coopLoad<MA>(&a_tile[4u * ab + sr], BM);
        let a1 = coopLoad<MA>(&a_tile[4u * ab + sr + 16u], BM);
        let b0 = coopLoadT<MB>(&b_tile[4u * bb + sc], BN);
        let b1 = coopLoadT<MB>(&b_tile[4u * bb + sc + 16u], BN);
        let b2 = coopLoadT<MB>(&b_tile[4u * bb + sc + 32u], BN);
        let b3 = coopLoadT<MB>(&b_tile[4u * bb + sc + 48u], BN);
        c0 = coopMultiplyAdd(a0, b0, c0);
        c1 = coopMultiplyAdd(a0, b1, c1);
        c2 = coopMultiplyAdd(a0, b2, c2);
        c3 = coopMultiplyAdd(a0, b3, c3);
        c4 = coopMultiplyAdd(a1, b0, c4);
        c5 = coopMultiplyAdd(a1, b1, c5);
        c6 = coopMultiplyAdd(a1, b2, c6);
        c7 = coopMultiplyAdd(a1, b3, c7);
#else
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<vec4<f32>, TM / 4u>;
            var b: array<vec4<f32>, TN / 4u>;
            for (var i = 0u; i < TM / 4u; i++) { a[i] = vec4<f32>(a_tile[ab + kk * (BM / 4u) + 16u * i + ty]); }
            for (var j = 0u; j < TN / 4u; j++) { b[j] = vec4<f32>(b_tile[bb + kk * (BN / 4u) + 16u * j + tx]); }
            for (var i = 0u; i < TM / 4u; i++) {
                for (var j = 0u; j < TN / 4u; j++) {
                    let o = (4u * i) * (TN / 4u) + j;
                    acc[o] += a[i].x * b[j];
                    acc[o + TN / 4u] += a[i].y * b[j];
                    acc[o + 2u * (TN / 4u)] += a[i].z * b[j];
                    acc[o + 3u * (TN / 4u)] += a[i].w * b[j];
                }
            }
        }
#endif
    }
#ifdef COOP
    let r0 = m0 + sr;
    let q0 = n0 + sc;
    store_block(bi, sg, lane, c0, r0, q0);
    store_block(bi, sg, lane, c1, r0, q0 + 16u);
    store_block(bi, sg, lane, c2, r0, q0 + 32u);
    store_block(bi, sg, lane, c3, r0, q0 + 48u);
    store_block(bi, sg, lane, c4, r0 + 16u, q0);
    store_block(bi, sg, lane, c5, r0 + 16u, q0 + 16u);
    store_block(bi, sg, lane, c6, r0 + 16u, q0 + 32u);
    store_block(bi, sg, lane, c7, r0 + 16u, q0 + 48u);
#else
    // acc[(4 i + r) * TN / 4 + j][c]: row m0 + 64 i + 4 ty + r, column n0 + 64 j + 4 tx + c.
    for (var i = 0u; i < TM / 4u; i++) {
        for (var r = 0u; r < 4u; r++) {
            let m = m0 + 64u * i + 4u * ty + r;
            if (m >= p.m) { continue; }
            for (var j = 0u; j < TN / 4u; j++) {
                let v = acc[(4u * i + r) * (TN / 4u) + j];
                for (var c = 0u; c < 4u; c++) {
                    let n = n0 + 64u * j + 4u * tx + c;
                    if (n < p.n) { store_c(bi, m, n, v[c]); }
                }
            }
        }
    }
#endif
}
