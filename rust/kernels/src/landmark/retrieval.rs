//! Retrieval for inference (docs/landmark.md, Retrieval): each query ranks the complete
//! blocks before its own by the softmax of its landmark scores, keeps the best `top_k` and
//! attends with the grouped softmax to its own block's regular tokens up to itself plus the
//! kept blocks only.
//!
//! A decode step reads one landmark row per block and `top_k + 1` blocks of keys and values
//! per head, never the whole cache: every read is a strided row of the cache as it lies
//! (`[B, T, H_kv, D]`), so nothing is gathered or copied for the float types (half types
//! convert the rows they read). Three passes, because two rankings are shared across
//! queries or heads: the landmark probabilities `[B, H, Tq, blocks]`, the shared maxima
//! where the selection needs them, then per query the choice and the attention.

use super::{own_block, LandmarkDims};
use crate::element::{Acc, Element};
use crate::gemm::pack::{rows_of, View};
use crate::linear::SharedMut;
use crate::simd::math::VecMath;
use crate::simd::Level;
use rayon::prelude::*;
use std::cmp::Ordering;

/// How the kept blocks are ranked (lm_benchmark's `cache_selection_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Per (batch entry, head, query): its own probabilities.
    PerTokenAndHead,
    /// Per (batch entry, query): the maximum over heads, shared by the query's heads.
    MaxOverHeads,
    /// Per (batch entry, head): the maximum over the call's queries that have the block as a
    /// candidate, shared by the chunk.
    MaxOverTokens,
}

/// Queries per parallel task: a decode step's heads spread over the threads one by one,
/// a prefill chunk's queries in groups.
const MIN_QUERIES: usize = 4;

#[derive(Default)]
struct Scratch<T> {
    q: Vec<T>,
    rows: Vec<T>,
    vrows: Vec<T>,
    s: Vec<T>,
    acc: Vec<T>,
    order: Vec<usize>,
    gate: Vec<T>,
}

struct Geo {
    h: usize,
    hkv: usize,
    group: usize,
    hd: usize,
    hv: usize,
    bs: usize,
    tq: usize,
    tk: usize,
    shift: usize,
    blocks: usize,
}

impl Geo {
    fn new(d: &LandmarkDims) -> Self {
        Geo {
            h: d.q_heads,
            hkv: d.kv_heads,
            group: d.q_heads / d.kv_heads,
            hd: d.head_dim,
            hv: d.v_head_dim,
            bs: d.block,
            tq: d.q_len,
            tk: d.kv_len,
            shift: d.kv_len - d.q_len,
            blocks: d.kv_len / d.block,
        }
    }
    /// `(b, hh, i)` of flat query index `t` in `[B, H, Tq]` order.
    fn split(&self, t: usize) -> (usize, usize, usize) {
        (t / (self.h * self.tq), t / self.tq % self.h, t % self.tq)
    }
    /// Complete blocks before query `i`'s own block: its candidates `0..n`.
    fn candidates(&self, i: usize) -> usize {
        (self.shift + i) / self.bs
    }
    /// `rows` cache rows of kv head `kvh` from position `t`, `width` values each.
    fn kv(&self, b: usize, t: usize, kvh: usize, rows: usize, width: usize, every: usize) -> View {
        View {
            base: ((b * self.tk + t) * self.hkv + kvh) * width,
            rs: every * self.hkv * width,
            rows,
            cols: width,
        }
    }
    fn q(&self, b: usize, i: usize, hh: usize) -> View {
        View {
            base: ((b * self.tq + i) * self.h + hh) * self.hd,
            rs: self.hd,
            rows: 1,
            cols: self.hd,
        }
    }
}

