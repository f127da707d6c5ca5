//! Sampling family (being written).
use super::{Bound, Ctx, Dispatch};
use crate::error::{Error, Result};
use crate::graph::Op;
/// Number of f32 sampler settings.
pub const SETTINGS_LEN: usize = 8;
/// Encodes sampling and noise.
pub fn encode(_ctx: &Ctx, _op: &Op, _ins: &[Bound], _out: &Bound) -> Result<Vec<Dispatch>> {
    Err(Error::Unsupported("sampling kernel not yet written".into()))
}
