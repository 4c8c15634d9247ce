//! Lo-Fi on small pooled maps (LITv2's 14² stages: 49 pooled keys): every token's query
//! against all pooled keys of its image, forward and backward, one task per (image, head,
//! query chunk).
//!
//! With so few keys the dense kernel's per-call packing passes (every query head's Q and dO
//! copied into GEMM panels before any work) cost more memory traffic than the attention
//! itself. Here a task packs its head's K and V once (a few KiB, kept in L1/L2), reads Q
//! and dO in place as GEMM `A` operands (storage = accumulation type; half types are
//! converted one tile at a time) and keeps every score block whole: no online softmax.
//!
//! Backward blocks are kept in GEMM panel layout (`[key panel][query][NR]`) so they serve
//! directly as the packed `B` of `dVᵀ += dOᵀ·P` and `dKᵀ += Qᵀ·dS`; the log-sum-exp and
//! `δ = rowsum(dO ⊙ O)` are folded into the score GEMMs as their initial accumulator, so
//! the exponential and `dS = P ⊙ (dP − δ)` are two calls per block instead of per row.

use crate::element::{Acc, Element};
use crate::gemm::pack::{pack_cols, pack_transposed, rows_of, View};
use crate::gemm::{gemm, gemm_to, panels, round_up_nr, GemmDims, NR};
use crate::linear::rows::prefetch;
use crate::linear::SharedMut;
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::Level;
use rayon::prelude::*;

use super::Io;

/// Pooled keys up to which this path runs (measured on fp32, 2 threads, against the dense
/// kernel: ahead at 400 and 784 keys — 56² at ws 2: forward 20 vs 24 ms, backward 47 vs 51 —
/// level at 1,600). Past it a head's packed K/V and a query tile's score rows outgrow L2 and
/// the dense kernel's key tiling takes over.
pub(super) const MAX_KEYS: usize = 1024;

/// Query rows per tile (a multiple of every micro-kernel's MR).
const BQ: usize = 48;

/// The Lo-Fi operands: queries `q[(b·q_len + i)·q_stride + h·hd + c]`, pooled keys
/// `kv[(b·keys + j)·kv_stride + h·hd + c]` and values at `+ heads·hd`; the output
/// `[B, q_len, heads·hd]` and lse `[B, q_len, heads]` are dense.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub batch: usize,
    pub q_len: usize,
    pub keys: usize,
    pub heads: usize,
    pub hd: usize,
    pub q_stride: usize,
    pub kv_stride: usize,
}

impl Geometry {
    fn k_view(&self, b: usize, h: usize) -> View {
        View {
            base: b * self.keys * self.kv_stride + h * self.hd,
            rs: self.kv_stride,
            rows: self.keys,
            cols: self.hd,
        }
    }
    fn v_view(&self, b: usize, h: usize) -> View {
        View {
            base: self.k_view(b, h).base + self.heads * self.hd,
            ..self.k_view(b, h)
        }
    }
    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        (b * self.q_len + i) * self.q_stride + h * self.hd
    }
    fn out_at(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.q_len + i) * self.heads + h) * self.hd
    }
    /// Whether the GEMMs write output / dQ rows in place: storage in the accumulation type
    /// (fp32, f64) and whole NR panels per head, so no write spills into another head.
    fn gemm_writes_rows<E: Element>(&self) -> bool {
        E::as_acc_slice(&[] as &[E]).is_some() && self.hd % NR == 0
    }
    /// Query chunks per head: enough tasks to keep every worker busy.
    fn chunks(&self) -> usize {
        let heads = (self.batch * self.heads).max(1);
        let want = (4 * rayon::current_num_threads()).div_ceil(heads);
        want.clamp(1, self.q_len.div_ceil(BQ).max(1))
    }
    /// Query rows `[start, end)` of chunk `c` of `n`, in whole tiles.
    fn chunk(&self, c: usize, n: usize) -> (usize, usize) {
        let tiles = self.q_len.div_ceil(BQ);
        let at = |c: usize| (tiles * c / n * BQ).min(self.q_len);
        (at(c), at(c + 1))
    }
}

