//! Backward pass (FlashAttention-2 order): one task per (batch, kv head, key tile) owns dK/dV
//! of its keys and loops over the query tiles (and the query heads of its GQA group) that
//! see them, recomputing `P` from the saved lse. dQ gathers contributions from every key
//! tile, so tasks are whole kv heads (or a few interleaved key-tile chunks of one, when
//! there are fewer heads than the pool needs) with a private dQ for the group's query
//! heads; chunks are summed at the end. That is cheaper than a second pass recomputing
//! `S` and `dP` for dQ.

use super::{store_row, AttnDims, Layout, Rows, SharedMut, Visibility, BWD_BK as BK, BWD_BQ as BQ};
use crate::buffer_pool::{take, PoolVec};
use crate::element::{Acc, Element};
use crate::gemm::pack::{pack_cols, pack_rows, pack_transposed, View};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::per_thread::PerThread;
use crate::simd::{self, Level};
use rayon::prelude::*;
use std::sync::Mutex;

/// Memory the per-chunk dQ partials may take when heads are too few to keep the pool busy.
const PARTIAL_DQ_BUDGET: usize = 256 << 20;

/// One query head packed for the backward GEMMs.
struct PackedQ<T: Acc> {
    /// `scale·log2e·Q` rows, A of `S = Q·Kᵀ`.
    qs: PoolVec<T>,
    /// Q column panels, B of `dK += dSᵀ·Q`.
    qp: PoolVec<T>,
    qps: usize,
    /// dO rows, A of `dP = dO·Vᵀ`.
    dor: PoolVec<T>,
    /// dO column panels, B of `dV += Pᵀ·dO`.
    dop: PoolVec<T>,
    dops: usize,
    /// `lse·log2e` per query.
    lse2: Vec<T>,
    /// `Σ dO ⊙ O` per query.
    delta: Vec<T>,
}

/// One kv head packed for the backward GEMMs.
struct PackedKv<T: Acc> {
    /// Kᵀ panels, B of `S = Q·Kᵀ`.
    kt: PoolVec<T>,
    /// K column panels, B of `dQ += dS·K`.
    kp: PoolVec<T>,
    kps: usize,
    /// Vᵀ panels, B of `dP = dO·Vᵀ`.
    vt: PoolVec<T>,
}

struct Scratch<T: Acc> {
    /// `P` of the current (query tile, key tile).
    s: Vec<T>,
    /// `dP`, turned into `dS` in place.
    dp: Vec<T>,
    /// dK / dV accumulators of the current key tile (unscaled dK).
    dk: Vec<T>,
    dv: Vec<T>,
    /// The current task's dQ, `[group][q_len][d_pad]`, unscaled.
    dq: PoolVec<T>,
    /// Output row conversion scratch.
    tmp: Vec<T>,
}

