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
use crate::simd::Level;

/// Rows ahead that the group gather/scatter prefetch: enough lines in flight to cover
/// memory latency, few enough that they arrive before they are needed.
const AHEAD: usize = 6;

/// Asks for every cache line of `s` to be brought towards this core.
#[inline]
pub(crate) fn prefetch<T>(s: &[T]) {
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
/// contiguous accumulation-type rows.
pub(crate) fn gather<E: Element>(
    src: &[E],
    row0: usize,
    len: usize,
    heads: usize,
    h: usize,
    width: usize,
    dst: &mut Vec<E::Acc>,
) {
    fit(dst, len * width);
    gather_into(src, row0, heads, h, width, dst);
}

/// [`gather`] into a slice of whole rows, prefetching a few rows ahead: one head's rows
/// are `heads·width` apart, a stride the hardware prefetcher does not follow.
pub(crate) fn gather_into<E: Element>(
    src: &[E],
    row0: usize,
    heads: usize,
    h: usize,
    width: usize,
    dst: &mut [E::Acc],
) {
    if width == 0 {
        return;
    }
    let len = dst.len() / width;
    let off = |t: usize| ((row0 + t) * heads + h) * width;
    for (t, d) in dst.chunks_exact_mut(width).enumerate() {
        if t + AHEAD < len {
            prefetch(&src[off(t + AHEAD)..][..width]);
        }
        E::to_acc_slice(&src[off(t)..][..width], d);
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

/// Makes `v` `n` long, keeping what it held (only growth is zeroed): every caller
/// overwrites all of it, and zeroing first cost ~5% of a causal forward.
pub(crate) fn fit<A: Acc>(v: &mut Vec<A>, n: usize) {
    if v.len() < n {
        v.resize(n, A::ZERO);
    } else {
        v.truncate(n);
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
pub(crate) unsafe fn scatter_heads<E: Element>(
    src: &[E::Acc],
    b: &Block,
    dst: SharedMut<E>,
    stream: bool,
) {
    let w = b.width;
    if w == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if stream {
        // SAFETY: `stream` promises f32 storage (so `E::Acc` is f32 too), AVX-512, 64-byte
        // aligned rows and a width that is a multiple of 16.
        let (src, out) = (
            std::slice::from_raw_parts(src.as_ptr().cast::<f32>(), src.len()),
            dst.0.cast::<f32>(),
        );
        for t in 0..b.len {
            for j in 0..b.g {
                let piece = &src[(j * b.len + t) * w..][..w];
                stream_f32(piece, out.add(b.off(t) + j * w));
            }
        }
        std::arch::x86_64::_mm_sfence();
        return;
    }
    let _ = stream;
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

/// Whether [`scatter_heads`] may write `out` (`[rows, heads, width]`) with non-temporal
/// stores: f32 storage, AVX-512, rows on 64-byte boundaries, and an output too large to be
/// read back from cache soon. Streaming skips reading every output line before writing it
/// (a fifth of the forward's memory traffic) and leaves the cache to the inputs.
pub(crate) fn can_stream<E: Element>(level: Level, out: &[E], width: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && level == Level::Avx512
        && std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()
        && (out.as_ptr() as usize).is_multiple_of(64)
        && width.is_multiple_of(16)
        && std::mem::size_of_val(out) >= STREAM_MIN_BYTES
}

/// Outputs at least this large are streamed: well past the 2 MiB L2 of a core, so a
/// consumer would not find much of them in cache anyway. Measured at B=1, H=8, T=16384
/// (32 MiB), 2 threads: forward 26.4-28.4 -> 25.2-25.5 ms. Smaller outputs (T=4096: 8 MiB)
/// stay cached for whatever reads them next.
const STREAM_MIN_BYTES: usize = 16 << 20;

/// `dst[..src.len()] = src` with non-temporal stores; `dst` 64-byte aligned, length a
/// multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_f32(src: &[f32], dst: *mut f32) {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_stream_ps};
    for i in (0..src.len()).step_by(16) {
        _mm512_stream_ps(dst.add(i), _mm512_loadu_ps(src.as_ptr().add(i)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offset of the first 64-byte aligned f32 in `buf`.
    fn aligned(buf: &[f32]) -> usize {
        (16 - (buf.as_ptr() as usize % 64) / 4) % 16
    }

    /// The streaming scatter writes exactly what the plain one does (3 heads, groups of 2
    /// at head 1, rows of 32); streaming is chosen for large aligned f32 outputs only.
    #[test]
    fn streamed_scatter_matches_plain() {
        let (rows, heads, w) = (9, 3, 32);
        let b = Block {
            row0: 2,
            len: 5,
            heads,
            h0: 1,
            g: 2,
            width: w,
        };
        let src: Vec<f32> = (0..b.g * b.len * w).map(|i| i as f32 * 0.5 - 7.0).collect();
        let n = rows * heads * w;
        let mut outs = vec![];
        for stream in [false, crate::simd::available().contains(&Level::Avx512)] {
            let mut buf = vec![-1f32; n + 16];
            let a = aligned(&buf);
            let out = &mut buf[a..a + n];
            // SAFETY: the block lies inside `out`, written by no one else.
            unsafe { scatter_heads::<f32>(&src, &b, SharedMut(out.as_mut_ptr()), stream) };
            outs.push(out.to_vec());
        }
        assert_eq!(outs[0], outs[1]);
        assert!(outs[0].iter().any(|&x| x != -1.0));
        let big = vec![0f32; STREAM_MIN_BYTES / 4 + 32];
        let a = aligned(&big);
        let x86 = cfg!(target_arch = "x86_64");
        assert_eq!(can_stream(Level::Avx512, &big[a..], w), x86);
        assert!(!can_stream(Level::Avx512, &big[a + 1..], w));
        assert!(!can_stream(Level::Avx512, &big[a..a + n], w));
        assert!(!can_stream(Level::Avx512, &big[a..], 8));
    }
}