/// Writes `out [B, Tq, H, Dv]` and the kept blocks `kept [B, H, Tq, top_k]` (best first,
/// `-1` in unused slots).
#[allow(clippy::too_many_arguments)]
pub(super) fn retrieval<E: Element>(
    level: Level,
    d: &LandmarkDims,
    scale: f64,
    top_k: usize,
    selection: Selection,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
    kept: &mut [i64],
) {
    let g = Geo::new(d);
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let n = d.batch * g.h * g.tq;
    // Pass 1: each query's landmark probabilities over its candidates.
    let mut probs = vec![E::Acc::ZERO; n * g.blocks];
    if g.blocks > 0 {
        probs
            .par_chunks_mut(g.blocks)
            .enumerate()
            .with_min_len(MIN_QUERIES)
            .for_each_init(Scratch::<E::Acc>::default, |sc, (t, p)| {
                let (b, hh, i) = g.split(t);
                let nc = g.candidates(i);
                let (qa, _) = rows_of(q, g.q(b, i, hh), &mut sc.q);
                let lm = g.kv(b, g.bs - 1, hh / g.group, nc, g.hd, g.bs);
                let (ka, rs) = rows_of(k, lm, &mut sc.rows);
                let p = &mut p[..nc];
                E::Acc::dot_rows(level, ka, rs, &qa[..g.hd], p);
                softmax(level, p, c);
            });
    }
    // Pass 2: the rankings shared across heads ([B, Tq, blocks]) or queries ([B, H, blocks]).
    let shared = match selection {
        Selection::PerTokenAndHead => Vec::new(),
        Selection::MaxOverHeads => shared_max(&probs, &g, d.batch * g.tq, |b, _, i| b * g.tq + i),
        Selection::MaxOverTokens => shared_max(&probs, &g, d.batch * g.h, |b, hh, _| b * g.h + hh),
    };
    // Pass 3: per query, the choice and the attention.
    let outp = SharedMut(out.as_mut_ptr());
    let keptp = SharedMut(kept.as_mut_ptr());
    (0..n)
        .into_par_iter()
        .with_min_len(MIN_QUERIES)
        .for_each_init(Scratch::<E::Acc>::default, |sc, t| {
            let (b, hh, i) = g.split(t);
            let kvh = hh / g.group;
            let nc = g.candidates(i);
            let rank: &[E::Acc] = match selection {
                Selection::PerTokenAndHead => &probs[t * g.blocks..][..nc],
                Selection::MaxOverHeads => &shared[(b * g.tq + i) * g.blocks..][..nc],
                Selection::MaxOverTokens => &shared[(b * g.h + hh) * g.blocks..][..nc],
            };
            let kk = choose(rank, top_k, &mut sc.order);
            // SAFETY: query t's slots of `kept` belong to this task alone.
            let slots = unsafe { keptp.slice(t * top_k, top_k) };
            for (slot, x) in slots.iter_mut().enumerate() {
                *x = if slot < kk { sc.order[slot] as i64 } else { -1 };
            }
            let Scratch {
                q: qtmp,
                rows,
                vrows,
                s,
                acc,
                order,
                gate,
            } = sc;
            let (qa, _) = rows_of(q, g.q(b, i, hh), qtmp);
            let qa = &qa[..g.hd];
            // Logits (base 2): the kept blocks' landmarks, then the own block's tokens.
            gate.clear();
            for &blk in &order[..kk] {
                let lm = g.kv(b, blk * g.bs + g.bs - 1, kvh, 1, g.hd, 1);
                let (ka, rs) = rows_of(k, lm, rows);
                let mut x = [E::Acc::ZERO];
                E::Acc::dot_rows(level, ka, rs, qa, &mut x);
                gate.push(x[0] * c);
            }
            let (start, own) = own_block(g.shift + i, g.bs);
            s.clear();
            s.resize(own.max(g.bs), E::Acc::ZERO);
            let (ka, rs) = rows_of(k, g.kv(b, start, kvh, own, g.hd, 1), rows);
            E::Acc::dot_rows(level, ka, rs, qa, &mut s[..own]);
            E::Acc::scale(level, &mut s[..own], c);
            let m = gate
                .iter()
                .fold(E::Acc::row_max(level, &s[..own]), |a, &x| a.max(x));
            let m = if m == E::Acc::NEG_INFINITY {
                E::Acc::ZERO
            } else {
                m
            };
            let mut z = E::Acc::exp2_sub_sum(level, &mut s[..own], m);
            for x in gate.iter_mut() {
                *x = E::Acc::exp2(*x - m);
                z += *x;
            }
            acc.clear();
            acc.resize(g.hv, E::Acc::ZERO);
            let (va, rs) = rows_of(v, g.kv(b, start, kvh, own, g.hv, 1), vrows);
            E::Acc::axpy_rows(level, acc, &s[..own], va, rs);
            // A kept block adds its in-block softmax average, weighted by its gate.
            for (&blk, &e) in order[..kk].iter().zip(gate.iter()) {
                let regular = g.bs - 1;
                let (ka, rs) = rows_of(k, g.kv(b, blk * g.bs, kvh, regular, g.hd, 1), rows);
                let w = &mut s[..regular];
                E::Acc::dot_rows(level, ka, rs, qa, w);
                E::Acc::scale(level, w, c);
                let mi = E::Acc::row_max(level, w);
                let mi = if mi == E::Acc::NEG_INFINITY {
                    E::Acc::ZERO
                } else {
                    mi
                };
                let l = E::Acc::exp2_sub_sum(level, w, mi);
                E::Acc::scale(level, w, e / l);
                let (va, rs) = rows_of(v, g.kv(b, blk * g.bs, kvh, regular, g.hv, 1), vrows);
                E::Acc::axpy_rows(level, acc, w, va, rs);
            }
            E::Acc::scale(level, acc, E::Acc::ONE / z);
            let at = ((b * g.tq + i) * g.h + hh) * g.hv;
            // SAFETY: output row (b, i, hh) belongs to this task alone.
            unsafe { E::from_acc_slice(acc, outp.slice(at, g.hv)) };
        });
}

