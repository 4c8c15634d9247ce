//! Landmark attention's training form (Mohtashami & Jaggi, docs/landmark.md), fused: the
//! grouped softmax without any `Tq × Tk` matrix, forward and backward.
//!
//! The last token of every `block` tokens is its block's landmark. A query attends to the
//! regular tokens of its own block up to itself, and to each earlier block through a gate:
//! the block's in-block softmax average of its values, weighted by the query's score on the
//! block's landmark. Both kinds of item share one softmax, so a row streams block by block
//! with an online softmax in which an earlier block is a single item (logit: the landmark
//! score; value: the block's in-block average) and the own block's tokens are items of their
//! own. Memory is O(block + head dims) per row beyond the inputs and outputs; the backward
//! recomputes every score from the saved log-sum-exp.
//!
//! The forward ([`forward`]) runs a tile of queries against one key block at a time as
//! GEMMs. The backward still walks one query row at a time with the SIMD row kernels
//! (`dot_rows` / `axpy_rows`), at matrix-vector speed.

mod forward;
#[cfg(test)]
mod tests;

use crate::element::{Acc, Element};
use crate::error::{check_len, KernelError};
use crate::linear::SharedMut;
use crate::simd::math::VecMath;
use crate::simd;
use rayon::prelude::*;

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
        return arg(format!("more queries ({}) than keys ({})", d.q_len, d.kv_len));
    }
    if d.kv_heads == 0 || d.q_heads % d.kv_heads != 0 {
        return arg(format!(
            "query heads ({}) must be a positive multiple of key/value heads ({})",
            d.q_heads, d.kv_heads
        ));
    }
    if d.head_dim == 0 || d.v_head_dim == 0 {
        return arg(format!("head dims must be positive, got {} and {}", d.head_dim, d.v_head_dim));
    }
    Ok(())
}

/// One (batch entry, kv head)'s key or value rows as accumulation values: row `t` at
/// `off + t·rs` of `data`.
#[derive(Clone, Copy)]
struct HeadRows<'a, T> {
    data: &'a [T],
    off: usize,
    rs: usize,
    width: usize,
}

impl<'a, T> HeadRows<'a, T> {
    /// Rows `[start, start + n)` as a strided slice for the row kernels.
    fn span(&self, start: usize, n: usize) -> &'a [T] {
        let from = self.off + start * self.rs;
        &self.data[from..from + (n - 1) * self.rs + self.width]
    }
}

