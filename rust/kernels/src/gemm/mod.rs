//! Small dense GEMM for the attention-style kernels: `C[m × n] (+)= A[m × k] · B[k × n]`.
//!
//! * `A` is read through two strides (`rsa` between rows, `csa` between columns), one scalar
//!   at a time and broadcast, so a transposed operand (e.g. `Pᵀ`) costs nothing extra.
//! * `B` is pre-packed in panels of [`NR`] columns: panel `p` holds `B[0..k][p*NR..p*NR+NR]`
//!   row after row (`k × NR` contiguous values), consecutive panels `bps` values apart.
//!   Columns past the logical `n` must be padded (zeros) by the packer, see [`pack`].
//! * `C` is row-major with leading dimension `ldc` and is written for all `npanels * NR`
//!   columns, so callers give it padded rows.
//!
//! One register-blocked micro-kernel per SIMD level; the level is chosen by the caller
//! (normally `simd::active()`, read once per op so a whole call uses one level).

pub mod pack;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

use crate::simd::Level;

/// Width of a packed `B` panel, for every level and type (2 zmm / 4 ymm of f32).
pub const NR: usize = 32;

/// Rounds `n` up to a whole number of panels' columns.
#[inline]
pub fn round_up_nr(n: usize) -> usize {
    n.div_ceil(NR) * NR
}

/// How many [`NR`]-wide panels cover `n` columns.
#[inline]
pub fn panels(n: usize) -> usize {
    n.div_ceil(NR)
}

/// Accumulation types the GEMM runs on. f32 has hand-written x86 kernels; f64 takes the
/// portable path whatever the level (the f64 ops are for reference-grade accuracy).
pub trait GemmElem: Copy + Send + Sync + 'static {
    /// # Safety
    /// See [`gemm_raw`].
    unsafe fn gemm_raw_impl(
        level: Level,
        d: &GemmDims,
        a: *const Self,
        b: *const Self,
        c: *mut Self,
    );
}

/// Sizes and strides of one GEMM call (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct GemmDims {
    /// Rows of A and C.
    pub m: usize,
    /// Number of NR-column panels of B (and of C's columns).
    pub npanels: usize,
    /// Inner dimension.
    pub k: usize,
    /// A's row stride.
    pub rsa: usize,
    /// A's column stride.
    pub csa: usize,
    /// Distance between consecutive B panels.
    pub bps: usize,
    /// C's row stride.
    pub ldc: usize,
    /// Add into C (true) or overwrite it (false).
    pub accumulate: bool,
}

impl GemmDims {
    fn need_a(&self) -> usize {
        if self.m == 0 || self.k == 0 {
            0
        } else {
            (self.m - 1) * self.rsa + (self.k - 1) * self.csa + 1
        }
    }
    fn need_b(&self) -> usize {
        if self.npanels == 0 || self.k == 0 {
            0
        } else {
            (self.npanels - 1) * self.bps + self.k * NR
        }
    }
    fn need_c(&self) -> usize {
        if self.m == 0 || self.npanels == 0 {
            0
        } else {
            (self.m - 1) * self.ldc + self.npanels * NR
        }
    }
}

/// Bounds-checked GEMM on slices. Panics only on a caller bug (slices too short for the
/// dims); the check is O(1) per call, negligible next to the O(m·n·k) work. A `level` this
/// CPU lacks runs the portable kernel.
#[inline]
pub fn gemm<T: GemmElem>(level: Level, d: &GemmDims, a: &[T], b: &[T], c: &mut [T]) {
    assert!(c.len() >= d.need_c(), "gemm: C too short");
    // SAFETY: C's extent checked above and borrowed exclusively.
    unsafe { gemm_to(level, d, a, b, c.as_mut_ptr()) }
}

/// GEMM with checked A and B writing C through a raw pointer: for tasks that each write their
/// own block of a shared output in place.
///
/// # Safety
/// The elements `c + i·ldc + j` for `i < m`, `j < npanels·NR` must be valid for writes (and
/// reads when accumulating), and no other thread may access them during the call.
#[inline]
pub unsafe fn gemm_to<T: GemmElem>(level: Level, d: &GemmDims, a: &[T], b: &[T], c: *mut T) {
    assert!(a.len() >= d.need_a(), "gemm: A too short");
    assert!(b.len() >= d.need_b(), "gemm: B too short");
    if d.m == 0 || d.npanels == 0 {
        return;
    }
    let level = if crate::simd::supported(level) {
        level
    } else {
        Level::Scalar
    };
    T::gemm_raw_impl(level, d, a.as_ptr(), b.as_ptr(), c)
}

/// Unchecked GEMM.
///
/// # Safety
/// `a`, `b`, `c` must be valid for the extents implied by `d` (see the module docs), and
/// `level` must be available on this CPU.
#[inline]
pub unsafe fn gemm_raw<T: GemmElem>(
    level: Level,
    d: &GemmDims,
    a: *const T,
    b: *const T,
    c: *mut T,
) {
    if d.m == 0 || d.npanels == 0 {
        return;
    }
    T::gemm_raw_impl(level, d, a, b, c)
}

