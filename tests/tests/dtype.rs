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
    let e = quantize(DType::Q4_K, &[0.0; 256]).unwrap_err();
    assert!(e.to_string().contains("q4_k"), "{e}");
}
