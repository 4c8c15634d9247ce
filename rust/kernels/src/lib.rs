//! fastattn's CPU kernels, free of any Python types so `cargo test` covers them directly.
//!
//! Layout conventions follow `shared/SPEC.md`: heads-last, contiguous `[B, T, H, D]`.
//! Kernels never panic on bad sizes: every public entry point checks slice lengths against
//! the dimensions it is given and returns a [`KernelError`].

pub mod attention;
pub mod element;
pub mod error;
pub mod simd;

pub use element::Element;
pub use error::KernelError;
