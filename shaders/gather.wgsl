// Embedding gather with dequantization: y[i, :] = table[ids[off + i], :] (off a run-time offset) for ids in this part's
// rows [row_start, row_start + rows); part 0 writes zeros for ids past the whole table.
// Bindings: 2 w: array<u32> (one table part, any dtype of weights.wgsl), 3 ids: array<u32> [n],
//           4 y: array<f32> [n, d]. Dispatch: ceil(n * d / 256) workgroups (grid()).
#include "common.wgsl"
#include "weights.wgsl"

struct Params { n: u32, d: u32, row_words: u32, row_start: u32, rows: u32, total_rows: u32, ids_add: u32, ids_slot: u32, ids_mul: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = group_index(wg, nwg) * 256u + li;
    if (e >= p.n * p.d) { return; }
    let i = e / p.d;
    let c = e % p.d;
    // Row i reads ids[off + i], or with per-row offsets (graph::Dyn::Rows) ids[off[i]].
    let id = ids[dyn_row(p.ids_add, p.ids_slot, p.ids_mul, i) + select(i, 0u, is_rows(p.ids_slot))];
    if (id >= p.row_start && id < p.row_start + p.rows) {
        y[e] = w_elem((id - p.row_start) * p.row_words, c);
    } else if (p.row_start == 0u && id >= p.total_rows) {
        y[e] = 0.0;
    }
}