/// # Safety (of the pointers)
/// `dq`, `dk`, `dv` address the rows `layout` gives them in buffers the caller checked and
/// lends to this call alone (dk and dv may be one buffer when their rows are disjoint).
#[allow(clippy::too_many_arguments)]
pub(super) fn run<E: Element>(
    dims: &AttnDims,
    layout: &Layout,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dqp: SharedMut<E>,
    dkp: SharedMut<E>,
    dvp: SharedMut<E>,
) {
    let level = simd::active();
    let AttnDims {
        batch,
        q_len: tq,
        kv_len: tk,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        v_head_dim: dvd,
    } = *dims;
    let group = hq / hkv;
    let one = E::Acc::ONE;
    let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
    let qscale = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let scale_t = E::Acc::from_f64(scale);

    let qh: Vec<PackedQ<E::Acc>> = (0..batch * hq)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / hq, bh % hq);
            let row0 = bi * tq * hq + h;
            let qv = View {
                base: layout.q.at(bi * tq, h, d),
                rs: layout.q.stride,
                rows: tq,
                cols: d,
            };
            let ov = View {
                base: layout.o.at(bi * tq, h, dvd),
                rs: layout.o.stride,
                rows: tq,
                cols: dvd,
            };
            let mut p = PackedQ {
                qs: take(tq * d),
                qp: take(round_up_nr(tq) * round_up_nr(d)),
                qps: 0,
                dor: take(tq * dvd),
                dop: take(round_up_nr(tq) * round_up_nr(dvd)),
                dops: 0,
                lse2: Vec::with_capacity(tq),
                delta: Vec::with_capacity(tq),
            };
            pack_rows(q, qv, qscale, &mut p.qs);
            p.qps = pack_cols(q, qv, one, &mut p.qp);
            pack_rows(dout, ov, one, &mut p.dor);
            p.dops = pack_cols(dout, ov, one, &mut p.dop);
            let mut orow = vec![E::Acc::ZERO; dvd];
            for i in 0..tq {
                let row = row0 + i * hq;
                p.lse2.push(lse[row] * log2e);
                E::to_acc_slice(&out[layout.o.at(bi * tq + i, h, dvd)..][..dvd], &mut orow);
                let mut s = E::Acc::ZERO;
                for (&x, &g) in orow.iter().zip(&p.dor[i * dvd..][..dvd]) {
                    s += x * g;
                }
                p.delta.push(s);
            }
            p
        })
        .collect();

    let kvh: Vec<PackedKv<E::Acc>> = (0..batch * hkv)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / hkv, bh % hkv);
            let kv = View {
                base: layout.k.at(bi * tk, h, d),
                rs: layout.k.stride,
                rows: tk,
                cols: d,
            };
            let vv = View {
                base: layout.v.at(bi * tk, h, dvd),
                rs: layout.v.stride,
                rows: tk,
                cols: dvd,
            };
            let mut p = PackedKv {
                kt: take(round_up_nr(tk) * d),
                kp: take(round_up_nr(tk) * round_up_nr(d)),
                kps: 0,
                vt: take(round_up_nr(tk) * dvd),
            };
            pack_transposed(k, kv, one, &mut p.kt);
            p.kps = pack_cols(k, kv, one, &mut p.kp);
            pack_transposed(v, vv, one, &mut p.vt);
            p
        })
        .collect();

    let vis = Visibility::new(dims, causal);
    let d_pad = round_up_nr(d);
    let dv_pad = round_up_nr(dvd);
    let nkt = tk.div_ceil(BK);
    let kv_heads_total = batch * hkv;
    // Each task owns one kv head's key tiles `chunk, chunk + nchunks, ...` (strided so causal
    // chunks get equal work) and accumulates dQ of the group's query heads privately. With
    // enough heads for the pool, one chunk per head and dQ needs no reduction at all.
    // Each chunk holds a full private dQ of its group until the reduction, so cap their
    // total size (MQA with long sequences would otherwise multiply dQ by the chunk count).
    let threads = rayon::current_num_threads().max(1);
    let dq_task_len = group * tq * d_pad;
    let dq_bytes = (dq_task_len * kv_heads_total * std::mem::size_of::<E::Acc>()).max(1);
    let max_chunks = (PARTIAL_DQ_BUDGET / dq_bytes).max(1);
    let nchunks = (4 * threads)
        .div_ceil(kv_heads_total)
        .min(max_chunks)
        .clamp(1, nkt);
    let partial_dq: Vec<Mutex<PoolVec<E::Acc>>> = (0..if nchunks > 1 {
        kv_heads_total * nchunks
    } else {
        0
    })
        .map(|_| Mutex::new(take(0)))
        .collect();
    let scratch = PerThread::new();

    (0..kv_heads_total * nchunks)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|t| {
            let init = || Scratch {
                s: vec![E::Acc::ZERO; BQ * BK],
                dp: vec![E::Acc::ZERO; BQ * BK],
                dk: vec![E::Acc::ZERO; BK * d_pad],
                dv: vec![E::Acc::ZERO; BK * dv_pad],
                dq: take(dq_task_len),
                tmp: Vec::with_capacity(d.max(dvd)),
            };
            scratch.with(init, |sc| {
                let chunk = t / kv_heads_total;
                let bkh = t % kv_heads_total;
                let (bi, kh) = (bkh / hkv, bkh % hkv);
                sc.dq.clear();
                sc.dq.resize(dq_task_len, E::Acc::ZERO);
                let kvp = &kvh[bkh];
                for jt in (chunk..nkt).step_by(nchunks) {
                    let j0 = jt * BK;
                    let bk = BK.min(tk - j0);
                    sc.dk.fill(E::Acc::ZERO);
                    sc.dv.fill(E::Acc::ZERO);
                    for g in 0..group {
                        let bh = bi * hq + kh * group + g;
                        key_tile(
                            level,
                            sc,
                            &qh[bh],
                            kvp,
                            g * tq * d_pad,
                            &vis,
                            j0,
                            bk,
                            tq,
                            d,
                            dvd,
                        );
                    }
                    // SAFETY: keys j0..j0+bk of kv head (bi, kh) belong to this task alone.
                    unsafe {
                        for jj in 0..bk {
                            let bt = bi * tk + j0 + jj;
                            store_row(
                                dkp,
                                layout.k.at(bt, kh, d),
                                &sc.dk[jj * d_pad..][..d],
                                scale_t,
                                &mut sc.tmp,
                            );
                            store_row(
                                dvp,
                                layout.v.at(bt, kh, dvd),
                                &sc.dv[jj * dv_pad..][..dvd],
                                one,
                                &mut sc.tmp,
                            );
                        }
                    }
                }
                if nchunks == 1 {
                    // SAFETY: the group's query heads of batch bi belong to this task alone.
                    unsafe {
                        write_dq(
                            dqp,
                            layout.q,
                            &sc.dq,
                            std::iter::empty(),
                            bi,
                            kh * group,
                            group,
                            tq,
                            d,
                            scale_t,
                        )
                    };
                } else {
                    let mut part = partial_dq[t].lock().unwrap_or_else(|e| e.into_inner());
                    *part = std::mem::replace(&mut sc.dq, take(dq_task_len));
                }
            })
        });

    if nchunks > 1 {
        let parts: Vec<PoolVec<E::Acc>> = partial_dq
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        (0..kv_heads_total).into_par_iter().for_each(|bkh| {
            let (bi, kh) = (bkh / hkv, bkh % hkv);
            let rest = (1..nchunks).map(|c| parts[c * kv_heads_total + bkh].as_slice());
            // SAFETY: as above, one iteration per (batch, kv head).
            unsafe {
                write_dq(
                    dqp,
                    layout.q,
                    &parts[bkh],
                    rest,
                    bi,
                    kh * group,
                    group,
                    tq,
                    d,
                    scale_t,
                )
            };
        });
    }
}

