//! CPU reference of 2D convolution (NCHW, f64 accumulation).

/// `y[b, co, oy, ox]` of a `ks x ks` convolution with stride and zero padding.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    b: usize,
    ci: usize,
    h: usize,
    wd: usize,
    co: usize,
    ks: usize,
    stride: usize,
    pad: usize,
) -> Vec<f32> {
    conv2d_padded(x, w, bias, b, ci, h, wd, co, ks, stride, pad, 0)
}

/// [`conv2d`] with `pad_end` more zero rows and columns after the input.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_padded(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    b: usize,
    ci: usize,
    h: usize,
    wd: usize,
    co: usize,
    ks: usize,
    stride: usize,
    pad: usize,
    pad_end: usize,
) -> Vec<f32> {
    let ho = (h + 2 * pad + pad_end - ks) / stride + 1;
    let wo = (wd + 2 * pad + pad_end - ks) / stride + 1;
    let mut y = vec![0f32; b * co * ho * wo];
    for bi in 0..b {
        for o in 0..co {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = bias.map_or(0.0, |bb| bb[o] as f64);
                    for c in 0..ci {
                        for ky in 0..ks {
                            for kx in 0..ks {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv =
                                    x[((bi * ci + c) * h + iy as usize) * wd + ix as usize] as f64;
                                s += xv * w[((o * ci + c) * ks + ky) * ks + kx] as f64;
                            }
                        }
                    }
                    y[((bi * co + o) * ho + oy) * wo + ox] = s as f32;
                }
            }
        }
    }
    y
}