/// One head's keys and values, packed for every GEMM that reads them.
#[derive(Default)]
struct PackedKv<T> {
    /// `c·Kᵀ` panels (`c = scale·log2 e`), B of the scores.
    kt: Vec<T>,
    /// V column panels, B of `O = P·V`.
    v: Vec<T>,
    vps: usize,
    /// Vᵀ panels, B of `dP = dO·Vᵀ`.
    vt: Vec<T>,
    /// `scale·K` column panels, B of `dQ = dS·K`.
    k: Vec<T>,
    kps: usize,
}

#[derive(Default)]
struct Scratch<T> {
    kv: PackedKv<T>,
    q: Vec<T>,
    dout: Vec<T>,
    /// Scores / probabilities: row-major `[BQ][keys_pad]` in the forward, panel blocks
    /// `[key panel][BQ][NR]` in the backward.
    s: Vec<T>,
    dp: Vec<T>,
    o: Vec<T>,
    lse2: Vec<T>,
    delta: Vec<T>,
    /// `dKᵀ`, `dVᵀ` `[hd][keys_pad]` of the task's queries.
    dkt: Vec<T>,
    dvt: Vec<T>,
    row: Vec<T>,
}

fn fit<T: Acc>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::ZERO);
}

/// Forward: `out = softmax(scale·Q·Kᵀ)·V` per image and head, and the natural-log lse.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<E: Element>(
    level: Level,
    g: &Geometry,
    scale: f64,
    io: Io<E>,
    kv: &[E],
    lse: &mut [E::Acc],
) {
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let ln2 = E::Acc::from_f64(std::f64::consts::LN_2);
    let (hd, np) = (g.hd, g.keys);
    let (kpad, hpad) = (round_up_nr(np), round_up_nr(hd));
    // Storage in the accumulation type and whole panels per head: the P·V GEMM writes the
    // output rows in place (no staging row, no copy pass over the 32 MB output of the
    // paper's layer).
    let direct = g
        .gemm_writes_rows::<E>()
        .then(|| SharedMut(io.out_ptr().cast::<E::Acc>()));
    let q = io.queries();
    let lsep = SharedMut(lse.as_mut_ptr());
    let chunks = g.chunks();
    let scratch = PerThread::<Scratch<E::Acc>>::new();
    (0..g.batch * g.heads * chunks)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|t| {
            scratch.with(Scratch::default, |sc| {
                let (bh, ch) = (t / chunks, t % chunks);
                let (b, h) = (bh / g.heads, bh % g.heads);
                let (i_start, i_end) = g.chunk(ch, chunks);
                if i_start == i_end {
                    return;
                }
                pack_transposed(kv, g.k_view(b, h), c, &mut sc.kv.kt);
                sc.kv.vps = pack_cols(kv, g.v_view(b, h), E::Acc::ONE, &mut sc.kv.v);
                fit(&mut sc.s, BQ * kpad);
                fit(&mut sc.o, BQ * hpad);
                let mut i0 = i_start;
                while i0 < i_end {
                    let bq = BQ.min(i_end - i0);
                    let qv = View {
                        base: g.q_at(b, i0, h),
                        rs: g.q_stride,
                        rows: bq,
                        cols: hd,
                    };
                    let (qa, rsa) = match q {
                        Some(q) => rows_of(q, qv, &mut sc.q),
                        None => {
                            // In place: the tile's queries are copied out before its output
                            // rows replace them.
                            fit(&mut sc.q, bq * hd);
                            for r in 0..bq {
                                // SAFETY: head h's cells of these rows belong to this task.
                                let src = unsafe { io.row(qv.base + r * qv.rs, hd) };
                                E::to_acc_slice(src, &mut sc.q[r * hd..][..hd]);
                            }
                            (&sc.q[..], hd)
                        }
                    };
                    let sd = GemmDims {
                        m: bq,
                        npanels: panels(np),
                        k: hd,
                        rsa,
                        csa: 1,
                        bps: hd * NR,
                        ldc: kpad,
                        accumulate: false,
                    };
                    gemm(level, &sd, qa, &sc.kv.kt, &mut sc.s);
                    // The next tile's query rows are one head's 4-line run every q_stride
                    // values, a stride the hardware prefetcher does not follow: ask for
                    // them a row at a time while this tile's softmax runs.
                    let next = (i0 + bq..(i0 + 2 * bq).min(i_end)).map(|i| g.q_at(b, i, h));
                    let mut next = next.fuse();
                    for r in 0..bq {
                        if let Some(off) = next.next() {
                            match q {
                                Some(q) => prefetch(&q[off..off + hd]),
                                // SAFETY: head h's cells of the chunk's rows belong to this task.
                                None => prefetch(unsafe { io.row(off, hd) }),
                            }
                        }
                        let row = &mut sc.s[r * kpad..][..np];
                        let m = E::Acc::row_max(level, row);
                        // All -inf: shift by 0 so NaN scores still reach the sum.
                        let m = if m == E::Acc::NEG_INFINITY {
                            E::Acc::ZERO
                        } else {
                            m
                        };
                        let l = E::Acc::exp2_sub_sum(level, row, m);
                        // Normalising the probabilities (np values) instead of the output
                        // row (hd values) lets the P·V GEMM write final rows. l = 0 (every
                        // score -inf) leaves a zero row: a zero output; a NaN l makes it NaN.
                        if l != E::Acc::ZERO {
                            E::Acc::scale(level, row, E::Acc::ONE / l);
                        }
                        let lse_r = if l > E::Acc::ZERO {
                            m * ln2 + l.ln()
                        } else if l == E::Acc::ZERO {
                            E::Acc::NEG_INFINITY
                        } else {
                            l
                        };
                        // SAFETY: rows i0..i0+bq of head (b, h) belong to this task alone.
                        unsafe { lsep.slice((b * g.q_len + i0 + r) * g.heads + h, 1)[0] = lse_r };
                    }
                    let od = GemmDims {
                        m: bq,
                        npanels: panels(hd),
                        k: np,
                        rsa: kpad,
                        csa: 1,
                        bps: sc.kv.vps,
                        ldc: hpad,
                        accumulate: false,
                    };
                    if let Some(o) = direct {
                        // SAFETY: the GEMM writes rows i0..i0+bq, columns h·hd..(h+1)·hd
                        // (whole panels: hd is a multiple of NR) of this task's head only.
                        unsafe {
                            gemm_to(
                                level,
                                &GemmDims {
                                    ldc: g.heads * hd,
                                    ..od
                                },
                                &sc.s,
                                &sc.kv.v,
                                o.0.add(g.out_at(b, i0, h)),
                            )
                        };
                    } else {
                        gemm(level, &od, &sc.s, &sc.kv.v, &mut sc.o);
                        for r in 0..bq {
                            // SAFETY: rows i0..i0+bq of head (b, h) belong to this task alone.
                            unsafe {
                                E::from_acc_slice(
                                    &sc.o[r * hpad..][..hd],
                                    io.out_row(g.out_at(b, i0 + r, h), hd),
                                )
                            };
                        }
                    }
                    i0 += bq;
                }
            })
        });
}