impl GemmElem for f32 {
    #[inline]
    unsafe fn gemm_raw_impl(level: Level, d: &GemmDims, a: *const f32, b: *const f32, c: *mut f32) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => x86_avx512::gemm(d, a, b, c),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => x86_avx2::gemm(d, a, b, c),
            _ => portable::gemm(d, a, b, c),
        }
    }
}

impl GemmElem for f64 {
    #[inline]
    unsafe fn gemm_raw_impl(
        _level: Level,
        d: &GemmDims,
        a: *const f64,
        b: *const f64,
        c: *mut f64,
    ) {
        portable::gemm(d, a, b, c)
    }
}

#[cfg(test)]
mod tests {
    use super::pack::{pack_cols, pack_transposed, View};
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Every level, every MR remainder, row-major and transposed A, store and accumulate,
    /// against a naive sum; B comes from both packers.
    #[test]
    fn gemm_matches_naive_every_level() {
        let mut seed = 7u64;
        for level in crate::simd::available() {
            for m in [1, 2, 3, 5, 8, 9, 13, 17, 31] {
                for n in [1, 20, 32, 33, 70] {
                    for k in [0, 1, 7, 64, 65] {
                        for transposed_a in [false, true] {
                            for accumulate in [false, true] {
                                let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                                let bm: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
                                // B[k][n] as "rows of Xᵀ" (pack_transposed of X = Bᵀ) and as
                                // column panels of B itself (pack_cols); both must agree.
                                let bt: Vec<f32> = (0..n * k)
                                    .map(|i| bm[(i % k.max(1)) * n + i / k.max(1)])
                                    .collect();
                                let mut p1 = Vec::new();
                                pack_transposed(
                                    &bt,
                                    View {
                                        base: 0,
                                        rs: k,
                                        rows: n,
                                        cols: k,
                                    },
                                    1.0f32,
                                    &mut p1,
                                );
                                let mut p2 = Vec::new();
                                let ps2 = pack_cols(
                                    &bm,
                                    View {
                                        base: 0,
                                        rs: n,
                                        rows: k,
                                        cols: n,
                                    },
                                    1.0f32,
                                    &mut p2,
                                );
                                let (rsa, csa) = if transposed_a { (1, m) } else { (k, 1) };
                                // A[r][p] lives at r*rsa + p*csa.
                                let a_at = |r: usize, p: usize| a[r * rsa + p * csa];
                                let ldc = round_up_nr(n) + 3;
                                for (b, bps) in [(&p1, k * NR), (&p2, ps2)] {
                                    let c0: Vec<f32> =
                                        (0..m * ldc).map(|_| lcg(&mut seed)).collect();
                                    let mut c = c0.clone();
                                    let d = GemmDims {
                                        m,
                                        npanels: panels(n),
                                        k,
                                        rsa,
                                        csa,
                                        bps,
                                        ldc,
                                        accumulate,
                                    };
                                    gemm(level, &d, &a, b, &mut c);
                                    for r in 0..m {
                                        for j in 0..n {
                                            let mut want: f64 = (0..k)
                                                .map(|p| a_at(r, p) as f64 * bm[p * n + j] as f64)
                                                .sum();
                                            if accumulate {
                                                want += c0[r * ldc + j] as f64;
                                            }
                                            let got = c[r * ldc + j] as f64;
                                            assert!(
                                                (got - want).abs() < 1e-4,
                                                "{level:?} m={m} n={n} k={k}"
                                            );
                                        }
                                        // Columns past the panels are untouched.
                                        for j in round_up_nr(n)..ldc {
                                            assert_eq!(c[r * ldc + j], c0[r * ldc + j]);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f64_gemm_is_exact_on_integers() {
        let (m, n, k) = (5, 40, 9);
        let a: Vec<f64> = (0..m * k).map(|i| (i % 7) as f64 - 3.0).collect();
        let bm: Vec<f64> = (0..k * n).map(|i| (i % 5) as f64 - 2.0).collect();
        let mut b = Vec::new();
        let bps = pack_cols(
            &bm,
            View {
                base: 0,
                rs: n,
                rows: k,
                cols: n,
            },
            1.0f64,
            &mut b,
        );
        let mut c = vec![0.0; m * round_up_nr(n)];
        let d = GemmDims {
            m,
            npanels: panels(n),
            k,
            rsa: k,
            csa: 1,
            bps,
            ldc: round_up_nr(n),
            accumulate: false,
        };
        gemm(Level::Scalar, &d, &a, &b, &mut c);
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| a[r * k + p] * bm[p * n + j]).sum();
                assert_eq!(c[r * round_up_nr(n) + j], want);
            }
        }
    }
}
