//! Forward for few queries per kv head (decoding, short chunks): at most `NR` query rows
//! share each kv head (`q_len · group ≤ NR`), so packing K and V would cost as much memory
//! traffic as the attention itself. Instead the roles swap and K, V are read in place as
//! the broadcast (`A`) operands: `Sᵀ = K·Qᵀ` against one packed panel of queries, the
//! online softmax runs down the key axis with one lane per query, and `Oᵀ += Vᵀ·Pᵀ` uses
//! the exponentiated `Sᵀ` tile directly as its packed `B`. With at most `GEMV_MAX`
//! queries even one panel is mostly padding, so each query runs as matrix-vector products
//! instead. Needs storage = accumulation type (f32/f64), i.e. nothing to convert.

// Per-query-column state is indexed in parallel arrays, one lane per query.
#![allow(clippy::needless_range_loop)]

use super::{AttnDims, Layout, SharedMut, Visibility};
use crate::element::{Acc, Element};
use crate::gemm::{gemm, GemmDims, NR};
use crate::per_thread::PerThread;
use crate::simd::{self, math::VecMath};
use rayon::prelude::*;

/// Keys per tile (the `Sᵀ` tile is `KT × NR`).
const KT: usize = 256;

/// Up to this many queries per kv head, each query runs as matrix-vector products
/// (`K·q`, `pᵀV`) instead of padding a 32-wide GEMM panel with zero queries.
const GEMV_MAX: usize = 4;

/// Whether [`run`] handles these dims.
pub(super) fn applies(dims: &AttnDims) -> bool {
    let group = dims.q_heads / dims.kv_heads;
    dims.q_len * group <= NR
}

struct Scratch<T> {
    /// `scale·log2e·Qᵀ`, one `[d][NR]` panel; column `c = g·q_len + i`.
    qt: Vec<T>,
    /// `Sᵀ` / `Pᵀ` tile, `[key][NR]`.
    st: Vec<T>,
    /// `Oᵀ`, `[dv][NR]`.
    ot: Vec<T>,
    m: [T; NR],
    l: [T; NR],
    m_ref: [T; NR],
    alpha: [T; NR],
}

