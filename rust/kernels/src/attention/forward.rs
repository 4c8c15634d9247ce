//! Forward pass: one task per (batch, query head, query tile), online softmax over key tiles.

use super::{fwd_bq, store_row, AttnDims, Layout, SharedMut, Visibility, FWD_BK as BK};
use crate::buffer_pool::{take, PoolVec};
use crate::element::{Acc, Element};
use crate::gemm::pack::{pack_cols, pack_rows, pack_transposed, View};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::per_thread::PerThread;
use crate::simd::{self, Level};
use rayon::prelude::*;

/// One kv head packed for the forward GEMMs.
struct PackedKv<T: Acc> {
    /// Kᵀ panels (`[key panel][d][NR]`), B of `S = Q·Kᵀ`.
    kt: PoolVec<T>,
    /// V column panels (`[dv panel][key][NR]`), B of `O += P·V`.
    v: PoolVec<T>,
    /// Stride between V panels.
    vps: usize,
}

/// Per-task buffers, reused across the tasks one worker runs.
struct Scratch<T: Acc> {
    /// The query tile, pre-scaled by `scale·log2 e`.
    q: Vec<T>,
    /// One `BQ × BK` tile of scores, exponentiated in place into probabilities.
    s: Vec<T>,
    /// Unnormalised output rows (`dv` padded to whole panels).
    o: Vec<T>,
    /// Running row max (base-2 units) and row sum of the online softmax.
    m: Vec<T>,
    l: Vec<T>,
    /// Output row conversion scratch.
    tmp: Vec<T>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run<E: Element>(
    dims: &AttnDims,
    layout: &Layout,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
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
    let one = E::Acc::ONE;

    let kv: Vec<PackedKv<E::Acc>> = (0..batch * hkv)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / hkv, bh % hkv);
            let mut kt = take(round_up_nr(tk) * d);
            pack_transposed(
                k,
                View {
                    base: layout.k.at(bi * tk, h, d),
                    rs: layout.k.stride,
                    rows: tk,
                    cols: d,
                },
                one,
                &mut kt,
            );
            let mut vp = take(round_up_nr(tk) * round_up_nr(dv));
            let vps = pack_cols(
                v,
                View {
                    base: layout.v.at(bi * tk, h, dv),
                    rs: layout.v.stride,
                    rows: tk,
                    cols: dv,
                },
                one,
                &mut vp,
            );
            PackedKv { kt, v: vp, vps }
        })
        .collect();

    let vis = Visibility::new(dims, causal);
    let qscale = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let dv_pad = round_up_nr(dv);
    let bq_tile = fwd_bq(tq);
    let nqt = tq.div_ceil(bq_tile);
    let heads = batch * hq;
    let outp = SharedMut(out.as_mut_ptr());
    let lsep = SharedMut(lse.as_mut_ptr());
    let scratch = PerThread::new();

    // Largest tiles first (under causal the last query tiles see the most keys), one task per
    // rayon job so the two halves of the pool stay balanced.
    (0..nqt * heads)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|t| {
            let init = || Scratch {
                q: Vec::with_capacity(bq_tile * d),
                s: vec![E::Acc::ZERO; bq_tile * BK],
                o: vec![E::Acc::ZERO; bq_tile * dv_pad],
                m: vec![E::Acc::ZERO; bq_tile],
                l: vec![E::Acc::ZERO; bq_tile],
                tmp: Vec::with_capacity(dv),
            };
            scratch.with(init, |sc| {
                let qt = nqt - 1 - t / heads;
                let bh = t % heads;
                let (bi, h) = (bh / hq, bh % hq);
                let i0 = qt * bq_tile;
                let bq = bq_tile.min(tq - i0);
                let src = View {
                    base: layout.q.at(bi * tq + i0, h, d),
                    rs: layout.q.stride,
                    rows: bq,
                    cols: d,
                };
                pack_rows(q, src, qscale, &mut sc.q);
                let kvh = &kv[bi * hkv + h / group];
                tile::<E::Acc>(level, sc, kvh, &vis, i0, bq, d, dv_pad);
                // SAFETY: rows i0..i0+bq of head (bi, h) belong to this task alone.
                unsafe {
                    let (op, lp) = (outp.get(), lsep.get());
                    let sc = &mut *sc;
                    for r in 0..bq {
                        let row = (bi * tq + i0 + r) * hq + h;
                        let orow_at = layout.o.at(bi * tq + i0 + r, h, dv);
                        let l = sc.l[r];
                        let orow = &sc.o[r * dv_pad..][..dv];
                        if l > E::Acc::ZERO {
                            store_row(outp, orow_at, orow, one / l, &mut sc.tmp);
                            let ln2 = E::Acc::from_f64(std::f64::consts::LN_2);
                            *lp.add(row) = sc.m[r] * ln2 + l.ln();
                        } else {
                            // No visible key (or a NaN row): zero output, lse -inf / NaN.
                            let nan = l.partial_cmp(&l).is_none();
                            for c in 0..dv {
                                *op.add(orow_at + c) =
                                    E::from_acc(if nan { l } else { E::Acc::ZERO });
                            }
                            *lp.add(row) = if nan { l } else { E::Acc::NEG_INFINITY };
                        }
                    }
                }
            })
        });
}

