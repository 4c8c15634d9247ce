//! Softmax steps on one score row restricted to a query's window, given as bits over the
//! row's key columns.
//!
//! The generic path writes `-inf` outside the window and reuses `simd::math`. AVX-512 f32
//! has its own masked loop instead: `simd::math`'s AVX-512 `exp2` ends in `scalef`, and a
//! `scalef` that underflows (every `-inf` score) takes a microcode assist on Intel cores,
//! which made the exponentials of masked scores the bulk of the kernel's time. Masked
//! lanes here never reach the exponential at all.

use crate::element::Acc;
use crate::simd::Level;
#[cfg(target_arch = "x86_64")]
use std::any::TypeId;

/// Bit `j` of a little-endian bitset.
#[inline]
fn bit(bits: &[u64], j: usize) -> bool {
    bits[j / 64] >> (j % 64) & 1 != 0
}

/// `row` as f32 when `T` is f32.
#[cfg(target_arch = "x86_64")]
#[inline]
fn as_f32<T: Acc>(row: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: `T` is `f32`, so the slice's type is unchanged.
        Some(unsafe { &mut *(row as *mut [T] as *mut [f32]) })
    } else {
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn avx512(level: Level) -> bool {
    level == Level::Avx512 && crate::simd::supported(Level::Avx512)
}

/// Window test for the generic path: `-inf` outside the window.
fn mask_generic<T: Acc>(row: &mut [T], bits: Option<&[u64]>, cs: usize) {
    if let Some(bits) = bits {
        for (i, x) in row.iter_mut().enumerate() {
            if !bit(bits, cs + i) {
                *x = T::NEG_INFINITY;
            }
        }
    }
}

/// One online-softmax step: `row` holds base-2 scores of key columns `cs..cs + row.len()`;
/// keys outside the window (`bits`, `None`: all in) count as `-inf`. Returns the new
/// running max and the sum of `row[i] = 2^(row[i] − m_ref)` (zero outside the window),
/// where `m_ref` is the new max, or 0 while it is still `-inf`.
pub(super) fn online<T: Acc>(
    level: Level,
    row: &mut [T],
    bits: Option<&[u64]>,
    cs: usize,
    m_old: T,
) -> (T, T, T) {
    #[cfg(target_arch = "x86_64")]
    if avx512(level) {
        if let Some(r) = as_f32(row) {
            // SAFETY: AVX-512F checked above; callers' bits cover the row's columns.
            let (m_new, m_ref, sum) = unsafe { x86::online(r, bits, cs, m_old.to_f64() as f32) };
            return (
                T::from_f64(m_new as f64),
                T::from_f64(m_ref as f64),
                T::from_f64(sum as f64),
            );
        }
    }
    mask_generic(row, bits, cs);
    let mx = T::row_max(level, row);
    #[allow(clippy::eq_op)]
    let m_new = if mx > m_old || mx != mx { mx } else { m_old };
    let m_ref = if m_new == T::NEG_INFINITY {
        T::ZERO
    } else {
        m_new
    };
    let sum = T::exp2_sub_sum(level, row, m_ref);
    (m_new, m_ref, sum)
}

/// `row[i] = 2^(row[i] − m)` inside the window, 0 outside (the backward's `P`).
pub(super) fn exp_fixed<T: Acc>(
    level: Level,
    row: &mut [T],
    bits: Option<&[u64]>,
    cs: usize,
    m: T,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512(level) {
        if let Some(r) = as_f32(row) {
            // SAFETY: AVX-512F checked above; callers' bits cover the row's columns.
            unsafe { x86::exp_fixed(r, bits, cs, m.to_f64() as f32) };
            return;
        }
    }
    mask_generic(row, bits, cs);
    T::exp2_sub_sum(level, row, m);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::simd::math::x86_avx512::exp2v_masked as exp2;
    use std::arch::x86_64::*;

    /// Lanes of 16 columns from `j` that are inside both the row (`n` columns from `cs`)
    /// and the window.
    #[inline(always)]
    fn lanes(bits: Option<&[u64]>, cs: usize, i: usize, n: usize) -> u16 {
        let tail = if n - i >= 16 {
            u16::MAX
        } else {
            ((1u32 << (n - i)) - 1) as u16
        };
        let Some(b) = bits else { return tail };
        let j = cs + i;
        let (w, sh) = (j / 64, j % 64);
        let mut x = b[w] >> sh;
        if sh > 48 && w + 1 < b.len() {
            x |= b[w + 1] << (64 - sh);
        }
        x as u16 & tail
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn online(
        row: &mut [f32],
        bits: Option<&[u64]>,
        cs: usize,
        m_old: f32,
    ) -> (f32, f32, f32) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n {
            let k = lanes(bits, cs, i, n);
            mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, p.add(i)));
            i += 16;
        }
        let mx = _mm512_reduce_max_ps(mx);
        #[allow(clippy::eq_op)]
        let m_new = if mx > m_old || mx != mx { mx } else { m_old };
        let m_ref = if m_new == f32::NEG_INFINITY {
            0.0
        } else {
            m_new
        };
        let mv = _mm512_set1_ps(m_ref);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = lanes(bits, cs, i, n);
            let tail = lanes(None, cs, i, n);
            let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), mv);
            let e = exp2(k, x);
            _mm512_mask_storeu_ps(p.add(i), tail, e);
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        (m_new, m_ref, _mm512_reduce_add_ps(acc))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_fixed(row: &mut [f32], bits: Option<&[u64]>, cs: usize, m: f32) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let mv = _mm512_set1_ps(m);
        let mut i = 0;
        while i < n {
            let k = lanes(bits, cs, i, n);
            let tail = lanes(None, cs, i, n);
            let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), mv);
            _mm512_mask_storeu_ps(p.add(i), tail, exp2(k, x));
            i += 16;
        }
    }
}
