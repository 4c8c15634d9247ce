//! Vectorised row operations the attention-style kernels run between GEMMs: exp2 of a
//! shifted row (with its sum), row max, scaling, and the softmax-backward `P ⊙ (dP − δ)`.
//!
//! Everything works in base 2: kernels fold `log2(e)` into their scale so one `exp2` per
//! score suffices. The f32 x86 paths use a range-reduced degree-5 polynomial (relative
//! error ≈ 2e-7 in f32 arithmetic); f64 and `Level::Scalar` use the standard library.

#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx512;

use super::Level;

/// `2^f ≈ Σ c_k f^k` on `[-1/2, 1/2]`, fitted for minimal relative error (7.5e-8 in exact
/// arithmetic), lowest order first.
#[allow(clippy::excessive_precision)]
#[cfg(target_arch = "x86_64")]
const EXP2_POLY: [f32; 6] = [
    1.000_000_1,
    0.693_146_94,
    0.240_221_2,
    0.055_507_135,
    0.009_675_529,
    0.001_327_641_5,
];

/// Row operations on an accumulation type, dispatched on a SIMD level.
pub trait VecMath: Copy + Send + Sync + 'static {
    /// `x[i] = 2^(x[i] - m)`; returns `Σ x[i]` after the update. `-inf` entries become 0.
    fn exp2_sub_sum(level: Level, x: &mut [Self], m: Self) -> Self;
    /// `x[i] = 2^(x[i] - m[i])` (per-lane shift; `m` at least as long as `x`).
    fn exp2_sub_vec(level: Level, x: &mut [Self], m: &[Self]);
    /// `out[j] = Σ_i a[j·rs + i] · x[i]` for `j < out.len()` (matrix-vector over strided rows).
    /// `a` must hold `(out.len() − 1)·rs + x.len()` values when `out` is non-empty.
    fn dot_rows(level: Level, a: &[Self], rs: usize, x: &[Self], out: &mut [Self]);
    /// `y[i] += Σ_j p[j] · a[j·rs + i]` for `i < y.len()` (vector-matrix over strided rows).
    /// `a` must hold `(p.len() − 1)·rs + y.len()` values when `p` is non-empty.
    fn axpy_rows(level: Level, y: &mut [Self], p: &[Self], a: &[Self], rs: usize);
    /// Largest element (`-inf` for an empty row). NaNs may be skipped; they still
    /// propagate through `exp2_sub_sum` of the same row.
    fn row_max(level: Level, x: &[Self]) -> Self;
    /// `x[i] *= a`.
    fn scale(level: Level, x: &mut [Self], a: Self);
    /// `x[i] = 1 / (1 + e^(−x[i]))`.
    fn sigmoid(level: Level, x: &mut [Self]);
    /// `out[i] = (Σ_t c_t · x_t[i] + base[i]) · s[i] (1 − s[i])`: a gradient summed from
    /// four terms, taken back through the sigmoid whose outputs are `s`. Every slice must
    /// be at least as long as `out`.
    fn sigmoid_grad(
        level: Level,
        out: &mut [Self],
        s: &[Self],
        terms: &[(Self, &[Self]); 4],
        base: &[Self],
    );
    /// `ds[i] = p[i] · (ds[i] − delta)`; `p` must be at least as long as `ds`.
    fn mul_sub(level: Level, ds: &mut [Self], p: &[Self], delta: Self);
    /// Scalar `2^x`.
    fn exp2(x: Self) -> Self;
    /// Scalar `log2(x)`.
    fn log2(x: Self) -> Self;
}

