//! fastattn's CPU kernels, free of any Python types so `cargo test` covers them directly.
//!
//! Layout conventions follow the project's `docs/conventions.md`: heads-last, contiguous `[B, T, H, D]`.
//! Kernels never panic on bad sizes: every public entry point checks slice lengths against
//! the dimensions it is given and returns a [`KernelError`].
//!
//! Building blocks shared by the attention kernels (and meant for the next ones):
//! * [`gemm`]: small packed GEMM `C (+)= A·B` with one micro-kernel per SIMD level, and
//!   [`gemm::pack`] to lay tensors out as its panels;
//! * [`simd::math`]: vectorised row ops (exp2 with sum, max, scale, `P ⊙ (dP − δ)`);
//! * [`per_thread`]: per-worker scratch for rayon loops; [`buffer_pool`]: large buffers
//!   reused across calls.

pub mod alloc;
// The unit tests run on the allocator the shipped extension and the examples install.
#[cfg(test)]
#[global_allocator]
static ALLOC: alloc::CacheLineAligned = alloc::CacheLineAligned;
pub mod attention;
pub mod buffer_pool;
pub mod element;
pub mod error;
pub mod flow;
pub mod fma_peak;
pub mod gemm;
pub mod hilo;
pub mod landmark;
pub mod linear;
pub mod neighborhood;
pub mod pages;
pub mod per_thread;
pub mod simd;

pub use element::Element;
pub use error::KernelError;
