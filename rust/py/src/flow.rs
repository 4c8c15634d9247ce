//! Flow-Attention bindings.

use crate::buffers::{slice, slice_mut, Buf, DType};
use crate::runtime::{flops, run};
use crate::with_dtype;
use fastattn_kernels::flow::{self, FlowDims};
use pyo3::prelude::*;

/// `(batch, q_len, kv_len, heads, head_dim, v_head_dim)`
type Dims = (usize, usize, usize, usize, usize, usize);

fn dims((batch, q_len, kv_len, heads, head_dim, v_head_dim): Dims) -> FlowDims {
    FlowDims {
        batch,
        q_len,
        kv_len,
        heads,
        head_dim,
        v_head_dim,
    }
}

/// Estimated FLOPs of a forward (decides whether the call runs inline).
fn work(d: &FlowDims) -> f64 {
    flops(&[
        d.batch,
        d.q_len.max(d.kv_len),
        d.heads,
        d.head_dim,
        d.v_head_dim,
    ])
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn flow_attention_forward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    causal: bool,
    eps: f64,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    out: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: contiguous inputs and a fresh, unaliased output, counts reported by Python.
        let (q, k, v, out) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice_mut::<E>("out", out)?,
        )};
        run(py, threads, work(&d), move || flow::forward(&d, causal, eps, q, k, v, out))
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn flow_attention_backward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    causal: bool,
    eps: f64,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    dout: Buf,
    dq: Buf,
    dk: Buf,
    dv: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: as in `flow_attention_forward`; gradients are fresh and unaliased.
        let (q, k, v, dout, dq, dk, dv) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice::<E>("dout", dout)?,
            slice_mut::<E>("dq", dq)?,
            slice_mut::<E>("dk", dk)?,
            slice_mut::<E>("dv", dv)?,
        )};
        run(py, threads, work(&d), move || flow::backward(&d, causal, eps, q, k, v, dout, dq, dk, dv))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(flow_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(flow_attention_backward, m)?)?;
    Ok(())
}
