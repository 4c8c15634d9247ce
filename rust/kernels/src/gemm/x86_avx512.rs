//! AVX-512F micro-kernel: MR rows × 32 columns (2 zmm) of C held in 2·MR registers, one
//! broadcast of A per row per k step. Zen4 executes zmm FMAs double-pumped, so 16
//! independent accumulators already cover FMA latency × throughput.

#![allow(clippy::needless_range_loop)] // unrolled register blocks read best indexed

use super::{GemmDims, NR};
use std::arch::x86_64::*;

const MR: usize = 8;

#[target_feature(enable = "avx512f")]
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
        match d.m - i {
            1 => tile::<1>(d, a, bp, c),
            2 => tile::<2>(d, a, bp, c),
            3 => tile::<3>(d, a, bp, c),
            4 => tile::<4>(d, a, bp, c),
            5 => tile::<5>(d, a, bp, c),
            6 => tile::<6>(d, a, bp, c),
            7 => tile::<7>(d, a, bp, c),
            _ => {}
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize>(d: &GemmDims, a: *const f32, b: *const f32, c: *mut f32) {
    let mut c0 = [_mm512_setzero_ps(); R];
    let mut c1 = [_mm512_setzero_ps(); R];
    let (rsa, csa) = (d.rsa, d.csa);
    let mut ap = a;
    let mut bp = b;
    for _ in 0..d.k {
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for r in 0..R {
            let av = _mm512_set1_ps(*ap.add(r * rsa));
            c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
            c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
        }
        ap = ap.add(csa);
        bp = bp.add(NR);
    }
    for r in 0..R {
        let cr = c.add(r * d.ldc);
        if d.accumulate {
            c0[r] = _mm512_add_ps(_mm512_loadu_ps(cr), c0[r]);
            c1[r] = _mm512_add_ps(_mm512_loadu_ps(cr.add(16)), c1[r]);
        }
        _mm512_storeu_ps(cr, c0[r]);
        _mm512_storeu_ps(cr.add(16), c1[r]);
    }
}
