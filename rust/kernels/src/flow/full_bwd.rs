//! Non-causal Flow-Attention backward, streamed over row segments like the forward (see
//! [`super::full`]): the forward's three reduction passes are recomputed, then four
//! gradient passes alternate between query and key rows, each needing only `D`-vectors,
//! `dS` (`D×Dv`) and scalars reduced over the whole sequence by the pass before.
//!
//! With `aq_i = a_i I_i φ(q_i)`, `vc_j = c_j v_j`, `S = Σ φ(k_j) vc_jᵀ`, `out_i = aq_i S`:
//!
//! ```text
//! q rows:  daq = dout Sᵀ,  dS = Σ aqᵀ dout,  dih_i = I_i (daq_i·φq_i) a_i (1 − a_i) n/m,
//!          dWk = Σ dih_i (φq_i + ε)
//! k rows:  dvc = φk dS → dc_j = dvc_j·v_j, dv_j = c_j dvc_j;  dφk(core) = vc dSᵀ;
//!          dino_j = −(dWk·φk_j) O_j²;  dWq = Σ dÔ_j (φk_j + ε) with
//!          dÔ_j = [|Ô_j| ≤ 1] c_j (dc_j − Σ c dc / m)
//! q rows:  dini_i = −(a_i daq_i·φq_i + dWq·φq_i) I_i²;  dq from all of the above
//! k rows:  dk from all of the above
//! ```

use super::full::{add_all, each_head, shifted, Head, HeadJob, Rows, Seg, Segments};
use super::{sigmoid, FlowDims};
use crate::buffer_pool::{take, PoolVec};
use crate::element::{Acc, Element};
use crate::gemm::round_up_nr;
use crate::linear::core::{mm, pack_n, pack_t, CHUNK};
use crate::linear::{fit, SharedMut};
use crate::simd::math::VecMath;
use crate::simd::Level;

/// Per-row values a segment keeps between the backward's passes.
#[derive(Default)]
pub(crate) struct BwdRows<A: Acc> {
    // query rows
    a: Vec<A>,
    daqq: Vec<A>,
    dih: Vec<A>,
    /// `dout Sᵀ`, rows × D (pooled, as are the other row-by-D buffers: fresh ones fault in
    /// every page on every call).
    daq: PoolVec<A>,
    // key rows
    o: Vec<A>,
    e: Vec<A>,
    dc: Vec<A>,
    dino: Vec<A>,
    /// The core's gradient of `φ(k)`, rows × D.
    dkc: PoolVec<A>,
    // blocks
    g: Vec<A>,
    bg: Vec<A>,
    blk: Vec<A>,
}

/// Makes `v` `n` long, from the pool when it cannot grow in place.
fn pooled<A: Acc>(v: &mut PoolVec<A>, n: usize) {
    if v.capacity() < n {
        *v = take(n);
    }
    fit(v, n);
}

/// `y += Σ_r p[r] (x_r + eps)` over the rows of `x` (`y.len()` wide).
fn axpy_rows_eps<A: Acc>(level: Level, y: &mut [A], p: &[A], x: &[A], eps: A) {
    A::axpy_rows(level, y, p, x, y.len());
    let sp = p.iter().fold(A::ZERO, |s, &v| s + v) * eps;
    y.iter_mut().for_each(|v| *v += sp);
}

/// The gradients' destinations and the upstream gradient.
struct Grads<'a, E: Element> {
    dout: &'a [E],
    dq: SharedMut<E>,
    dk: SharedMut<E>,
    dv: SharedMut<E>,
}

/// Reduced values the passes share.
struct Sums<'a, A> {
    nq: &'a [A],
    nk: &'a [A],
    nwq: &'a [A],
    nwk: &'a [A],
    swk: A,
    ratio: A,
    /// `c_j = cscale · e_j`.
    cscale: A,
}

