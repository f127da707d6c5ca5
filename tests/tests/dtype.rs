//! Block formats against llama.cpp's gguf-py (fixtures in tests/fixtures/dtypes, made by
//! tools/make_dtype_fixtures.py): CPU dequantization bit for bit, quantize-on-load byte for
//! byte, and the GPU's fused dequantization in gathers and matvecs.

use kiln::dtype::{dequantize, quantize};
use kiln::DType;
use kiln_tests::{assert_close, dot_tolerance, OpTest, Rng};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/dtypes")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(b)
}

/// Every block-quantized weight type the engine has.
fn types() -> impl Iterator<Item = DType> {
    DType::WEIGHTS.into_iter().filter(|d| d.is_quantized())
}

#[test]
fn cpu_dequantize_equals_gguf_py_bitwise() {
    for dt in types() {
        let blocks = fixture(&format!("{dt}.blocks.bin"));
        let want = f32s(&fixture(&format!("{dt}.dequant.f32")));
        let got = dequantize(dt, &blocks, want.len()).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{dt} element {i}: expected {w}, got {g}"
            );
        }
    }
}

#[test]
fn quantize_on_load_equals_gguf_py_bytes() {
    for dt in [DType::Q8_0, DType::Q4_0] {
        let x = f32s(&fixture(&format!("{dt}.quant_in.f32")));
        let want = fixture(&format!("{dt}.quant_out.bin"));
        let got = quantize(dt, &x).unwrap();
        assert_eq!(got.len(), want.len());
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!(
                "{dt}: byte {i} (block {}): expected {:#04x}, got {:#04x}",
                i / dt.block_bytes(),
                want[i],
                got[i]
            );
        }
    }
}

#[test]
fn gpu_dequantization_matches_gguf_py() {
    for dt in types() {
        let blocks = fixture(&format!("{dt}.blocks.bin"));
        let want = f32s(&fixture(&format!("{dt}.dequant.f32")));
        let rows = 8;
        let k = want.len() / rows;
        // Gather every row: one dequantized element at a time.
        let mut t = OpTest::new();
        let table = t.weight("table", &[rows, k], dt, &blocks);
        let ids: Vec<u32> = (0..rows as u32).rev().collect();
        let iv = t.input_u32("ids", &[rows], &ids);
        let y = t.g.gather(table, iv).unwrap();
        let got = t.run(y, &[]);
        let want_rows: Vec<f32> = ids
            .iter()
            .flat_map(|&r| want[r as usize * k..(r as usize + 1) * k].to_vec())
            .collect();
        // scale * quant in f32 on both sides; only fused multiply-add contraction may differ.
        assert_close(
            &format!("gather {dt} vs gguf-py"),
            &got,
            &want_rows,
            1e-7,
            1e-6,
        );
        // Matvec: the block-wise fused path.
        let mut t = OpTest::new();
        let x = Rng::new(9).vec(k, -1.0, 1.0);
        let xv = t.input("x", &[1, k], &x);
        let w = t.weight("w", &[rows, k], dt, &blocks);
        let y = t.g.linear(xv, w, None).unwrap();
        let got = t.run(y, &[]);
        let want_y = kiln::reference::linear::linear(&x, &want, None, 1, rows, k);
        assert_close(
            &format!("matvec {dt} vs gguf-py"),
            &got,
            &want_y,
            dot_tolerance(&x, &want, 1, rows, k),
            1e-5,
        );
    }
}

#[test]
fn malformed_block_data_is_an_error() {
    let e = dequantize(DType::Q6_K, &[0u8; 100], 256).unwrap_err();
    assert!(e.to_string().contains("need 210 bytes, found 100"), "{e}");
    let e = dequantize(DType::Q4_K, &[0u8; 144], 100).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a multiple of the block size 256"),
        "{e}"
    );
    let e = quantize(DType::Q2_K, &[0.0; 256]).unwrap_err();
    assert!(e.to_string().contains("q2_k"), "{e}");
}

/// The K-quant encoders (llama.cpp's reference quantizers; byte equality with llama-quantize is
/// checked in tests/tests/llm.rs) on edge blocks: zeros stay zeros, constant, one-outlier,
/// all-negative and denormal-sized blocks come back finite and within the block's step.
#[test]
fn k_quant_encoders_on_edge_blocks() {
    let mut rng = Rng::new(77);
    let mut outlier = rng.vec(256, -0.01, 0.01);
    outlier[17] = 40.0;
    let blocks: Vec<(&str, Vec<f32>)> = vec![
        ("zeros", vec![0.0; 256]),
        ("constant", vec![0.75; 256]),
        ("negative", rng.vec(256, -3.0, -1.0)),
        ("outlier", outlier),
        ("tiny", rng.vec(256, -1e-20, 1e-20)),
        ("normal", rng.vec(256, -1.0, 1.0)),
    ];
    for dtype in [DType::Q4_K, DType::Q6_K] {
        for (what, x) in &blocks {
            let q = quantize(dtype, x).unwrap();
            let back = dequantize(dtype, &q, 256).unwrap();
            let range = x.iter().fold(0f32, |a, v| a.max(v.abs())) * 2.0;
            // 4 bits: 15 steps over the sub-block's range, with 6-bit scales; 6 bits: 63 steps.
            // Scales are f16: below its resolution (~6e-8) a block rounds to zeros.
            let steps = if dtype == DType::Q4_K { 15.0 } else { 63.0 };
            let bound = (range / steps).max(1e-6);
            for (i, (a, b)) in back.iter().zip(x).enumerate() {
                assert!(a.is_finite(), "{dtype} {what}: value {i} is {a}");
                assert!(
                    (a - b).abs() <= bound,
                    "{dtype} {what}: value {i}: {a} for {b} (bound {bound})"
                );
            }
            if *what == "zeros" {
                assert!(back.iter().all(|&v| v == 0.0), "{dtype}: zeros");
            }
        }
    }
}