/// Per shared ranking row `row(b, hh, i)` of `rows`, the maximum of the probabilities of
/// the queries that share it, over each query's candidates only.
fn shared_max<T: Acc>(
    probs: &[T],
    g: &Geo,
    rows: usize,
    row: impl Fn(usize, usize, usize) -> usize,
) -> Vec<T> {
    let mut m = vec![T::NEG_INFINITY; rows * g.blocks];
    if g.blocks == 0 {
        return m;
    }
    for (t, p) in probs.chunks(g.blocks).enumerate() {
        let (b, hh, i) = g.split(t);
        let r = &mut m[row(b, hh, i) * g.blocks..][..g.blocks];
        for (x, &y) in r.iter_mut().zip(&p[..g.candidates(i)]) {
            *x = x.max(y);
        }
    }
    m
}

/// `p = softmax(c·p)` in base 2 (`c` carries log2 e); a row without a finite maximum or with
/// a NaN comes out as zeros, as torch's `softmax(...).nan_to_num(0)`.
fn softmax<T: Acc + VecMath>(level: Level, p: &mut [T], c: T) {
    if p.is_empty() {
        return;
    }
    T::scale(level, p, c);
    let m = T::row_max(level, p);
    let l = T::exp2_sub_sum(level, p, m);
    T::scale(level, p, T::ONE / l);
    for x in p.iter_mut() {
        // finite weights lie in [0, 1]: anything else is a NaN row
        if !x.is_finite() {
            *x = T::ZERO;
        }
    }
}

/// The `min(top_k, rank.len())` best candidates into `order[..kk]`, best first, ties to the
/// earlier block; returns `kk`.
fn choose<T: Acc>(rank: &[T], top_k: usize, order: &mut Vec<usize>) -> usize {
    order.clear();
    order.extend(0..rank.len());
    let kk = top_k.min(rank.len());
    let better = |&a: &usize, &b: &usize| {
        rank[b]
            .partial_cmp(&rank[a])
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    };
    if kk == 0 {
        return 0;
    }
    if kk < order.len() {
        order.select_nth_unstable_by(kk - 1, better);
    }
    order[..kk].sort_unstable_by(better);
    kk
}
