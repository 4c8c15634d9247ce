//! Moving rows between `[rows, heads, width]` tensors and the contiguous per-head buffers
//! the chunked core works on.
//!
//! One head's row is a short run (`width` values) every `heads·width` values, so a long
//! sequence read one head at a time touches every cache line of the tensor's rows once per
//! head and defeats the hardware prefetcher (which stops at page boundaries and cannot see a
//! 2 KiB stride as one stream). The `*_heads` variants move several adjacent heads per row
//! in one contiguous run and prefetch a few rows ahead themselves.

use super::SharedMut;
use crate::element::{Acc, Element};

/// Rows ahead that the group gather/scatter prefetch: enough lines in flight to cover
/// memory latency, few enough that they arrive before they are needed.
const AHEAD: usize = 6;

/// Asks for every cache line of `s` to be brought towards this core.
#[inline]
fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = s.as_ptr().cast::<i8>();
        for off in (0..std::mem::size_of_val(s)).step_by(64) {
            // SAFETY: `off` is inside `s`; a prefetch neither faults nor changes memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// Gathers rows `row0..row0+len` of head `h` from a `[rows, heads, width]` tensor as
/// contiguous accumulation-type rows, mapping every value through `f`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather<E: Element>(
    src: &[E],
    row0: usize,
    len: usize,
    heads: usize,
    h: usize,
    width: usize,
    dst: &mut Vec<E::Acc>,
    f: impl Fn(E::Acc) -> E::Acc,
) {
    dst.clear();
    dst.resize(len * width, <E::Acc as Acc>::ZERO);
    for t in 0..len {
        let off = ((row0 + t) * heads + h) * width;
        let d = &mut dst[t * width..(t + 1) * width];
        E::to_acc_slice(&src[off..off + width], d);
        d.iter_mut().for_each(|x| *x = f(*x));
    }
}

/// Writes contiguous rows back into head `h` of a `[rows, heads, width]` tensor.
///
/// # Safety
/// Those rows of `dst` must be in bounds and written by no one else meanwhile.
pub(crate) unsafe fn scatter<E: Element>(
    src: &[E::Acc],
    row0: usize,
    len: usize,
    heads: usize,
    h: usize,
    width: usize,
    dst: SharedMut<E>,
) {
    for t in 0..len {
        let off = ((row0 + t) * heads + h) * width;
        E::from_acc_slice(&src[t * width..(t + 1) * width], dst.slice(off, width));
    }
}

/// Which rows and heads a group move covers: rows `row0..row0+len`, heads `h0..h0+g` of a
/// `[rows, heads, width]` tensor.
#[derive(Clone, Copy)]
pub(crate) struct Block {
    pub row0: usize,
    pub len: usize,
    pub heads: usize,
    pub h0: usize,
    pub g: usize,
    pub width: usize,
}

impl Block {
    /// Offset of row `t`'s first head of the group.
    #[inline]
    fn off(&self, t: usize) -> usize {
        ((self.row0 + t) * self.heads + self.h0) * self.width
    }
}

/// Makes `v` `n` long. Its contents are left as they are when it already is: every caller
/// overwrites all of it, and zeroing first cost ~5% of a causal forward.
pub(crate) fn fit<A: Acc>(v: &mut Vec<A>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, A::ZERO);
    }
}

/// Gathers a block head-major into `dst` (`g × len × width`: head `j`'s rows start at
/// `j·len·width`), reading each row's heads as one run.
pub(crate) fn gather_heads<E: Element>(src: &[E], b: &Block, dst: &mut Vec<E::Acc>) {
    let (w, run) = (b.width, b.g * b.width);
    fit(dst, b.g * b.len * w);
    if w == 0 {
        return;
    }
    for t in 0..b.len {
        if t + AHEAD < b.len {
            let o = b.off(t + AHEAD);
            prefetch(&src[o..o + run]);
        }
        let row = &src[b.off(t)..b.off(t) + run];
        for (j, part) in row.chunks_exact(w).enumerate() {
            E::to_acc_slice(part, &mut dst[(j * b.len + t) * w..][..w]);
        }
    }
}

/// Writes a head-major block (as [`gather_heads`] lays it out) back, each row's heads as
/// one run.
///
/// # Safety
/// The block's rows and heads of `dst` must be in bounds and written by no one else
/// meanwhile.
pub(crate) unsafe fn scatter_heads<E: Element>(src: &[E::Acc], b: &Block, dst: SharedMut<E>) {
    let w = b.width;
    if w == 0 {
        return;
    }
    for t in 0..b.len {
        if t + AHEAD < b.len {
            // the stores would otherwise wait for each line's read-for-ownership in turn
            prefetch(dst.slice(b.off(t + AHEAD), b.g * w));
        }
        let row = dst.slice(b.off(t), b.g * w);
        for (j, part) in row.chunks_exact_mut(w).enumerate() {
            E::from_acc_slice(&src[(j * b.len + t) * w..][..w], part);
        }
    }
}
