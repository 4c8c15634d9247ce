//! Neighborhood attention bindings.

use crate::buffers::{slice, slice_mut, Buf, DType};
use crate::runtime::{flops, run};
use crate::with_dtype;
use fastattn_kernels::neighborhood::{self, NaDims, NaParams};
use fastattn_kernels::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `(batch, spatial, q_heads, kv_heads, head_dim, v_head_dim, n_additional)`
type Dims = (usize, Vec<usize>, usize, usize, usize, usize, usize);
/// `(kernel_size, stride, dilation, is_causal, scale)`, one entry per spatial dim.
type Params = (Vec<usize>, Vec<usize>, Vec<usize>, Vec<bool>, f64);

fn convert(shape: Dims, params: Params) -> PyResult<(NaDims, NaParams)> {
    let (batch, spatial, hq, hkv, d, dv, extra) = shape;
    let (k, s, dil, c, scale) = params;
    let r = spatial.len();
    if !(1..=3).contains(&r) || [k.len(), s.len(), dil.len(), c.len()] != [r; 4] {
        return Err(PyValueError::new_err(
            "spatial rank must be 1-3 with one kernel_size/stride/dilation/is_causal entry per dim",
        ));
    }
    Ok((
        NaDims::new(batch, &spatial, hq, hkv, d, dv, extra),
        NaParams::new(&k, &s, &dil, &c, scale),
    ))
}

/// Estimated FLOPs of a forward (decides whether the call runs inline).
fn work(d: &NaDims, p: &NaParams) -> f64 {
    let keys = p.kernel_size[..d.rank].iter().product::<usize>() + d.n_additional;
    let queries = d.spatial[..d.rank].iter().product::<usize>();
    flops(&[
        d.batch,
        d.q_heads,
        d.head_dim.max(d.v_head_dim),
        queries,
        keys,
    ])
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn na_forward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    params: Params,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    add_k: Buf,
    add_v: Buf,
    out: Buf,
    lse: Buf,
) -> PyResult<()> {
    let (d, p) = convert(shape, params)?;
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: the Python layer passes contiguous inputs and freshly allocated, unaliased
        // outputs whose element counts it reports alongside the pointers.
        let (q, k, v, ak, av, out, lse) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice::<E>("additional_keys", add_k)?,
            slice::<E>("additional_values", add_v)?,
            slice_mut::<E>("out", out)?,
            slice_mut::<<E as Element>::Acc>("lse", lse)?,
        )};
        run(py, threads, work(&d, &p), move || neighborhood::forward(&d, &p, q, k, v, ak, av, out, lse))
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn na_backward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    params: Params,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    add_k: Buf,
    add_v: Buf,
    out: Buf,
    dout: Buf,
    lse: Buf,
    grads: (Buf, Buf, Buf, Buf, Buf),
) -> PyResult<()> {
    let (d, p) = convert(shape, params)?;
    let (dq, dk, dv, dak, dav) = grads;
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: as in `na_forward`; the five gradients are fresh and unaliased.
        let (q, k, v, ak, av, out, dout, lse, dq, dk, dv, dak, dav) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            slice::<E>("additional_keys", add_k)?,
            slice::<E>("additional_values", add_v)?,
            slice::<E>("out", out)?,
            slice::<E>("dout", dout)?,
            slice::<<E as Element>::Acc>("lse", lse)?,
            slice_mut::<E>("dq", dq)?,
            slice_mut::<E>("dk", dk)?,
            slice_mut::<E>("dv", dv)?,
            slice_mut::<E>("d_additional_keys", dak)?,
            slice_mut::<E>("d_additional_values", dav)?,
        )};
        run(py, threads, work(&d, &p), move || {
            neighborhood::backward(&d, &p, q, k, v, ak, av, out, dout, lse, dq, dk, dv, dak, dav)
        })
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(na_forward, m)?)?;
    m.add_function(wrap_pyfunction!(na_backward, m)?)?;
    Ok(())
}
