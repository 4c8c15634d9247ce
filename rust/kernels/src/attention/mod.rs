//! Dense softmax attention (flash-style), forward and backward. CONTRACT STUB:
//! the signatures below are what the bindings call; the bodies are filled in by the kernel work.

use crate::element::Element;
use crate::error::KernelError;

/// Shapes of one dense attention call. Every buffer is contiguous heads-last:
/// q `[batch, q_len, q_heads, head_dim]`, k `[batch, kv_len, kv_heads, head_dim]`,
/// v `[batch, kv_len, kv_heads, v_head_dim]`, out/dout `[batch, q_len, q_heads, v_head_dim]`,
/// lse `[batch, q_len, q_heads]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

/// Forward. `causal` aligns queries to the end of the keys (flash-attn): query `i` sees key
/// `j` iff `j <= i + kv_len - q_len`. A query that sees no key gets output 0 and lse -inf.
pub fn forward<E: Element>(
    dims: &AttnDims,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
    lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    let _ = (dims, scale, causal, q, k, v, out, lse);
    Err(KernelError::Argument("attention kernel not built yet".into()))
}

/// Backward from the saved `out` and `lse`. Writes (overwrites) dq, dk, dv.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element>(
    dims: &AttnDims,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dq: &mut [E],
    dk: &mut [E],
    dv: &mut [E],
) -> Result<(), KernelError> {
    let _ = (dims, scale, causal, q, k, v, out, dout, lse, dq, dk, dv);
    Err(KernelError::Argument("attention kernel not built yet".into()))
}
