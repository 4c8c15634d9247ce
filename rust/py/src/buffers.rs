//! Raw tensor buffers passed from Python as `(address, numel)` pairs.
//!
//! Python hands over the data pointer of a contiguous numpy array or torch tensor. These
//! helpers turn one into a slice after checking what can be checked here: alignment and
//! the null pointer of empty tensors. Lengths are checked against the op's dimensions by
//! the kernels themselves.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::ptr::NonNull;

/// `(address, number of elements)` of a contiguous buffer.
pub type Buf = (usize, usize);

fn checked_ptr<T>(name: &str, (addr, len): Buf) -> PyResult<*mut T> {
    if len == 0 {
        return Ok(NonNull::<T>::dangling().as_ptr());
    }
    if addr == 0 {
        return Err(PyValueError::new_err(format!(
            "`{name}`: null data pointer for a non-empty buffer"
        )));
    }
    if addr % std::mem::align_of::<T>() != 0 {
        return Err(PyValueError::new_err(format!(
            "`{name}`: data pointer is not aligned for its dtype"
        )));
    }
    Ok(addr as *mut T)
}

/// # Safety
/// `buf` must describe `len` live, initialised elements of `T` that nobody writes during
/// the returned borrow.
pub unsafe fn slice<'a, T>(name: &str, buf: Buf) -> PyResult<&'a [T]> {
    let p = checked_ptr::<T>(name, buf)?;
    Ok(std::slice::from_raw_parts(p, buf.1))
}

/// # Safety
/// `buf` must describe `len` live elements of `T`, not aliased by any other slice in use.
pub unsafe fn slice_mut<'a, T>(name: &str, buf: Buf) -> PyResult<&'a mut [T]> {
    let p = checked_ptr::<T>(name, buf)?;
    Ok(std::slice::from_raw_parts_mut(p, buf.1))
}

/// # Safety
/// As [`slice`], for a buffer that may be absent.
pub unsafe fn opt<'a, T>(name: &str, b: Option<Buf>) -> PyResult<Option<&'a [T]>> {
    b.map(|b| slice::<T>(name, b)).transpose()
}

/// The element types the kernels take, named as Python names them.
#[derive(Clone, Copy, Debug)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
}

impl DType {
    pub fn parse(s: &str) -> PyResult<DType> {
        match s {
            "float32" => Ok(DType::F32),
            "float64" => Ok(DType::F64),
            "bfloat16" => Ok(DType::BF16),
            "float16" => Ok(DType::F16),
            other => Err(PyValueError::new_err(format!(
                "unsupported dtype `{other}` (expected float32, float64, bfloat16 or float16)"
            ))),
        }
    }
}

/// Runs `$body` with `$E` bound to the storage type named by `$dtype`.
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            $crate::buffers::DType::F32 => {
                type $E = f32;
                $body
            }
            $crate::buffers::DType::F64 => {
                type $E = f64;
                $body
            }
            $crate::buffers::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            $crate::buffers::DType::F16 => {
                type $E = half::f16;
                $body
            }
        }
    };
}
