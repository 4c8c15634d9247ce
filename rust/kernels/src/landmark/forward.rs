//! The forward as GEMMs: a tile of query rows against one key block at a time, the block
//! being the key tile. Per block, `S = Q·Kᵀ` for the whole tile; then, row by row, the block
//! is one of three things for that row, and its score row becomes the row's weights `U`:
//!
//! * an **earlier block**: the in-block softmax of its regular tokens, times the gate
//!   `2^(landmark score − running max)` (the landmark's own column weighs 0);
//! * the row's **own block**: `2^(score − running max)` for its regular tokens up to the
//!   query, 0 past it and at the landmark;
//! * a **later block** (rows of the tile that start earlier): all 0.
//!
//! and `acc += U·V` is one GEMM for the tile. The running maxima rescale `acc` and the sums
//! as in any online softmax.

use super::{own_block, LandmarkDims, BQ};
use crate::element::{Acc, Element};
use crate::gemm::pack::{pack_cols, pack_transposed, rows_of, View};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::linear::SharedMut;
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::Level;
use rayon::prelude::*;

#[derive(Default)]
struct Scratch<T> {
    /// Per key block: `c·Kᵀ` panels, and V column panels with their panel stride. Packed
    /// once per task, read by every query tile.
    kt: Vec<Vec<T>>,
    v: Vec<(Vec<T>, usize)>,
    q: Vec<T>,
    s: Vec<T>,
    acc: Vec<T>,
    m: Vec<T>,
    z: Vec<T>,
}

fn fit<T: Acc>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::ZERO);
}

/// Query tiles per (batch, head) split into chunks: enough tasks for every worker.
fn chunks(d: &LandmarkDims) -> usize {
    let heads = (d.batch * d.q_heads).max(1);
    let tiles = d.q_len.div_ceil(BQ).max(1);
    (4 * rayon::current_num_threads())
        .div_ceil(heads)
        .clamp(1, tiles)
}

