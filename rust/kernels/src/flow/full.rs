//! Non-causal Flow-Attention forward, streamed over row segments.
//!
//! Every scalar of the non-causal form depends on whole-sequence sums, in a chain of
//! three: `Σφ(k)`, `Σφ(q)` → the flows `I`, `O` and `Σ O φ(k)`, `Σ I φ(q)` → the competition
//! `C` and the state `S = Σ φ(k) (C v)ᵀ` → the output. So the forward is four passes, each
//! over one segment of rows per thread, carrying only `D`-vectors, `S` and one scalar per
//! query row between them. A thread keeps its segment's `φ(q)`, `φ(k)` (in L2 for
//! moderate lengths) instead of whole-head copies, and long sequences are split across
//! threads (`rayon::broadcast` pins segment `i` to thread `i`, so a segment stays in the
//! cache it was written to).
//!
//! The softmax over `C` uses the fixed shift 1 instead of the row maximum: its inputs are
//! clamped to `[-1, 1]`, so `exp(x - 1)` lies in `[e⁻², 1]` and cannot overflow.

use super::{clamp1, sigmoid, FlowDims};
use crate::buffer_pool::{take, PoolVec};
use crate::element::{Acc, Element};
use crate::gemm::round_up_nr;
use crate::linear::core::{mm, pack_n, CHUNK};
use crate::linear::{fit, gather, gather_into, SharedMut};
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::Level;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

/// Fewest rows per thread worth splitting a head's sequence for.
const MIN_SPLIT_ROWS: usize = 512;

/// Rows per fused block: 64 rows of D=64 are 16 KiB, half of L1.
const BLOCK: usize = 64;

/// One thread's buffers, reused across heads.
pub(super) struct Seg<A: Acc> {
    /// `φ(q)` then (last pass) the scaled queries, segment rows × D.
    pub(super) qs: PoolVec<A>,
    /// `φ(k)`, segment rows × D.
    pub(super) ks: PoolVec<A>,
    /// `I_i` of the segment's query rows.
    pub(super) inv: Vec<A>,
    /// Per-row scratch (`O_j`, `C_j` logits, allocations).
    pub(super) t: Vec<A>,
    /// A block of (scaled) values, and its GEMM packing.
    pub(super) vb: Vec<A>,
    pub(super) bv: Vec<A>,
    /// A block of outputs.
    pub(super) o: Vec<A>,
    /// The conserved sources `Ô_j` before the clamp (the backward's gate).
    pub(super) ohr: Vec<A>,
    /// Backward only: per-row scalars and gradient blocks (see `full_bwd`).
    pub(super) b: super::full_bwd::BwdRows<A>,
}

impl<A: Acc> Seg<A> {
    /// Buffers for up to `rows` query and key rows of width `d` (pooled: fresh
    /// multi-megabyte buffers would page-fault on every call).
    pub(super) fn new(rows: usize, d: usize) -> Self {
        Seg {
            qs: take(rows * d),
            ks: take(rows * d),
            inv: Vec::new(),
            t: Vec::new(),
            vb: Vec::new(),
            bv: Vec::new(),
            o: Vec::new(),
            ohr: Vec::new(),
            b: Default::default(),
        }
    }
}

/// Query rows `[qa, qb)` and key rows `[ka, kb)` of one segment.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    pub(super) qa: usize,
    pub(super) qb: usize,
    pub(super) ka: usize,
    pub(super) kb: usize,
}

fn split(len: usize, parts: usize, i: usize) -> (usize, usize) {
    (len * i / parts, len * (i + 1) / parts)
}

/// Sums of per-segment vectors, in segment order (deterministic for a thread count).
pub(super) fn add_all<A: Acc>(parts: impl IntoIterator<Item = Vec<A>>) -> Vec<A> {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_default();
    for p in it {
        acc.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
    }
    acc
}

/// `(x + eps, Σ (x + eps))`: the shifted whole-sequence sums the formulas use.
pub(super) fn shifted<A: Acc>(mut x: Vec<A>, eps: A) -> (Vec<A>, A) {
    x.iter_mut().for_each(|v| *v += eps);
    let s = x.iter().fold(A::ZERO, |a, &v| a + v);
    (x, s)
}

/// One head's inputs and sizes.
pub(super) struct Head<'a, E: Element> {
    pub(super) q: &'a [E],
    pub(super) k: &'a [E],
    pub(super) v: &'a [E],
    pub(super) level: Level,
    /// Row offsets of this batch entry, head index, head count.
    pub(super) qrow0: usize,
    pub(super) krow0: usize,
    pub(super) h: usize,
    pub(super) heads: usize,
    pub(super) d: usize,
    pub(super) dv: usize,
    /// Query and key rows of the head.
    pub(super) n: usize,
    pub(super) m: usize,
    pub(super) eps: E::Acc,
}

