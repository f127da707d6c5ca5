//! CPU reference (elementwise).
