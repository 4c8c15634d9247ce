//! Portable micro-kernel: plain loops the compiler can auto-vectorise for the baseline
//! target. Used for `Level::Scalar` and for f64.

use super::{GemmDims, NR};
use std::ops::{Add, Mul};

const MR: usize = 4;

pub(super) unsafe fn gemm<T>(d: &GemmDims, a: *const T, b: *const T, c: *mut T)
where
    T: Copy + Default + Add<Output = T> + Mul<Output = T>,
{
    for p in 0..d.npanels {
        let bp = b.add(p * d.bps);
        let cp = c.add(p * NR);
        let mut i = 0;
        while i < d.m {
            let rows = MR.min(d.m - i);
            tile(d, rows, a.add(i * d.rsa), bp, cp.add(i * d.ldc));
            i += rows;
        }
    }
}

#[inline(always)]
unsafe fn tile<T>(d: &GemmDims, rows: usize, a: *const T, b: *const T, c: *mut T)
where
    T: Copy + Default + Add<Output = T> + Mul<Output = T>,
{
    let mut acc = [[T::default(); NR]; MR];
    for kk in 0..d.k {
        let brow = std::slice::from_raw_parts(b.add(kk * NR), NR);
        for (r, accr) in acc.iter_mut().enumerate().take(rows) {
            let av = *a.add(r * d.rsa + kk * d.csa);
            for (x, &bv) in accr.iter_mut().zip(brow) {
                *x = *x + av * bv;
            }
        }
    }
    for (r, accr) in acc.iter().enumerate().take(rows) {
        let crow = std::slice::from_raw_parts_mut(c.add(r * d.ldc), NR);
        if d.accumulate {
            for (x, &v) in crow.iter_mut().zip(accr) {
                *x = *x + v;
            }
        } else {
            crow.copy_from_slice(accr);
        }
    }
}
