//! CPU reference of attention (being written).