impl<E: Element> Head<'_, E> {
    /// Rows `row0 .. row0 + n` (of the whole tensor) of this head of `src`, `w` wide.
    pub(super) fn rows(&self, src: &[E], row0: usize, n: usize, w: usize, dst: &mut Vec<E::Acc>) {
        gather(src, row0, n, self.heads, self.h, w, dst);
    }

    /// `φ` of the segment's rows into `sg`; returns their `Σφ(q)`, `Σφ(k)`.
    pub(super) fn sums(&self, r: Rows, sg: &mut Seg<E::Acc>) -> (Vec<E::Acc>, Vec<E::Acc>) {
        let sq = self.phi(self.q, self.qrow0 + r.qa, r.qb - r.qa, &mut sg.qs);
        let sk = self.phi(self.k, self.krow0 + r.ka, r.kb - r.ka, &mut sg.ks);
        (sq, sk)
    }

    /// `φ` of `n` rows from `row0` of `src` into `dst`, returning their column sums. A
    /// block is gathered, mapped and summed while it is in L1 (three whole-segment passes
    /// were ~20% of the forward).
    fn phi(&self, src: &[E], row0: usize, n: usize, dst: &mut Vec<E::Acc>) -> Vec<E::Acc> {
        let (level, d) = (self.level, self.d);
        fit(dst, n * d);
        let mut s = vec![E::Acc::ZERO; d];
        let ones = [E::Acc::ONE; BLOCK];
        for (b, blk) in dst.chunks_mut(BLOCK * d.max(1)).enumerate() {
            gather_into(src, row0 + b * BLOCK, self.heads, self.h, d, blk);
            E::Acc::sigmoid(level, blk);
            E::Acc::axpy_rows(level, &mut s, &ones[..blk.len() / d], blk, d);
        }
        s
    }

    /// Flows `I_i = 1 / φ(q_i)·ΣΦ(k)`, `O_j = 1 / φ(k_j)·Σφ(q)` (eps-shifted); keeps `I`,
    /// returns `Σ I φ(q)`, `Σ O φ(k)`.
    pub(super) fn flows(
        &self,
        sg: &mut Seg<E::Acc>,
        (nk, snk): (&[E::Acc], E::Acc),
        (nq, snq): (&[E::Acc], E::Acc),
    ) -> (Vec<E::Acc>, Vec<E::Acc>) {
        let wq = self.weigh(&sg.qs, (nk, snk), &mut sg.inv);
        let wk = self.weigh(&sg.ks, (nq, snq), &mut sg.t);
        (wq, wk)
    }

    /// `f_r = 1 / (x_r·n + eps·sn)` for every row of `x` into `f`, and `Σ f_r x_r`, a block
    /// at a time so the second read hits L1.
    fn weigh(
        &self,
        x: &[E::Acc],
        (n, sn): (&[E::Acc], E::Acc),
        f: &mut Vec<E::Acc>,
    ) -> Vec<E::Acc> {
        let (level, d, eps) = (self.level, self.d, self.eps);
        let one = E::Acc::ONE;
        let rows = x.len() / d.max(1);
        fit(f, rows);
        let mut w = vec![E::Acc::ZERO; d];
        for (blk, fb) in x.chunks(BLOCK * d.max(1)).zip(f.chunks_mut(BLOCK)) {
            E::Acc::dot_rows(level, blk, d, n, fb);
            fb.iter_mut().for_each(|v| *v = one / (*v + eps * sn));
            E::Acc::axpy_rows(level, &mut w, fb, blk, d);
        }
        w
    }

    /// Competition logits → `e_j = exp(clamp(·) − 1)`; returns this segment's part of
    /// `S = Σ φ(k_j) (e_j v_j)ᵀ` (`d × round_up_nr(dv)`) and of `Σ e_j`.
    pub(super) fn state(
        &self,
        r: Rows,
        sg: &mut Seg<E::Acc>,
        (nwq, swq): (&[E::Acc], E::Acc),
    ) -> (Vec<E::Acc>, E::Acc) {
        let (level, d, dv, eps) = (self.level, self.d, self.dv, self.eps);
        let vp = round_up_nr(dv);
        let mrows = r.kb - r.ka;
        let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
        fit(&mut sg.t, mrows);
        fit(&mut sg.ohr, mrows);
        let mut total = E::Acc::ZERO;
        let mut s = vec![E::Acc::ZERO; d * vp];
        for j0 in (0..mrows).step_by(CHUNK) {
            let nb = CHUNK.min(mrows - j0);
            // the logits of these rows while they are in L1
            let t = &mut sg.t[j0..j0 + nb];
            E::Acc::dot_rows(level, &sg.ks[j0 * d..(j0 + nb) * d], d, nwq, t);
            t.iter_mut().for_each(|x| *x += eps * swq);
            sg.ohr[j0..j0 + nb].copy_from_slice(t);
            t.iter_mut().for_each(|x| *x = clamp1(*x) * log2e);
            total += E::Acc::exp2_sub_sum(level, t, log2e);
            self.rows(self.v, self.krow0 + r.ka + j0, nb, dv, &mut sg.vb);
            for (row, &e) in sg.vb.chunks_exact_mut(dv).zip(&sg.t[j0..j0 + nb]) {
                E::Acc::scale(level, row, e);
            }
            let bps = pack_n(&sg.vb, dv, nb, dv, &mut sg.bv);
            mm(
                level,
                d,
                nb,
                &sg.ks[j0 * d..],
                1,
                d,
                &sg.bv,
                bps,
                dv,
                &mut s,
                vp,
                true,
            );
        }
        (s, total)
    }

    /// Allocation and output rows: `out_i = sigmoid(φ(q_i)·ΣOφ(k) · n/m) I_i (m / Σe) φ(q_i) S`.
    #[allow(clippy::too_many_arguments)]
    fn output(
        &self,
        r: Rows,
        sg: &mut Seg<E::Acc>,
        (nwk, swk): (&[E::Acc], E::Acc),
        ratio: E::Acc,
        cscale: E::Acc,
        bs: &[E::Acc],
        bsps: usize,
        out: SharedMut<E>,
    ) {
        let (level, d, dv, eps) = (self.level, self.d, self.dv, self.eps);
        let vp = round_up_nr(dv);
        let nrows = r.qb - r.qa;
        fit(&mut sg.t, CHUNK);
        sg.o.resize(CHUNK * vp, E::Acc::ZERO);
        for i0 in (0..nrows).step_by(CHUNK) {
            let nb = CHUNK.min(nrows - i0);
            let qc = &mut sg.qs[i0 * d..(i0 + nb) * d];
            E::Acc::dot_rows(level, qc, d, nwk, &mut sg.t[..nb]);
            for (t, row) in qc.chunks_exact_mut(d).enumerate() {
                let f = sigmoid((sg.t[t] + eps * swk) * ratio) * sg.inv[i0 + t] * cscale;
                E::Acc::scale(level, row, f);
            }
            mm(
                level,
                nb,
                d,
                &sg.qs[i0 * d..],
                d,
                1,
                bs,
                bsps,
                dv,
                &mut sg.o,
                vp,
                false,
            );
            for t in 0..nb {
                let off = ((self.qrow0 + r.qa + i0 + t) * self.heads + self.h) * dv;
                // SAFETY: the rows of head `h` in this segment belong to this call alone.
                let dst = unsafe { out.slice(off, dv) };
                E::from_acc_slice(&sg.o[t * vp..t * vp + dv], dst);
            }
        }
    }
}

