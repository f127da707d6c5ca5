//! CPU reference (norm).
