//! Softmax, RMSNorm, LayerNorm and GroupNorm (+SiLU) against the CPU reference.

use kiln::reference::norm as r;
use kiln_tests::{assert_close, OpTest, Rng};

// Statistics are f32 tree reductions vs an f64 reference; outputs are O(1) values, so 2e-5
// absolute (~100 ulp) covers the rounding of a few-thousand-element reduction.
const TOL: f32 = 2e-5;

#[test]
fn softmax_rows() {
    for (rows, d) in [(3, 1), (5, 300), (2, 4097)] {
        let mut t = OpTest::new();
        let x = Rng::new(d as u64).vec(rows * d, -8.0, 8.0);
        let xv = t.input("x", &[rows, d], &x);
        let y = t.g.softmax(xv).unwrap();
        assert_close(
            &format!("softmax {rows}x{d}"),
            &t.run(y, &[]),
            &r::softmax(&x, d),
            1e-6,
            1e-4,
        );
    }
}

#[test]
fn rms_and_layer_norm() {
    for (rows, d) in [(1, 64), (7, 577), (3, 2048)] {
        let mut rng = Rng::new(d as u64 + 1);
        let (x, w, b) = (
            rng.vec(rows * d, -2.0, 3.0),
            rng.vec(d, 0.5, 1.5),
            rng.vec(d, -0.5, 0.5),
        );
        let mut t = OpTest::new();
        let (xv, wv) = (t.input("x", &[rows, d], &x), t.input("w", &[d], &w));
        let y = t.g.rms_norm(xv, wv, 1e-6).unwrap();
        assert_close(
            &format!("rms_norm {rows}x{d}"),
            &t.run(y, &[]),
            &r::rms_norm(&x, &w, 1e-6),
            TOL,
            1e-5,
        );
        let mut t = OpTest::new();
        let (xv, wv, bv) = (
            t.input("x", &[rows, d], &x),
            t.input("w", &[d], &w),
            t.input("b", &[d], &b),
        );
        let y = t.g.layer_norm(xv, wv, bv, 1e-5).unwrap();
        assert_close(
            &format!("layer_norm {rows}x{d}"),
            &t.run(y, &[]),
            &r::layer_norm(&x, &w, &b, 1e-5),
            TOL,
            1e-5,
        );
    }
}

/// Many rows on every kernel variant: software adapters take the barrier-free one-row-per-
/// invocation variant from 64 rows (the embedders' and the U-Net's token norms).
#[test]
fn rms_and_layer_norm_of_many_rows_on_every_variant() {
    let (rows, d) = (kiln::kernels::norm::ROWWISE_MIN_ROWS * 3 + 5, 384);
    let mut rng = Rng::new(11);
    let (x, w, b) = (
        rng.vec(rows * d, -2.0, 3.0),
        rng.vec(d, 0.5, 1.5),
        rng.vec(d, -0.5, 0.5),
    );
    for gpu in kiln_tests::gpu_variants() {
        let mut t = OpTest::on(gpu.clone());
        let (xv, wv) = (t.input("x", &[rows, d], &x), t.input("w", &[d], &w));
        let y = t.g.rms_norm(xv, wv, 1e-6).unwrap();
        let what = format!(
            "rms_norm {rows}x{d} (software kernels {})",
            gpu.features.software
        );
        assert_close(&what, &t.run(y, &[]), &r::rms_norm(&x, &w, 1e-6), TOL, 1e-5);
        let mut t = OpTest::on(gpu.clone());
        let (xv, wv, bv) = (
            t.input("x", &[rows, d], &x),
            t.input("w", &[d], &w),
            t.input("b", &[d], &b),
        );
        let y = t.g.layer_norm(xv, wv, bv, 1e-5).unwrap();
        let what = format!(
            "layer_norm {rows}x{d} (software kernels {})",
            gpu.features.software
        );
        assert_close(
            &what,
            &t.run(y, &[]),
            &r::layer_norm(&x, &w, &b, 1e-5),
            TOL,
            1e-5,
        );
    }
}

#[test]
fn group_norm_with_and_without_silu() {
    for (b, c, h, w, groups, silu) in [
        (1, 32, 8, 8, 8, false),
        (2, 64, 5, 7, 32, true),
        (2, 96, 16, 16, 32, true),
    ] {
        let mut rng = Rng::new((c * h) as u64);
        let n = b * c * h * w;
        let (x, gw, gb) = (
            rng.vec(n, -1.0, 2.0),
            rng.vec(c, 0.5, 1.5),
            rng.vec(c, -0.5, 0.5),
        );
        let mut t = OpTest::new();
        let (xv, wv, bv) = (
            t.input("x", &[b, c, h, w], &x),
            t.input("w", &[c], &gw),
            t.input("b", &[c], &gb),
        );
        let y = t.g.group_norm(xv, wv, bv, groups, 1e-5, silu).unwrap();
        let want = r::group_norm(&x, &gw, &gb, b, groups, 1e-5, silu);
        assert_close(
            &format!("group_norm {b}x{c}x{h}x{w} g{groups} silu={silu}"),
            &t.run(y, &[]),
            &want,
            TOL,
            1e-5,
        );
    }
}

#[test]
fn norm_shape_errors() {
    let mut g = kiln::Graph::new();
    let x = g.input("x", &[2, 30, 4, 4], kiln::DType::F32).unwrap();
    let w = g.input("w", &[30], kiln::DType::F32).unwrap();
    let e = g.group_norm(x, w, w, 32, 1e-5, false).unwrap_err();
    assert!(e.to_string().contains("divisible by 32 groups"), "{e}");
    let e = g.rms_norm(x, w, 1e-5).unwrap_err();
    assert!(e.to_string().contains("expected [4]"), "{e}");
}

#[test]
fn per_head_qk_norm() {
    // Rows of [q heads | k heads | v heads] (Qwen3 / Gemma 3 stacked projections): q heads
    // normalized with w[0], k heads with w[1], v copied. Head dims 128 and 256 (Gemma), odd 40.
    for (t, heads, kv_heads, d) in [(1, 4, 1, 256), (7, 8, 2, 128), (3, 2, 2, 40)] {
        let n = heads + 2 * kv_heads;
        let mut rng = Rng::new((t * 31 + d) as u64);
        let (x, w) = (rng.vec(t * n * d, -3.0, 3.0), rng.vec(2 * d, 0.5, 1.5));
        let mut t_ = OpTest::new();
        let (xv, wv) = (
            t_.input("qkv", &[1, t, n * d], &x),
            t_.input("w", &[2, d], &w),
        );
        let y = t_.g.qk_norm(xv, wv, heads, kv_heads, 1e-6).unwrap();
        let want: Vec<f32> = x
            .chunks(d)
            .enumerate()
            .flat_map(|(r, head)| match r % n {
                h if h < heads => r::rms_norm(head, &w[..d], 1e-6),
                h if h < heads + kv_heads => r::rms_norm(head, &w[d..], 1e-6),
                _ => head.to_vec(),
            })
            .collect();
        assert_close(
            &format!("qk_norm t={t} {heads}/{kv_heads} d={d}"),
            &t_.run(y, &[]),
            &want,
            TOL,
            1e-5,
        );
    }
}
