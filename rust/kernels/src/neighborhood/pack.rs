//! Packing of scattered heads-last rows (a tile's queries, a key box) straight from the
//! input tensors into GEMM operand layouts, converting to the accumulation type on the way.
//! Going through a gathered copy first cost one `memcpy` call per row, which dominated at
//! small head dims.

use crate::element::{Acc, Element};
use crate::gemm::{panels, round_up_nr, NR};
use crate::simd::Level;
#[cfg(target_arch = "x86_64")]
use std::any::TypeId;

/// Rows of one head of a heads-last tensor: row `i` is position `pos[i]` of batch `b`.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a, E> {
    pub src: &'a [E],
    pub pos: &'a [usize],
    pub b: usize,
    /// Positions per batch entry.
    pub n: usize,
    pub heads: usize,
    pub h: usize,
    /// Row width.
    pub w: usize,
}

impl<E: Element> Rows<'_, E> {
    #[inline]
    fn row(&self, i: usize) -> &[E] {
        let off = ((self.b * self.n + self.pos[i]) * self.heads + self.h) * self.w;
        &self.src[off..off + self.w]
    }

    /// Calls `f(i, row)` with each row as `Acc` (in place for f32 / f64, else via `tmp`).
    #[inline]
    pub(super) fn each(&self, tmp: &mut Vec<E::Acc>, mut f: impl FnMut(usize, &[E::Acc])) {
        if tmp.len() < self.w {
            tmp.resize(self.w, E::Acc::ZERO);
        }
        let tmp = &mut tmp[..self.w];
        for i in 0..self.pos.len() {
            let r = self.row(i);
            match E::as_acc_slice(r) {
                Some(a) => f(i, a),
                None => {
                    E::to_acc_slice(r, tmp);
                    f(i, tmp);
                }
            }
        }
    }
}

impl<E: Element> Rows<'_, E> {
    /// The source as f32 when the AVX-512 f32 packers apply, after checking every row's
    /// bounds (the packers then read rows unchecked at `src + off(i)`).
    #[cfg(target_arch = "x86_64")]
    fn f32_src(&self, level: Level) -> Option<*const f32> {
        let ok = level == Level::Avx512
            && crate::simd::supported(level)
            && TypeId::of::<E>() == TypeId::of::<f32>()
            && TypeId::of::<E::Acc>() == TypeId::of::<f32>();
        if !ok {
            return None;
        }
        for i in 0..self.pos.len() {
            let _ = self.row(i);
        }
        Some(self.src.as_ptr() as *const f32)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn off(&self, i: usize) -> usize {
        ((self.b * self.n + self.pos[i]) * self.heads + self.h) * self.w
    }
}

/// `x` as f32 when `T` is f32.
#[cfg(target_arch = "x86_64")]
fn f32_mut<T: 'static>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: only when `T` is f32, so the slice's type is unchanged.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { &mut *(x as *mut [T] as *mut [f32]) })
}

/// Makes `out` `len` long without clearing what it held: every packer writes all of its
/// values except padding, which it zeroes itself (zero-filling whole tiles first was
/// 5–8% of the passes).
fn set_len<T: Acc>(out: &mut Vec<T>, len: usize) {
    if out.len() < len {
        out.resize(len, T::ZERO);
    } else {
        out.truncate(len);
    }
}

/// Row-major `[rows][w]`, times `scale`.
pub(super) fn rows<E: Element>(
    level: Level,
    r: Rows<'_, E>,
    scale: E::Acc,
    tmp: &mut Vec<E::Acc>,
    out: &mut Vec<E::Acc>,
) {
    let w = r.w;
    set_len(out, r.pos.len() * w);
    #[cfg(target_arch = "x86_64")]
    if let (Some(src), Some(o)) = (r.f32_src(level), f32_mut(out)) {
        let sc = scale.to_f64() as f32;
        // SAFETY: AVX-512F and f32 checked by `f32_src`, which also bounds-checked every
        // row; `o` holds `rows · w` values.
        unsafe { x86::rows(r.pos.len(), w, |i| src.add(r.off(i)), sc, o.as_mut_ptr()) };
        return;
    }
    let _ = level;
    r.each(tmp, |i, x| {
        for (d, &v) in out[i * w..(i + 1) * w].iter_mut().zip(x) {
            *d = v * scale;
        }
    });
}

