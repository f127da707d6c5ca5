//! Linear family on the GPU against the CPU reference: matvec (decode), GEMM (prefill) and
//! gathers, for every weight dtype, including weights split across bindings.

use kiln::dtype::dequantize;
use kiln::reference::linear as refl;
use kiln::{DType, GpuOptions, Tensor};
use kiln_tests::{
    assert_close, dot_tolerance, gpu_with, product_tolerance, random_weight_bytes, test_k, to_f16,
    OpTest, Rng,
};

fn check_linear(t: OpTest, dtype: DType, m: usize, n: usize, bias: bool, seed: u64) {
    check_linear_k(t, dtype, m, n, test_k(dtype), bias, seed)
}

fn check_linear_k(t: OpTest, dtype: DType, m: usize, n: usize, k: usize, bias: bool, seed: u64) {
    let mut t = t;
    let mut rng = Rng::new(seed);
    let wb = random_weight_bytes(&mut rng, dtype, n, k);
    let wf = dequantize(dtype, &wb, n * k).unwrap();
    let x = rng.vec(m * k, -1.0, 1.0);
    let b = rng.vec(n, -0.5, 0.5);
    let xv = t.input("x", &[m, k], &x);
    let wv = t.weight("w", &[n, k], dtype, &wb);
    let bv = bias.then(|| t.input("b", &[n], &b));
    let y = t.g.linear(xv, wv, bv).unwrap();
    let gpu = t.gpu.clone();
    let got = t.run(y, &[]);
    let want = refl::linear(&x, &wf, bias.then_some(b.as_slice()), m, n, k);
    let tol = product_tolerance(&gpu, &x, &wf, m, n, k);
    assert_close(
        &format!("linear {dtype} m={m} n={n} k={k} bias={bias}"),
        &got,
        &want,
        tol,
        1e-5,
    );
}

/// Every matvec variant, whatever the adapter: the cooperative one GPUs use, and for software
/// adapters one row per subgroup (with subgroups) or per invocation (without).
#[test]
fn matvec_every_dtype() {
    for gpu in kiln_tests::gpu_variants() {
        for (i, dt) in DType::WEIGHTS.into_iter().enumerate() {
            let t = || OpTest::on(gpu.clone());
            check_linear(t(), dt, 1, 67, i % 2 == 0, 10 + i as u64);
            check_linear(t(), dt, 2, 33, true, 20 + i as u64);
        }
    }
}

/// The software adapters' 16-byte-load matvec (ROWS_V4) for the dtypes and row lengths it
/// serves (k a multiple of 8 for plain types; Q8_0/Q4_0/Q4_1 rows padded to 16 bytes, with a
/// partial last group of blocks), m = 1 and 2, a batch of decoding sequences (m = 3, 5, 8: the
/// COLS variant, the last column group partial), and the same rows through the GEMM (m = 37: 8
/// activation rows per workgroup of the software GEMM, the last group partial); every adapter
/// variant runs the same shapes.
#[test]
fn matvec_wide_loads() {
    use kiln::kernels::linear::rows_v4;
    for gpu in kiln_tests::gpu_variants() {
        for (i, (dt, k)) in [
            (DType::F32, 204),
            (DType::F32, 208),
            (DType::F16, 208),
            (DType::BF16, 576),
            (DType::Q8_0, 384),
            (DType::Q8_0, 160),
            (DType::Q4_0, 256),
            (DType::Q4_0, 576),
            (DType::Q4_0, 1536),
            (DType::Q4_1, 160),
            (DType::Q4_1, 576),
            (DType::Q5_0, 160),
            (DType::Q5_0, 640),
            (DType::Q4_K, 256),
            (DType::Q4_K, 1536),
            (DType::Q6_K, 256),
            (DType::Q6_K, 1536),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(rows_v4(dt, k), "{dt} k={k}");
            for m in [1, 2, 3, 5, 8, 37] {
                let mut t = OpTest::on(gpu.clone());
                let mut rng = Rng::new(500 + i as u64 * 7 + m as u64);
                let n = 131;
                let wb = random_weight_bytes(&mut rng, dt, n, k);
                let wf = dequantize(dt, &wb, n * k).unwrap();
                let x = rng.vec(m * k, -1.0, 1.0);
                let xv = t.input("x", &[m, k], &x);
                let wv = t.weight("w", &[n, k], dt, &wb);
                let y = t.g.linear(xv, wv, None).unwrap();
                let got = t.run(y, &[]);
                let want = refl::linear(&x, &wf, None, m, n, k);
                let what = format!(
                    "padded-row product {dt} m={m} k={k} (software kernels {})",
                    gpu.features.software
                );
                assert_close(
                    &what,
                    &got,
                    &want,
                    product_tolerance(&gpu, &x, &wf, m, n, k),
                    1e-5,
                );
            }
        }
    }
}

