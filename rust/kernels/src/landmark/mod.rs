//! Landmark attention's training form (Mohtashami & Jaggi, docs/landmark.md), fused: the
//! grouped softmax without any `Tq × Tk` matrix, forward and backward.
//!
//! The last token of every `block` tokens is its block's landmark. A query attends to the
//! regular tokens of its own block up to itself, and to each earlier block through a gate:
//! the block's in-block softmax average of its values, weighted by the query's score on the
//! block's landmark. Both kinds of item share one softmax, so a row streams block by block
//! with an online softmax in which an earlier block is a single item (logit: the landmark
//! score; value: the block's in-block average) and the own block's tokens are items of their
//! own. Beyond the inputs and outputs, memory is a tile's block of scores plus each task's
//! packed keys and values (and, backward, its kv head's key gradients); the backward
//! recomputes every score from the saved log-sum-exp.
//!
//! Both directions run a tile of queries against one key block at a time as GEMMs
//! ([`forward`], [`backward`]).

mod backward;
mod forward;
mod retrieval;
#[cfg(test)]
mod tests;

pub use retrieval::Selection;

use crate::element::Element;
use crate::error::{check_len, KernelError};
use crate::simd;

/// Shapes of one call, heads-last `[B, T, H, D]`. The `q_len` queries are the last `q_len`
/// positions of the `kv_len` keys (chunked prefill; `q_len == kv_len` for training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandmarkDims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    /// Tokens per block, landmark included (the original's `mem_freq + 1`), at least 2.
    pub block: usize,
}

fn check(d: &LandmarkDims) -> Result<(), KernelError> {
    let arg = |m: String| Err(KernelError::Argument(m));
    if d.block < 2 {
        return arg(format!("block_size must be at least 2, got {}", d.block));
    }
    if d.q_len > d.kv_len {
        return arg(format!(
            "more queries ({}) than keys ({})",
            d.q_len, d.kv_len
        ));
    }
    if d.kv_heads == 0 || d.q_heads % d.kv_heads != 0 {
        return arg(format!(
            "query heads ({}) must be a positive multiple of key/value heads ({})",
            d.q_heads, d.kv_heads
        ));
    }
    if d.head_dim == 0 || d.v_head_dim == 0 {
        return arg(format!(
            "head dims must be positive, got {} and {}",
            d.head_dim, d.v_head_dim
        ));
    }
    Ok(())
}

/// Query rows per tile in both directions (a multiple of every micro-kernel's MR).
const BQ: usize = 48;

/// Regular tokens of the query at cache position `p` in its own block: `[start, start + n)`.
fn own_block(p: usize, block: usize) -> (usize, usize) {
    let start = p / block * block;
    // the block's landmark (its last token) is never attended to directly
    let last = p.min(start + block - 2);
    (start, last - start + 1)
}

/// Forward: `out [B, Tq, H, Dv]` and the natural-log `lse [B, Tq, H]`.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Element>(
    d: &LandmarkDims,
    scale: f64,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
    lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    check(d)?;
    let (h, dk, dv) = (d.q_heads, d.head_dim, d.v_head_dim);
    check_len("q", q, d.batch * d.q_len * h * dk)?;
    check_len("k", k, d.batch * d.kv_len * d.kv_heads * dk)?;
    check_len("v", v, d.batch * d.kv_len * d.kv_heads * dv)?;
    check_len("out", out, d.batch * d.q_len * h * dv)?;
    check_len("lse", lse, d.batch * d.q_len * h)?;
    if d.batch == 0 || d.q_len == 0 || h == 0 {
        return Ok(());
    }
    forward::forward(simd::active(), d, scale, q, k, v, out, lse);
    Ok(())
}

/// Backward from the forward's `out` and `lse`: `dq [B, Tq, H, D]`, `dk [B, Tk, H_kv, D]`,
/// `dv [B, Tk, H_kv, Dv]`. One task per (batch entry, kv head) owns its keys' gradients, so
/// nothing is summed across threads (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element>(
    d: &LandmarkDims,
    scale: f64,
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
    check(d)?;
    let (h, hd, hv) = (d.q_heads, d.head_dim, d.v_head_dim);
    check_len("q", q, d.batch * d.q_len * h * hd)?;
    check_len("k", k, d.batch * d.kv_len * d.kv_heads * hd)?;
    check_len("v", v, d.batch * d.kv_len * d.kv_heads * hv)?;
    check_len("out", out, d.batch * d.q_len * h * hv)?;
    check_len("dout", dout, d.batch * d.q_len * h * hv)?;
    check_len("lse", lse, d.batch * d.q_len * h)?;
    check_len("dq", dq, d.batch * d.q_len * h * hd)?;
    check_len("dk", dk, d.batch * d.kv_len * d.kv_heads * hd)?;
    check_len("dv", dv, d.batch * d.kv_len * d.kv_heads * hv)?;
    if d.batch == 0 || d.kv_len == 0 || d.kv_heads == 0 {
        return Ok(());
    }
    backward::backward(
        simd::active(),
        d,
        scale,
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        dk,
        dv,
    );
    Ok(())
}

/// Retrieval for inference (docs/landmark.md, Retrieval): `out [B, Tq, H, Dv]` and the kept
/// blocks `kept [B, H, Tq, top_k]` (best first, `-1` in unused slots). Work per query: one
/// landmark score per complete block before its own, then `top_k` blocks and its own block.
#[allow(clippy::too_many_arguments)]
pub fn retrieval<E: Element>(
    d: &LandmarkDims,
    scale: f64,
    top_k: usize,
    selection: Selection,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
    kept: &mut [i64],
) -> Result<(), KernelError> {
    check(d)?;
    let (h, dk, dv) = (d.q_heads, d.head_dim, d.v_head_dim);
    check_len("q", q, d.batch * d.q_len * h * dk)?;
    check_len("k_cache", k, d.batch * d.kv_len * d.kv_heads * dk)?;
    check_len("v_cache", v, d.batch * d.kv_len * d.kv_heads * dv)?;
    check_len("out", out, d.batch * d.q_len * h * dv)?;
    check_len("kept", kept, d.batch * h * d.q_len * top_k)?;
    if d.batch == 0 || d.q_len == 0 || h == 0 {
        return Ok(());
    }
    retrieval::retrieval(
        simd::active(),
        d,
        scale,
        top_k,
        selection,
        q,
        k,
        v,
        out,
        kept,
    );
    Ok(())
}
