// Tiled GEMM core shared by matmul.wgsl and conv2d.wgsl: C[b, m, n] = sum_k A[b, m, k] B[b, n, k].
// The includer defines Params (with fields m, n, k), load_a(b, m, k), load_b(b, n, k) (both
// returning 0 outside the matrix) and store_c(b, m, n, v).
// Tiles: BM = 64 rows by BN columns per workgroup (BN = 128 with WIDE, else 64), k in steps of
// BK = 16; 256 threads, each accumulating a 4 x (BN / 16) block in registers (f32). The tiles
// sit in workgroup memory as vec4s ([BK][BM / 4] and [BK][BN / 4], 12 KiB with WIDE), so a
// thread's inner step is 1 + BN / 64 16-byte loads for 4 * BN / 16 multiply-adds (WIDE: 3 for
// 32; the 4 x 4 blocking before: 8 scalar loads for 16). Its columns are tx * 4.. and, WIDE,
// 64 + tx * 4..: consecutive threads read consecutive vec4s. Global loads are coalesced along
// k (consecutive threads, consecutive k) and issued for the next k-step before the current
// one's multiply-adds (register prefetch), so their latency overlaps the arithmetic.
// Dispatch: (ceil(n / BN), ceil(m / 64), batch).
#ifdef WIDE
const BN: u32 = 128u;
#else
const BN: u32 = 64u;
#endif
const BM: u32 = 64u;
const BK: u32 = 16u;
// Elements of each tile a thread loads per k-step.
const LA: u32 = BM * BK / 256u;
const LB: u32 = BN * BK / 256u;

var<workgroup> a_tile: array<vec4<f32>, 256>; // [BK][BM / 4]
var<workgroup> b_tile: array<vec4<f32>, 512>; // [BK][BN / 4] (the first half without WIDE)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    let bi = wg.z;
    let tx = li % 16u;
    let ty = li / 16u;
    // Element e = li + 256 r of a tile: row e / BK, k e % BK.
    var pa: array<f32, LA>;
    var pb: array<f32, LB>;
    for (var r = 0u; r < LA; r++) { let e = li + 256u * r; pa[r] = load_a(bi, m0 + e / BK, e % BK); }
    for (var r = 0u; r < LB; r++) { let e = li + 256u * r; pb[r] = load_b(bi, n0 + e / BK, e % BK); }
    var acc: array<vec4<f32>, 8>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var r = 0u; r < LA; r++) {
            let e = li + 256u * r;
            let row = e / BK;
            a_tile[(e % BK) * (BM / 4u) + row / 4u][row % 4u] = pa[r];
        }
        for (var r = 0u; r < LB; r++) {
            let e = li + 256u * r;
            let row = e / BK;
            b_tile[(e % BK) * (BN / 4u) + row / 4u][row % 4u] = pb[r];
        }
        workgroupBarrier();
        let k1 = k0 + BK;
        if (k1 < p.k) {
            for (var r = 0u; r < LA; r++) { let e = li + 256u * r; pa[r] = load_a(bi, m0 + e / BK, k1 + e % BK); }
            for (var r = 0u; r < LB; r++) { let e = li + 256u * r; pb[r] = load_b(bi, n0 + e / BK, k1 + e % BK); }
        }
        for (var kk = 0u; kk < BK; kk++) {
            let a = a_tile[kk * (BM / 4u) + ty];
            let b = b_tile[kk * (BN / 4u) + tx];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
#ifdef WIDE
            let c = b_tile[kk * (BN / 4u) + 16u + tx];
            acc[4] += a.x * c;
            acc[5] += a.y * c;
            acc[6] += a.z * c;
            acc[7] += a.w * c;
#endif
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx * 4u + j;
            if (m < p.m && n < p.n) { store_c(bi, m, n, acc[i][j]); }
#ifdef WIDE
            if (m < p.m && n + 64u < p.n) { store_c(bi, m, n + 64u, acc[4u + i][j]); }
#endif
        }
    }
}
