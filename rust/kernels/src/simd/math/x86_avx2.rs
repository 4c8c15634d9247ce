//! AVX2+FMA row kernels; tails fall back to scalar code.

use super::EXP2_POLY;
use std::arch::x86_64::*;

/// `2^x` by `x = n + f`, `|f| ≤ 1/2`: polynomial for `2^f` times `2^n` built in the
/// exponent field. Inputs below -126 flush to 0 (masked scores are `-inf`).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp2v(x0: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-126.0);
    let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x0, lo);
    // maxps returns its second operand when either is NaN, so NaN survives the clamps.
    let x = _mm256_max_ps(lo, x0);
    let x = _mm256_min_ps(_mm256_set1_ps(127.0), x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm256_sub_ps(x, n);
    let mut p = _mm256_set1_ps(EXP2_POLY[5]);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[4]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[3]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[2]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[1]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[0]));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp2_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let mv = _mm256_set1_ps(m);
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + 16 <= n {
        let e0 = exp2v(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
        let e1 = exp2v(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), mv));
        _mm256_storeu_ps(p.add(i), e0);
        _mm256_storeu_ps(p.add(i + 8), e1);
        acc0 = _mm256_add_ps(acc0, e0);
        acc1 = _mm256_add_ps(acc1, e1);
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(acc0, acc1));
    for v in &mut x[i..] {
        *v = (*v - m).exp2();
        s += *v;
    }
    s
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp2_sub_vec(x: &mut [f32], m: &[f32]) {
    let n = x.len();
    let (p, mp) = (x.as_mut_ptr(), m.as_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(mp.add(i)));
        _mm256_storeu_ps(p.add(i), exp2v(v));
        i += 8;
    }
    for (v, &mv) in x[i..].iter_mut().zip(&m[i..]) {
        *v = (*v - mv).exp2();
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn max(x: &[f32]) -> f32 {
    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
    let n = x.len();
    let p = x.as_ptr();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_max_ps(acc, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    let s = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
    x[i..].iter().fold(_mm_cvtss_f32(s), |a, &b| a.max(b))
}

/// `x = 1 / (1 + 2^(-x·log2 e))` (the exponent is clamped inside [`exp2v`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn sigmoid(x: &mut [f32]) {
    let (c, one) = (
        _mm256_set1_ps(-std::f32::consts::LOG2_E),
        _mm256_set1_ps(1.0),
    );
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + 8 <= n {
        let e = exp2v(_mm256_mul_ps(_mm256_loadu_ps(p.add(i)), c));
        _mm256_storeu_ps(p.add(i), _mm256_div_ps(one, _mm256_add_ps(one, e)));
        i += 8;
    }
    x[i..]
        .iter_mut()
        .for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scale(x: &mut [f32], a: f32) {
    let av = _mm256_set1_ps(a);
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), av));
        i += 8;
    }
    x[i..].iter_mut().for_each(|v| *v *= a);
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn mul_sub(ds: &mut [f32], pr: &[f32], delta: f32) {
    let dv = _mm256_set1_ps(delta);
    let n = ds.len();
    let d = ds.as_mut_ptr();
    let p = pr.as_ptr();
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_sub_ps(_mm256_loadu_ps(d.add(i)), dv);
        _mm256_storeu_ps(d.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), x));
        i += 8;
    }
    for (dd, &pv) in ds[i..].iter_mut().zip(&pr[i..]) {
        *dd = pv * (*dd - delta);
    }
}
