//! Attention family (being written).
use super::{Bound, Ctx, Dispatch};
use crate::error::{Error, Result};
use crate::graph::Op;
/// Largest head dimension the kernel supports.
pub const MAX_HEAD_DIM: usize = 256;
/// Encodes attention.
pub fn encode(_ctx: &Ctx, _op: &Op, _ins: &[Bound], _out: &Bound) -> Result<Vec<Dispatch>> {
    Err(Error::Unsupported("attention kernel not yet written".into()))
}