/// Both GEMM variants (workgroup tiles, and DIRECT for software adapters) on every dtype.
/// On software adapters a batch of activation rows (continuous batching's decode, COLS) gives
/// each row the same bits as a product of that row alone, with a bias and a residual: a slot's
/// tokens do not depend on which others decode beside it.
#[test]
fn matvec_batch_rows_equal_single_rows() {
    let [_, _, sw, sw_plain] = kiln_tests::gpu_variants();
    for gpu in [sw, sw_plain] {
        for (i, (dt, k)) in [
            (DType::F32, 208),
            (DType::F16, 208),
            (DType::BF16, 576),
            (DType::Q4_0, 576),
            (DType::Q6_K, 256),
        ]
        .into_iter()
        .enumerate()
        {
            let (n, m) = (131, 6);
            let mut rng = Rng::new(900 + i as u64);
            let wb = random_weight_bytes(&mut rng, dt, n, k);
            let x = rng.vec(m * k, -1.0, 1.0);
            let (b, res) = (rng.vec(n, -0.5, 0.5), rng.vec(m * n, -1.0, 1.0));
            let run = |rows: std::ops::Range<usize>| {
                let mut t = OpTest::on(gpu.clone());
                let r = rows.len();
                let xv = t.input("x", &[r, k], &x[rows.start * k..rows.end * k]);
                let wv = t.weight("w", &[n, k], dt, &wb);
                let bv = t.input("b", &[n], &b);
                let rv = t.input("res", &[r, n], &res[rows.start * n..rows.end * n]);
                let y = t.g.linear_add(xv, wv, Some(bv), rv).unwrap();
                t.run(y, &[])
            };
            let batch = run(0..m);
            for row in 0..m {
                let one = run(row..row + 1);
                let same = one
                    .iter()
                    .zip(&batch[row * n..(row + 1) * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{dt} k={k}: row {row} of a batch of {m} differs from its own product"
                );
            }
        }
    }
}

#[test]
fn gemm_every_dtype() {
    for gpu in kiln_tests::gpu_variants() {
        for (i, dt) in DType::WEIGHTS.into_iter().enumerate() {
            check_linear(
                OpTest::on(gpu.clone()),
                dt,
                37,
                70,
                i % 2 == 1,
                30 + i as u64,
            );
        }
    }
}

#[test]
fn gemm_wide_x_loads() {
    // Rows of a multiple of 4 elements: the software GEMM reads x 16 bytes at a time (X4).
    for gpu in kiln_tests::gpu_variants() {
        for (i, dt) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            check_linear_k(
                OpTest::on(gpu.clone()),
                dt,
                19,
                37,
                212,
                i == 1,
                60 + i as u64,
            );
        }
    }
}

#[test]
fn gemm_large_tiles() {
    // Several 64x64 tiles in each direction plus ragged edges.
    for gpu in kiln_tests::gpu_variants() {
        check_linear(OpTest::on(gpu), DType::F16, 130, 150, true, 41);
    }
}

/// Products big enough for the GEMM core's 128 x 128 and 64 x 128 tiles (`gemm_block`), with
/// ragged edges in both directions, a k that is not a multiple of the 16-element step (nor,
/// for f16, of the 8-element run: a partial last run), and block formats (32- and 256-element
/// blocks, each of the formats with its own run loader).
#[test]
fn gemm_wide_tiles() {
    use kiln::kernels::linear::gemm_block;
    for (i, (dt, m, n, k, block)) in [
        (DType::F16, 1030, 1100, 74, (8, 8)),
        (DType::Q4_0, 1030, 1100, 96, (8, 8)),
        (DType::Q4_K, 700, 2400, 256, (8, 8)),
        (DType::Q6_K, 600, 1100, 256, (4, 8)),
        (DType::Q4_1, 600, 1030, 64, (4, 8)),
        (DType::Q8_0, 1030, 1100, 64, (8, 8)),
        (DType::BF16, 1030, 1100, 40, (8, 8)),
        (DType::F32, 1030, 1100, 36, (8, 8)),
        (DType::Q5_K, 600, 1100, 256, (4, 8)),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(gemm_block(m, n, 1), block, "{dt} {m}x{n}");
        for gpu in &kiln_tests::gpu_variants()[..2] {
            check_linear_k(OpTest::on(gpu.clone()), dt, m, n, k, i == 0, 70 + i as u64);
        }
    }
}

