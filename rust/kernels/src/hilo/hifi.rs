//! Hi-Fi: attention inside the non-overlapping `ws × ws` windows of the map (LITv2's
//! high-frequency heads), forward and backward.
//!
//! A window holds at most 64 tokens, so its scores are a few dot products per query and the
//! cost is in moving rows, not in arithmetic. Each task takes one band of window rows of one
//! image and copies every window token's whole `q | k | v` row once (all heads together, pad
//! tokens past the map's bottom/right edge getting the pad key and value the caller gives, as
//! a zero-padded map would after the projection); the heads then read their keys and values
//! from that buffer as strided rows, and a token's output (or gradient) row is written once for
//! all heads. Queries of pad tokens are not computed: LITv2 crops them after the projection.

use crate::element::{Acc, Element};
use crate::linear::SharedMut;
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::Level;
use rayon::prelude::*;

use super::Io;

/// Token rows to gather from: a plain slice (backward) or a forward's [`Io`].
#[derive(Clone, Copy)]
enum Rows<'a, E> {
    Slice(&'a [E]),
    Io(&'a Io<E>),
}

impl<'a, E> Rows<'a, E> {
    fn row(self, off: usize, len: usize) -> &'a [E] {
        match self {
            Rows::Slice(s) => &s[off..][..len],
            // SAFETY: a token's row is read and written only by the task owning its window.
            Rows::Io(io) => unsafe { io.row(off, len) },
        }
    }
}

/// The map and the Hi-Fi heads. Token `(b, y, x)` of `qkv` starts at
/// `((b·height + y)·width + x)·stride`, with q, k, v at offsets `0`, `heads·hd`, `2·heads·hd`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub ws: usize,
    pub heads: usize,
    pub hd: usize,
    pub stride: usize,
}

impl Geometry {
    fn dim(&self) -> usize {
        self.heads * self.hd
    }
    fn bands(&self) -> usize {
        self.height.div_ceil(self.ws)
    }
    /// Fills `slots` with the tokens of window `(gy, gx)` of image `b` in row-major slot
    /// order: `Some(token)`, or `None` for a slot past the map's edge.
    fn window(&self, b: usize, gy: usize, gx: usize, slots: &mut Vec<Option<usize>>) {
        let ws = self.ws;
        slots.clear();
        slots.extend((0..ws * ws).map(|t| {
            let (y, x) = (gy * ws + t / ws, gx * ws + t % ws);
            (y < self.height && x < self.width).then(|| (b * self.height + y) * self.width + x)
        }));
    }
}

/// One worker's buffers (accumulation type), sized for one window.
#[derive(Default)]
struct Scratch<A> {
    slots: Vec<Option<usize>>,
    /// `[slot][q | k | v]`, all heads.
    qkv: Vec<A>,
    /// `[slot][dim]`: output rows (forward) or output gradients (backward).
    rows: Vec<A>,
    /// `[slot][q | k | v]` gradients.
    grad: Vec<A>,
    /// `[query slot][key slot]` probabilities and score gradients of one head.
    p: Vec<A>,
    ds: Vec<A>,
    col: Vec<A>,
}

/// `v.len() == n`, contents unspecified (every use overwrites or clears what it reads).
fn sized<A: Acc>(v: &mut Vec<A>, n: usize) {
    v.resize(n, A::ZERO);
}

/// Copies the window's token rows into `sc.qkv`; pad slots get the pad key and value (zeros
/// without one) and a zero query.
fn gather<E: Element>(g: &Geometry, qkv: Rows<'_, E>, pad: Option<&[E]>, sc: &mut Scratch<E::Acc>) {
    let (dim, row) = (g.dim(), 3 * g.dim());
    sized(&mut sc.qkv, sc.slots.len() * row);
    for (t, tok) in sc.slots.iter().enumerate() {
        let dst = &mut sc.qkv[t * row..][..row];
        match tok {
            Some(tok) => E::to_acc_slice(qkv.row(tok * g.stride, row), dst),
            None => {
                dst.fill(E::Acc::ZERO);
                if let Some(pad) = pad {
                    E::to_acc_slice(&pad[..2 * dim], &mut dst[dim..]);
                }
            }
        }
    }
}

