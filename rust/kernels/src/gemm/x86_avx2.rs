//! AVX2+FMA micro-kernel: MR rows × 32 columns (4 ymm) of C in 4·MR registers. With 16
//! ymm registers, MR = 2 (8 accumulators + 4 B vectors + a broadcast) is the largest block
//! that does not spill; MR = 3 measured at half the rate.

#![allow(clippy::needless_range_loop)] // unrolled register blocks read best indexed

use super::{GemmDims, NR};
use std::arch::x86_64::*;

const MR: usize = 2;

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gemm(d: &GemmDims, a: *const f32, b: *const f32, c: *mut f32) {
    for p in 0..d.npanels {
        let bp = b.add(p * d.bps);
        let cp = c.add(p * NR);
        let mut i = 0;
        while i + MR <= d.m {
            tile::<MR>(d, a.add(i * d.rsa), bp, cp.add(i * d.ldc));
            i += MR;
        }
        let (a, c) = (a.add(i * d.rsa), cp.add(i * d.ldc));
        if d.m - i == 1 {
            tile::<1>(d, a, bp, c);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(d: &GemmDims, a: *const f32, b: *const f32, c: *mut f32) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let (rsa, csa) = (d.rsa, d.csa);
    let mut ap = a;
    let mut bp = b;
    for _ in 0..d.k {
        let bv = [
            _mm256_loadu_ps(bp),
            _mm256_loadu_ps(bp.add(8)),
            _mm256_loadu_ps(bp.add(16)),
            _mm256_loadu_ps(bp.add(24)),
        ];
        for r in 0..R {
            let av = _mm256_set1_ps(*ap.add(r * rsa));
            for q in 0..4 {
                acc[r][q] = _mm256_fmadd_ps(av, bv[q], acc[r][q]);
            }
        }
        ap = ap.add(csa);
        bp = bp.add(NR);
    }
    for r in 0..R {
        let cr = c.add(r * d.ldc);
        for q in 0..4 {
            let mut x = acc[r][q];
            if d.accumulate {
                x = _mm256_add_ps(_mm256_loadu_ps(cr.add(8 * q)), x);
            }
            _mm256_storeu_ps(cr.add(8 * q), x);
        }
    }
}
