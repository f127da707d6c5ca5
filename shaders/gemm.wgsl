// Tiled GEMM core shared by matmul.wgsl and conv2d.wgsl: C[b, m, n] = sum_k A[b, m, k] B[b, n, k].
// The includer defines Params (with fields m, n, k), load_a(b, m, k), load_b(b, n, k) (both
// returning 0 outside the matrix) and store_c(b, m, n, v).
// Tiles: 64 x 64 outputs per workgroup, k in steps of 16, 256 threads with 4 x 4 register
// tiles, f32 accumulation. Loads are coalesced along k (consecutive threads, consecutive k).
// Dispatch: (ceil(n / 64), ceil(m / 64), batch).

var<workgroup> a_tile: array<f32, 1024>; // [16 k][64 m]
var<workgroup> b_tile: array<f32, 1024>; // [16 k][64 n]

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * 64u;
    let m0 = wg.y * 64u;
    let bi = wg.z;
    let tx = li % 16u;
    let ty = li / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        for (var r = 0u; r < 4u; r++) {
            let idx = li + 256u * r;
            let row = idx / 16u;
            let kk = idx % 16u;
            a_tile[kk * 64u + row] = load_a(bi, m0 + row, k0 + kk);
            b_tile[kk * 64u + row] = load_b(bi, n0 + row, k0 + kk);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            let av = vec4<f32>(a_tile[kk * 64u + ty * 4u], a_tile[kk * 64u + ty * 4u + 1u], a_tile[kk * 64u + ty * 4u + 2u], a_tile[kk * 64u + ty * 4u + 3u]);
            let bv = vec4<f32>(b_tile[kk * 64u + tx * 4u], b_tile[kk * 64u + tx * 4u + 1u], b_tile[kk * 64u + tx * 4u + 2u], b_tile[kk * 64u + tx * 4u + 3u]);
            acc[0] += av.x * bv;
            acc[1] += av.y * bv;
            acc[2] += av.z * bv;
            acc[3] += av.w * bv;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx * 4u + j;
            if (m < p.m && n < p.n) { store_c(bi, m, n, acc[i][j]); }
        }
    }
}