/// Moves row `r`'s running maximum up to `m_new`, rescaling its sum and output row.
fn lift<T: Acc>(level: Level, m: &mut T, z: &mut T, acc: &mut [T], m_new: T) {
    if m_new > *m {
        if *m != T::NEG_INFINITY {
            let c = T::exp2(*m - m_new);
            *z *= c;
            T::scale(level, acc, c);
        }
        *m = m_new;
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<E: Element>(
    level: Level,
    d: &LandmarkDims,
    scale: f64,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
    lse: &mut [E::Acc],
) {
    let (h, hd, hv, bs) = (d.q_heads, d.head_dim, d.v_head_dim, d.block);
    let (group, shift) = (h / d.kv_heads, d.kv_len - d.q_len);
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let ln2 = E::Acc::from_f64(std::f64::consts::LN_2);
    let (kpad, vpad) = (round_up_nr(bs), round_up_nr(hv));
    let tiles = d.q_len.div_ceil(BQ);
    let n_chunks = chunks(d);
    let outp = SharedMut(out.as_mut_ptr());
    let lsep = SharedMut(lse.as_mut_ptr());
    let scratch = PerThread::<Scratch<E::Acc>>::new();
    let kv_row = |b: usize, t: usize, kvh: usize| (b * d.kv_len + t) * d.kv_heads + kvh;
    (0..d.batch * h * n_chunks)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            scratch.with(Scratch::default, |sc| {
                let (bh, ch) = (task / n_chunks, task % n_chunks);
                let (b, hh) = (bh / h, bh % h);
                let kvh = hh / group;
                let (t0, t1) = (tiles * ch / n_chunks, tiles * (ch + 1) / n_chunks);
                fit(&mut sc.s, BQ * kpad);
                fit(&mut sc.acc, BQ * vpad);
                if t0 == t1 {
                    return;
                }
                let blocks = (shift + (t1 * BQ).min(d.q_len) - 1) / bs + 1;
                sc.kt.resize_with(blocks.max(sc.kt.len()), Vec::new);
                sc.v.resize_with(blocks.max(sc.v.len()), Default::default);
                for g in 0..blocks {
                    let start = g * bs;
                    let nk = bs.min(d.kv_len - start);
                    let view = |width| View {
                        base: kv_row(b, start, kvh) * width,
                        rs: d.kv_heads * width,
                        rows: nk,
                        cols: width,
                    };
                    pack_transposed(k, view(hd), c, &mut sc.kt[g]);
                    let (vp, vps) = &mut sc.v[g];
                    *vps = pack_cols(v, view(hv), E::Acc::ONE, vp);
                }
                for tile in t0..t1 {
                    let i0 = tile * BQ;
                    let bq = BQ.min(d.q_len - i0);
                    let (p0, p1) = (shift + i0, shift + i0 + bq - 1);
                    let qv = View {
                        base: ((b * d.q_len + i0) * h + hh) * hd,
                        rs: h * hd,
                        rows: bq,
                        cols: hd,
                    };
                    let (qa, rsa) = rows_of(q, qv, &mut sc.q);
                    sc.acc.fill(E::Acc::ZERO);
                    fit(&mut sc.m, bq);
                    sc.m.fill(E::Acc::NEG_INFINITY);
                    fit(&mut sc.z, bq);
                    for g in 0..=p1 / bs {
                        let start = g * bs;
                        let nk = bs.min(d.kv_len - start);
                        let sd = GemmDims {
                            m: bq,
                            npanels: panels(nk),
                            k: hd,
                            rsa,
                            csa: 1,
                            bps: hd * NR,
                            ldc: kpad,
                            accumulate: false,
                        };
                        gemm(level, &sd, qa, &sc.kt[g], &mut sc.s);
                        for r in 0..bq {
                            let p = p0 + r;
                            let row = &mut sc.s[r * kpad..][..nk];
                            let acc = &mut sc.acc[r * vpad..][..vpad];
                            let (m, z) = (&mut sc.m[r], &mut sc.z[r]);
                            let qb = p / bs;
                            if g < qb {
                                // complete (it ends before the query): one gated item
                                let gate = row[bs - 1];
                                let inner = &mut row[..bs - 1];
                                let mi = E::Acc::row_max(level, inner);
                                let mi = if mi == E::Acc::NEG_INFINITY {
                                    E::Acc::ZERO
                                } else {
                                    mi
                                };
                                let l = E::Acc::exp2_sub_sum(level, inner, mi);
                                lift(level, m, z, acc, gate);
                                let w = E::Acc::exp2(gate - *m);
                                *z += w;
                                E::Acc::scale(level, inner, w / l);
                                row[bs - 1] = E::Acc::ZERO;
                            } else if g == qb {
                                let (_, n) = own_block(p, bs);
                                lift(level, m, z, acc, E::Acc::row_max(level, &row[..n]));
                                let mm = if *m == E::Acc::NEG_INFINITY {
                                    E::Acc::ZERO
                                } else {
                                    *m
                                };
                                *z += E::Acc::exp2_sub_sum(level, &mut row[..n], mm);
                                row[n..].fill(E::Acc::ZERO);
                            } else {
                                row.fill(E::Acc::ZERO);
                            }
                        }
                        let od = GemmDims {
                            m: bq,
                            npanels: panels(hv),
                            k: nk,
                            rsa: kpad,
                            csa: 1,
                            bps: sc.v[g].1,
                            ldc: vpad,
                            accumulate: true,
                        };
                        gemm(level, &od, &sc.s, &sc.v[g].0, &mut sc.acc);
                    }
                    for r in 0..bq {
                        let (m, z) = (sc.m[r], sc.z[r]);
                        let orow = &mut sc.acc[r * vpad..][..hv];
                        E::Acc::scale(level, orow, E::Acc::ONE / z);
                        let at = (b * d.q_len + i0 + r) * h + hh;
                        let m = if m == E::Acc::NEG_INFINITY {
                            E::Acc::ZERO
                        } else {
                            m
                        };
                        // SAFETY: row (b, i0 + r, hh) belongs to this task alone.
                        unsafe {
                            E::from_acc_slice(orow, outp.slice(at * hv, hv));
                            lsep.slice(at, 1)[0] = (m + E::Acc::log2(z)) * ln2;
                        }
                    }
                }
            })
        });
}