/// Writes `scale · Σ parts` (each `[group][tq][d_pad]`) into dq for query heads
/// `h0..h0+group` of batch `bi`.
///
/// # Safety
/// No other thread may write those dq rows concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn write_dq<'a, E: Element>(
    dq: SharedMut<E>,
    rows: Rows,
    first: &[E::Acc],
    rest: impl Iterator<Item = &'a [E::Acc]> + Clone,
    bi: usize,
    h0: usize,
    group: usize,
    tq: usize,
    d: usize,
    scale: E::Acc,
) where
    E::Acc: 'a,
{
    let d_pad = round_up_nr(d);
    let (mut sum, mut tmp) = (vec![E::Acc::ZERO; d], Vec::with_capacity(d));
    for g in 0..group {
        for i in 0..tq {
            let src = (g * tq + i) * d_pad;
            sum.copy_from_slice(&first[src..src + d]);
            for p in rest.clone() {
                for (s, &x) in sum.iter_mut().zip(&p[src..src + d]) {
                    *s += x;
                }
            }
            store_row(dq, rows.at(bi * tq + i, h0 + g, d), &sum, scale, &mut tmp);
        }
    }
}

/// Adds one (query head, key tile) pair's contributions: dK/dV into `sc`, dQ into `dq`
/// (this head's `[tq][d_pad]` rows from `sc.dq[dq_off..]`, unscaled).
#[allow(clippy::too_many_arguments)]
fn key_tile<T: Acc>(
    level: Level,
    sc: &mut Scratch<T>,
    qh: &PackedQ<T>,
    kv: &PackedKv<T>,
    dq_off: usize,
    vis: &Visibility,
    j0: usize,
    bk: usize,
    tq: usize,
    d: usize,
    dvd: usize,
) {
    let d_pad = round_up_nr(d);
    let dv_pad = round_up_nr(dvd);
    let npk = panels(bk);
    let first = vis.first_query(j0);
    let mut i0 = first / BQ * BQ;
    while i0 < tq {
        let bq = BQ.min(tq - i0);
        // S = (scale·log2e·Q) Kᵀ, then P = 2^(S − lse2) in place.
        let sd = GemmDims {
            m: bq,
            npanels: npk,
            k: d,
            rsa: d,
            csa: 1,
            bps: d * NR,
            ldc: BK,
            accumulate: false,
        };
        gemm(
            level,
            &sd,
            &qh.qs[i0 * d..],
            &kv.kt[(j0 / NR) * d * NR..],
            &mut sc.s,
        );
        for r in 0..bq {
            let i = i0 + r;
            let row = &mut sc.s[r * BK..r * BK + bk];
            let l2 = qh.lse2[i];
            let nvis = if l2 == T::NEG_INFINITY {
                0
            } else {
                vis.limit(i).saturating_sub(j0).min(bk)
            };
            T::exp2_sub_sum(level, &mut row[..nvis], l2);
            row[nvis..].fill(T::ZERO);
        }
        // dV += Pᵀ dO
        if dvd > 0 {
            let g = GemmDims {
                m: bk,
                npanels: dv_pad / NR,
                k: bq,
                rsa: 1,
                csa: BK,
                bps: qh.dops,
                ldc: dv_pad,
                accumulate: true,
            };
            gemm(level, &g, &sc.s, &qh.dop[i0 * NR..], &mut sc.dv);
        }
        // dP = dO Vᵀ, then dS = P ⊙ (dP − δ) in place.
        let g = GemmDims {
            m: bq,
            npanels: npk,
            k: dvd,
            rsa: dvd,
            csa: 1,
            bps: dvd * NR,
            ldc: BK,
            accumulate: false,
        };
        gemm(
            level,
            &g,
            &qh.dor[i0 * dvd..],
            &kv.vt[(j0 / NR) * dvd * NR..],
            &mut sc.dp,
        );
        for r in 0..bq {
            T::mul_sub(
                level,
                &mut sc.dp[r * BK..r * BK + bk],
                &sc.s[r * BK..],
                qh.delta[i0 + r],
            );
        }
        if d > 0 {
            // dK += dSᵀ Q
            let g = GemmDims {
                m: bk,
                npanels: d_pad / NR,
                k: bq,
                rsa: 1,
                csa: BK,
                bps: qh.qps,
                ldc: d_pad,
                accumulate: true,
            };
            gemm(level, &g, &sc.dp, &qh.qp[i0 * NR..], &mut sc.dk);
            // dQ += dS K
            let g = GemmDims {
                m: bq,
                npanels: d_pad / NR,
                k: bk,
                rsa: BK,
                csa: 1,
                bps: kv.kps,
                ldc: d_pad,
                accumulate: true,
            };
            gemm(
                level,
                &g,
                &sc.dp,
                &kv.kp[j0 * NR..],
                &mut sc.dq[dq_off + i0 * d_pad..],
            );
        }
        i0 += bq;
    }
}