/// How a head's passes run over its segments: results come back in segment order.
pub(super) trait Segments<A: Acc> {
    fn each<R: Send>(&self, f: &(dyn Fn(Rows, &mut Seg<A>) -> R + Sync)) -> Vec<R>;
}

/// One segment per pool thread; `rayon::broadcast` runs segment `i` on thread `i`.
struct Split<'a, A: Acc> {
    segs: &'a [Mutex<Seg<A>>],
    n: usize,
    m: usize,
}

impl<A: Acc> Segments<A> for Split<'_, A> {
    fn each<R: Send>(&self, f: &(dyn Fn(Rows, &mut Seg<A>) -> R + Sync)) -> Vec<R> {
        let parts = self.segs.len();
        rayon::broadcast(|ctx| {
            let i = ctx.index();
            let ((qa, qb), (ka, kb)) = (split(self.n, parts, i), split(self.m, parts, i));
            let mut sg = self.segs[i].lock().unwrap_or_else(|e| e.into_inner());
            f(Rows { qa, qb, ka, kb }, &mut sg)
        })
    }
}

/// The whole head as one segment on the calling thread.
struct Whole<'a, A: Acc> {
    sg: RefCell<&'a mut Seg<A>>,
    n: usize,
    m: usize,
}

impl<A: Acc> Segments<A> for Whole<'_, A> {
    fn each<R: Send>(&self, f: &(dyn Fn(Rows, &mut Seg<A>) -> R + Sync)) -> Vec<R> {
        let r = Rows {
            qa: 0,
            qb: self.n,
            ka: 0,
            kb: self.m,
        };
        vec![f(r, &mut self.sg.borrow_mut())]
    }
}

