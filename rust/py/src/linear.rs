//! Linear attention bindings.

use crate::buffers::{opt, slice, slice_mut, Buf, DType};
use crate::runtime::{flops, run};
use crate::with_dtype;
use fastattn_kernels::linear::{self, FeatureMap, LinearDims, LinearOpts};
use fastattn_kernels::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `(batch, seq_len, heads, head_dim, v_head_dim)`
type Dims = (usize, usize, usize, usize, usize);

fn dims((batch, seq_len, heads, head_dim, v_head_dim): Dims) -> LinearDims {
    LinearDims {
        batch,
        seq_len,
        heads,
        head_dim,
        v_head_dim,
    }
}

fn opts(scale: f64, causal: bool, normalize: bool, feature_map: &str) -> PyResult<LinearOpts> {
    let feature_map = FeatureMap::parse(feature_map).ok_or_else(|| {
        PyValueError::new_err(format!(
            "feature_map must be 'identity', 'elu1' or 'relu', got '{feature_map}'"
        ))
    })?;
    Ok(LinearOpts {
        scale,
        causal,
        normalize,
        feature_map,
    })
}

/// Estimated FLOPs of a forward (decides whether the call runs inline).
fn work(d: &LinearDims) -> f64 {
    flops(&[d.batch, d.seq_len, d.heads, d.head_dim, d.v_head_dim])
}

#[pyfunction]
#[pyo3(signature = (dtype, shape, scale, causal, normalize, feature_map, threads, q, k, v, init_kv, init_z, cu_seqlens, out, final_kv, final_z))]
#[allow(clippy::too_many_arguments)]
fn linear_attention_forward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    causal: bool,
    normalize: bool,
    feature_map: &str,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    init_kv: Option<Buf>,
    init_z: Option<Buf>,
    cu_seqlens: Option<Buf>,
    out: Buf,
    final_kv: Buf,
    final_z: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    let o = opts(scale, causal, normalize, feature_map)?;
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: the Python layer passes contiguous inputs and fresh, unaliased outputs
        // whose element counts it reports alongside the pointers.
        let (q, k, v, s0, z0, cu, out, fkv, fz) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            opt::<<E as Element>::Acc>("initial_kv", init_kv)?,
            opt::<<E as Element>::Acc>("initial_z", init_z)?,
            opt::<i64>("cu_seqlens", cu_seqlens)?,
            slice_mut::<E>("out", out)?,
            slice_mut::<<E as Element>::Acc>("final_kv", final_kv)?,
            slice_mut::<<E as Element>::Acc>("final_z", final_z)?,
        )};
        run(py, threads, work(&d), move || linear::forward(&d, &o, cu, q, k, v, s0, z0, out, fkv, fz))
    })
}

#[pyfunction]
#[pyo3(signature = (dtype, shape, scale, causal, normalize, feature_map, threads, q, k, v, init_kv, init_z, cu_seqlens, dout, d_final_kv, d_final_z, dq, dk, dv, d_init_kv, d_init_z))]
#[allow(clippy::too_many_arguments)]
fn linear_attention_backward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    causal: bool,
    normalize: bool,
    feature_map: &str,
    threads: usize,
    q: Buf,
    k: Buf,
    v: Buf,
    init_kv: Option<Buf>,
    init_z: Option<Buf>,
    cu_seqlens: Option<Buf>,
    dout: Buf,
    d_final_kv: Option<Buf>,
    d_final_z: Option<Buf>,
    dq: Buf,
    dk: Buf,
    dv: Buf,
    d_init_kv: Buf,
    d_init_z: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    let o = opts(scale, causal, normalize, feature_map)?;
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: as in `linear_attention_forward`; gradients are fresh and unaliased.
        let (q, k, v, s0, z0, cu, dout, gkv, gz, dq, dk, dv, dkv0, dz0) = unsafe {(
            slice::<E>("q", q)?,
            slice::<E>("k", k)?,
            slice::<E>("v", v)?,
            opt::<<E as Element>::Acc>("initial_kv", init_kv)?,
            opt::<<E as Element>::Acc>("initial_z", init_z)?,
            opt::<i64>("cu_seqlens", cu_seqlens)?,
            slice::<E>("dout", dout)?,
            opt::<<E as Element>::Acc>("d_final_kv", d_final_kv)?,
            opt::<<E as Element>::Acc>("d_final_z", d_final_z)?,
            slice_mut::<E>("dq", dq)?,
            slice_mut::<E>("dk", dk)?,
            slice_mut::<E>("dv", dv)?,
            slice_mut::<<E as Element>::Acc>("d_initial_kv", d_init_kv)?,
            slice_mut::<<E as Element>::Acc>("d_initial_z", d_init_z)?,
        )};
        run(py, threads, work(&d), move || {
            linear::backward(&d, &o, cu, q, k, v, s0, z0, dout, gkv, gz, dq, dk, dv, dkv0, dz0)
        })
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(linear_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(linear_attention_backward, m)?)?;
    Ok(())
}
