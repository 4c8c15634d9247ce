//! The thread pool and SIMD level every kernel call runs under, and the GIL/panic guard.

use fastattn_kernels::simd::{self, Level};
use fastattn_kernels::KernelError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

static POOL: Mutex<Option<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(None);

/// The pool slot, locked (the fork handlers hold it across `fork()`).
pub(crate) fn pool_slot() -> MutexGuard<'static, Option<(usize, Arc<rayon::ThreadPool>)>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pool with `threads` workers, rebuilt only when the requested size changes (Python
/// asks for torch's intra-op thread count, or FASTATTN_NUM_THREADS, on every call).
fn pool(threads: usize) -> PyResult<Arc<rayon::ThreadPool>> {
    let threads = threads.max(1);
    let mut guard = pool_slot();
    if let Some((n, p)) = guard.as_ref() {
        if *n == threads {
            return Ok(p.clone());
        }
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fastattn-{i}"))
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot build thread pool: {e}")))?;
    let p = Arc::new(p);
    *guard = Some((threads, p.clone()));
    Ok(p)
}

/// Where the last kernel panic happened, for the error that reports it.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// A panic inside a kernel is a bug; [`run`] turns it into a RuntimeError that carries its
/// message and place. This hook records the place and prints nothing: the default one would
/// also write the message (and a backtrace under RUST_BACKTRACE) to the user's terminal.
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }));
}

/// Calls estimated below this many FLOPs run on the calling thread: handing work to the
/// pool and waking its threads costs tens of microseconds, more than such a call computes
/// (a decode step, T=1 attention).
const INLINE_WORK: f64 = 2e6;

/// The FLOP estimate [`run`] takes: 4 × the product of a call's sizes (two GEMMs' worth).
pub fn flops(sizes: &[usize]) -> f64 {
    4.0 * sizes.iter().map(|&x| x as f64).product::<f64>()
}

thread_local! {
    /// A one-thread pool whose only worker is this thread, so `install` runs inline.
    static INLINE: std::cell::OnceCell<Option<rayon::ThreadPool>> = const { std::cell::OnceCell::new() };
}

/// Runs a kernel without the GIL on a pool of `threads` (or inline when `threads` is 1 or
/// the call is small: `work` is its estimated FLOPs), mapping kernel errors to ValueError
/// and any panic to RuntimeError so nothing aborts the interpreter.
pub fn run<F>(py: Python<'_>, threads: usize, work: f64, f: F) -> PyResult<()>
where
    F: FnOnce() -> Result<(), KernelError> + Send,
{
    let inline = threads <= 1 || work < INLINE_WORK;
    let p = if inline { None } else { Some(pool(threads)?) };
    let result = py.detach(|| {
        catch_unwind(AssertUnwindSafe(|| match &p {
            Some(p) => p.install(f),
            None => INLINE.with(|cell| {
                let local = cell.get_or_init(|| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .use_current_thread()
                        .build()
                        .ok()
                });
                match local {
                    Some(local) => local.install(f),
                    // no inline pool could be built: run here (parallel loops then use
                    // rayon's global pool)
                    None => f(),
                }
            }),
        }))
    });
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PyValueError::new_err(e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let at = LAST_PANIC
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .map_or(String::new(), |at| format!(" (at {at})"));
            Err(PyRuntimeError::new_err(format!(
                "fastattn kernel failed internally (please report): {msg}{at}"
            )))
        }
    }
}

#[pyfunction]
fn simd_level() -> &'static str {
    simd::active().name()
}

#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    simd::available().into_iter().map(Level::name).collect()
}

/// Forces the SIMD level (`None`: the best this CPU has). Returns the level now active.
#[pyfunction]
#[pyo3(signature = (level=None))]
fn set_simd_level(level: Option<&str>) -> PyResult<&'static str> {
    let parsed = match level {
        None => None,
        Some(s) => Some(Level::parse(s).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown SIMD level `{s}` (expected scalar, avx2, avx512 or neon)"
            ))
        })?),
    };
    simd::force(parsed)
        .map(Level::name)
        .map_err(PyValueError::new_err)
}

/// Frees the scratch buffers kernels keep between calls (up to 256 MiB per element type).
#[pyfunction]
fn release_buffers() {
    fastattn_kernels::buffer_pool::release_all();
}

/// This machine's fp32 FMA peak at the active SIMD level on `threads` threads, measured for
/// about `seconds`: `(GFLOP/s, level name)`.
#[pyfunction]
#[pyo3(signature = (threads, seconds=0.5))]
fn measure_fma_peak(py: Python<'_>, threads: usize, seconds: f64) -> PyResult<(f64, &'static str)> {
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(PyValueError::new_err(format!(
            "seconds must be positive, got {seconds}"
        )));
    }
    let mut peak = None;
    let slot = &mut peak;
    run(py, threads, f64::INFINITY, move || {
        *slot = Some(fastattn_kernels::fma_peak::measure(seconds, 5)?);
        Ok(())
    })?;
    let peak = peak.ok_or_else(|| PyRuntimeError::new_err("peak measurement did not run"))?;
    Ok((peak.flops_per_s / 1e9, peak.level.name()))
}

/// Panics inside the guarded kernel runner, on a pool thread: lets the tests check that a
/// Rust panic reaches Python as an exception instead of aborting the interpreter.
#[pyfunction]
fn _panic_in_kernel_for_tests(py: Python<'_>, threads: usize) -> PyResult<()> {
    use rayon::prelude::*;
    run(py, threads, f64::INFINITY, || {
        (0..4usize).into_par_iter().for_each(|i| {
            if i == 3 {
                panic!("deliberate test panic");
            }
        });
        Ok(())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_panic_in_kernel_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(release_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(measure_fma_peak, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    Ok(())
}