/// Backward from the forward's `out` and `lse`: writes `dq` (addressed like `q`) and the
/// `[dK | dV]` rows of `dkv` (addressed like `kv`).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<E: Element>(
    level: Level,
    g: &Geometry,
    scale: f64,
    q: &[E],
    kv: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dq: &mut [E],
    dkv: &mut [E],
) {
    let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let s_t = E::Acc::from_f64(scale);
    let (hd, np) = (g.hd, g.keys);
    let (kpad, hpad) = (round_up_nr(np), round_up_nr(hd));
    let kp = panels(np);
    let direct = g.gemm_writes_rows::<E>();
    let dqp = SharedMut(dq.as_mut_ptr());
    let dkvp = SharedMut(dkv.as_mut_ptr());
    let chunks = g.chunks();
    let scratch = PerThread::<Scratch<E::Acc>>::new();
    // With several chunks per head each task leaves its dKᵀ/dVᵀ here, summed per head after.
    let partials: Vec<std::sync::Mutex<Vec<E::Acc>>> = if chunks > 1 {
        (0..g.batch * g.heads * chunks)
            .map(|_| std::sync::Mutex::new(Vec::new()))
            .collect()
    } else {
        Vec::new()
    };
    let store_kv = |b: usize, h: usize, dkt: &[E::Acc], dvt: &[E::Acc], row: &mut Vec<E::Acc>| {
        fit(row, hd);
        for j in 0..np {
            for (x, cc) in row.iter_mut().zip(0..hd) {
                *x = dkt[cc * kpad + j] * s_t;
            }
            let at = g.k_view(b, h).base + j * g.kv_stride;
            // SAFETY: key rows of head (b, h) are written by this head's one writer.
            unsafe { E::from_acc_slice(row, dkvp.slice(at, hd)) };
            for (x, cc) in row.iter_mut().zip(0..hd) {
                *x = dvt[cc * kpad + j];
            }
            unsafe { E::from_acc_slice(row, dkvp.slice(at + g.heads * hd, hd)) };
        }
    };
    (0..g.batch * g.heads * chunks)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|t| {
            scratch.with(Scratch::default, |sc| {
                let (bh, ch) = (t / chunks, t % chunks);
                let (b, h) = (bh / g.heads, bh % g.heads);
                let (i_start, i_end) = g.chunk(ch, chunks);
                let Scratch {
                    kv: pk,
                    q: qtmp,
                    dout: dtmp,
                    s,
                    dp,
                    o,
                    lse2,
                    delta,
                    dkt,
                    dvt,
                    row,
                } = sc;
                fit(dkt, hd * kpad);
                fit(dvt, hd * kpad);
                if i_start < i_end {
                    pack_transposed(kv, g.k_view(b, h), c, &mut pk.kt);
                    pack_transposed(kv, g.v_view(b, h), E::Acc::ONE, &mut pk.vt);
                    pk.kps = pack_cols(kv, g.k_view(b, h), s_t, &mut pk.k);
                    fit(s, kp * BQ * NR);
                    fit(dp, kp * BQ * NR);
                    fit(o, BQ * hpad);
                }
                let mut i0 = i_start;
                while i0 < i_end {
                    let bq = BQ.min(i_end - i0);
                    let qv = View {
                        base: g.q_at(b, i0, h),
                        rs: g.q_stride,
                        rows: bq,
                        cols: hd,
                    };
                    let ov = View {
                        base: g.out_at(b, i0, h),
                        rs: g.heads * hd,
                        rows: bq,
                        cols: hd,
                    };
                    let (qa, rsq) = rows_of(q, qv, qtmp);
                    let (da, rsd) = rows_of(dout, ov, dtmp);
                    fit(lse2, bq);
                    fit(delta, bq);
                    fit(row, hd);
                    for r in 0..bq {
                        // the next tile's rows, as in the forward
                        if i0 + bq + r < i_end {
                            let i = i0 + bq + r;
                            prefetch(&q[g.q_at(b, i, h)..][..hd]);
                            prefetch(&out[g.out_at(b, i, h)..][..hd]);
                            prefetch(&dout[g.out_at(b, i, h)..][..hd]);
                        }
                        let at = (b * g.q_len + i0 + r) * g.heads + h;
                        lse2[r] = lse[at] * log2e;
                        E::to_acc_slice(&out[ov.base + r * ov.rs..][..hd], row);
                        let dor = &da[r * rsd..][..hd];
                        E::Acc::dot_rows(level, row, 0, dor, &mut delta[r..r + 1]);
                    }
                    // Score and dP blocks, one key panel at a time, seeded with -lse2 / -δ.
                    for p in 0..kp {
                        let sb = &mut s[p * BQ * NR..][..bq * NR];
                        let db = &mut dp[p * BQ * NR..][..bq * NR];
                        for r in 0..bq {
                            sb[r * NR..][..NR].fill(-lse2[r]);
                            db[r * NR..][..NR].fill(-delta[r]);
                        }
                        let d = GemmDims {
                            m: bq,
                            npanels: 1,
                            k: hd,
                            rsa: rsq,
                            csa: 1,
                            bps: hd * NR,
                            ldc: NR,
                            accumulate: true,
                        };
                        gemm(level, &d, qa, &pk.kt[p * hd * NR..], sb);
                        let d = GemmDims { rsa: rsd, ..d };
                        gemm(level, &d, da, &pk.vt[p * hd * NR..], db);
                    }
                    // P = 2^(S − lse2); dS = P ⊙ (dP − δ), in place of dP. Columns past the
                    // last key hold junk that only reaches the padding of dKᵀ / dVᵀ.
                    let n = kp * BQ * NR;
                    if bq == BQ {
                        E::Acc::exp2_sub_sum(level, &mut s[..n], E::Acc::ZERO);
                        E::Acc::mul_sub(level, &mut dp[..n], &s[..n], E::Acc::ZERO);
                    } else {
                        for p in 0..kp {
                            let blk = p * BQ * NR..p * BQ * NR + bq * NR;
                            E::Acc::exp2_sub_sum(level, &mut s[blk.clone()], E::Acc::ZERO);
                            E::Acc::mul_sub(level, &mut dp[blk.clone()], &s[blk], E::Acc::ZERO);
                        }
                    }
                    // dVᵀ += dOᵀ·P and dKᵀ += Qᵀ·dS (Qᵀ, dOᵀ read in place, transposed).
                    let t = GemmDims {
                        m: hd,
                        npanels: kp,
                        k: bq,
                        rsa: 1,
                        csa: rsd,
                        bps: BQ * NR,
                        ldc: kpad,
                        accumulate: true,
                    };
                    gemm(level, &t, da, s, dvt);
                    gemm(level, &GemmDims { csa: rsq, ..t }, qa, dp, dkt);
                    // dQ = dS·(scale·K), one key panel of dS at a time; with fp32 and
                    // whole-panel heads straight into dq's rows (no staging, no copy).
                    for p in 0..kp {
                        let d = GemmDims {
                            m: bq,
                            npanels: panels(hd),
                            k: NR.min(np - p * NR),
                            rsa: NR,
                            csa: 1,
                            bps: pk.kps,
                            ldc: if direct { g.q_stride } else { hpad },
                            accumulate: p > 0,
                        };
                        let (a, bb) = (&dp[p * BQ * NR..], &pk.k[p * NR * NR..]);
                        if direct {
                            // SAFETY: rows i0..i0+bq, columns h·hd..(h+1)·hd of dq (whole
                            // panels) belong to this task.
                            unsafe { gemm_to(level, &d, a, bb, dqp.0.add(qv.base).cast()) };
                        } else {
                            gemm(level, &d, a, bb, o);
                        }
                    }
                    for r in (0..bq).filter(|_| !direct) {
                        // SAFETY: query rows i0..i0+bq of head (b, h) belong to this task.
                        unsafe {
                            E::from_acc_slice(
                                &o[r * hpad..][..hd],
                                dqp.slice(qv.base + r * qv.rs, hd),
                            )
                        };
                    }
                    i0 += bq;
                }
                if chunks == 1 {
                    store_kv(b, h, dkt, dvt, row);
                } else {
                    let mut slot = partials[t].lock().unwrap_or_else(|e| e.into_inner());
                    slot.clear();
                    slot.extend_from_slice(dkt);
                    slot.extend_from_slice(dvt);
                }
            })
        });
    if chunks > 1 {
        (0..g.batch * g.heads).into_par_iter().for_each(|bh| {
            let n = hd * kpad;
            let mut sum = vec![E::Acc::ZERO; 2 * n];
            for ch in 0..chunks {
                let slot = partials[bh * chunks + ch]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for (x, y) in sum.iter_mut().zip(slot.iter()) {
                    *x += *y;
                }
            }
            let mut row = Vec::new();
            store_kv(bh / g.heads, bh % g.heads, &sum[..n], &sum[n..], &mut row);
        });
    }
}