/// The cooperative-matrix GEMM (gemm.wgsl's COOP: 16 x 16 f16 blocks, f32 accumulation) as the
/// device would compile it, for the matmul and the convolution and a plain and two block
/// formats, through naga's WGSL front end, validator (with the capabilities the feature
/// brings) and SPIR-V back end, on every machine. It runs where an adapter reports the feature
/// (`GpuFeatures::coop_matrix`): there `gemm_wide_tiles` and the other GEMM tests take it for
/// their 128 x 128 tiles.
#[test]
fn coop_matrix_gemm_compiles() {
    use kiln::kernels::linear::weight_key;
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    for shader in ["matmul.wgsl", "conv2d.wgsl"] {
        for dt in [DType::F16, DType::Q4_0, DType::Q4_K] {
            let key = weight_key(shader, dt)
                .unwrap()
                .def("TM", "8u")
                .def("TN", "8u")
                .def("HALF", "")
                .def("COOP", "")
                .def("X4", "");
            let src = kiln::shaders::kernel_source(key.shader, &key.defines, true).unwrap();
            let what = format!("{shader} {dt} COOP");
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
            let caps = Capabilities::COOPERATIVE_MATRIX
                | Capabilities::SHADER_FLOAT16
                | Capabilities::SHADER_FLOAT16_IN_FLOAT32
                | Capabilities::SUBGROUP;
            let info = Validator::new(ValidationFlags::all(), caps)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
            let opts = naga::back::spv::Options {
                lang_version: (1, 4),
                ..Default::default()
            };
            let spv = naga::back::spv::write_vec(&module, &info, &opts, None)
                .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));
            assert!(spv.len() > 100, "{what}: {} words", spv.len());
        }
    }
}

#[test]
fn batched_activation_product() {
    for gpu in kiln_tests::gpu_variants() {
        batched_product_on(gpu);
    }
}

fn batched_product_on(gpu: std::sync::Arc<kiln::Gpu>) {
    let half = gpu.features.half_tiles;
    let mut t = OpTest::on(gpu);
    let mut rng = Rng::new(5);
    let (b, m, n, k) = (3, 19, 23, 45);
    let x = rng.vec(b * m * k, -1.0, 1.0);
    let w = rng.vec(b * n * k, -1.0, 1.0);
    let xv = t.input("x", &[b, m, k], &x);
    let wv = t.input("w", &[b, n, k], &w);
    let y = t.g.linear(xv, wv, None).unwrap();
    let got = t.run(y, &[]);
    let want = refl::batched_linear(&x, &w, b, m, n, k);
    // k = 45 products of magnitude <= 1: f32 rounding stays far below 1e-5 (f16 tiles: 2e-3).
    let tol = if half { 0.1 } else { 1e-5 };
    assert_close("batched product", &got, &want, tol, 1e-5);
}

/// A binding limit of 4 KiB splits every test weight into many parts; results must not change.
#[test]
fn split_weights_matvec_gemm_gather() {
    let small = gpu_with(GpuOptions {
        max_binding_size: Some(4096),
        ..Default::default()
    });
    assert_eq!(small.binding_limit, 4096);
    for (i, dt) in DType::WEIGHTS.into_iter().enumerate() {
        check_linear(OpTest::on(small.clone()), dt, 1, 45, true, 50 + i as u64);
        check_linear(OpTest::on(small.clone()), dt, 9, 45, false, 60 + i as u64);
        check_gather(OpTest::on(small.clone()), dt, 70 + i as u64, true);
    }
}

fn check_gather(t: OpTest, dtype: DType, seed: u64, expect_split: bool) {
    let mut t = t;
    let mut rng = Rng::new(seed);
    let (v, d) = (53, test_k(dtype));
    let wb = random_weight_bytes(&mut rng, dtype, v, d);
    let table = kiln::Tensor::upload(&t.gpu, "table", &[v, d], dtype, &wb).unwrap();
    assert_eq!(
        table.parts.len() > 1,
        expect_split,
        "{dtype}: parts {}",
        table.parts.len()
    );
    let tv = t.g.tensor(&std::sync::Arc::new(table));
    let ids: Vec<u32> = vec![0, 52, 7, 7, 31, 1, 60];
    let iv = t.input_u32("ids", &[ids.len()], &ids);
    let y = t.g.gather(tv, iv).unwrap();
    let got = t.run(y, &[]);
    let want = refl::gather(&dequantize(dtype, &wb, v * d).unwrap(), d, &ids);
    // A gather dequantizes single elements: only the f32 rounding of scale * quant differs.
    assert_close(&format!("gather {dtype}"), &got, &want, 1e-6, 1e-6);
}

