//! Dense attention bindings.

use crate::buffers::{slice, slice_mut, Buf, DType};
use crate::runtime::{flops, run};
use crate::with_dtype;
use fastattn_kernels::attention::{self, AttnDims};
use fastattn_kernels::Element;
use pyo3::prelude::*;

/// `(batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim)`
type Dims = (usize, usize, usize, usize, usize, usize, usize);

fn dims((batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim): Dims) -> AttnDims {
    AttnDims {
        batch,
        q_len,
        kv_len,
        q_heads,
        kv_heads,
        head_dim,
        v_head_dim,
    }
}

/// Estimated FLOPs of a forward (decides whether the call runs inline).
fn work(d: &AttnDims) -> f64 {
    flops(&[
        d.batch,
        d.q_len,
        d.kv_len,
        d.q_heads,
        d.head_dim.max(d.v_head_dim),
    ])
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn attention_forward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    causal: bool,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    out: Buf,
    lse: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: the Python layer passes fresh contiguous inputs and freshly allocated,
        // unaliased outputs whose element counts it reports alongside the pointers.
        let (q, k, v, out, lse) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice_mut::<E>("out", out)?,
            slice_mut::<<E as Element>::Acc>("lse", lse)?,
        )};
        run(py, threads, work(&d), move || attention::forward(&d, scale, causal, q, k, v, out, lse))
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    causal: bool,
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
        // SAFETY: as in `attention_forward`; dq/dk/dv are fresh and unaliased.
        let (q, k, v, out, dout, lse, dq, dk, dv) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice::<E>("out", out)?,
            slice::<E>("dout", dout)?,
            slice::<<E as Element>::Acc>("lse", lse)?,
            slice_mut::<E>("dq", dq)?,
            slice_mut::<E>("dk", dk)?,
            slice_mut::<E>("dv", dv)?,
        )};
        run(py, threads, work(&d), move || {
            attention::backward(&d, scale, causal, q, k, v, out, dout, lse, dq, dk, dv)
        })
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward, m)?)?;
    Ok(())
}