/// Rows `0..rows` of `(b, kvh)` in `src` (`[B, T, H_kv, width]`), read in place when the
/// storage type is the accumulation type, else converted into `tmp`.
fn head_rows<'a, E: Element>(
    src: &'a [E],
    d: &LandmarkDims,
    b: usize,
    kvh: usize,
    width: usize,
    rows: usize,
    tmp: &'a mut Vec<E::Acc>,
) -> HeadRows<'a, E::Acc> {
    let off = (b * d.kv_len * d.kv_heads + kvh) * width;
    let rs = d.kv_heads * width;
    match E::as_acc_slice(src) {
        Some(s) => HeadRows {
            data: s,
            off,
            rs,
            width,
        },
        None => {
            tmp.clear();
            tmp.resize(rows * width, E::Acc::ZERO);
            for t in 0..rows {
                E::to_acc_slice(&src[off + t * rs..][..width], &mut tmp[t * width..][..width]);
            }
            HeadRows {
                data: &tmp[..],
                off: 0,
                rs: width,
                width,
            }
        }
    }
}

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
    let level = simd::active();
    let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let sc = E::Acc::from_f64(scale);
    let (bs, group, shift, tk) = (d.block, h / d.kv_heads, d.kv_len - d.q_len, d.kv_len);
    let dqp = SharedMut(dq.as_mut_ptr());
    let dkp = SharedMut(dk.as_mut_ptr());
    let dvp = SharedMut(dv.as_mut_ptr());
    (0..d.batch * d.kv_heads).into_par_iter().with_max_len(1).for_each(|task| {
        let (b, kvh) = (task / d.kv_heads, task % d.kv_heads);
        let (mut kt, mut vt) = (Vec::new(), Vec::new());
        let kr = head_rows(k, d, b, kvh, hd, tk, &mut kt);
        let vr = head_rows(v, d, b, kvh, hv, tk, &mut vt);
        let mut gk = vec![E::Acc::ZERO; tk * hd];
        let mut gv = vec![E::Acc::ZERO; tk * hv];
        let (mut qa, mut qs) = (vec![E::Acc::ZERO; hd], vec![E::Acc::ZERO; hd]);
        let (mut dor, mut orow) = (vec![E::Acc::ZERO; hv], vec![E::Acc::ZERO; hv]);
        let mut gq = vec![E::Acc::ZERO; hd];
        let (mut s, mut e) = (vec![E::Acc::ZERO; bs], vec![E::Acc::ZERO; bs]);
        let (mut ds, mut a) = (vec![E::Acc::ZERO; bs], vec![E::Acc::ZERO; bs]);
        for hh in kvh * group..(kvh + 1) * group {
            for i in 0..d.q_len {
                let p = shift + i;
                let at = (b * d.q_len + i) * h + hh;
                E::to_acc_slice(&q[at * hd..][..hd], &mut qa);
                qs.copy_from_slice(&qa);
                E::Acc::scale(level, &mut qs, c);
                E::to_acc_slice(&dout[at * hv..][..hv], &mut dor);
                E::to_acc_slice(&out[at * hv..][..hv], &mut orow);
                let delta = dor.iter().zip(&orow).fold(E::Acc::ZERO, |a, (&x, &y)| a + x * y);
                let lse2 = lse[at] * log2e;
                gq.fill(E::Acc::ZERO);
                // Adds `ds[j]` (gradients of the natural-log scores of rows start..start+n)
                // into dQ and dK, and `a[j]·dO` into dV.
                let mut scatter = |start: usize, ds: &[E::Acc], a: &[E::Acc], gq: &mut [E::Acc]| {
                    let n = ds.len();
                    E::Acc::axpy_rows(level, gq, ds, kr.span(start, n), kr.rs);
                    for (j, (&dsj, &aj)) in ds.iter().zip(a).enumerate() {
                        let t = start + j;
                        E::Acc::axpy_rows(level, &mut gk[t * hd..][..hd], &[dsj], &qa, hd);
                        E::Acc::axpy_rows(level, &mut gv[t * hv..][..hv], &[aj], &dor, hv);
                    }
                };
                for g in 0..p / bs {
                    E::Acc::dot_rows(level, kr.span(g * bs, bs), kr.rs, &qs, &mut s);
                    E::Acc::dot_rows(level, vr.span(g * bs, bs - 1), vr.rs, &dor, &mut e[..bs - 1]);
                    let gate = E::Acc::exp2(s[bs - 1] - lse2);
                    let inner = &mut s[..bs - 1];
                    let m = E::Acc::row_max(level, inner);
                    let m = if m == E::Acc::NEG_INFINITY { E::Acc::ZERO } else { m };
                    let l = E::Acc::exp2_sub_sum(level, inner, m);
                    E::Acc::scale(level, inner, gate / l); // a_j = gate · in-block weight
                    // dO·(block average) = Σ_j w_j e_j
                    let dot_avg = if gate > E::Acc::ZERO {
                        inner.iter().zip(&e).fold(E::Acc::ZERO, |a, (&x, &y)| a + x * y) / gate
                    } else {
                        E::Acc::ZERO
                    };
                    // the in-block scores' gradients a_j (e_j − dO·avg), and the gate's at
                    // the landmark; the landmark's value is never used
                    for j in 0..bs - 1 {
                        ds[j] = inner[j] * (e[j] - dot_avg);
                    }
                    ds[bs - 1] = gate * (dot_avg - delta);
                    a[..bs - 1].copy_from_slice(inner);
                    a[bs - 1] = E::Acc::ZERO;
                    scatter(g * bs, &ds, &a, &mut gq);
                }
                let (start, n) = own_block(p, bs);
                let own = &mut s[..n];
                E::Acc::dot_rows(level, kr.span(start, n), kr.rs, &qs, own);
                E::Acc::dot_rows(level, vr.span(start, n), vr.rs, &dor, &mut e[..n]);
                for j in 0..n {
                    own[j] = E::Acc::exp2(own[j] - lse2);
                    ds[j] = own[j] * (e[j] - delta);
                }
                scatter(start, &ds[..n], own, &mut gq);
                E::Acc::scale(level, &mut gq, sc);
                // SAFETY: query row (b, i, hh) belongs to this task's kv head alone.
                unsafe { E::from_acc_slice(&gq, dqp.slice(at * hd, hd)) };
            }
        }
        E::Acc::scale(level, &mut gk, sc);
        for t in 0..tk {
            let row = (b * tk + t) * d.kv_heads + kvh;
            // SAFETY: key rows of (b, kvh) belong to this task alone.
            unsafe {
                E::from_acc_slice(&gk[t * hd..][..hd], dkp.slice(row * hd, hd));
                E::from_acc_slice(&gv[t * hv..][..hv], dvp.slice(row * hv, hv));
            }
        }
    });
    Ok(())
}
