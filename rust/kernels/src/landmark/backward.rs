//! The backward as GEMMs, recomputing from the saved lse: for a tile of query rows and one
//! key block, `S = Q·Kᵀ` and `E = dO·Vᵀ` (`e_j = dO·v_j`), then per row the weights `a_j`
//! the forward used and the score gradients `ds_j` (natural-log scores), with
//! `δ = dO·O` and, for an earlier block, its in-block weights `w_j` and gate `G`:
//!
//! * earlier block: `a_j = G·w_j`, `ds_j = a_j (e_j − Σ w e)`; the landmark's
//!   `ds = G (Σ w e − δ)` and `a = 0`;
//! * own block: `a_j = 2^(s_j − lse)`, `ds_j = a_j (e_j − δ)` up to the query;
//! * later block: 0.
//!
//! then `dV_g += Aᵀ·dO`, `dK_g += dSᵀ·Q` and `dQ += dS·K_g`. A task owns one (batch entry,
//! kv head), or with few kv heads a chunk of one's query tiles; chunks' key gradients are
//! summed in a fixed order afterwards, so results do not depend on scheduling.

use super::{own_block, LandmarkDims, BQ};
use crate::element::{Acc, Element};
use crate::gemm::pack::{pack_cols, pack_transposed, rows_of, View};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::linear::SharedMut;
use crate::simd::math::VecMath;
use crate::simd::Level;
use rayon::prelude::*;