/// `dst = scale · src` converted to `E` (an output row; `tmp` at least as long as `dst`).
pub(super) fn store_scaled<E: Element>(
    level: Level,
    src: &[E::Acc],
    scale: E::Acc,
    tmp: &mut [E::Acc],
    dst: &mut [E],
) {
    let n = dst.len();
    let src = &src[..n];
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512
        && crate::simd::supported(level)
        && TypeId::of::<E::Acc>() == TypeId::of::<f32>()
    {
        if let Some(d) = f32_mut(dst) {
            let s = src.as_ptr() as *const f32;
            let sc = scale.to_f64() as f32;
            // SAFETY: AVX-512F checked; `E::Acc` is f32; both sides hold `n` values.
            unsafe { x86::rows(1, n, |_| s, sc, d.as_mut_ptr()) };
            return;
        }
    }
    let _ = level;
    for (x, &y) in tmp[..n].iter_mut().zip(src) {
        *x = y * scale;
    }
    E::from_acc_slice(&tmp[..n], dst);
}

/// `Xᵀ` panels over the rows (`gemm::pack::pack_transposed` layout): `out[p][c][jj] =
/// X[p·NR + jj][c]`, zero past the last row.
pub(super) fn transposed<E: Element>(
    level: Level,
    r: Rows<'_, E>,
    tmp: &mut Vec<E::Acc>,
    out: &mut Vec<E::Acc>,
) {
    let w = r.w;
    let nrows = r.pos.len();
    set_len(out, panels(nrows) * w * NR);
    // Padding: the last panel's lanes past the last row.
    if !nrows.is_multiple_of(NR) {
        let last = &mut out[(nrows / NR) * w * NR..];
        for c in 0..w {
            last[c * NR + nrows % NR..(c + 1) * NR].fill(E::Acc::ZERO);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(src) = r.f32_src(level) {
        // SAFETY: AVX-512F and f32 (`E`, `E::Acc`) checked by `f32_src`, which also
        // bounds-checked every row; `out` was sized for the panels.
        unsafe {
            x86::transposed(
                nrows,
                w,
                |i| src.add(r.off(i)),
                out.as_mut_ptr() as *mut f32,
            )
        };
        return;
    }
    let _ = level;
    r.each(tmp, |i, x| {
        let panel = &mut out[(i / NR) * w * NR + i % NR..];
        for (d, &v) in panel.iter_mut().step_by(NR).zip(x) {
            *d = v;
        }
    });
}

/// Column panels of `X` (`gemm::pack::pack_cols` layout): `out[p][r][cc] = X[r][p·NR + cc]`,
/// rows padded to a multiple of NR. Returns the panel stride.
pub(super) fn cols<E: Element>(
    level: Level,
    r: Rows<'_, E>,
    tmp: &mut Vec<E::Acc>,
    out: &mut Vec<E::Acc>,
) -> usize {
    let nrows = r.pos.len();
    let ps = round_up_nr(nrows) * NR;
    set_len(out, panels(r.w) * ps);
    // Padding: rows past the last in every panel, and the last panel's columns past `w`.
    for p in 0..panels(r.w) {
        out[p * ps + nrows * NR..(p + 1) * ps].fill(E::Acc::ZERO);
    }
    if !r.w.is_multiple_of(NR) {
        let last = (r.w / NR) * ps;
        for i in 0..nrows {
            out[last + i * NR + r.w % NR..last + (i + 1) * NR].fill(E::Acc::ZERO);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let (Some(src), Some(o)) = (r.f32_src(level), f32_mut(out)) {
        // SAFETY: AVX-512F and f32 checked by `f32_src`, which also bounds-checked every
        // row; `o` holds `panels(w) · ps` values.
        unsafe { x86::cols(r.pos.len(), r.w, |i| src.add(r.off(i)), o.as_mut_ptr(), ps) };
        return ps;
    }
    let _ = level;
    r.each(tmp, |i, x| {
        for (p, c) in x.chunks(NR).enumerate() {
            out[p * ps + i * NR..][..c.len()].copy_from_slice(c);
        }
    });
    ps
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::transpose16;

/// AVX-512 `Xᵀ` panels of f32 rows: 16 × 16 blocks transposed in registers (scalar strided
/// stores were a fifth of the forward's time at head dim 32).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::gemm::NR;
    use std::arch::x86_64::*;

    /// Transposes 16 rows of 16 lanes in place.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn transpose16(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            r[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
            r[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
            r[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
            r[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
        }
        for i in 0..2 {
            for j in 0..4 {
                let (a, b) = (r[8 * i + j], r[8 * i + j + 4]);
                t[8 * i + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
                t[8 * i + j + 4] = _mm512_shuffle_f32x4::<0xDD>(a, b);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]);
            r[j + 8] = _mm512_shuffle_f32x4::<0xDD>(t[j], t[j + 8]);
        }
    }

    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// `out[i·w + c] = scale · row(i)[c]`.
    ///
    /// # Safety
    /// AVX-512F available; every `row(i)` valid for `w` reads; `out` for `nrows · w` writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(
        nrows: usize,
        w: usize,
        row: impl Fn(usize) -> *const f32,
        scale: f32,
        out: *mut f32,
    ) {
        let sv = _mm512_set1_ps(scale);
        for i in 0..nrows {
            let (src, dst) = (row(i), out.add(i * w));
            let mut c = 0;
            while c < w {
                let k = lanes(w - c);
                let v = _mm512_maskz_loadu_ps(k, src.add(c));
                _mm512_mask_storeu_ps(dst.add(c), k, _mm512_mul_ps(v, sv));
                c += 16;
            }
        }
    }

    /// `out[p·ps + i·NR + cc] = row(i)[p·NR + cc]`.
    ///
    /// # Safety
    /// AVX-512F available; every `row(i)` valid for `w` reads; `out` valid for
    /// `panels(w) · ps` writes with `ps ≥ nrows · NR`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn cols(
        nrows: usize,
        w: usize,
        row: impl Fn(usize) -> *const f32,
        out: *mut f32,
        ps: usize,
    ) {
        for i in 0..nrows {
            let src = row(i);
            let mut c = 0;
            while c < w {
                let k = lanes(w - c);
                let dst = out.add((c / NR) * ps + i * NR + c % NR);
                _mm512_mask_storeu_ps(dst, k, _mm512_maskz_loadu_ps(k, src.add(c)));
                c += 16;
            }
        }
    }

    /// Writes the panels of `nrows` rows of width `w` (`row(i)` points at row `i`) into
    /// `out`, which must hold `panels(nrows) · w · NR` values.
    ///
    /// # Safety
    /// AVX-512F available; every `row(i)` valid for `w` reads; `out` long enough.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transposed(
        nrows: usize,
        w: usize,
        row: impl Fn(usize) -> *const f32,
        out: *mut f32,
    ) {
        let mut r = [_mm512_setzero_ps(); 16];
        let mut i0 = 0;
        while i0 < nrows {
            let (p, jj0) = (i0 / NR, i0 % NR);
            let m = (nrows - i0).min(16);
            let mut c0 = 0;
            while c0 < w {
                let nc = (w - c0).min(16);
                let k = ((1u32 << nc) - 1) as __mmask16;
                for (i, ri) in r.iter_mut().enumerate() {
                    *ri = if i < m {
                        _mm512_maskz_loadu_ps(k, row(i0 + i).add(c0))
                    } else {
                        _mm512_setzero_ps()
                    };
                }
                transpose16(&mut r);
                let dst = out.add(p * w * NR + c0 * NR + jj0);
                for (c, &rc) in r.iter().enumerate().take(nc) {
                    _mm512_storeu_ps(dst.add(c * NR), rc);
                }
                c0 += 16;
            }
            i0 += 16;
        }
    }
}
