//! HiLo bindings (the attention boundary: projection outputs in, branch outputs out).

use crate::buffers::{opt, slice, slice_mut, Buf, DType};
use crate::runtime::{flops, run};
use crate::with_dtype;
use fastattn_kernels::hilo::{self, HiloDims, HiloRows};
use fastattn_kernels::Element;
use pyo3::prelude::*;

/// `(batch, height, width, window, head_dim, hi_heads, lo_heads)`
type Dims = (usize, usize, usize, usize, usize, usize, usize);

fn dims((batch, height, width, window, head_dim, hi_heads, lo_heads): Dims) -> HiloDims {
    HiloDims {
        batch,
        height,
        width,
        window,
        head_dim,
        hi_heads,
        lo_heads,
    }
}

/// Contiguous token rows: `[q | k | v]`, the Lo-Fi queries and the pooled `[K | V]`.
fn rows(d: &HiloDims) -> HiloRows {
    HiloRows {
        hi: 3 * d.hi_heads * d.head_dim,
        lo_q: d.lo_heads * d.head_dim,
        lo_kv: 2 * d.lo_heads * d.head_dim,
    }
}

/// Estimated FLOPs of a forward (decides whether the call runs inline).
fn work(d: &HiloDims) -> f64 {
    let tokens = d.batch * d.height * d.width;
    flops(&[tokens, d.head_dim, d.hi_heads, d.window * d.window])
        + flops(&[tokens, d.head_dim, d.lo_heads, d.pooled()])
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn hilo_forward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    threads: usize,
    hi_qkv: Buf,
    hi_pad: Option<Buf>,
    lo_q: Buf,
    lo_kv: Buf,
    hi_out: Buf,
    lo_out: Buf,
    lo_lse: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    let r = rows(&d);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: the Python layer passes contiguous inputs and fresh, unaliased outputs
        // whose element counts it reports alongside the pointers.
        let (hi_qkv, hi_pad, lo_q, lo_kv, hi_out, lo_out, lo_lse) = unsafe {(
            slice::<E>("hi_qkv", hi_qkv)?,
            opt::<E>("hi_pad", hi_pad)?,
            slice::<E>("lo_q", lo_q)?,
            slice::<E>("lo_kv", lo_kv)?,
            slice_mut::<E>("hi_out", hi_out)?,
            slice_mut::<E>("lo_out", lo_out)?,
            slice_mut::<<E as Element>::Acc>("lo_lse", lo_lse)?,
        )};
        run(py, threads, work(&d), move || {
            hilo::forward(&d, &r, scale, hi_qkv, hi_pad, lo_q, lo_kv, hi_out, lo_out, lo_lse)
        })
    })
}

/// Inference forward writing the outputs over the queries (`hilo::forward_in_place`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn hilo_forward_in_place(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    threads: usize,
    hi_qkv: Buf,
    hi_pad: Option<Buf>,
    lo_q: Buf,
    lo_kv: Buf,
    lo_lse: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    let r = rows(&d);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: the Python layer passes contiguous tensors; `hi_qkv` and `lo_q` are its
        // own fresh projection outputs, aliased by nothing else it passes, `lo_lse` fresh.
        let (hi_qkv, hi_pad, lo_q, lo_kv, lo_lse) = unsafe {(
            slice_mut::<E>("hi_qkv", hi_qkv)?,
            opt::<E>("hi_pad", hi_pad)?,
            slice_mut::<E>("lo_q", lo_q)?,
            slice::<E>("lo_kv", lo_kv)?,
            slice_mut::<<E as Element>::Acc>("lo_lse", lo_lse)?,
        )};
        run(py, threads, work(&d), move || {
            hilo::forward_in_place(&d, &r, scale, hi_qkv, hi_pad, lo_q, lo_kv, lo_lse)
        })
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn hilo_backward(
    py: Python<'_>,
    dtype: &str,
    shape: Dims,
    scale: f64,
    threads: usize,
    hi_qkv: Buf,
    hi_pad: Option<Buf>,
    lo_q: Buf,
    lo_kv: Buf,
    lo_out: Buf,
    lo_lse: Buf,
    d_hi_out: Buf,
    d_lo_out: Buf,
    d_hi_qkv: Buf,
    d_hi_pad: Buf,
    d_lo_q: Buf,
    d_lo_kv: Buf,
) -> PyResult<()> {
    let d = dims(shape);
    let r = rows(&d);
    with_dtype!(DType::parse(dtype)?, E => {
        // SAFETY: as in `hilo_forward`; the four gradients are fresh and unaliased.
        let (hi_qkv, hi_pad, lo_q, lo_kv, lo_out, lo_lse, d_hi_out, d_lo_out) = unsafe {(
            slice::<E>("hi_qkv", hi_qkv)?,
            opt::<E>("hi_pad", hi_pad)?,
            slice::<E>("lo_q", lo_q)?,
            slice::<E>("lo_kv", lo_kv)?,
            slice::<E>("lo_out", lo_out)?,
            slice::<<E as Element>::Acc>("lo_lse", lo_lse)?,
            slice::<E>("d_hi_out", d_hi_out)?,
            slice::<E>("d_lo_out", d_lo_out)?,
        )};
        let (d_hi_qkv, d_hi_pad, d_lo_q, d_lo_kv) = unsafe {(
            slice_mut::<E>("d_hi_qkv", d_hi_qkv)?,
            slice_mut::<E>("d_hi_pad", d_hi_pad)?,
            slice_mut::<E>("d_lo_q", d_lo_q)?,
            slice_mut::<E>("d_lo_kv", d_lo_kv)?,
        )};
        run(py, threads, 2.5 * work(&d), move || {
            hilo::backward(
                &d, &r, scale, hi_qkv, hi_pad, lo_q, lo_kv, lo_out, lo_lse, d_hi_out, d_lo_out,
                d_hi_qkv, d_hi_pad, d_lo_q, d_lo_kv,
            )
        })
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hilo_forward, m)?)?;
    m.add_function(wrap_pyfunction!(hilo_forward_in_place, m)?)?;
    m.add_function(wrap_pyfunction!(hilo_backward, m)?)?;
    Ok(())
}