impl<E: Element> Head<'_, E> {
    fn row_off(&self, row0: usize, r: usize, width: usize) -> usize {
        ((row0 + r) * self.heads + self.h) * width
    }

    /// Query rows: `daq`, this segment's `dS` (`d × vp`) and `dWk`.
    fn grad_q1(
        &self,
        r: Rows,
        sg: &mut Seg<E::Acc>,
        gr: &Grads<'_, E>,
        z: &Sums<'_, E::Acc>,
        (bst, bstps): (&[E::Acc], usize),
    ) -> (Vec<E::Acc>, Vec<E::Acc>) {
        let (level, d, dv, eps) = (self.level, self.d, self.dv, self.eps);
        let (vp, dp) = (round_up_nr(dv), round_up_nr(d));
        let one = E::Acc::ONE;
        let nrows = r.qb - r.qa;
        let b = &mut sg.b;
        b.a.clear();
        b.a.resize(nrows, E::Acc::ZERO);
        E::Acc::dot_rows(level, &sg.qs, d, z.nwk, &mut b.a);
        b.a.iter_mut()
            .for_each(|x| *x = sigmoid((*x + eps * z.swk) * z.ratio));
        pooled(&mut b.daq, nrows * d);
        b.daqq.resize(nrows, E::Acc::ZERO);
        b.dih.resize(nrows, E::Acc::ZERO);
        b.blk.resize(CHUNK * dp.max(vp), E::Acc::ZERO);
        let mut ds = vec![E::Acc::ZERO; d * vp];
        let mut dwk = vec![E::Acc::ZERO; d];
        for i0 in (0..nrows).step_by(CHUNK) {
            let nb = CHUNK.min(nrows - i0);
            self.rows(gr.dout, self.qrow0 + r.qa + i0, nb, dv, &mut b.g);
            mm(
                level, nb, dv, &b.g, dv, 1, bst, bstps, d, &mut b.blk, dp, false,
            );
            for t in 0..nb {
                b.daq[(i0 + t) * d..(i0 + t + 1) * d].copy_from_slice(&b.blk[t * dp..t * dp + d]);
            }
            // aq rows of the block, then dS += aqᵀ dout
            fit(&mut sg.vb, nb * d);
            sg.vb.copy_from_slice(&sg.qs[i0 * d..(i0 + nb) * d]);
            for (t, row) in sg.vb.chunks_exact_mut(d).enumerate() {
                E::Acc::scale(level, row, b.a[i0 + t] * sg.inv[i0 + t]);
            }
            let bps = pack_n(&b.g, dv, nb, dv, &mut b.bg);
            mm(
                level, d, nb, &sg.vb, 1, d, &b.bg, bps, dv, &mut ds, vp, true,
            );
            // dWk's part from these rows while they are in L1
            for i in i0..i0 + nb {
                let qi = &sg.qs[i * d..(i + 1) * d];
                let daqq = crate::linear::core::vdot(level, &b.daq[i * d..(i + 1) * d], qi);
                b.daqq[i] = daqq;
                b.dih[i] = sg.inv[i] * daqq * b.a[i] * (one - b.a[i]) * z.ratio;
            }
            let qc = &sg.qs[i0 * d..(i0 + nb) * d];
            axpy_rows_eps(level, &mut dwk, &b.dih[i0..i0 + nb], qc, eps);
        }
        (ds, dwk)
    }

    /// Key rows: `dv` (written), the core's `dφk`, `dc`, `dino`; returns `Σ c dc`, this
    /// segment's `dsq` and the two parts of `dWq` (`Σ gate c dc (φk + ε)`, `Σ gate c (φk + ε)`).
    #[allow(clippy::too_many_arguments)]
    fn grad_k1(
        &self,
        r: Rows,
        sg: &mut Seg<E::Acc>,
        gr: &Grads<'_, E>,
        z: &Sums<'_, E::Acc>,
        dwk: &[E::Acc],
        (bds, bdsps): (&[E::Acc], usize),
        (bdst, bdstps): (&[E::Acc], usize),
    ) -> (E::Acc, [Vec<E::Acc>; 3]) {
        let (level, d, dv, eps) = (self.level, self.d, self.dv, self.eps);
        let (vp, dp) = (round_up_nr(dv), round_up_nr(d));
        let one = E::Acc::ONE;
        let mrows = r.kb - r.ka;
        let b = &mut sg.b;
        b.dc.resize(mrows, E::Acc::ZERO);
        pooled(&mut b.dkc, mrows * d);
        b.blk.resize(CHUNK * dp.max(vp), E::Acc::ZERO);
        let mut s_cdc = E::Acc::ZERO;
        // dWq's two parts (gated by the clamp) and the outflow chain's dsq, each summed a
        // chunk at a time while its key rows are in L1
        let (mut p1, mut p2, mut dsq) = (
            vec![E::Acc::ZERO; d],
            vec![E::Acc::ZERO; d],
            vec![E::Acc::ZERO; d],
        );
        b.dino.clear();
        b.dino.resize(mrows, E::Acc::ZERO);
        for j0 in (0..mrows).step_by(CHUNK) {
            let nb = CHUNK.min(mrows - j0);
            let kc = &sg.ks[j0 * d..(j0 + nb) * d];
            self.rows(self.v, self.krow0 + r.ka + j0, nb, dv, &mut sg.vb);
            mm(
                level, nb, d, kc, d, 1, bds, bdsps, dv, &mut b.blk, vp, false,
            );
            for t in 0..nb {
                let j = j0 + t;
                let c = z.cscale * b.e[j];
                let dvc = &b.blk[t * vp..t * vp + dv];
                let vrow = &mut sg.vb[t * dv..(t + 1) * dv];
                let dc = crate::linear::core::vdot(level, dvc, vrow);
                b.dc[j] = dc;
                s_cdc += c * dc;
                E::Acc::scale(level, vrow, c);
                fit(&mut b.g, dv);
                b.g.copy_from_slice(dvc);
                E::Acc::scale(level, &mut b.g, c);
                // SAFETY: key rows of head `h` in this segment belong to this call alone.
                let dst = unsafe { gr.dv.slice(self.row_off(self.krow0, r.ka + j, dv), dv) };
                E::from_acc_slice(&b.g, dst);
            }
            mm(
                level, nb, dv, &sg.vb, dv, 1, bdst, bdstps, d, &mut b.blk, dp, false,
            );
            for t in 0..nb {
                b.dkc[(j0 + t) * d..(j0 + t + 1) * d].copy_from_slice(&b.blk[t * dp..t * dp + d]);
            }
            b.g.clear();
            b.g.extend((j0..j0 + nb).map(|j| {
                let gate = sg.ohr[j] >= -one && sg.ohr[j] <= one;
                if gate {
                    z.cscale * b.e[j]
                } else {
                    E::Acc::ZERO
                }
            }));
            axpy_rows_eps(level, &mut p2, &b.g, kc, eps);
            b.g.iter_mut()
                .zip(&b.dc[j0..j0 + nb])
                .for_each(|(g, &dc)| *g *= dc);
            axpy_rows_eps(level, &mut p1, &b.g, kc, eps);
            let dino = &mut b.dino[j0..j0 + nb];
            E::Acc::dot_rows(level, kc, d, dwk, dino);
            dino.iter_mut()
                .zip(&b.o[j0..j0 + nb])
                .for_each(|(x, &o)| *x = -*x * o * o);
            axpy_rows_eps(level, &mut dsq, dino, kc, eps);
        }
        (s_cdc, [dsq, p1, p2])
    }

    /// Query rows: `dq` (written); returns this segment's `dsk`.
    fn grad_q2(
        &self,
        r: Rows,
        sg: &mut Seg<E::Acc>,
        gr: &Grads<'_, E>,
        z: &Sums<'_, E::Acc>,
        dwq: &[E::Acc],
        dsq: &[E::Acc],
    ) -> Vec<E::Acc> {
        let (level, d, eps) = (self.level, self.d, self.eps);
        let nrows = r.qb - r.qa;
        let b = &mut sg.b;
        let mut dini = vec![E::Acc::ZERO; nrows];
        E::Acc::dot_rows(level, &sg.qs, d, dwq, &mut dini);
        for (i, x) in dini.iter_mut().enumerate() {
            let ii = sg.inv[i];
            *x = -(b.a[i] * b.daqq[i] + *x) * ii * ii;
        }
        let mut dsk = vec![E::Acc::ZERO; d];
        axpy_rows_eps(level, &mut dsk, &dini, &sg.qs, eps);
        fit(&mut b.g, d);
        #[allow(clippy::needless_range_loop)] // i indexes five per-row arrays
        for i in 0..nrows {
            let ii = sg.inv[i];
            let terms = [
                (b.a[i] * ii, &b.daq[i * d..(i + 1) * d]),
                (b.dih[i], z.nwk),
                (ii, dwq),
                (dini[i], z.nk),
            ];
            E::Acc::sigmoid_grad(level, &mut b.g, &sg.qs[i * d..(i + 1) * d], &terms, dsq);
            // SAFETY: query rows of head `h` in this segment belong to this call alone.
            let dst = unsafe { gr.dq.slice(self.row_off(self.qrow0, r.qa + i, d), d) };
            E::from_acc_slice(&b.g, dst);
        }
        dsk
    }

    /// Key rows: `dk` (written).
    #[allow(clippy::too_many_arguments)]
    fn grad_k2(
        &self,
        r: Rows,
        sg: &mut Seg<E::Acc>,
        gr: &Grads<'_, E>,
        z: &Sums<'_, E::Acc>,
        scm: E::Acc,
        dwk: &[E::Acc],
        dsk: &[E::Acc],
    ) {
        let (level, d) = (self.level, self.d);
        let one = E::Acc::ONE;
        let b = &mut sg.b;
        fit(&mut b.g, d);
        for j in 0..r.kb - r.ka {
            let gate = sg.ohr[j] >= -one && sg.ohr[j] <= one;
            let dohr = if gate {
                z.cscale * b.e[j] * (b.dc[j] - scm)
            } else {
                E::Acc::ZERO
            };
            let terms = [
                (one, &b.dkc[j * d..(j + 1) * d]),
                (dohr, z.nwq),
                (b.o[j], dwk),
                (b.dino[j], z.nq),
            ];
            E::Acc::sigmoid_grad(level, &mut b.g, &sg.ks[j * d..(j + 1) * d], &terms, dsk);
            // SAFETY: key rows of head `h` in this segment belong to this call alone.
            let dst = unsafe { gr.dk.slice(self.row_off(self.krow0, r.ka + j, d), d) };
            E::from_acc_slice(&b.g, dst);
        }
    }
}