macro_rules! portable_impl {
    ($t:ty) => {
        pub(super) fn p_exp2_sub_sum(x: &mut [$t], m: $t) -> $t {
            let mut s: $t = 0.0;
            for v in x.iter_mut() {
                *v = (*v - m).exp2();
                s += *v;
            }
            s
        }
        pub(super) fn p_exp2_sub_vec(x: &mut [$t], m: &[$t]) {
            for (v, &mv) in x.iter_mut().zip(m) {
                *v = (*v - mv).exp2();
            }
        }
        pub(super) fn p_dot_rows(a: &[$t], rs: usize, x: &[$t], out: &mut [$t]) {
            for (j, o) in out.iter_mut().enumerate() {
                let row = &a[j * rs..][..x.len()];
                *o = row.iter().zip(x).map(|(&u, &w)| u * w).sum();
            }
        }
        pub(super) fn p_axpy_rows(y: &mut [$t], p: &[$t], a: &[$t], rs: usize) {
            for (j, &pj) in p.iter().enumerate() {
                let row = &a[j * rs..][..y.len()];
                for (v, &u) in y.iter_mut().zip(row) {
                    *v += pj * u;
                }
            }
        }
        pub(super) fn p_max(x: &[$t]) -> $t {
            x.iter().fold(<$t>::NEG_INFINITY, |a, &b| a.max(b))
        }
        pub(super) fn p_scale(x: &mut [$t], a: $t) {
            x.iter_mut().for_each(|v| *v *= a);
        }
        pub(super) fn p_sigmoid(x: &mut [$t]) {
            x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
        }
        pub(super) fn p_sigmoid_grad(
            out: &mut [$t],
            s: &[$t],
            terms: &[($t, &[$t]); 4],
            base: &[$t],
        ) {
            for (i, o) in out.iter_mut().enumerate() {
                let x = terms.iter().fold(base[i], |a, (c, x)| a + c * x[i]);
                *o = x * (s[i] - s[i] * s[i]);
            }
        }
        pub(super) fn p_mul_sub(ds: &mut [$t], p: &[$t], delta: $t) {
            for (d, &pv) in ds.iter_mut().zip(p) {
                *d = pv * (*d - delta);
            }
        }
    };
}

mod p32 {
    portable_impl!(f32);
}
mod p64 {
    portable_impl!(f64);
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn avx512() -> bool {
    super::supported(Level::Avx512)
}
#[cfg(target_arch = "x86_64")]
#[inline]
fn avx2() -> bool {
    super::supported(Level::Avx2)
}

impl VecMath for f32 {
    #[inline]
    fn exp2_sub_sum(level: Level, x: &mut [f32], m: f32) -> f32 {
        match level {
            // SAFETY (all arms): the guard checked the CPU has the level's features.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::exp2_sub_sum(x, m) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 if avx2() => unsafe { x86_avx2::exp2_sub_sum(x, m) },
            _ => p32::p_exp2_sub_sum(x, m),
        }
    }
    #[inline]
    fn exp2_sub_vec(level: Level, x: &mut [f32], m: &[f32]) {
        assert!(m.len() >= x.len());
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::exp2_sub_vec(x, m) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 if avx2() => unsafe { x86_avx2::exp2_sub_vec(x, m) },
            _ => p32::p_exp2_sub_vec(x, m),
        }
    }
    #[inline]
    fn dot_rows(level: Level, a: &[f32], rs: usize, x: &[f32], out: &mut [f32]) {
        if let Some(last) = out.len().checked_sub(1) {
            assert!(x.is_empty() || a.len() >= last * rs + x.len());
        }
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::dot_rows(a, rs, x, out) },
            _ => p32::p_dot_rows(a, rs, x, out),
        }
    }
    #[inline]
    fn axpy_rows(level: Level, y: &mut [f32], p: &[f32], a: &[f32], rs: usize) {
        if let Some(last) = p.len().checked_sub(1) {
            assert!(y.is_empty() || a.len() >= last * rs + y.len());
        }
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::axpy_rows(y, p, a, rs) },
            _ => p32::p_axpy_rows(y, p, a, rs),
        }
    }
    #[inline]
    fn row_max(level: Level, x: &[f32]) -> f32 {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::max(x) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 if avx2() => unsafe { x86_avx2::max(x) },
            _ => p32::p_max(x),
        }
    }
    #[inline]
    fn scale(level: Level, x: &mut [f32], a: f32) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::scale(x, a) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 if avx2() => unsafe { x86_avx2::scale(x, a) },
            _ => p32::p_scale(x, a),
        }
    }
    #[inline]
    fn sigmoid(level: Level, x: &mut [f32]) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::sigmoid(x) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 if avx2() => unsafe { x86_avx2::sigmoid(x) },
            _ => p32::p_sigmoid(x),
        }
    }
    #[inline]
    fn sigmoid_grad(
        level: Level,
        out: &mut [f32],
        s: &[f32],
        terms: &[(f32, &[f32]); 4],
        base: &[f32],
    ) {
        let n = out.len();
        assert!(s.len() >= n && base.len() >= n && terms.iter().all(|t| t.1.len() >= n));
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::sigmoid_grad(out, s, terms, base) },
            _ => p32::p_sigmoid_grad(out, s, terms, base),
        }
    }
    #[inline]
    fn mul_sub(level: Level, ds: &mut [f32], p: &[f32], delta: f32) {
        assert!(p.len() >= ds.len());
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if avx512() => unsafe { x86_avx512::mul_sub(ds, p, delta) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 if avx2() => unsafe { x86_avx2::mul_sub(ds, p, delta) },
            _ => p32::p_mul_sub(ds, p, delta),
        }
    }
    #[inline]
    fn exp2(x: f32) -> f32 {
        x.exp2()
    }
    #[inline]
    fn log2(x: f32) -> f32 {
        x.log2()
    }
}