/// `p` = the softmax over the window's slots of query slot `i`, head `h` (`c` = scale·log₂e).
fn probabilities<A: Acc>(
    level: Level,
    g: &Geometry,
    qkv: &[A],
    i: usize,
    h: usize,
    c: A,
    p: &mut [A],
) {
    let (hd, dim, row) = (g.hd, g.dim(), 3 * g.dim());
    A::dot_rows(
        level,
        &qkv[dim + h * hd..],
        row,
        &qkv[i * row + h * hd..][..hd],
        p,
    );
    let mut m = A::NEG_INFINITY;
    for s in p.iter_mut() {
        *s *= c;
        if *s > m {
            m = *s;
        }
    }
    let inv = A::ONE / A::exp2_sub_sum(level, p, m);
    for s in p.iter_mut() {
        *s *= inv;
    }
}

/// Forward: token `t`'s output row (all heads) goes to `io`'s output at `t·out_stride`.
pub(super) fn forward<E: Element>(
    level: Level,
    g: &Geometry,
    scale: f64,
    io: Io<E>,
    pad: Option<&[E]>,
) {
    let (hd, dim, row, ws) = (g.hd, g.dim(), 3 * g.dim(), g.ws);
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let scratch = PerThread::new();
    (0..g.batch * g.bands()).into_par_iter().for_each(|task| {
        let (b, gy) = (task / g.bands(), task % g.bands());
        scratch.with(Scratch::default, |sc: &mut Scratch<E::Acc>| {
            for gx in 0..g.width.div_ceil(ws) {
                g.window(b, gy, gx, &mut sc.slots);
                gather(g, Rows::Io(&io), pad, sc);
                let n = sc.slots.len();
                sized(&mut sc.p, n);
                sized(&mut sc.rows, dim);
                for (i, tok) in sc.slots.iter().enumerate() {
                    let Some(tok) = *tok else { continue };
                    sc.rows.fill(E::Acc::ZERO);
                    for h in 0..g.heads {
                        probabilities(level, g, &sc.qkv, i, h, c, &mut sc.p);
                        let o = &mut sc.rows[h * hd..][..hd];
                        E::Acc::axpy_rows(level, o, &sc.p, &sc.qkv[2 * dim + h * hd..], row);
                    }
                    // SAFETY: each token (its input row and its output row) belongs to the
                    // one task that owns its window; the window was gathered above.
                    unsafe { E::from_acc_slice(&sc.rows, io.out_row(tok * io.out_stride, dim)) };
                }
            }
        })
    });
}

/// Backward: writes the q, k, v channels of every token of `dqkv` (addressed like `qkv`) and
/// returns the summed gradient of the pad key and value (`2·heads·hd`, k then v).
pub(super) fn backward<E: Element>(
    level: Level,
    g: &Geometry,
    scale: f64,
    qkv: &[E],
    pad: Option<&[E]>,
    dout: &[E],
    dqkv: &mut [E],
) -> Vec<E::Acc> {
    let (dim, row, ws) = (g.dim(), 3 * g.dim(), g.ws);
    let c = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let sc_t = E::Acc::from_f64(scale);
    let dp = SharedMut(dqkv.as_mut_ptr());
    let scratch = PerThread::new();
    // Per band, the pad tokens' gradient; summed in band order below (deterministic).
    let pad_parts: Vec<Vec<E::Acc>> = (0..g.batch * g.bands())
        .into_par_iter()
        .map(|task| {
            let (b, gy) = (task / g.bands(), task % g.bands());
            let mut pad_grad = vec![E::Acc::ZERO; 2 * dim];
            scratch.with(Scratch::default, |sc: &mut Scratch<E::Acc>| {
                for gx in 0..g.width.div_ceil(ws) {
                    g.window(b, gy, gx, &mut sc.slots);
                    gather(g, Rows::Slice(qkv), pad, sc);
                    window_backward(level, g, c, dout, sc);
                    for (t, tok) in sc.slots.iter().enumerate() {
                        let gr = &mut sc.grad[t * row..][..row];
                        E::Acc::scale(level, &mut gr[..2 * dim], sc_t);
                        match tok {
                            // SAFETY: a token's q, k, v channels are written by its window's
                            // task alone.
                            Some(tok) => unsafe {
                                E::from_acc_slice(gr, dp.slice(tok * g.stride, row))
                            },
                            None => {
                                for (a, &x) in pad_grad.iter_mut().zip(&gr[dim..]) {
                                    *a += x;
                                }
                            }
                        }
                    }
                }
            });
            pad_grad
        })
        .collect();
    let mut total = vec![E::Acc::ZERO; 2 * dim];
    for part in pad_parts {
        for (a, x) in total.iter_mut().zip(part) {
            *a += x;
        }
    }
    total
}

