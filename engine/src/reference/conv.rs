//! CPU reference (conv).