fn zeroed<T: Acc>(n: usize) -> Vec<T> {
    vec![T::ZERO; n]
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<E: Element>(
    level: Level,
    d: &LandmarkDims,
    scale: f64,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dq: &mut [E],
    dk: &mut [E],
    dv: &mut [E],
) {
    let (h, hd, hv, bs, tk) = (d.q_heads, d.head_dim, d.v_head_dim, d.block, d.kv_len);
    let (group, shift) = (h / d.kv_heads, d.kv_len - d.q_len);
    let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let sc = E::Acc::from_f64(scale);
    let (kpad, hpad, vpad) = (round_up_nr(bs), round_up_nr(hd), round_up_nr(hv));
    let dqp = SharedMut(dq.as_mut_ptr());
    let dkp = SharedMut(dk.as_mut_ptr());
    let dvp = SharedMut(dv.as_mut_ptr());
    let kv_row = |b: usize, t: usize, kvh: usize| (b * tk + t) * d.kv_heads + kvh;
    // A kv head's work: (query head, tile) units, each costing the blocks its tile reaches.
    let tiles = d.q_len.div_ceil(BQ);
    let units = group * tiles;
    let cost = |u: usize| (shift + (u % tiles * BQ + BQ).min(d.q_len) - 1) / bs + 1;
    let total: usize = (0..units).map(cost).sum();
    // Few kv heads (MQA at batch 1): split their units into chunks of equal cost, each with
    // its own dK/dV, summed in chunk order after (deterministic).
    let n_chunks = (2 * rayon::current_num_threads())
        .div_ceil(d.batch * d.kv_heads)
        .clamp(1, units.max(1));
    let bounds: Vec<usize> = {
        let (mut out, mut acc, mut next) = (vec![0], 0, 1);
        for u in 0..units {
            acc += cost(u);
            if next < n_chunks && acc * n_chunks >= total * next {
                out.push(u + 1);
                next += 1;
            }
        }
        while out.len() <= n_chunks {
            out.push(units);
        }
        out
    };
    // Writes one kv head's finished dK (scaled here) and dV.
    let store = |b: usize, kvh: usize, gk: &mut [E::Acc], gv: &[E::Acc]| {
        for t in 0..tk {
            let row = kv_row(b, t, kvh);
            let gkr = &mut gk[t * hpad..][..hd];
            E::Acc::scale(level, gkr, sc);
            // SAFETY: key rows of (b, kvh) are written by one task alone.
            unsafe {
                E::from_acc_slice(gkr, dkp.slice(row * hd, hd));
                E::from_acc_slice(&gv[t * vpad..][..hv], dvp.slice(row * hv, hv));
            }
        }
    };
    let partials: Vec<std::sync::Mutex<(Vec<E::Acc>, Vec<E::Acc>)>> = if n_chunks > 1 {
        (0..d.batch * d.kv_heads * n_chunks)
            .map(|_| Default::default())
            .collect()
    } else {
        Vec::new()
    };
    (0..d.batch * d.kv_heads * n_chunks)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let (bk, chunk) = (task / n_chunks, task % n_chunks);
            let (b, kvh) = (bk / d.kv_heads, bk % d.kv_heads);
            let (mut gk, mut gv) = (zeroed::<E::Acc>(tk * hpad), zeroed::<E::Acc>(tk * vpad));
            let (mut s, mut e) = (zeroed::<E::Acc>(BQ * kpad), zeroed::<E::Acc>(BQ * kpad));
            let mut gq = zeroed::<E::Acc>(BQ * hpad);
            // Every key block packed once for the task: c·Kᵀ (scores), Vᵀ (dO·Vᵀ) and K column
            // panels with their stride (dQ += dS·K).
            let n_blocks = tk.div_ceil(bs);
            let mut packed: Vec<(Vec<E::Acc>, Vec<E::Acc>, Vec<E::Acc>, usize)> =
                Vec::with_capacity(n_blocks);
            for g in 0..n_blocks {
                let start = g * bs;
                let nk = bs.min(tk - start);
                let view = |width| View {
                    base: kv_row(b, start, kvh) * width,
                    rs: d.kv_heads * width,
                    rows: nk,
                    cols: width,
                };
                let (mut kt, mut vt, mut kc) = (Vec::new(), Vec::new(), Vec::new());
                pack_transposed(k, view(hd), c, &mut kt);
                pack_transposed(v, view(hv), E::Acc::ONE, &mut vt);
                let kps = pack_cols(k, view(hd), E::Acc::ONE, &mut kc);
                packed.push((kt, vt, kc, kps));
            }
            let (mut qtmp, mut dtmp, mut qc, mut dc) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut orow = zeroed::<E::Acc>(hv);
            let (mut lse2, mut delta) = (zeroed::<E::Acc>(BQ), zeroed::<E::Acc>(BQ));
            for unit in bounds[chunk]..bounds[chunk + 1] {
                let (hh, i0) = (kvh * group + unit / tiles, unit % tiles * BQ);
                let bq = BQ.min(d.q_len - i0);
                let (p0, p1) = (shift + i0, shift + i0 + bq - 1);
                let row0 = (b * d.q_len + i0) * h + hh;
                let qv = View {
                    base: row0 * hd,
                    rs: h * hd,
                    rows: bq,
                    cols: hd,
                };
                let ov = View {
                    base: row0 * hv,
                    rs: h * hv,
                    rows: bq,
                    cols: hv,
                };
                let (qa, rsq) = rows_of(q, qv, &mut qtmp);
                let (da, rsd) = rows_of(dout, ov, &mut dtmp);
                // Q and dO as the B operands of dK and dV
                let qps = pack_cols(q, qv, E::Acc::ONE, &mut qc);
                let dps = pack_cols(dout, ov, E::Acc::ONE, &mut dc);
                for r in 0..bq {
                    E::to_acc_slice(&out[(row0 + r * h) * hv..][..hv], &mut orow);
                    E::Acc::dot_rows(level, &orow, 0, &da[r * rsd..][..hv], &mut delta[r..r + 1]);
                    lse2[r] = lse[row0 + r * h] * log2e;
                }
                gq.fill(E::Acc::ZERO);
                for g in 0..=p1 / bs {
                    let start = g * bs;
                    let nk = bs.min(tk - start);
                    let (kt, vt, kc, kps) = &packed[g];
                    let scores =
                        |a: &[E::Acc], rsa: usize, kk: usize, b: &[E::Acc], out: &mut [E::Acc]| {
                            let gd = GemmDims {
                                m: bq,
                                npanels: panels(nk),
                                k: kk,
                                rsa,
                                csa: 1,
                                bps: kk * NR,
                                ldc: kpad,
                                accumulate: false,
                            };
                            gemm(level, &gd, a, b, out);
                        };
                    scores(qa, rsq, hd, kt, &mut s);
                    scores(da, rsd, hv, vt, &mut e);
                    for r in 0..bq {
                        let p = p0 + r;
                        let qb = p / bs;
                        let a = &mut s[r * kpad..][..nk];
                        let ds = &mut e[r * kpad..][..nk];
                        if g < qb {
                            let gate = E::Acc::exp2(a[bs - 1] - lse2[r]);
                            let inner = &mut a[..bs - 1];
                            let mi = E::Acc::row_max(level, inner);
                            let mi = if mi == E::Acc::NEG_INFINITY {
                                E::Acc::ZERO
                            } else {
                                mi
                            };
                            let l = E::Acc::exp2_sub_sum(level, inner, mi);
                            // The in-block weights are w = p / l: Σ w·e = (p·e) / l, and
                            // one scaling by G / l turns p into a = G·w.
                            let mut pe = [E::Acc::ZERO];
                            E::Acc::dot_rows(level, inner, 0, &ds[..bs - 1], &mut pe);
                            let wdot = pe[0] / l;
                            E::Acc::scale(level, inner, gate / l);
                            E::Acc::mul_sub(level, &mut ds[..bs - 1], inner, wdot);
                            ds[bs - 1] = gate * (wdot - delta[r]);
                            a[bs - 1] = E::Acc::ZERO;
                        } else if g == qb {
                            let (_, n) = own_block(p, bs);
                            E::Acc::exp2_sub_sum(level, &mut a[..n], lse2[r]);
                            E::Acc::mul_sub(level, &mut ds[..n], &a[..n], delta[r]);
                            a[n..].fill(E::Acc::ZERO);
                            ds[n..].fill(E::Acc::ZERO);
                        } else {
                            a.fill(E::Acc::ZERO);
                            ds.fill(E::Acc::ZERO);
                        }
                    }
                    // dV_g += Aᵀ·dO and dK_g += dSᵀ·Q (scaled once at the end)
                    let transposed = |a: &[E::Acc],
                                      b: &[E::Acc],
                                      bps: usize,
                                      width: usize,
                                      ld: usize,
                                      c: &mut [E::Acc]| {
                        let gd = GemmDims {
                            m: nk,
                            npanels: panels(width),
                            k: bq,
                            rsa: 1,
                            csa: kpad,
                            bps,
                            ldc: ld,
                            accumulate: true,
                        };
                        gemm(level, &gd, a, b, &mut c[start * ld..]);
                    };
                    transposed(&s, &dc, dps, hv, vpad, &mut gv);
                    transposed(&e, &qc, qps, hd, hpad, &mut gk);
                    // dQ += dS·K_g
                    let qd = GemmDims {
                        m: bq,
                        npanels: panels(hd),
                        k: nk,
                        rsa: kpad,
                        csa: 1,
                        bps: *kps,
                        ldc: hpad,
                        accumulate: true,
                    };
                    gemm(level, &qd, &e, kc, &mut gq);
                }
                for r in 0..bq {
                    let row = &mut gq[r * hpad..][..hd];
                    E::Acc::scale(level, row, sc);
                    // SAFETY: query row (b, i0 + r, hh) belongs to this task's kv head alone.
                    unsafe { E::from_acc_slice(row, dqp.slice((row0 + r * h) * hd, hd)) };
                }
            }
            if n_chunks > 1 {
                *partials[task].lock().unwrap_or_else(|e| e.into_inner()) = (gk, gv);
            } else {
                store(b, kvh, &mut gk, &gv);
            }
        });
    if n_chunks > 1 {
        (0..d.batch * d.kv_heads).into_par_iter().for_each(|bk| {
            let take = |c: usize| {
                std::mem::take(
                    &mut *partials[bk * n_chunks + c]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()),
                )
            };
            let (mut gk, mut gv) = take(0);
            for c in 1..n_chunks {
                let (pk, pv) = take(c);
                gk.iter_mut().zip(&pk).for_each(|(a, &x)| *a += x);
                gv.iter_mut().zip(&pv).for_each(|(a, &x)| *a += x);
            }
            store(bk / d.kv_heads, bk % d.kv_heads, &mut gk, &gv);
        });
    }
}
