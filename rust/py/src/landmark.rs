//! Landmark attention bindings.

use crate::buffers::{slice, slice_mut, Buf, DType};
use crate::runtime::{flops, run};
use crate::with_dtype;
use fastattn_kernels::landmark::{self, LandmarkDims, Selection};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `(batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim, block)`
type Dims = (usize, usize, usize, usize, usize, usize, usize, usize);

fn dims(
    (batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim, block): Dims,
) -> LandmarkDims {
    LandmarkDims {
        batch,
        q_len,
        kv_len,
        q_heads,
        kv_heads,
        head_dim,
        v_head_dim,
        block,
    }
}

/// Estimated FLOPs of a forward (decides whether the call runs inline).
fn work(d: &LandmarkDims) -> f64 {
    flops(&[
        d.batch,
        d.q_len,
        d.kv_len,
        d.q_heads,
        d.head_dim + d.v_head_dim,
    ])
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn landmark_forward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    out: Buf,
    lse: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: contiguous inputs and fresh, unaliased outputs, counts reported by Python.
        let (q, k, v, out, lse) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice_mut::<E>("out", out)?,
            slice_mut::<<E as fastattn_kernels::element::Element>::Acc>("lse", lse)?,
        )};
        run(py, threads, work(&d), move || landmark::forward(&d, scale, q, k, v, out, lse))
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn landmark_backward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    out: Buf,
    dout: Buf,
    lse: Buf,
    dq: Buf,
    dk: Buf,
    dv: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: as in `landmark_forward`; gradients are fresh and unaliased.
        let (q, k, v, out, dout, lse, dq, dk, dv) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice::<E>("out", out)?,
            slice::<E>("dout", dout)?,
            slice::<<E as fastattn_kernels::element::Element>::Acc>("lse", lse)?,
            slice_mut::<E>("dq", dq)?,
            slice_mut::<E>("dk", dk)?,
            slice_mut::<E>("dv", dv)?,
        )};
        run(py, threads, work(&d), move || landmark::backward(&d, scale, q, k, v, out, dout, lse, dq, dk, dv))
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn landmark_retrieval(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    top_k: usize,
    selection: &str,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    out: Buf,
    kept: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    let selection = match selection {
        "per_token_and_head" => Selection::PerTokenAndHead,
        "max_over_heads" => Selection::MaxOverHeads,
        "max_over_tokens" => Selection::MaxOverTokens,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown selection {other:?}"
            )));
        }
    };
    // a score per landmark, then top_k blocks and the own block, per query and head
    let per_query = d.kv_len / d.block.max(1) + (top_k + 1) * d.block;
    let work = flops(&[
        d.batch,
        d.q_len,
        d.q_heads,
        per_query,
        d.head_dim + d.v_head_dim,
    ]);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: contiguous inputs and fresh, unaliased outputs, counts reported by Python.
        let (q, k, v, out, kept) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k_cache", k)?,
            slice::<E>("v_cache", v)?,
            slice_mut::<E>("out", out)?,
            slice_mut::<i64>("kept", kept)?,
        )};
        run(py, threads, work, move || landmark::retrieval(&d, scale, top_k, selection, q, k, v, out, kept))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(landmark_forward, m)?)?;
    m.add_function(wrap_pyfunction!(landmark_backward, m)?)?;
    m.add_function(wrap_pyfunction!(landmark_retrieval, m)?)?;
    Ok(())
}
