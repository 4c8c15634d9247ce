//! AVX-512F row kernels. Tails use masked loads/stores instead of a scalar loop.

use super::EXP2_POLY;
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// `2^x` on lanes `k` (0 elsewhere) by `x = n + f`, `|f| ≤ 1/2`: polynomial for `2^f`, then
/// `scalef` by `n`, which handles overflow (and keeps NaN) without integer exponent tricks.
/// Inputs below -125 (including `-inf`) give 0: their true value is under 2^-125, and a
/// subnormal result from `scalef` costs a microcode assist on some Intel cores.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp2v_masked(k: __mmask16, x: __m512) -> __m512 {
    // Not-less-than, unordered: NaN lanes stay live and propagate.
    let k = k & _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-125.0));
    let x = _mm512_maskz_mov_ps(k, x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[5]);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[4]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[3]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[2]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[1]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[0]));
    _mm512_maskz_scalef_ps(k, p, n)
}

/// `2^x` on every lane (see [`exp2v_masked`]).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp2v(x: __m512) -> __m512 {
    exp2v_masked(u16::MAX, x)
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp2_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let mv = _mm512_set1_ps(m);
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + 32 <= n {
        let e0 = exp2v(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
        let e1 = exp2v(_mm512_sub_ps(_mm512_loadu_ps(p.add(i + 16)), mv));
        _mm512_storeu_ps(p.add(i), e0);
        _mm512_storeu_ps(p.add(i + 16), e1);
        acc0 = _mm512_add_ps(acc0, e0);
        acc1 = _mm512_add_ps(acc1, e1);
        i += 32;
    }
    while i < n {
        let k = tail_mask((n - i).min(16));
        let e = exp2v(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), mv));
        _mm512_mask_storeu_ps(p.add(i), k, e);
        acc0 = _mm512_mask_add_ps(acc0, k, acc0, e);
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp2_sub_vec(x: &mut [f32], m: &[f32]) {
    let n = x.len();
    let (p, mp) = (x.as_mut_ptr(), m.as_ptr());
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        let v = _mm512_sub_ps(
            _mm512_maskz_loadu_ps(k, p.add(i)),
            _mm512_maskz_loadu_ps(k, mp.add(i)),
        );
        _mm512_mask_storeu_ps(p.add(i), k, exp2v(v));
        i += 16;
    }
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dot_rows(a: &[f32], rs: usize, x: &[f32], out: &mut [f32]) {
    let n = x.len();
    for (j, o) in out.iter_mut().enumerate() {
        let row = a.as_ptr().add(j * rs);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = tail_mask((n - i).min(16));
            let u = _mm512_maskz_loadu_ps(k, row.add(i));
            acc = _mm512_fmadd_ps(u, _mm512_maskz_loadu_ps(k, x.as_ptr().add(i)), acc);
            i += 16;
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn axpy_rows(y: &mut [f32], p: &[f32], a: &[f32], rs: usize) {
    let n = y.len();
    let mut i = 0;
    // One 16-lane strip of y stays in a register while every row adds into it.
    while i < n {
        let k = tail_mask((n - i).min(16));
        let mut acc = _mm512_maskz_loadu_ps(k, y.as_ptr().add(i));
        for (j, &pj) in p.iter().enumerate() {
            let u = _mm512_maskz_loadu_ps(k, a.as_ptr().add(j * rs + i));
            acc = _mm512_fmadd_ps(_mm512_set1_ps(pj), u, acc);
        }
        _mm512_mask_storeu_ps(y.as_mut_ptr().add(i), k, acc);
        i += 16;
    }
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn max(x: &[f32]) -> f32 {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut acc = ninf;
    let n = x.len();
    let p = x.as_ptr();
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        acc = _mm512_max_ps(acc, _mm512_mask_loadu_ps(ninf, k, p.add(i)));
        i += 16;
    }
    _mm512_reduce_max_ps(acc)
}

/// `x = 1 / (1 + 2^(-x·log2 e))`. The reciprocal is `rcp14` plus one Newton step (about
/// 1 ulp): a `vdivps` per vector was the flows' largest cost. The exponent is capped at
/// 126 so `1 + e` stays finite and the Newton step cannot form `inf · 0`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn sigmoid(x: &mut [f32]) {
    let (c, cap, one) = (
        _mm512_set1_ps(-std::f32::consts::LOG2_E),
        _mm512_set1_ps(126.0),
        _mm512_set1_ps(1.0),
    );
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        // min returns its second operand for NaN, so NaN stays NaN
        let t = _mm512_min_ps(cap, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), c));
        let d = _mm512_add_ps(one, exp2v(t));
        let r = _mm512_rcp14_ps(d);
        let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
        _mm512_mask_storeu_ps(p.add(i), k, r);
        i += 16;
    }
}

/// `out = (Σ_t c_t x_t + base) · s (1 − s)`, 16 lanes at a time (see `VecMath`).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn sigmoid_grad(
    out: &mut [f32],
    s: &[f32],
    terms: &[(f32, &[f32]); 4],
    base: &[f32],
) {
    let n = out.len();
    let c = terms.map(|(c, _)| _mm512_set1_ps(c));
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        let mut acc = _mm512_maskz_loadu_ps(k, base.as_ptr().add(i));
        for (cv, (_, x)) in c.iter().zip(terms) {
            acc = _mm512_fmadd_ps(*cv, _mm512_maskz_loadu_ps(k, x.as_ptr().add(i)), acc);
        }
        let sv = _mm512_maskz_loadu_ps(k, s.as_ptr().add(i));
        let ds = _mm512_fnmadd_ps(sv, sv, sv);
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, _mm512_mul_ps(acc, ds));
        i += 16;
    }
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scale(x: &mut [f32], a: f32) {
    let av = _mm512_set1_ps(a);
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        let v = _mm512_maskz_loadu_ps(k, p.add(i));
        _mm512_mask_storeu_ps(p.add(i), k, _mm512_mul_ps(v, av));
        i += 16;
    }
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn mul_sub(ds: &mut [f32], pr: &[f32], delta: f32) {
    let dv = _mm512_set1_ps(delta);
    let n = ds.len();
    let d = ds.as_mut_ptr();
    let p = pr.as_ptr();
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, d.add(i)), dv);
        let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), x);
        _mm512_mask_storeu_ps(d.add(i), k, y);
        i += 16;
    }
}