/// One head's backward: the forward's reductions, then the four gradient passes.
fn run_head<E: Element>(hd: &Head<'_, E>, gr: &Grads<'_, E>, segs: &impl Segments<E::Acc>) {
    let (eps, d, dv, n, m) = (hd.eps, hd.d, hd.dv, hd.n, hd.m);
    let vp = round_up_nr(dv);
    let (sq, sk): (Vec<_>, Vec<_>) = segs.each(&|r, sg| hd.sums(r, sg)).into_iter().unzip();
    let ((nq, snq), (nk, snk)) = (shifted(add_all(sq), eps), shifted(add_all(sk), eps));
    let (wq, wk): (Vec<_>, Vec<_>) = segs
        .each(&|_, sg| {
            let w = hd.flows(sg, (&nk, snk), (&nq, snq));
            sg.b.o.clone_from(&sg.t);
            w
        })
        .into_iter()
        .unzip();
    let ((nwq, swq), (nwk, swk)) = (shifted(add_all(wq), eps), shifted(add_all(wk), eps));
    let (ss, totals): (Vec<_>, Vec<_>) = segs
        .each(&|r, sg| {
            let st = hd.state(r, sg, (&nwq, swq));
            sg.b.e.clone_from(&sg.t);
            st
        })
        .into_iter()
        .unzip();
    let total = totals.into_iter().fold(E::Acc::ZERO, |a, b| a + b);
    let mf = E::Acc::from_f64(m as f64);
    // the state with the competition's normalisation: S = Σ φ(k_j) (c_j v_j)ᵀ
    let mut s = add_all(ss);
    s.iter_mut().for_each(|x| *x *= mf / total);
    let z = Sums {
        nq: &nq,
        nk: &nk,
        nwq: &nwq,
        nwk: &nwk,
        swk,
        ratio: E::Acc::from_f64(n as f64 / m as f64),
        cscale: mf / total,
    };
    let mut bst = Vec::new();
    let bstps = pack_t(&s, vp, d, dv, &mut bst);
    let (dss, dwks): (Vec<_>, Vec<_>) = segs
        .each(&|r, sg| hd.grad_q1(r, sg, gr, &z, (&bst, bstps)))
        .into_iter()
        .unzip();
    let (ds, dwk) = (add_all(dss), add_all(dwks));
    let (mut bds, mut bdst) = (Vec::new(), Vec::new());
    let bdsps = pack_n(&ds, vp, d, dv, &mut bds);
    let bdstps = pack_t(&ds, vp, d, dv, &mut bdst);
    let parts = segs.each(&|r, sg| hd.grad_k1(r, sg, gr, &z, &dwk, (&bds, bdsps), (&bdst, bdstps)));
    let s_cdc = parts.iter().fold(E::Acc::ZERO, |a, p| a + p.0);
    let [mut dsq, mut p1, mut p2] = [Vec::new(), Vec::new(), Vec::new()];
    for (_, [a, b, c]) in parts {
        for (acc, x) in [(&mut dsq, a), (&mut p1, b), (&mut p2, c)] {
            if acc.is_empty() {
                *acc = x;
            } else {
                acc.iter_mut().zip(&x).for_each(|(u, &w)| *u += w);
            }
        }
    }
    let scm = s_cdc / mf;
    let dwq: Vec<_> = p1.iter().zip(&p2).map(|(&a, &b)| a - scm * b).collect();
    let dsk = add_all(segs.each(&|r, sg| hd.grad_q2(r, sg, gr, &z, &dwq, &dsq)));
    segs.each(&|r, sg| hd.grad_k2(r, sg, gr, &z, scm, &dwk, &dsk));
}

impl<E: Element> HeadJob<E> for Grads<'_, E> {
    fn run(&self, hd: &Head<'_, E>, segs: &impl Segments<E::Acc>) {
        run_head(hd, self, segs);
    }
}

/// The backward over every (batch, head); `q_len` and `kv_len` must be positive.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<E: Element>(
    level: Level,
    dims: &FlowDims,
    eps: E::Acc,
    q: &[E],
    k: &[E],
    v: &[E],
    dout: &[E],
    dq: &mut [E],
    dk: &mut [E],
    dv: &mut [E],
) {
    let gr = Grads {
        dout,
        dq: SharedMut(dq.as_mut_ptr()),
        dk: SharedMut(dk.as_mut_ptr()),
        dv: SharedMut(dv.as_mut_ptr()),
    };
    each_head(level, dims, eps, (q, k, v), &gr);
}