#[test]
fn gather_every_dtype() {
    for (i, dt) in DType::WEIGHTS.into_iter().enumerate() {
        check_gather(OpTest::new(), dt, 80 + i as u64, false);
    }
}

#[test]
fn quantize_on_load_matches_ggml_reference() {
    // Quantizing to Q4_0/Q8_0 on load then running the fused kernel equals the reference on
    // the dequantized quantized weights.
    let mut rng = Rng::new(7);
    let (n, k) = (40, 256);
    let w = rng.vec(n * k, -1.0, 1.0);
    for dt in [DType::Q4_0, DType::Q8_0] {
        let q = kiln::dtype::quantize(dt, &w).unwrap();
        let back = dequantize(dt, &q, n * k).unwrap();
        let max_err = w
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Step of the grid: 2*amax/15 (q4) or amax/127 (q8), halved by rounding, amax <= 1.
        let bound = if dt == DType::Q4_0 { 0.14 } else { 0.0045 };
        assert!(
            max_err < bound,
            "{dt}: quantization error {max_err} >= {bound}"
        );
        let mut t = OpTest::new();
        let x = rng.vec(k, -1.0, 1.0);
        let xv = t.input("x", &[1, k], &x);
        let wv = t.weight("w", &[n, k], dt, &q);
        let y = t.g.linear(xv, wv, None).unwrap();
        let got = t.run(y, &[]);
        let want = refl::linear(&x, &back, None, 1, n, k);
        assert_close(
            &format!("quantized-on-load {dt}"),
            &got,
            &want,
            dot_tolerance(&x, &back, 1, n, k),
            1e-5,
        );
    }
}

#[test]
fn bad_weight_bytes_are_errors() {
    let g = kiln_tests::gpu();
    let e = kiln::Tensor::upload(&g, "w", &[4, 64], DType::Q4_0, &[0u8; 10]).unwrap_err();
    assert!(e.to_string().contains("needs 144 bytes, found 10"), "{e}");
    let e = kiln::Tensor::upload(&g, "w", &[4, 48], DType::Q4_K, &[0u8; 10]).unwrap_err();
    assert!(e.to_string().contains("not a multiple of 256"), "{e}");
    let mut gr = kiln::Graph::new();
    let x = gr.input("x", &[2, 8], DType::F32).unwrap();
    let w = gr.input("w", &[3, 9], DType::F32).unwrap();
    let e = gr.linear(x, w, None).unwrap_err();
    assert!(
        e.to_string().contains("k = 8") && e.to_string().contains("k = 9"),
        "{e}"
    );
}

/// The residual add in the product's epilogue (`Graph::linear_add`), matvec and GEMM, on
/// every kernel variant: `r + x @ w^T + b`.
#[test]
fn linear_with_residual_every_variant() {
    for gpu in kiln_tests::gpu_variants() {
        for (i, (dt, m)) in [
            (DType::F16, 1),
            (DType::Q4_0, 2),
            (DType::F32, 37),
            (DType::Q8_0, 70),
        ]
        .into_iter()
        .enumerate()
        {
            let mut t = OpTest::on(gpu.clone());
            let mut rng = Rng::new(300 + i as u64);
            let (n, k) = (45, test_k(dt));
            let wb = random_weight_bytes(&mut rng, dt, n, k);
            let wf = dequantize(dt, &wb, n * k).unwrap();
            let (x, b, r) = (
                rng.vec(m * k, -1.0, 1.0),
                rng.vec(n, -0.5, 0.5),
                rng.vec(m * n, -2.0, 2.0),
            );
            let xv = t.input("x", &[m, k], &x);
            let wv = t.weight("w", &[n, k], dt, &wb);
            let bv = t.input("b", &[n], &b);
            let rv = t.input("r", &[m, n], &r);
            let y = t.g.linear_add(xv, wv, Some(bv), rv).unwrap();
            let got = t.run(y, &[]);
            let mut want = refl::linear(&x, &wf, Some(b.as_slice()), m, n, k);
            want.iter_mut().zip(&r).for_each(|(w, r)| *w += r);
            let tol = product_tolerance(&gpu, &x, &wf, m, n, k) + 1e-6;
            let what = format!(
                "linear + residual {dt} m={m} (software kernels {})",
                gpu.features.software
            );
            assert_close(&what, &got, &want, tol, 1e-5);
        }
    }
    // A residual of the wrong shape is a shape error naming it.
    let mut g = kiln::Graph::new();
    let x = g.input("x", &[2, 8], DType::F32).unwrap();
    let w = g.input("w", &[4, 8], DType::F32).unwrap();
    let r = g.input("r", &[2, 5], DType::F32).unwrap();
    let e = g.linear_add(x, w, None, r).unwrap_err().to_string();
    assert!(e.contains("residual shape [2, 5]"), "{e}");
}

