//! Where the rows of each operand live, so callers can hand over tensors that are not
//! contiguous heads-last tensors of their own: the query slice of a fused projection, or the
//! `[K | V]` halves of one key-value projection (HiLo's Lo-Fi branch), without copying them.
//!
//! Token `t` of batch `b`, head `h` of an operand starts at
//! `offset + (b·len + t)·stride + h·width`, `width` being its head dim and `len` its sequence
//! length; a head's `width` values are contiguous. A contiguous heads-last tensor has
//! `offset = 0`, `stride = heads·width`.

use super::{mul, AttnDims};
use crate::error::KernelError;

/// One operand's row addressing (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    pub offset: usize,
    pub stride: usize,
}

impl Rows {
    /// A contiguous heads-last tensor with `heads` heads of `width`.
    pub fn dense(heads: usize, width: usize) -> Self {
        Rows {
            offset: 0,
            stride: heads * width,
        }
    }

    /// Element index of row `bt` (= `b·len + t`), head `h`.
    #[inline(always)]
    pub fn at(&self, bt: usize, h: usize, width: usize) -> usize {
        self.offset + bt * self.stride + h * width
    }

    /// Checks that `rows` token rows of `heads` heads of `width` fit a buffer of `buf_len`
    /// elements, and that one token's heads end before the next token starts.
    fn check(
        &self,
        name: &'static str,
        rows: usize,
        heads: usize,
        width: usize,
        buf_len: usize,
    ) -> Result<(), KernelError> {
        let row = mul(name, &[heads, width])?;
        if rows == 0 || row == 0 {
            return Ok(());
        }
        if self.stride < row {
            return Err(KernelError::Argument(format!(
                "`{name}`: row stride {} is shorter than a row's {row} elements",
                self.stride
            )));
        }
        let need = mul(name, &[rows - 1, self.stride])?
            .checked_add(self.offset)
            .and_then(|x| x.checked_add(row))
            .ok_or_else(|| KernelError::Argument(format!("`{name}` size overflows usize")))?;
        if buf_len < need {
            return Err(KernelError::Length {
                name,
                expected: need,
                got: buf_len,
            });
        }
        Ok(())
    }
}

/// Row addressing of every operand of a call. `o` serves the output and (backward) its
/// gradient; gradients of q, k, v are written with the addressing of q, k, v. The log-sum-exp
/// is always contiguous `[batch, q_len, q_heads]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub q: Rows,
    pub k: Rows,
    pub v: Rows,
    pub o: Rows,
}

impl Layout {
    /// Every operand a contiguous heads-last tensor (the public [`super::forward`]).
    pub fn dense(d: &AttnDims) -> Self {
        Layout {
            q: Rows::dense(d.q_heads, d.head_dim),
            k: Rows::dense(d.kv_heads, d.head_dim),
            v: Rows::dense(d.kv_heads, d.v_head_dim),
            o: Rows::dense(d.q_heads, d.v_head_dim),
        }
    }

    pub(super) fn check_q(
        &self,
        d: &AttnDims,
        name: &'static str,
        len: usize,
    ) -> Result<(), KernelError> {
        self.q
            .check(name, d.batch * d.q_len, d.q_heads, d.head_dim, len)
    }
    pub(super) fn check_k(
        &self,
        d: &AttnDims,
        name: &'static str,
        len: usize,
    ) -> Result<(), KernelError> {
        self.k
            .check(name, d.batch * d.kv_len, d.kv_heads, d.head_dim, len)
    }
    pub(super) fn check_v(
        &self,
        d: &AttnDims,
        name: &'static str,
        len: usize,
    ) -> Result<(), KernelError> {
        self.v
            .check(name, d.batch * d.kv_len, d.kv_heads, d.v_head_dim, len)
    }
    pub(super) fn check_o(
        &self,
        d: &AttnDims,
        name: &'static str,
        len: usize,
    ) -> Result<(), KernelError> {
        self.o
            .check(name, d.batch * d.q_len, d.q_heads, d.v_head_dim, len)
    }

    /// Whether the key and value rows of one token overlap (they may not when both are
    /// written into one buffer).
    pub(super) fn kv_disjoint(&self, d: &AttnDims) -> bool {
        let (k0, k1) = (self.k.offset, self.k.offset + d.kv_heads * d.head_dim);
        let (v0, v1) = (self.v.offset, self.v.offset + d.kv_heads * d.v_head_dim);
        self.k.stride == self.v.stride
            && (k1 <= v0 || v1 <= k0)
            && k1.max(v1) - k0.min(v0) <= self.k.stride
    }
}

/// Where the backward writes dK and dV: their own buffers, or one buffer holding both (the
/// gradient of one `[K | V]` projection output), addressed by the layout's `k` and `v` rows.
pub enum KvGrads<'a, E> {
    Split { dk: &'a mut [E], dv: &'a mut [E] },
    Joint(&'a mut [E]),
}
