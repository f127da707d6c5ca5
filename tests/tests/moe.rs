//! Mixture-of-experts layers against their f64 CPU references (`kiln::reference::moe`) on every
//! kernel variant: Gemma 4's router (128 experts, top 8, renormalized, per-expert scale) and a
//! Qwen-MoE-shaped one (60 experts, top 4, not renormalized), rows with tied logits; the experts
//! (lists, expert-indexed products, weighted sum) for the weight dtypes Gemma 4 files carry, one
//! token to 150 (past a GEMM tile per expert), an expert nobody picks and one everybody does,
//! and expert matrices split across bindings.

use kiln::dtype::{dequantize, DType};
use kiln::kernels::elementwise::Act;
use kiln::reference::elementwise::gelu_tanh;
use kiln::reference::moe::{experts as ref_experts, route};
use kiln::{GpuOptions, Tensor};
use kiln_tests::{gpu_variants, gpu_with, random_weight_bytes, OpTest, Rng};
use std::sync::Arc;

#[test]
fn moe_router_against_f64_every_variant() {
    for (vi, gpu) in gpu_variants().iter().enumerate() {
        for (experts, k, renorm, rows) in [(128, 8, true, 3), (60, 4, false, 2), (5, 5, true, 1)] {
            let mut rng = Rng::new(41 + vi as u64 + experts as u64);
            let mut logits = rng.vec(rows * experts, -3.0, 3.0);
            // Ties: the lower index goes first.
            logits[3] = logits[1];
            let scale = rng.vec(experts, 0.5, 1.5);
            let mut t = OpTest::on(gpu.clone());
            let lv = t.input("logits", &[rows, experts], &logits);
            let sv = t.input("scale", &[experts], &scale);
            let out = t.g.moe_router(lv, sv, k, renorm).unwrap();
            let got: Vec<u32> = t.run(out, &[]).iter().map(|f| f.to_bits()).collect();
            let want = route(&logits, experts, k, renorm, &scale);
            let what = format!("router {experts} experts top {k} renorm {renorm} variant {vi}");
            for (r, row) in want.iter().enumerate() {
                for (j, &(e, w)) in row.iter().enumerate() {
                    let at = r * 2 * k + 2 * j;
                    assert_eq!(got[at], e, "{what}: row {r} choice {j}");
                    let gw = f32::from_bits(got[at + 1]);
                    assert!(
                        (gw - w).abs() <= 2e-6 * w.abs().max(1e-3),
                        "{what}: row {r} choice {j}: weight {gw}, want {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn moe_router_refuses_bad_shapes() {
    let mut t = OpTest::new();
    let lv = t.input("logits", &[2, 4], &[0.0; 8]);
    let sv = t.input("scale", &[4], &[1.0; 4]);
    let e = t.g.moe_router(lv, sv, 5, true).unwrap_err().to_string();
    assert!(e.contains("top 5 of 4 experts"), "{e}");
}

/// Routes for `rows` rows: `top_k` distinct experts each (expert 0 in every row, the last
/// expert in none), weights in (0.1, 1).
fn random_routes(rng: &mut Rng, rows: usize, experts: usize, top_k: usize) -> Vec<Vec<(u32, f32)>> {
    (0..rows)
        .map(|_| {
            let mut chosen = vec![0u32];
            while chosen.len() < top_k {
                let e = (rng.next_u64() % (experts as u64 - 1)) as u32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            chosen
                .into_iter()
                .map(|e| (e, rng.uniform(0.1, 1.0)))
                .collect()
        })
        .collect()
}

/// The experts of `rows` rows on `gpu` against the f64 reference.
fn check_experts(gpu: &Arc<kiln::Gpu>, dtype: DType, rows: usize, seed: u64, want_parts: bool) {
    let (experts, top_k) = (5, 2);
    // n (the expert width) and k, h (the hidden size): whole blocks of the dtype.
    let (n, k) = match dtype.block_elems() {
        256 => (256, 256),
        _ => (32, 64),
    };
    let h = k;
    let mut rng = Rng::new(seed);
    let x = rng.vec(rows * k, -1.0, 1.0);
    let routes = random_routes(&mut rng, rows, experts, top_k);
    let gu_bytes = random_weight_bytes(&mut rng, dtype, experts * 2 * n, k);
    let down_bytes = random_weight_bytes(&mut rng, dtype, experts * h, n);
    let gu = dequantize(dtype, &gu_bytes, experts * 2 * n * k).unwrap();
    let down = dequantize(dtype, &down_bytes, experts * h * n).unwrap();
    let mut t = OpTest::on(gpu.clone());
    let xv = t.input("x", &[rows, k], &x);
    let words: Vec<u32> = routes
        .iter()
        .flat_map(|r| r.iter().flat_map(|&(e, w)| [e, w.to_bits()]))
        .collect();
    let rv = t.input_u32("routes", &[rows, 2 * top_k], &words);
    let gut =
        Tensor::upload_experts(gpu, "gate_up", &[experts, 2 * n, k], dtype, &gu_bytes).unwrap();
    let dt = Tensor::upload_experts(gpu, "down", &[experts, h, n], dtype, &down_bytes).unwrap();
    assert_eq!(
        gut.parts.len() > 1,
        want_parts,
        "{dtype}: {} parts",
        gut.parts.len()
    );
    let (guv, dv) = (t.g.tensor(&Arc::new(gut)), t.g.tensor(&Arc::new(dt)));
    let y = t.g.moe_experts(xv, rv, guv, dv, Act::GeluTanh).unwrap();
    let got = t.run(y, &[]);
    let want = ref_experts(&x, &routes, &gu, &down, (n, k, h), gelu_tanh);
    // f16 GEMM tiles round both operands of both products; an indexing error costs O(max).
    let max = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let tol = if gpu.features.half_tiles { 4e-3 } else { 2e-5 } * max + 1e-6;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{dtype}, {rows} rows, {}: element {i} (row {}): {g} vs {w} (tol {tol})",
            gpu.describe(),
            i / h
        );
    }
}

#[test]
fn moe_experts_against_f64_every_variant() {
    for (vi, gpu) in gpu_variants().iter().enumerate() {
        for (di, dtype) in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_K]
            .into_iter()
            .enumerate()
        {
            for rows in [1, 2, 3, 150] {
                if dtype == DType::Q4_K && rows == 150 {
                    continue; // the f64 reference of 256-wide experts: 3 rows say enough
                }
                check_experts(
                    gpu,
                    dtype,
                    rows,
                    (vi * 10 + di) as u64 * 7 + rows as u64,
                    false,
                );
            }
        }
    }
}

/// Expert matrices split two experts to a binding: every part's experts are found, on both
/// kernel families and both product shapes.
#[test]
fn moe_experts_split_across_bindings() {
    for software in [false, true] {
        let small = gpu_with(GpuOptions {
            max_binding_size: Some(2 * 2 * 32 * 64 * 4),
            software: Some(software),
            ..Default::default()
        });
        // 40 rows: the GEMM over each expert's pairs; 1 (a decode step): on the GPU kernels
        // the matvec over the pairs, each part skipping the pairs of experts it does not hold.
        check_experts(&small, DType::F32, 40, 91, true);
        check_experts(&small, DType::F32, 1, 92, true);
    }
}

#[test]
fn moe_experts_refuse_bad_shapes() {
    let mut t = OpTest::new();
    let x = t.input("x", &[2, 8], &[0.0; 16]);
    let routes = t.input_u32("routes", &[2, 4], &[0; 8]);
    let w = t.input("w", &[3, 8, 8], &[0.0; 192]);
    let e =
        t.g.moe_experts(x, routes, w, w, Act::Silu)
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("moe_linear") && e.contains("expected [4, 8]"),
        "{e}"
    );
}
