//! 2D convolution (implicit GEMM) against the CPU reference, for the weight dtypes a U-Net uses.

use kiln::dtype::dequantize;
use kiln::reference::conv::conv2d_padded;
use kiln::DType;
use kiln_tests::{assert_close, random_weight_bytes, OpTest, Rng};

#[test]
fn conv2d_kernels_strides_padding_dtypes() {
    let cases = [
        // (b, ci, h, w, co, k, stride, pad, pad_end, dtype, bias)
        (1, 4, 9, 11, 8, 3, 1, 1, 0, DType::F32, true),
        (2, 5, 16, 16, 70, 3, 2, 1, 0, DType::F16, true),
        (2, 32, 13, 10, 67, 1, 1, 0, 0, DType::F32, false),
        (1, 16, 8, 8, 16, 3, 2, 0, 0, DType::BF16, true),
        (1, 3, 7, 7, 5, 3, 1, 0, 0, DType::F16, false),
        // Block formats (k = ci * 9 whole blocks) through the software GEMM's quant-word reads.
        (2, 32, 5, 6, 9, 3, 1, 1, 0, DType::Q8_0, true),
        (1, 256, 5, 4, 6, 3, 2, 1, 0, DType::Q4_K, false),
        // At least 256 output pixels (software adapters: window rows in GEMM groups of 8, the
        // last one partial; channels in groups of 4, the last one partial).
        (1, 6, 20, 17, 9, 3, 1, 1, 0, DType::F16, true),
        (2, 8, 16, 18, 5, 1, 1, 0, 0, DType::F32, false),
        (1, 4, 34, 33, 7, 3, 2, 1, 0, DType::BF16, true),
        // SD 1.5's widest input (skip concatenation of 1280 + 1280 channels): 23040 products
        // per output, past lavapipe's cap of 65535 loop iterations per invocation if a kernel
        // spent more than two per product.
        (1, 2560, 4, 4, 8, 3, 1, 1, 0, DType::F16, true),
        // Enough pixels and channels for the GEMM core's 64 x 128 tiles (`gemm_wide`), ragged
        // in the channels.
        (2, 4, 64, 64, 136, 3, 1, 1, 0, DType::F16, true),
        // The VAE encoder's down-sampling: padded (0, 1, 0, 1), stride 2, even and odd sizes.
        (1, 8, 16, 16, 8, 3, 2, 0, 1, DType::F32, true),
        (2, 6, 21, 20, 70, 3, 2, 0, 1, DType::F16, true),
    ];
    // Every variant: the GEMM core's workgroup tiles, and for software adapters IM2COL (the
    // windows through matmul.wgsl's DIRECT GEMM, in chunks of rows for large outputs).
    let variants = kiln_tests::gpu_variants();
    let runs = variants
        .iter()
        .flat_map(|g| cases.iter().enumerate().map(move |c| (g, c)));
    for (gpu, (i, &(b, ci, h, w, co, k, stride, pad, pad_end, dt, bias))) in runs {
        let mut rng = Rng::new(i as u64 + 100);
        let x = rng.vec(b * ci * h * w, -1.0, 1.0);
        let wb = random_weight_bytes(&mut rng, dt, co, ci * k * k);
        let wf = dequantize(dt, &wb, co * ci * k * k).unwrap();
        let bb = rng.vec(co, -0.5, 0.5);
        let mut t = OpTest::on(gpu.clone());
        let xv = t.input("x", &[b, ci, h, w], &x);
        let wv = t.weight("w", &[co, ci, k, k], dt, &wb);
        let bv = bias.then(|| t.input("b", &[co], &bb));
        let y = t.g.conv2d_padded(xv, wv, bv, stride, pad, pad_end).unwrap();
        // f16 GEMM tiles round both operands to f16 (to nearest, as every GPU converts): the
        // reference takes the same operands.
        let want = conv2d_padded(
            &kiln_tests::as_tile_operands(gpu, &x),
            &kiln_tests::as_tile_operands(gpu, &wf),
            bias.then_some(bb.as_slice()),
            b,
            ci,
            h,
            w,
            co,
            k,
            stride,
            pad,
            pad_end,
        );
        // Dot products of n = ci*k*k terms with |terms| <= 1: f32 accumulation error grows at
        // most linearly in n; 3e-5 covers n <= 288 (~300 * 6e-8 * 1), scaled from there.
        let n = (ci * k * k) as f32;
        assert_close(
            &format!(
                "conv2d case {i} ({dt}, k{k} s{stride} p{pad}+{pad_end}, software kernels {})",
                gpu.features.software
            ),
            &t.run(y, &[]),
            &want,
            3e-5 * (n / 288.0).max(1.0),
            1e-5,
        );
    }
}

#[test]
fn conv2d_shape_errors() {
    let mut g = kiln::Graph::new();
    let x = g.input("x", &[1, 4, 8, 8], DType::F32).unwrap();
    let w = g.input("w", &[8, 5, 3, 3], DType::F32).unwrap();
    let e = g.conv2d(x, w, None, 1, 1).unwrap_err();
    assert!(
        e.to_string().contains("[1, 4, 8, 8]") && e.to_string().contains("[8, 5, 3, 3]"),
        "{e}"
    );
    let w = g.input("w2", &[8, 4, 3, 3], DType::F32).unwrap();
    let e = g.conv2d(x, w, None, 3, 1).unwrap_err();
    assert!(e.to_string().contains("stride 3"), "{e}");
}
