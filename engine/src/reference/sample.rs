//! CPU reference of sampling (being written).