/// The fusion pass on decode products (`graph/fuse.rs`), on every kernel variant and weight
/// dtype: `rms_norm` followed by a product (with a residual), and by a stacked gate/up product
/// whose halves feed a gated unit (SiLU gate first, GELU-tanh up first). The fused plans must
/// match the CPU reference of the ops as written and the unfused plan of the same graph, in 1
/// dispatch instead of 2 and 3 (software kernels keep the norm's dispatch: 2 and 2). Rows of
/// two activations and a norm with another reader stay unfused.
#[test]
fn fused_norm_and_gated_unit_every_variant() {
    use kiln::graph::{Act, GluInput};
    use kiln::reference::elementwise::{gelu_tanh, silu};
    use kiln::reference::norm::rms_norm;
    use kiln::CompileOptions;
    let run = |gpu: &std::sync::Arc<kiln::Gpu>,
               g: &kiln::Graph,
               ins: &[(kiln::Value, &[f32])],
               out,
               unfused| {
        let mut g = g.clone();
        g.output(out);
        let opts = CompileOptions {
            poison: true,
            unfused,
        };
        let plan = pollster::block_on(g.compile(gpu, opts)).unwrap();
        for (v, d) in ins {
            plan.write_f32(*v, d).unwrap();
        }
        plan.run().unwrap();
        let n = plan.dispatch_count();
        (pollster::block_on(plan.read_f32(out)).unwrap(), n)
    };
    for gpu in kiln_tests::gpu_variants() {
        let dtypes = DType::WEIGHTS.into_iter().map(|d| (d, test_k(d)));
        // Row lengths the 16-byte variant serves too (576: SmolLM2's hidden size).
        let wide = [
            (DType::Q4_0, 576),
            (DType::F16, 576),
            (DType::Q4_K, 256),
            (DType::Q8_0, 160),
        ];
        for (i, (dt, k)) in dtypes.chain(wide).enumerate() {
            let mut rng = Rng::new(900 + i as u64);
            let (f, eps) = (37, 1e-5);
            let wb = random_weight_bytes(&mut rng, dt, 2 * f, k);
            let wf = dequantize(dt, &wb, 2 * f * k).unwrap();
            let (x, nw, r) = (
                rng.vec(k, -2.0, 2.0),
                rng.vec(k, 0.5, 1.5),
                rng.vec(2 * f, -1.0, 1.0),
            );
            let xn = rms_norm(&x, &nw, eps);
            let (act, gate_first) = if i % 2 == 0 {
                (Act::Silu, true)
            } else {
                (Act::GeluTanh, false)
            };
            // One graph per case: norm -> product + residual, or norm -> product -> gated unit.
            let build = |glu: bool| {
                let mut g = kiln::Graph::new();
                let xv = g.input("x", &[1, k], DType::F32).unwrap();
                let nv = g.input("nw", &[k], DType::F32).unwrap();
                let rv = g.input("r", &[1, 2 * f], DType::F32).unwrap();
                let t = Tensor::upload(&gpu, "w", &[2 * f, k], dt, &wb).unwrap();
                let wv = g.tensor(&std::sync::Arc::new(t));
                let h = g.rms_norm(xv, nv, eps).unwrap();
                let y = if glu {
                    let gu = g.linear(h, wv, None).unwrap();
                    g.glu(GluInput::Halves { x: gu, gate_first }, act).unwrap()
                } else {
                    g.linear_add(h, wv, None, rv).unwrap()
                };
                (g, y, [xv, nv, rv])
            };
            let prod = refl::linear(&xn, &wf, None, 1, 2 * f, k);
            let want_res: Vec<f32> = prod.iter().zip(&r).map(|(p, r)| p + r).collect();
            let (gate, up) = if gate_first {
                (&prod[..f], &prod[f..])
            } else {
                (&prod[f..], &prod[..f])
            };
            let a = |v: f32| match act {
                Act::Silu => silu(v as f64) as f32,
                _ => gelu_tanh(v as f64) as f32,
            };
            let want_glu: Vec<f32> = gate.iter().zip(up).map(|(g, u)| a(*g) * u).collect();
            let tol = dot_tolerance(&xn, &wf, 1, 2 * f, k) * 4.0 + 1e-6;
            let what = |s: &str| {
                format!(
                    "{s} {dt} k={k} (software kernels {})",
                    gpu.features.software
                )
            };
            for (glu, want, plain) in [(false, &want_res, 2), (true, &want_glu, 3)] {
                let (g, y, [xv, nv, rv]) = build(glu);
                let ins: [(kiln::Value, &[f32]); 3] = [(xv, &x), (nv, &nw), (rv, &r)];
                let (got, n) = run(&gpu, &g, &ins, y, false);
                let (unfused, n0) = run(&gpu, &g, &ins, y, true);
                assert_close(&what("fused"), &got, want, tol, 1e-4);
                assert_close(&what("fused vs unfused"), &got, &unfused, tol, 1e-4);
                // Software kernels keep the norm: only the gated unit fuses there.
                let fused = if gpu.features.software { 2 } else { 1 };
                assert_eq!(
                    (n, n0),
                    (fused, plain),
                    "{}: dispatches fused/unfused",
                    what("")
                );
            }
        }
    }
    // Left as written: a norm over two rows (the GEMM's input), and a norm another op reads too.
    let gpu = kiln_tests::gpu();
    let mut g = kiln::Graph::new();
    let x = g.input("x", &[2, 64], DType::F32).unwrap();
    let nw = g.input("nw", &[64], DType::F32).unwrap();
    let t = Tensor::upload(&gpu, "w", &[16, 64], DType::F32, &vec![0u8; 16 * 64 * 4]).unwrap();
    let w = g.tensor(&std::sync::Arc::new(t));
    let h = g.rms_norm(x, nw, 1e-6).unwrap();
    let y = g.linear(h, w, None).unwrap();
    g.output(y);
    let plan = pollster::block_on(g.compile(&gpu, CompileOptions::default())).unwrap();
    assert_eq!(plan.dispatch_count(), 2, "two rows: norm + product");
    let mut g = kiln::Graph::new();
    let x = g.input("x", &[1, 64], DType::F32).unwrap();
    let nw = g.input("nw", &[64], DType::F32).unwrap();
    let t = Tensor::upload(&gpu, "w", &[16, 64], DType::F32, &vec![0u8; 16 * 64 * 4]).unwrap();
    let w = g.tensor(&std::sync::Arc::new(t));
    let h = g.rms_norm(x, nw, 1e-6).unwrap();
    let y = g.linear(h, w, None).unwrap();
    let z = g.add(y, y).unwrap();
    let s = g.add(h, h).unwrap();
    g.output(z);
    g.output(s);
    let plan = pollster::block_on(g.compile(&gpu, CompileOptions::default())).unwrap();
    assert_eq!(plan.dispatch_count(), 4, "a norm with another reader stays");
}

