//! Plain-Rust CPU references of every kernel, accumulating in f64. The tests compare each
//! GPU kernel against these on random inputs.

pub mod attention;
pub mod conv;
pub mod delta;
pub mod elementwise;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod sample;
pub mod scheduler;

/// Largest |got - want| divided by the largest |want|: a scale-free error for comparing a
/// kernel or a model with its reference. A length mismatch or a NaN in `got` is infinite.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .fold(0f64, |a, &v| a.max((v as f64).abs()))
        .max(1e-30);
    let worst = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .fold(
            0f64,
            |a, d| if d.is_nan() { f64::INFINITY } else { a.max(d) },
        );
    worst / scale
}