/// The four passes of one head, with the reductions between them.
fn run_head<E: Element>(hd: &Head<'_, E>, segs: &impl Segments<E::Acc>, out: SharedMut<E>) {
    let (eps, n, m) = (hd.eps, hd.n, hd.m);
    let (sq, sk): (Vec<_>, Vec<_>) = segs.each(&|r, sg| hd.sums(r, sg)).into_iter().unzip();
    let ((nq, snq), (nk, snk)) = (shifted(add_all(sq), eps), shifted(add_all(sk), eps));
    let (wq, wk): (Vec<_>, Vec<_>) = segs
        .each(&|_, sg| hd.flows(sg, (&nk, snk), (&nq, snq)))
        .into_iter()
        .unzip();
    let ((nwq, swq), (nwk, swk)) = (shifted(add_all(wq), eps), shifted(add_all(wk), eps));
    let (ss, totals): (Vec<_>, Vec<_>) = segs
        .each(&|r, sg| hd.state(r, sg, (&nwq, swq)))
        .into_iter()
        .unzip();
    let s = add_all(ss);
    let total = totals.into_iter().fold(E::Acc::ZERO, |a, b| a + b);
    let mut bs = Vec::new();
    let bsps = pack_n(&s, round_up_nr(hd.dv), hd.d, hd.dv, &mut bs);
    let ratio = E::Acc::from_f64(n as f64 / m as f64);
    let cscale = E::Acc::from_f64(m as f64) / total;
    segs.each(&|r, sg| hd.output(r, sg, (&nwk, swk), ratio, cscale, &bs, bsps, out));
}

/// Work done on each head: the passes, over whichever segments the driver chose.
pub(super) trait HeadJob<E: Element>: Sync {
    fn run(&self, hd: &Head<'_, E>, segs: &impl Segments<E::Acc>);
}

/// Runs `job` on every (batch, head): heads in parallel, each on one thread as one segment,
/// or, when there are fewer heads than threads and the sequences are long, heads one after
/// another with each split across every thread. `q_len` and `kv_len` must be positive.
pub(super) fn each_head<E: Element>(
    level: Level,
    dims: &FlowDims,
    eps: E::Acc,
    (q, k, v): (&[E], &[E], &[E]),
    job: &impl HeadJob<E>,
) {
    let (n, m, hs) = (dims.q_len, dims.kv_len, dims.heads);
    let threads = rayon::current_num_threads().max(1);
    let tasks = dims.batch * hs;
    let head = |task: usize| Head {
        q,
        k,
        v,
        level,
        qrow0: (task / hs) * n,
        krow0: (task / hs) * m,
        h: task % hs,
        heads: hs,
        d: dims.head_dim,
        dv: dims.v_head_dim,
        n,
        m,
        eps,
    };
    if tasks < threads && n.min(m) >= MIN_SPLIT_ROWS * threads {
        let rows = n.max(m).div_ceil(threads);
        let segs: Vec<Mutex<Seg<E::Acc>>> = (0..threads)
            .map(|_| Mutex::new(Seg::new(rows, dims.head_dim)))
            .collect();
        let split = Split { segs: &segs, n, m };
        for task in 0..tasks {
            job.run(&head(task), &split);
        }
    } else {
        let per: PerThread<Seg<E::Acc>> = PerThread::new();
        (0..tasks).into_par_iter().for_each(|task| {
            per.with(
                || Seg::new(n.max(m), dims.head_dim),
                |sg| {
                    job.run(
                        &head(task),
                        &Whole {
                            sg: RefCell::new(sg),
                            n,
                            m,
                        },
                    )
                },
            )
        });
    }
}

/// The forward's job: the four passes, writing `out`.
struct Forward<E>(SharedMut<E>);

impl<E: Element> HeadJob<E> for Forward<E> {
    fn run(&self, hd: &Head<'_, E>, segs: &impl Segments<E::Acc>) {
        run_head(hd, segs, self.0);
    }
}

/// The forward over every (batch, head); `q_len` and `kv_len` must be positive.
pub(super) fn forward<E: Element>(
    level: Level,
    dims: &FlowDims,
    eps: E::Acc,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
) {
    each_head(
        level,
        dims,
        eps,
        (q, k, v),
        &Forward(SharedMut(out.as_mut_ptr())),
    );
}