/// The rotary step fused into the stacked Q/K/V matvec (`Epilogue::RopeKv`), on every kernel
/// variant: rotate_half with full rotary dims and a bias (Qwen2), interleaved with partial
/// rotary dims, a position past the cache (k and v not written). q and both caches must match
/// the CPU reference and the unfused plan (product, then `rope_kv`), in 1 dispatch instead of 2;
/// the caches hold two sequences and the step writes the second (a parallel slot's cache).
#[test]
fn fused_rotary_step_every_variant() {
    use kiln::reference::elementwise::rope;
    use kiln::CompileOptions;
    use std::sync::Arc;
    let inv_freq = |rot: usize| -> Vec<f32> {
        (0..rot / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32))
            .collect()
    };
    for gpu in kiln_tests::gpu_variants() {
        for (case, (dt, k, heads, kv_heads, d, rot, interleaved, bias, pos)) in [
            (DType::Q4_0, 576, 3, 1, 32, 32, false, true, 5u32),
            (DType::F16, 208, 2, 2, 24, 16, true, false, 9),
            (DType::Q6_K, 256, 4, 2, 16, 16, false, false, 7),
            (DType::F32, 203, 2, 1, 16, 8, true, true, 12), // past the cache of 12 rows
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = Rng::new(1200 + case as u64);
            let (qw, kvw) = (heads * d, kv_heads * d);
            let n = qw + 2 * kvw;
            let (cap, positions) = (12, 16);
            let wb = random_weight_bytes(&mut rng, dt, n, k);
            let wf = dequantize(dt, &wb, n * k).unwrap();
            let x = rng.vec(k, -1.0, 1.0);
            let b = rng.vec(n, -0.5, 0.5);
            let f = inv_freq(rot);
            let tab = kiln::kernels::rope::table(&f, positions);
            // Caches of two sequences; the step writes the second (a parallel slot's).
            let (kc0, vc0) = (
                rng.vec(2 * cap * kvw, -1.0, 1.0),
                rng.vec(2 * cap * kvw, -1.0, 1.0),
            );
            // The caches in f32, then in f16 (two to a word; the reference rounds to f16).
            for f16 in [false, true] {
                let cache = |name: &str, data: &[f32]| -> Arc<Tensor> {
                    Arc::new(match f16 {
                        false => Tensor::from_f32(&gpu, name, &[2, cap, kvw], data).unwrap(),
                        true => Tensor::upload(
                            &gpu,
                            name,
                            &[2, cap, kvw],
                            DType::F16,
                            &to_f16(&mut data.to_vec()),
                        )
                        .unwrap(),
                    })
                };
                let run = |unfused: bool| -> (Vec<f32>, Vec<f32>, Vec<f32>, usize) {
                    let mut g = kiln::Graph::new();
                    let xv = g.input("x", &[1, 1, k], DType::F32).unwrap();
                    let bv = g.input("b", &[n], DType::F32).unwrap();
                    let fv = g.input("f", &[positions, rot / 2, 2], DType::F32).unwrap();
                    let w = Tensor::upload(&gpu, "w", &[n, k], dt, &wb).unwrap();
                    let wv = g.tensor(&Arc::new(w));
                    let (kc, vc) = (cache("kc", &kc0), cache("vc", &vc0));
                    let (kcv, vcv) = (g.tensor(&kc), g.tensor(&vc));
                    let p = g.scalar("pos").unwrap();
                    let qkv = g.linear(xv, wv, bias.then_some(bv)).unwrap();
                    let q = g
                        .rope_kv_seq(
                            qkv,
                            fv,
                            kcv,
                            vcv,
                            (heads, kv_heads),
                            interleaved,
                            kiln::Dyn::slot(p),
                            kiln::Dyn::Static(1),
                        )
                        .unwrap();
                    g.output(q);
                    let opts = CompileOptions {
                        poison: true,
                        unfused,
                    };
                    let mut plan = pollster::block_on(g.compile(&gpu, opts)).unwrap();
                    plan.write_f32(xv, &x).unwrap();
                    plan.write_f32(bv, &b).unwrap();
                    plan.write_f32(fv, &tab).unwrap();
                    plan.set(p, pos);
                    plan.run().unwrap();
                    let read = |t: &Arc<Tensor>| pollster::block_on(t.to_f32(&gpu)).unwrap();
                    let q = pollster::block_on(plan.read_f32(q)).unwrap();
                    (q, read(&kc), read(&vc), plan.dispatch_count())
                };
                let (q, kc, vc, n_fused) = run(false);
                let (q0, kc_0, vc_0, n_plain) = run(true);
                // CPU reference: the product, then the rotary step and the cache writes.
                let y = refl::linear(&x, &wf, bias.then_some(b.as_slice()), 1, n, k);
                let q_want = rope(&y[..qw], 1, heads, d, &f, interleaved, pos);
                let k_want = rope(&y[qw..qw + kvw], 1, kv_heads, d, &f, interleaved, pos);
                let (mut kc_want, mut vc_want) = (kc0.clone(), vc0.clone());
                let at = pos as usize;
                if at < cap {
                    let at = cap + at; // sequence 1
                    kc_want[at * kvw..(at + 1) * kvw].copy_from_slice(&k_want);
                    vc_want[at * kvw..(at + 1) * kvw].copy_from_slice(&y[qw + kvw..]);
                }
                if f16 {
                    to_f16(&mut kc_want);
                    to_f16(&mut vc_want);
                }
                let tol = dot_tolerance(&x, &wf, 1, n, k) * 2.0 + 1e-6;
                // A cache value rounds to f16 once: half an f16 ulp more, one ulp where the two
                // sides land on either side of a rounding boundary.
                let cache_rtol = if f16 { 1e-3 } else { 1e-5 };
                let what = format!(
                "fused rotary {dt} h={heads}/{kv_heads} d={d} rot={rot} f16 caches {f16} (software kernels {})",
                gpu.features.software
            );
                for (name, got, plain, want, rtol) in [
                    ("q", &q, &q0, &q_want, 1e-5),
                    ("k cache", &kc, &kc_0, &kc_want, cache_rtol),
                    ("v cache", &vc, &vc_0, &vc_want, cache_rtol),
                ] {
                    assert_close(&format!("{what}: {name}"), got, want, tol, rtol);
                    assert_close(&format!("{what}: {name} vs unfused"), got, plain, tol, rtol);
                }
                assert_eq!((n_fused, n_plain), (1, 2), "{what}: dispatches");
            }
        }
    }
}

