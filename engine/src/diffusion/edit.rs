//! Images going into a generation (img2img, inpainting), prepared as diffusers'
//! `VaeImageProcessor` prepares them: resized with a Lanczos filter when the size differs, the
//! image to `[-1, 1]`, the mask to PIL's grayscale and binarized at 0.5 (white = repaint), and
//! the mask at the latent size by nearest neighbour (`F.interpolate`'s default).

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major (`rgb.len() == 3 * width * height`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// The largest side an init image or mask may have (before resizing): an 8192 x 8192 image is
/// already 200 MB of pixels.
pub const MAX_SIDE: usize = 8192;

impl RgbImage {
    /// An image from RGB bytes, checked against its size.
    pub fn new(width: usize, height: usize, rgb: Vec<u8>, what: &str) -> Result<RgbImage> {
        let img = RgbImage { width, height, rgb };
        img.check(what)?;
        Ok(img)
    }

    /// An error naming `what` when the size is empty, too large or does not match the bytes.
    pub fn check(&self, what: &str) -> Result<()> {
        let (w, h) = (self.width, self.height);
        let bad = |msg: String| Error::Data {
            name: what.into(),
            msg,
        };
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(bad(format!(
                "size {w}x{h} (each side 1 to {MAX_SIDE} pixels)"
            )));
        }
        if self.rgb.len() != 3 * w * h {
            return Err(bad(format!(
                "{} bytes for a {w}x{h} RGB image (expected {})",
                self.rgb.len(),
                3 * w * h
            )));
        }
        Ok(())
    }

    /// The image at `w x h`: itself when the size matches, else resized (Lanczos, a = 3, the
    /// filter widened by the scale when shrinking, as PIL's `Image.resize(..., LANCZOS)`
    /// does; rounded back to 8 bits).
    pub fn resized(&self, w: usize, h: usize) -> RgbImage {
        if (w, h) == (self.width, self.height) {
            return self.clone();
        }
        // Horizontal pass to [height][w][3] in f32, then vertical.
        let hx = Filter::new(self.width, w);
        let mut tmp = vec![0f32; self.height * w * 3];
        for y in 0..self.height {
            for (x, (lo, ws)) in hx.taps.iter().enumerate() {
                for c in 0..3 {
                    tmp[(y * w + x) * 3 + c] = ws
                        .iter()
                        .enumerate()
                        .map(|(k, wt)| wt * self.rgb[(y * self.width + lo + k) * 3 + c] as f32)
                        .sum();
                }
            }
        }
        let vy = Filter::new(self.height, h);
        let mut rgb = vec![0u8; h * w * 3];
        for (y, (lo, ws)) in vy.taps.iter().enumerate() {
            for x in 0..w {
                for c in 0..3 {
                    let v: f32 = ws
                        .iter()
                        .enumerate()
                        .map(|(k, wt)| wt * tmp[((lo + k) * w + x) * 3 + c])
                        .sum();
                    rgb[(y * w + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        RgbImage {
            width: w,
            height: h,
            rgb,
        }
    }

    /// Planar `[3, h, w]` in `[-1, 1]` (`x / 127.5 - 1`, diffusers' `/ 255` then `2x - 1`).
    pub fn to_planar(&self) -> Vec<f32> {
        let n = self.width * self.height;
        let mut out = vec![0f32; 3 * n];
        for p in 0..n {
            for c in 0..3 {
                out[c * n + p] = self.rgb[p * 3 + c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        out
    }

    /// The mask of a mask image: PIL's `convert("L")` (ITU-R 601-2 luma in 16-bit fixed
    /// point), then 1 where `L / 255 >= 0.5` (repaint), else 0; `[h * w]`.
    pub fn to_mask(&self) -> Vec<f32> {
        self.rgb
            .chunks_exact(3)
            .map(|p| {
                let l =
                    (p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16;
                if l as f32 / 255.0 < 0.5 {
                    0.0
                } else {
                    1.0
                }
            })
            .collect()
    }
}

/// The mask `[h * w]` at the latent size `[lh * lw]`: nearest neighbour, source index
/// `floor(dst * in / out)` as `torch.nn.functional.interpolate` computes it.
pub fn mask_to_latent(mask: &[f32], h: usize, w: usize, lh: usize, lw: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(lh * lw);
    for y in 0..lh {
        let sy = ((y as f64 * h as f64 / lh as f64).floor() as usize).min(h - 1);
        for x in 0..lw {
            let sx = ((x as f64 * w as f64 / lw as f64).floor() as usize).min(w - 1);
            out.push(mask[sy * w + sx]);
        }
    }
    out
}

/// The image with the repainted pixels set to 0 (mid-gray): diffusers'
/// `init_image * (mask < 0.5)` on the planar `[3, h w]` image.
pub fn masked(planar: &[f32], mask: &[f32]) -> Vec<f32> {
    let n = mask.len();
    planar
        .iter()
        .enumerate()
        .map(|(i, &v)| if mask[i % n] < 0.5 { v } else { 0.0 })
        .collect()
}

/// One axis of a Lanczos resize: for each output index, the first input index and the
/// normalized weights from there.
struct Filter {
    taps: Vec<(usize, Vec<f32>)>,
}

impl Filter {
    fn new(n_in: usize, n_out: usize) -> Filter {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let p = std::f64::consts::PI * x;
                p.sin() / p
            }
        }
        let lanczos = |x: f64| {
            if x.abs() < 3.0 {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            }
        };
        let scale = n_in as f64 / n_out as f64;
        let fscale = scale.max(1.0);
        let support = 3.0 * fscale;
        let taps = (0..n_out)
            .map(|o| {
                let center = (o as f64 + 0.5) * scale;
                let lo = ((center - support).floor().max(0.0)) as usize;
                let hi = ((center + support).ceil() as usize).min(n_in);
                let mut ws: Vec<f64> = (lo..hi)
                    .map(|i| lanczos((i as f64 + 0.5 - center) / fscale))
                    .collect();
                let sum: f64 = ws.iter().sum();
                if sum != 0.0 {
                    ws.iter_mut().for_each(|v| *v /= sum);
                }
                (lo, ws.into_iter().map(|v| v as f32).collect())
            })
            .collect();
        Filter { taps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_untouched_and_constant_images_stay_constant() {
        let img = RgbImage::new(5, 3, (0..45).map(|v| v as u8).collect(), "x").unwrap();
        assert_eq!(img.resized(5, 3), img);
        let flat = RgbImage::new(7, 9, vec![200; 7 * 9 * 3], "x").unwrap();
        let r = flat.resized(16, 4);
        assert_eq!((r.width, r.height), (16, 4));
        assert!(r.rgb.iter().all(|&v| v == 200), "{:?}", r.rgb);
    }

    #[test]
    fn mask_binarizes_luma_and_samples_nearest() {
        // white, black, mid-gray just below and at 0.5 (L 127 < 127.5, 128 >= 127.5)
        let m = RgbImage::new(
            4,
            1,
            vec![255, 255, 255, 0, 0, 0, 127, 127, 127, 128, 128, 128],
            "m",
        )
        .unwrap();
        assert_eq!(m.to_mask(), vec![1.0, 0.0, 0.0, 1.0]);
        let big: Vec<f32> = (0..16).map(|i| i as f32).collect();
        assert_eq!(mask_to_latent(&big, 4, 4, 2, 2), vec![0.0, 2.0, 8.0, 10.0]);
    }

    #[test]
    fn bad_sizes_are_errors_naming_the_input() {
        let e = RgbImage::new(2, 2, vec![0; 11], "init image").unwrap_err();
        assert!(e.to_string().contains("init image"), "{e}");
        assert!(RgbImage::new(0, 2, vec![], "mask").is_err());
    }
}
