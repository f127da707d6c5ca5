//! CPU reference (linear).