/// One window's `sc.grad` (`[slot][dq | dk | dv]`, dq and dk not yet multiplied by the
/// scale) from `sc.qkv` and the output gradient. Pad slots are queries with zero probability
/// rows, so every head's key and value gradients are one strided product over all slots.
fn window_backward<E: Element>(
    level: Level,
    g: &Geometry,
    c: E::Acc,
    dout: &[E],
    sc: &mut Scratch<E::Acc>,
) {
    let (hd, dim, row) = (g.hd, g.dim(), 3 * g.dim());
    let n = sc.slots.len();
    let zero = E::Acc::ZERO;
    sized(&mut sc.rows, n * dim);
    for (t, tok) in sc.slots.iter().enumerate() {
        let dst = &mut sc.rows[t * dim..][..dim];
        match tok {
            Some(tok) => E::to_acc_slice(&dout[tok * dim..][..dim], dst),
            None => dst.fill(zero),
        }
    }
    sized(&mut sc.grad, n * row);
    sc.grad.fill(zero);
    sized(&mut sc.p, n * n);
    sized(&mut sc.ds, n * n);
    sized(&mut sc.col, n);
    for h in 0..g.heads {
        let (k, v) = (&sc.qkv[dim + h * hd..], &sc.qkv[2 * dim + h * hd..]);
        for (i, tok) in sc.slots.iter().enumerate() {
            let (p, ds) = (&mut sc.p[i * n..][..n], &mut sc.ds[i * n..][..n]);
            if tok.is_none() {
                p.fill(zero);
                ds.fill(zero);
                continue;
            }
            probabilities(level, g, &sc.qkv, i, h, c, p);
            // dP_i = V dO_i, dS_i = P_i ⊙ (dP_i − P_i·dP_i), dq_i = Σ_j dS_ij k_j
            E::Acc::dot_rows(level, v, row, &sc.rows[i * dim + h * hd..][..hd], ds);
            let delta = p.iter().zip(ds.iter()).fold(zero, |a, (&x, &y)| a + x * y);
            E::Acc::mul_sub(level, ds, p, delta);
            E::Acc::axpy_rows(level, &mut sc.grad[i * row + h * hd..][..hd], ds, k, row);
        }
        // dk_j = Σ_i dS_ij q_i, dv_j = Σ_i P_ij dO_i
        for j in 0..n {
            for i in 0..n {
                sc.col[i] = sc.ds[i * n + j];
            }
            let dk = &mut sc.grad[j * row + dim + h * hd..][..hd];
            E::Acc::axpy_rows(level, dk, &sc.col, &sc.qkv[h * hd..], row);
            for i in 0..n {
                sc.col[i] = sc.p[i * n + j];
            }
            let dv = &mut sc.grad[j * row + 2 * dim + h * hd..][..hd];
            E::Acc::axpy_rows(level, dv, &sc.col, &sc.rows[h * hd..], dim);
        }
    }
}
