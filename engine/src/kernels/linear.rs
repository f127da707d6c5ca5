//! Linear family: decode matvec with fused dequantization (`matvec.wgsl`), tiled GEMM
//! (`matmul.wgsl` over `gemm.wgsl`) and embedding gathers (`gather.wgsl`), for every weight
//! dtype. A weight split into parts gets one dispatch per part, each writing its rows.

use super::{elementwise_groups, grid, Binding, Bound, Dispatch, KernelKey, Params};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Inputs with at most this many rows use the matvec kernel; more use the GEMM.
pub const MATVEC_MAX_ROWS: usize = 2;

/// Adds the weight-dtype define of `weights.wgsl`.
pub fn weight_key(shader: &'static str, dtype: DType) -> Result<KernelKey> {
    if !DType::WEIGHTS.contains(&dtype) {
        return Err(Error::DType {
            op: shader.into(),
            expected: "a weight dtype".into(),
            found: dtype.to_string(),
        });
    }
    Ok(KernelKey::new(shader, "main").def(&format!("W_{}", dtype.name().to_uppercase()), ""))
}

/// `x @ w^T (+ bias)`.
pub fn linear(ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
    let (x, w) = (&ins[0], &ins[1]);
    let bias = ins.get(2);
    let k = *x.shape.last().unwrap_or(&1);
    let m_total = x.numel() / k.max(1);
    let bias_buf = bias.map(|b| b.buf()).unwrap_or(x.buf());
    let has_bias = bias.is_some() as u32;
    if w.shape.len() == 3 {
        // Batched product with an f32 activation as the second operand.
        let (b, n) = (w.shape[0], w.shape[1]);
        let m = m_total / b;
        let p = Params::default()
            .u(m)
            .u(n)
            .u(k)
            .u(k)
            .u(n * k)
            .u(0)
            .u(n)
            .u(has_bias);
        return Ok(vec![Dispatch {
            key: weight_key("matmul.wgsl", DType::F32)?,
            params: p.0,
            bindings: vec![
                Binding::read(w.buf()),
                Binding::read(x.buf()),
                Binding::read(bias_buf),
                Binding::write(out.buf()),
            ],
            groups: [n.div_ceil(64) as u32, m.div_ceil(64) as u32, b as u32],
        }]);
    }
    let n_total = w.shape[0];
    let row_words = w.dtype.row_words(k);
    let mut ds = Vec::new();
    for part in &w.parts {
        let bindings = vec![
            Binding::read(&part.buffer),
            Binding::read(x.buf()),
            Binding::read(bias_buf),
            Binding::write(out.buf()),
        ];
        if m_total <= MATVEC_MAX_ROWS {
            let p = Params::default()
                .u(part.rows)
                .u(k)
                .u(row_words)
                .u(part.row_start)
                .u(m_total)
                .u(n_total)
                .u(has_bias);
            ds.push(Dispatch {
                key: weight_key("matvec.wgsl", w.dtype)?,
                params: p.0,
                bindings,
                groups: grid((part.rows.div_ceil(4) * m_total) as u32),
            });
        } else {
            let p = Params::default()
                .u(m_total)
                .u(part.rows)
                .u(k)
                .u(row_words)
                .u(0)
                .u(part.row_start)
                .u(n_total)
                .u(has_bias);
            ds.push(Dispatch {
                key: weight_key("matmul.wgsl", w.dtype)?,
                params: p.0,
                bindings,
                groups: [
                    part.rows.div_ceil(64) as u32,
                    m_total.div_ceil(64) as u32,
                    1,
                ],
            });
        }
    }
    Ok(ds)
}

/// Embedding rows `table[ids]`.
pub fn gather(
    table: &Bound,
    ids: &Bound,
    ids_offset: crate::graph::Dyn,
    out: &Bound,
) -> Result<Vec<Dispatch>> {
    let (total, d) = (table.shape[0], table.shape[1]);
    let n = out.shape[0];
    let [oa, os, om] = ids_offset.words();
    let row_words = table.dtype.row_words(d);
    table
        .parts
        .iter()
        .map(|part| {
            Ok(Dispatch {
                key: weight_key("gather.wgsl", table.dtype)?,
                params: Params::default()
                    .u(n)
                    .u(d)
                    .u(row_words)
                    .u(part.row_start)
                    .u(part.rows)
                    .u(total)
                    .u(oa)
                    .u(os)
                    .u(om)
                    .0,
                bindings: vec![
                    Binding::read(&part.buffer),
                    Binding::read(ids.buf()),
                    Binding::write(out.buf()),
                ],
                groups: elementwise_groups(n * d),
            })
        })
        .collect()
}