impl VecMath for f64 {
    #[inline]
    fn exp2_sub_sum(_: Level, x: &mut [f64], m: f64) -> f64 {
        p64::p_exp2_sub_sum(x, m)
    }
    #[inline]
    fn exp2_sub_vec(_: Level, x: &mut [f64], m: &[f64]) {
        p64::p_exp2_sub_vec(x, m)
    }
    #[inline]
    fn dot_rows(_: Level, a: &[f64], rs: usize, x: &[f64], out: &mut [f64]) {
        p64::p_dot_rows(a, rs, x, out)
    }
    #[inline]
    fn axpy_rows(_: Level, y: &mut [f64], p: &[f64], a: &[f64], rs: usize) {
        p64::p_axpy_rows(y, p, a, rs)
    }
    #[inline]
    fn row_max(_: Level, x: &[f64]) -> f64 {
        p64::p_max(x)
    }
    #[inline]
    fn scale(_: Level, x: &mut [f64], a: f64) {
        p64::p_scale(x, a)
    }
    #[inline]
    fn sigmoid(_: Level, x: &mut [f64]) {
        p64::p_sigmoid(x)
    }
    #[inline]
    fn sigmoid_grad(
        _: Level,
        out: &mut [f64],
        s: &[f64],
        terms: &[(f64, &[f64]); 4],
        base: &[f64],
    ) {
        p64::p_sigmoid_grad(out, s, terms, base)
    }
    #[inline]
    fn mul_sub(_: Level, ds: &mut [f64], p: &[f64], delta: f64) {
        p64::p_mul_sub(ds, p, delta)
    }
    #[inline]
    fn exp2(x: f64) -> f64 {
        x.exp2()
    }
    #[inline]
    fn log2(x: f64) -> f64 {
        x.log2()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_matches_std_every_level() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| -140.0 + i as f32 * 0.1437)
            .chain([f32::NEG_INFINITY, 0.0, -0.5, 0.5])
            .collect();
        for level in crate::simd::available() {
            let mut y = xs.clone();
            let s = f32::exp2_sub_sum(level, &mut y, 3.0);
            let mut want_sum = 0.0f64;
            for (&x, &y) in xs.iter().zip(&y) {
                let w = ((x - 3.0) as f64).exp2();
                want_sum += w;
                assert!(
                    (y as f64 - w).abs() <= 1e-6 * w + 1e-37,
                    "{level:?} x={x} got {y} want {w}"
                );
            }
            assert!((s as f64 - want_sum).abs() <= 1e-5 * want_sum);
            let mut nan = vec![1.0f32, f32::NAN, 2.0];
            assert!(f32::exp2_sub_sum(level, &mut nan, 2.0).is_nan());
            assert_eq!(f32::row_max(level, &xs[..1000]), xs[999]);
            assert_eq!(f32::row_max(level, &[]), f32::NEG_INFINITY);
        }
    }

    #[test]
    fn sigmoid_matches_std_every_level() {
        let xs: Vec<f32> = (0..2001)
            .map(|i| -100.0 + i as f32 * 0.1)
            .chain([f32::NEG_INFINITY, f32::INFINITY, 0.0, -1e-8, 88.5, -88.5])
            .collect();
        for level in crate::simd::available() {
            let mut y = xs.clone();
            f32::sigmoid(level, &mut y);
            for (&x, &y) in xs.iter().zip(&y) {
                let w = 1.0 / (1.0 + (-(x as f64)).exp());
                // rounding x·log2(e) to f32 costs up to |x|·2^-24 relative error in e^-x
                let tol = 4e-7 + (x as f64).abs().min(200.0) * 6e-8;
                assert!(
                    (y as f64 - w).abs() <= tol * w + 1e-37,
                    "{level:?} x={x} got {y} want {w}"
                );
            }
            let mut nan = [0.5f32, f32::NAN];
            f32::sigmoid(level, &mut nan);
            assert!(nan[1].is_nan() && nan[0] > 0.6);
            for n in [0, 1, 15, 16, 17, 64, 70] {
                let row = |k: usize| -> Vec<f32> {
                    (0..n)
                        .map(|i| ((i * 13 + k * 7) % 17) as f32 / 8.0 - 1.0)
                        .collect()
                };
                let (s, base, x) = (row(0), row(1), [row(2), row(3), row(4), row(5)]);
                let c = [0.5f32, -1.25, 2.0, 0.75];
                let terms = [
                    (c[0], &x[0][..]),
                    (c[1], &x[1][..]),
                    (c[2], &x[2][..]),
                    (c[3], &x[3][..]),
                ];
                let mut out = vec![f32::NAN; n];
                f32::sigmoid_grad(level, &mut out, &s, &terms, &base);
                for i in 0..n {
                    let lin: f64 =
                        base[i] as f64 + (0..4).map(|t| c[t] as f64 * x[t][i] as f64).sum::<f64>();
                    let want = lin * s[i] as f64 * (1.0 - s[i] as f64);
                    assert!(
                        (out[i] as f64 - want).abs() <= 1e-5,
                        "{level:?} n={n} i={i}"
                    );
                }
            }
        }
    }

    #[test]
    fn strided_row_products_every_level() {
        let a: Vec<f32> = (0..40 * 7)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 8.0)
            .collect();
        for level in crate::simd::available() {
            for n in [0, 1, 5, 16, 17, 33] {
                let rs = 40;
                let x: Vec<f32> = (0..n).map(|i| 0.5 - i as f32 / 16.0).collect();
                let mut out = vec![9.0f32; 7];
                f32::dot_rows(level, &a, rs, &x, &mut out);
                for (j, &o) in out.iter().enumerate() {
                    let want: f32 = (0..n).map(|i| a[j * rs + i] * x[i]).sum();
                    assert!((o - want).abs() < 1e-4, "{level:?} n={n}");
                }
                let p: Vec<f32> = (0..7).map(|j| j as f32 / 4.0 - 0.7).collect();
                let mut y: Vec<f32> = (0..n).map(|i| i as f32).collect();
                f32::axpy_rows(level, &mut y, &p, &a, rs);
                for (i, &yi) in y.iter().enumerate() {
                    let want = i as f32 + (0..7).map(|j| p[j] * a[j * rs + i]).sum::<f32>();
                    assert!((yi - want).abs() < 1e-4, "{level:?} n={n}");
                }
                let mut e: Vec<f32> = x.clone();
                let m: Vec<f32> = (0..n).map(|i| i as f32 / 3.0).collect();
                f32::exp2_sub_vec(level, &mut e, &m);
                for i in 0..n {
                    let want = (x[i] - m[i]).exp2();
                    assert!((e[i] - want).abs() <= 1e-6 * want, "{level:?} n={n}");
                }
            }
        }
    }
}