/// The matrix-vector variant for `nq ≤ GEMV_MAX`: one query at a time, scores in `sc.st`,
/// output row in `sc.ot`.
///
/// # Safety
/// The caller owns the output rows of batch `bi`, kv head `kh`'s query heads.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_head<E: Element>(
    level: simd::Level,
    sc: &mut Scratch<E::Acc>,
    bi: usize,
    kh: usize,
    dims: &AttnDims,
    layout: &Layout,
    lim: &[usize; NR],
    qscale: E::Acc,
    q: &[E],
    k: &[E::Acc],
    v: &[E::Acc],
    outp: SharedMut<E>,
    lsep: SharedMut<E::Acc>,
) {
    let AttnDims {
        q_len: tq,
        kv_len: tk,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        v_head_dim: dv,
        ..
    } = *dims;
    let group = hq / hkv;
    let (zero, one, ninf) = (E::Acc::ZERO, E::Acc::ONE, E::Acc::NEG_INFINITY);
    let (kbase, ks) = (layout.k.at(bi * tk, kh, d), layout.k.stride);
    let (vbase, vs) = (layout.v.at(bi * tk, kh, dv), layout.v.stride);
    let mut qv = vec![zero; d];
    for c in 0..tq * group {
        let (g, i) = (c / tq, c % tq);
        let row = (bi * tq + i) * hq + kh * group + g;
        let qa = layout.q.at(bi * tq + i, kh * group + g, d);
        E::to_acc_slice(&q[qa..qa + d], &mut qv);
        qv.iter_mut().for_each(|x| *x *= qscale);
        let o = &mut sc.ot[..dv];
        o.fill(zero);
        let (mut m, mut l) = (ninf, zero);
        let mut j0 = 0;
        while j0 < lim[c] {
            let bk = KT.min(lim[c] - j0);
            let s = &mut sc.st[..bk];
            E::Acc::dot_rows(level, &k[kbase + j0 * ks..], ks, &qv, s);
            let mx = E::Acc::row_max(level, s);
            let m_new = if mx > m || mx.partial_cmp(&mx).is_none() {
                mx
            } else {
                m
            };
            let m_ref = if m_new == ninf { zero } else { m_new };
            let sum = E::Acc::exp2_sub_sum(level, s, m_ref);
            let alpha = if m == m_new {
                one
            } else {
                E::Acc::exp2(m - m_ref)
            };
            if alpha != one {
                E::Acc::scale(level, o, alpha);
            }
            l = l * alpha + sum;
            m = m_new;
            if dv > 0 {
                E::Acc::axpy_rows(level, o, s, &v[vbase + j0 * vs..], vs);
            }
            j0 += bk;
        }
        let nan = l.partial_cmp(&l).is_none();
        let (inv, lse_v) = if l > zero {
            let ln2 = E::Acc::from_f64(std::f64::consts::LN_2);
            (one / l, m * ln2 + l.ln())
        } else if nan {
            (l, l)
        } else {
            (zero, ninf)
        };
        let oa = layout.o.at(bi * tq + i, kh * group + g, dv);
        for (cc, &x) in o.iter().enumerate() {
            *outp.get().add(oa + cc) = E::from_acc(x * inv);
        }
        *lsep.get().add(row) = lse_v;
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run<E: Element>(
    dims: &AttnDims,
    layout: &Layout,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E::Acc],
    v: &[E::Acc],
    out: &mut [E],
    lse: &mut [E::Acc],
) {
    let level = simd::active();
    let AttnDims {
        batch,
        q_len: tq,
        kv_len: tk,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        v_head_dim: dv,
    } = *dims;
    let group = hq / hkv;
    let nq = tq * group;
    let vis = Visibility::new(dims, causal);
    let qscale = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let ninf = E::Acc::NEG_INFINITY;
    let zero = E::Acc::ZERO;
    let one = E::Acc::ONE;
    let outp = SharedMut(out.as_mut_ptr());
    let lsep = SharedMut(lse.as_mut_ptr());
    let scratch = PerThread::new();
    // Last key any query of the tile sees.
    let kend = vis.limit(tq - 1);
    // Visible-key count per query column.
    let mut lim = [tk; NR];
    for (c, l) in lim.iter_mut().enumerate().take(nq) {
        *l = vis.limit(c % tq);
    }
    let masked = lim[..nq].iter().any(|&l| l < kend);

    (0..batch * hkv)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|bkh| {
            let init = || Scratch {
                qt: vec![zero; d * NR],
                st: vec![zero; KT * NR],
                ot: vec![zero; dv * NR],
                m: [zero; NR],
                l: [zero; NR],
                m_ref: [zero; NR],
                alpha: [zero; NR],
            };
            scratch.with(init, |sc| {
                let (bi, kh) = (bkh / hkv, bkh % hkv);
                if nq <= GEMV_MAX {
                    // SAFETY: as below, this task owns the group's query rows of batch bi.
                    unsafe {
                        gemv_head::<E>(
                            level, sc, bi, kh, dims, layout, &lim, qscale, q, k, v, outp, lsep,
                        )
                    };
                    return;
                }
                sc.qt.fill(zero);
                let mut row = vec![zero; d];
                for c in 0..nq {
                    let (g, i) = (c / tq, c % tq);
                    let base = layout.q.at(bi * tq + i, kh * group + g, d);
                    E::to_acc_slice(&q[base..base + d], &mut row);
                    for (dd, &x) in row.iter().enumerate() {
                        sc.qt[dd * NR + c] = x * qscale;
                    }
                }
                sc.ot.fill(zero);
                sc.m = [ninf; NR];
                sc.l = [zero; NR];
                let (kbase, ks) = (layout.k.at(bi * tk, kh, d), layout.k.stride);
                let (vbase, vs) = (layout.v.at(bi * tk, kh, dv), layout.v.stride);
                let mut j0 = 0;
                while j0 < kend {
                    let bk = KT.min(kend - j0);
                    let sd = GemmDims {
                        m: bk,
                        npanels: 1,
                        k: d,
                        rsa: ks,
                        csa: 1,
                        bps: d * NR,
                        ldc: NR,
                        accumulate: false,
                    };
                    gemm(level, &sd, &k[kbase + j0 * ks..], &sc.qt, &mut sc.st);
                    // Only the nq live columns are touched: padding columns hold raw scores of
                    // zero queries and only feed padding columns of Oᵀ, which are never read.
                    let st = &mut sc.st[..bk * NR];
                    // Mask keys past each query's limit, then the column max.
                    let mut mx = [ninf; NR];
                    for (jj, srow) in st.chunks_exact_mut(NR).enumerate() {
                        for c in 0..nq {
                            if masked && j0 + jj >= lim[c] {
                                srow[c] = ninf;
                            }
                            let x = srow[c];
                            if x > mx[c] || x.partial_cmp(&x).is_none() {
                                mx[c] = x;
                            }
                        }
                    }
                    let mut rescale = false;
                    for c in 0..nq {
                        let (m_old, x) = (sc.m[c], mx[c]);
                        let m_new = if x > m_old || x.partial_cmp(&x).is_none() {
                            x
                        } else {
                            m_old
                        };
                        // All -inf so far: shift by 0 so NaN scores still reach the sum.
                        sc.m_ref[c] = if m_new == ninf { zero } else { m_new };
                        sc.alpha[c] = if m_old == m_new {
                            one
                        } else {
                            E::Acc::exp2(m_old - sc.m_ref[c])
                        };
                        rescale |= sc.alpha[c] != one;
                        sc.m[c] = m_new;
                    }
                    let mut sum = [zero; NR];
                    for srow in st.chunks_exact_mut(NR) {
                        let live = &mut srow[..nq];
                        E::Acc::exp2_sub_vec(level, live, &sc.m_ref);
                        for (s, &p) in sum.iter_mut().zip(live.iter()) {
                            *s += p;
                        }
                    }
                    for c in 0..nq {
                        sc.l[c] = sc.l[c] * sc.alpha[c] + sum[c];
                    }
                    if rescale {
                        for orow in sc.ot.chunks_exact_mut(NR) {
                            for (o, &a) in orow[..nq].iter_mut().zip(&sc.alpha) {
                                *o *= a;
                            }
                        }
                    }
                    let od = GemmDims {
                        m: dv,
                        npanels: 1,
                        k: bk,
                        rsa: 1,
                        csa: vs,
                        bps: bk * NR,
                        ldc: NR,
                        accumulate: true,
                    };
                    gemm(level, &od, &v[vbase + j0 * vs..], &sc.st, &mut sc.ot);
                    j0 += bk;
                }
                // SAFETY: the group's query heads of batch bi belong to this task alone.
                unsafe {
                    for c in 0..nq {
                        let (g, i) = (c / tq, c % tq);
                        let row = (bi * tq + i) * hq + kh * group + g;
                        let oa = layout.o.at(bi * tq + i, kh * group + g, dv);
                        let l = sc.l[c];
                        let nan = l.partial_cmp(&l).is_none();
                        let (inv, lse_v) = if l > zero {
                            let ln2 = E::Acc::from_f64(std::f64::consts::LN_2);
                            (one / l, sc.m[c] * ln2 + l.ln())
                        } else if nan {
                            (l, l)
                        } else {
                            (zero, ninf)
                        };
                        for cc in 0..dv {
                            *outp.get().add(oa + cc) = E::from_acc(sc.ot[cc * NR + c] * inv);
                        }
                        *lsep.get().add(row) = lse_v;
                    }
                }
            })
        });
}