/// The fused norm's sums of squares handed on from the residual product that made its input
/// (`NormPartials`): two producer/reader rounds (the second producer's residual is the first's
/// output, as in a transformer layer), two readers of the first, for f32 and Q4_K weights, on
/// the GPU kernels: the fused plan equals the unfused one, and the fusion pass paired them
/// (software kernels keep their norms, so nothing is handed on there).
#[test]
fn norm_partials_handed_on() {
    use kiln::CompileOptions;
    for gpu in kiln_tests::gpu_variants() {
        for (i, (dt, k)) in [(DType::F32, 96), (DType::Q4_K, 256)]
            .into_iter()
            .enumerate()
        {
            let mut rng = Rng::new(1200 + i as u64);
            let (k0, n2) = (64, 72);
            let mut g = kiln::Graph::new();
            let mut weight = |g: &mut kiln::Graph, n: usize, kk: usize, dt: DType| {
                let wb = random_weight_bytes(&mut rng, dt, n, kk);
                let t = Tensor::upload(&gpu, "w", &[n, kk], dt, &wb).unwrap();
                g.tensor(&std::sync::Arc::new(t))
            };
            let w1 = weight(&mut g, k, k0, DType::F32);
            let w2 = weight(&mut g, n2, k, dt);
            let w3 = weight(&mut g, 40, k, dt);
            let w4 = weight(&mut g, k, n2, DType::F32);
            let w5 = weight(&mut g, 24, k, dt);
            let a = g.input("a", &[1, k0], DType::F32).unwrap();
            let r = g.input("r", &[1, k], DType::F32).unwrap();
            let nw = g.input("nw", &[k], DType::F32).unwrap();
            let h = g.linear_add(a, w1, None, r).unwrap();
            let n1 = g.rms_norm(h, nw, 1e-5).unwrap();
            let y1 = g.linear(n1, w2, None).unwrap();
            let y2 = g.linear(n1, w3, None).unwrap();
            let h2 = g.linear_add(y1, w4, None, h).unwrap();
            let n2n = g.rms_norm(h2, nw, 1e-5).unwrap();
            let y3 = g.linear(n2n, w5, None).unwrap();
            g.output(y2);
            g.output(y3);
            let ins = [
                (a, rng.vec(k0, -1.0, 1.0)),
                (r, rng.vec(k, -1.0, 1.0)),
                (nw, rng.vec(k, 0.5, 1.5)),
            ];
            let run = |unfused| {
                let opts = CompileOptions {
                    poison: true,
                    unfused,
                };
                let plan = pollster::block_on(g.compile(&gpu, opts)).unwrap();
                for (v, d) in &ins {
                    plan.write_f32(*v, d).unwrap();
                }
                plan.run().unwrap();
                [y2, y3].map(|y| pollster::block_on(plan.read_f32(y)).unwrap())
            };
            let (fused, plain) = (run(false), run(true));
            let what = format!("{dt} (software kernels {})", gpu.features.software);
            for (f, p) in fused.iter().zip(&plain) {
                let scale = p.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_close(&what, f, p, 1e-4 * scale + 1e-5, 1e-4);
            }
            let ops = g.fused_ops(&gpu);
            let count = |s: &str| ops.iter().filter(|o| o.contains(s)).count();
            let want = if gpu.features.software {
                (0, 0)
            } else {
                (2, 3)
            };
            assert_eq!(
                (count("partials: Write"), count("partials: Read")),
                want,
                "{what}: {ops:#?}"
            );
        }
    }
}
