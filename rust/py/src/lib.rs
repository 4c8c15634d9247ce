//! Thin PyO3 bindings. Each function converts raw buffers handed over by the Python layer
//! (which has already validated shapes, dtypes and devices), releases the GIL, runs the
//! kernel on fastattn's sized rayon pool, and turns kernel errors and panics into Python
//! exceptions. No kernel logic lives here.

mod attention;
mod buffers;
mod flow;
mod fork;
mod hilo;
mod landmark;
mod linear;
mod neighborhood;
mod runtime;

use pyo3::prelude::*;

/// Cache-line-aligned heap blocks for the kernels' scratch (see `fastattn_kernels::alloc`).
#[global_allocator]
static ALLOC: fastattn_kernels::alloc::CacheLineAligned = fastattn_kernels::alloc::CacheLineAligned;

#[pymodule]
fn _fastattn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    fork::install().map_err(pyo3::exceptions::PyRuntimeError::new_err)?;
    runtime::quiet_panics();
    runtime::register(m)?;
    attention::register(m)?;
    flow::register(m)?;
    hilo::register(m)?;
    landmark::register(m)?;
    linear::register(m)?;
    neighborhood::register(m)?;
    Ok(())
}
