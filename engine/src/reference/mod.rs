//! Plain-Rust CPU references of every kernel, accumulating in f64. The tests compare each
//! GPU kernel against these on random inputs.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod sample;
pub mod scheduler;