/// Runs one query tile (already packed and scaled in `sc.q`) over all its visible keys,
/// leaving the unnormalised output in `sc.o` and the running max / sum in `sc.m` / `sc.l`.
#[allow(clippy::too_many_arguments)]
fn tile<T: Acc>(
    level: Level,
    sc: &mut Scratch<T>,
    kv: &PackedKv<T>,
    vis: &Visibility,
    i0: usize,
    bq: usize,
    d: usize,
    dv_pad: usize,
) {
    sc.o[..bq * dv_pad].fill(T::ZERO);
    sc.m[..bq].fill(T::NEG_INFINITY);
    sc.l[..bq].fill(T::ZERO);
    let kend = vis.limit(i0 + bq - 1);
    let nvp = dv_pad / NR;
    let mut j0 = 0;
    while j0 < kend {
        let bk = BK.min(kend - j0);
        let sd = GemmDims {
            m: bq,
            npanels: panels(bk),
            k: d,
            rsa: d,
            csa: 1,
            bps: d * NR,
            ldc: BK,
            accumulate: false,
        };
        gemm(level, &sd, &sc.q, &kv.kt[(j0 / NR) * d * NR..], &mut sc.s);
        for r in 0..bq {
            let row = &mut sc.s[r * BK..r * BK + bk];
            let nvis = vis.limit(i0 + r).saturating_sub(j0).min(bk);
            let mx = T::row_max(level, &row[..nvis]);
            let m_old = sc.m[r];
            #[allow(clippy::eq_op)]
            let m_new = if mx > m_old || mx != mx { mx } else { m_old };
            if nvis == 0 {
                row.fill(T::ZERO);
                continue;
            }
            // All -inf so far: shift by 0 instead, so NaN scores still reach the sum.
            let m_ref = if m_new == T::NEG_INFINITY {
                T::ZERO
            } else {
                m_new
            };
            let sum = T::exp2_sub_sum(level, &mut row[..nvis], m_ref);
            row[nvis..].fill(T::ZERO);
            // While the max is still -inf nothing was accumulated: the rescale by 0 of a zero
            // row (every query's first chunk) is skipped.
            let alpha = if m_old == m_new || m_old == T::NEG_INFINITY {
                T::ONE
            } else {
                T::exp2(m_old - m_ref)
            };
            sc.l[r] = sc.l[r] * alpha + sum;
            sc.m[r] = m_new;
            if alpha != T::ONE {
                T::scale(level, &mut sc.o[r * dv_pad..(r + 1) * dv_pad], alpha);
            }
        }
        let od = GemmDims {
            m: bq,
            npanels: nvp,
            k: bk,
            rsa: BK,
            csa: 1,
            bps: kv.vps,
            ldc: dv_pad,
            accumulate: true,
        };
        if nvp > 0 {
            gemm(level, &od, &sc.s, &kv.v[j0 * NR..], &mut sc.o);
        }
        j0 += bk;
    }
}
