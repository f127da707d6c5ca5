//! Mixture-of-experts routing against its f64 CPU reference (`kiln::reference::moe`) on every
//! kernel variant: Gemma 4's router (128 experts, top 8, renormalized, per-expert scale) and a
//! Qwen-MoE-shaped one (60 experts, top 4, not renormalized), rows with tied logits.

use kiln::reference::moe::route;
use kiln_tests::{gpu_variants, OpTest, Rng};

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
