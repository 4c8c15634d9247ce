//! Flow-Attention (Flowformer, docs/flow.md), forward and backward.
//!
//! Per head, `φ = sigmoid`: a per-row scalar preparation (flows `I`, `O`, conserved
//! `Ih`, `Oh`, allocation `A`, competition `C`, all from sums over the sequence, or prefix
//! sums when causal: O(T·D)), then one linear-attention pass with queries `A_i I_i φ(q_i)`,
//! keys `φ(k_j)` and values `C_j v_j` on the chunked core of [`crate::linear`] (causal:
//! a streaming `D×Dv` state, never the `[T, D, Dv]` cumsum of the original).
//!
//! The backward runs the core's backward, then the hand-derived chain through the scalars
//! in one reverse pass (causal) or two passes (non-causal), carrying `D`-vectors of
//! reverse prefix sums.

use crate::buffer_pool::{take, PoolVec};
use crate::element::{Acc, Element};
use crate::error::{check_len, KernelError};
use crate::linear::core::{axpy, vdot, Core, Ws};
use crate::linear::{gather, scatter, SharedMut, SEGMENT};
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::{self, Level};
use rayon::prelude::*;

mod full;
mod full_bwd;

/// Shapes: q `[batch, q_len, heads, head_dim]`, k `[batch, kv_len, heads, head_dim]`,
/// v `[batch, kv_len, heads, v_head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct FlowDims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

/// Per-worker buffers, pooled across calls (fresh multi-megabyte buffers page-fault).
struct Scratch<A: Acc> {
    ws: Ws<A>,
    qs: PoolVec<A>,
    ks: PoolVec<A>,
    v: PoolVec<A>,
    aq: PoolVec<A>,
    vc: PoolVec<A>,
    out: PoolVec<A>,
    i: PoolVec<A>,
    o: PoolVec<A>,
    a: PoolVec<A>,
    c: PoolVec<A>,
    ohr: PoolVec<A>,
    e: PoolVec<A>,
    z: PoolVec<A>,
    sk: PoolVec<A>,
    sq: PoolVec<A>,
    wk: PoolVec<A>,
    wq: PoolVec<A>,
    nk: PoolVec<A>,
    nq: PoolVec<A>,
    nwk: PoolVec<A>,
    nwq: PoolVec<A>,
    g: PoolVec<A>,
    daq: PoolVec<A>,
    dks: PoolVec<A>,
    dvc: PoolVec<A>,
    dqs: PoolVec<A>,
}

impl<A: Acc> Scratch<A> {
    fn new(rows: usize, d: usize, dv: usize) -> Self {
        let (nd, nv) = (rows * d, rows * dv);
        Scratch {
            ws: Ws::default(),
            qs: take(nd),
            ks: take(nd),
            v: take(nv),
            aq: take(nd),
            vc: take(nv),
            out: take(nv),
            i: take(rows),
            o: take(rows),
            a: take(rows),
            c: take(rows),
            ohr: take(rows),
            e: take(rows),
            z: take(rows),
            sk: take(nd),
            sq: take(nd),
            wk: take(nd),
            wq: take(nd),
            nk: take(d),
            nq: take(d),
            nwk: take(d),
            nwq: take(d),
            g: take(nv),
            daq: take(nd),
            dks: take(nd),
            dvc: take(nv),
            dqs: take(nd),
        }
    }
}

#[inline]
fn sigmoid<A: Acc>(x: A) -> A {
    A::ONE / (A::ONE + (-x).exp())
}

fn sum<A: Acc>(x: &[A]) -> A {
    x.iter().fold(A::ZERO, |s, &v| s + v)
}

/// `Σ_d (x_d + eps)(y'_d)` for an already shifted `y' = y + eps` with `sy = Σ y'`.
#[inline]
fn dot_eps<A: Acc>(level: Level, x: &[A], y1: &[A], sy: A, eps: A) -> A {
    vdot(level, x, y1) + eps * sy
}

fn zeros<A: Acc>(v: &mut Vec<A>, n: usize) {
    v.clear();
    v.resize(n, A::ZERO);
}

fn clamp1<A: Acc>(x: A) -> A {
    let one = A::ONE;
    if x > one {
        one
    } else if x < -one {
        -one
    } else {
        x
    }
}

/// Running sums of the causal scalars after the rows seen so far (kept shifted by eps,
/// with their element sums).
struct CausalRun<A> {
    sk: Vec<A>,
    sq: Vec<A>,
    wk: Vec<A>,
    wq: Vec<A>,
    ssk: A,
    ssq: A,
    swk: A,
    swq: A,
    zsum: A,
    rows: usize,
}

impl<A: Acc> CausalRun<A> {
    fn new(d: usize, eps: A) -> Self {
        let de = A::from_f64(d as f64) * eps;
        CausalRun {
            sk: vec![eps; d],
            sq: vec![eps; d],
            wk: vec![eps; d],
            wq: vec![eps; d],
            ssk: de,
            ssq: de,
            swk: de,
            swq: de,
            zsum: A::ZERO,
            rows: 0,
        }
    }
}

impl<A: Acc> Scratch<A> {
    /// Non-causal scalars; fills `aq` and `vc` (the core's queries and values). The sums
    /// kept for the backward (`nk`, `nq`, `nwk`, `nwq`) are shifted by `eps`.
    fn prep_full(&mut self, level: Level, n: usize, m: usize, d: usize, dv: usize, eps: A) {
        zeros(&mut self.nk, d);
        zeros(&mut self.nq, d);
        let ones_m = vec![A::ONE; m];
        let ones_n = vec![A::ONE; n];
        A::axpy_rows(level, &mut self.nk, &ones_m, &self.ks, d);
        A::axpy_rows(level, &mut self.nq, &ones_n, &self.qs, d);
        self.nk.iter_mut().for_each(|x| *x += eps);
        self.nq.iter_mut().for_each(|x| *x += eps);
        let (snk, snq) = (sum(&self.nk), sum(&self.nq));
        zeros(&mut self.i, n);
        zeros(&mut self.o, m);
        A::dot_rows(level, &self.qs, d, &self.nk, &mut self.i);
        A::dot_rows(level, &self.ks, d, &self.nq, &mut self.o);
        self.i
            .iter_mut()
            .for_each(|x| *x = A::ONE / (*x + eps * snk));
        self.o
            .iter_mut()
            .for_each(|x| *x = A::ONE / (*x + eps * snq));
        zeros(&mut self.nwk, d);
        zeros(&mut self.nwq, d);
        A::axpy_rows(level, &mut self.nwk, &self.o, &self.ks, d);
        A::axpy_rows(level, &mut self.nwq, &self.i, &self.qs, d);
        self.nwk.iter_mut().for_each(|x| *x += eps);
        self.nwq.iter_mut().for_each(|x| *x += eps);
        let (swk, swq) = (sum(&self.nwk), sum(&self.nwq));
        let ratio = A::from_f64(n as f64 / m as f64);
        zeros(&mut self.a, n);
        A::dot_rows(level, &self.qs, d, &self.nwk, &mut self.a);
        zeros(&mut self.aq, n * d);
        for i in 0..n {
            self.a[i] = sigmoid((self.a[i] + eps * swk) * ratio);
            let f = self.a[i] * self.i[i];
            for (x, &y) in self.aq[i * d..(i + 1) * d]
                .iter_mut()
                .zip(&self.qs[i * d..(i + 1) * d])
            {
                *x = f * y;
            }
        }
        zeros(&mut self.ohr, m);
        A::dot_rows(level, &self.ks, d, &self.nwq, &mut self.ohr);
        zeros(&mut self.e, m);
        zeros(&mut self.c, m);
        let mut mx = A::NEG_INFINITY;
        for j in 0..m {
            self.ohr[j] += eps * swq;
            mx = mx.max(clamp1(self.ohr[j]));
        }
        let mut total = A::ZERO;
        for j in 0..m {
            self.e[j] = (clamp1(self.ohr[j]) - mx).exp();
            total += self.e[j];
        }
        let mf = A::from_f64(m as f64);
        zeros(&mut self.vc, m * dv);
        for j in 0..m {
            self.c[j] = mf * self.e[j] / total;
            let c = self.c[j];
            for (x, &y) in self.vc[j * dv..(j + 1) * dv]
                .iter_mut()
                .zip(&self.v[j * dv..(j + 1) * dv])
            {
                *x = c * y;
            }
        }
    }

    /// Causal scalars (prefix sums, 1-based positions) of `n` rows that follow the rows
    /// already folded into `run` (the running sums carry over, so a sequence can stream
    /// through in segments); with `keep`, stores the prefix vectors for the backward.
    #[allow(clippy::too_many_arguments)]
    fn prep_causal(
        &mut self,
        level: Level,
        run: &mut CausalRun<A>,
        n: usize,
        d: usize,
        dv: usize,
        eps: A,
        keep: bool,
    ) {
        let CausalRun {
            sk,
            sq,
            wk,
            wq,
            ssk,
            ssq,
            swk,
            swq,
            zsum,
            rows,
        } = run;
        let (sk, sq, wk, wq) = (&mut sk[..], &mut sq[..], &mut wk[..], &mut wq[..]);
        for buf in [&mut self.i, &mut self.o, &mut self.a, &mut self.c] {
            zeros(buf, n);
        }
        for buf in [&mut self.ohr, &mut self.e, &mut self.z] {
            zeros(buf, n);
        }
        if keep {
            for buf in [&mut self.sk, &mut self.sq, &mut self.wk, &mut self.wq] {
                zeros(buf, n * d);
            }
        }
        zeros(&mut self.aq, n * d);
        zeros(&mut self.vc, n * dv);
        for t in 0..n {
            let tt = A::from_f64((*rows + t + 1) as f64);
            let qt = &self.qs[t * d..(t + 1) * d];
            let kt = &self.ks[t * d..(t + 1) * d];
            let (rq, rk) = (sum(qt), sum(kt));
            axpy(sk, A::ONE, kt);
            axpy(sq, A::ONE, qt);
            *ssk += rk;
            *ssq += rq;
            let it = A::ONE / dot_eps(level, qt, sk, *ssk, eps);
            let ot = A::ONE / dot_eps(level, kt, sq, *ssq, eps);
            axpy(wk, tt * ot, kt);
            axpy(wq, tt * it, qt);
            *swk += tt * ot * rk;
            *swq += tt * it * rq;
            let ih = dot_eps(level, qt, wk, *swk, eps) / tt;
            let ohr = dot_eps(level, kt, wq, *swq, eps) / tt;
            let at = sigmoid(ih);
            let et = clamp1(ohr).exp();
            *zsum += et;
            let ct = tt * et / *zsum;
            self.i[t] = it;
            self.o[t] = ot;
            self.a[t] = at;
            self.c[t] = ct;
            self.ohr[t] = ohr;
            self.e[t] = et;
            self.z[t] = *zsum;
            if keep {
                self.sk[t * d..(t + 1) * d].copy_from_slice(sk);
                self.sq[t * d..(t + 1) * d].copy_from_slice(sq);
                self.wk[t * d..(t + 1) * d].copy_from_slice(wk);
                self.wq[t * d..(t + 1) * d].copy_from_slice(wq);
            }
            let f = at * it;
            for (x, &y) in self.aq[t * d..(t + 1) * d].iter_mut().zip(qt) {
                *x = f * y;
            }
            for (x, &y) in self.vc[t * dv..(t + 1) * dv]
                .iter_mut()
                .zip(&self.v[t * dv..(t + 1) * dv])
            {
                *x = ct * y;
            }
        }
        *rows += n;
    }

    /// Chain rule through the non-causal scalars: `daq`, `dks` (core part, completed here),
    /// `dvc` (turned into dv) → `dqs`, `dks`.
    #[allow(clippy::needless_range_loop)] // rows index several per-row arrays at once
    fn chain_full(&mut self, level: Level, n: usize, m: usize, d: usize, dv: usize, eps: A) {
        let mf = A::from_f64(m as f64);
        let ratio = A::from_f64(n as f64 / m as f64);
        // competition
        let mut dc = vec![A::ZERO; m];
        let mut s_cdc = A::ZERO;
        for j in 0..m {
            let g = &mut self.dvc[j * dv..(j + 1) * dv];
            dc[j] = vdot(level, g, &self.v[j * dv..(j + 1) * dv]);
            g.iter_mut().for_each(|x| *x *= self.c[j]);
            s_cdc += self.c[j] * dc[j];
        }
        let one = A::ONE;
        let mut dwq = vec![A::ZERO; d];
        let mut dohr = vec![A::ZERO; m];
        for j in 0..m {
            let doh = self.c[j] * (dc[j] - s_cdc / mf);
            let r = self.ohr[j];
            dohr[j] = if r >= -one && r <= one { doh } else { A::ZERO };
            for (x, &k) in dwq.iter_mut().zip(&self.ks[j * d..(j + 1) * d]) {
                *x += dohr[j] * (k + eps);
            }
        }
        // allocation
        let mut dih = vec![A::ZERO; n];
        let mut daqq = vec![A::ZERO; n];
        let mut dwk = vec![A::ZERO; d];
        for i in 0..n {
            let qi = &self.qs[i * d..(i + 1) * d];
            daqq[i] = vdot(level, &self.daq[i * d..(i + 1) * d], qi);
            let da = self.i[i] * daqq[i];
            dih[i] = da * self.a[i] * (one - self.a[i]) * ratio;
            for (x, &q) in dwk.iter_mut().zip(qi) {
                *x += dih[i] * (q + eps);
            }
        }
        let mut dsk = vec![A::ZERO; d];
        let mut dsq = vec![A::ZERO; d];
        let mut dino = vec![A::ZERO; m];
        for j in 0..m {
            let kj = &self.ks[j * d..(j + 1) * d];
            let dox = vdot(level, &dwk, kj);
            dino[j] = -dox * self.o[j] * self.o[j];
            for (x, &k) in dsq.iter_mut().zip(kj) {
                *x += dino[j] * (k + eps);
            }
        }
        let mut dini = vec![A::ZERO; n];
        for i in 0..n {
            let qi = &self.qs[i * d..(i + 1) * d];
            let di = self.a[i] * daqq[i] + vdot(level, &dwq, qi);
            dini[i] = -di * self.i[i] * self.i[i];
            for (x, &q) in dsk.iter_mut().zip(qi) {
                *x += dini[i] * (q + eps);
            }
        }
        zeros(&mut self.dqs, n * d);
        for i in 0..n {
            let ai = self.a[i] * self.i[i];
            for c in 0..d {
                let x = ai * self.daq[i * d + c]
                    + dih[i] * self.nwk[c]
                    + self.i[i] * dwq[c]
                    + dini[i] * self.nk[c]
                    + dsq[c];
                let s = self.qs[i * d + c];
                self.dqs[i * d + c] = x * s * (one - s);
            }
        }
        for j in 0..m {
            for c in 0..d {
                let x = self.dks[j * d + c]
                    + dohr[j] * self.nwq[c]
                    + self.o[j] * dwk[c]
                    + dino[j] * self.nq[c]
                    + dsk[c];
                let s = self.ks[j * d + c];
                self.dks[j * d + c] = x * s * (one - s);
            }
        }
    }

    /// Chain rule through the causal scalars, one reverse pass.
    fn chain_causal(&mut self, level: Level, n: usize, d: usize, dv: usize, eps: A) {
        let one = A::ONE;
        let mut gwq = vec![A::ZERO; d];
        let mut gwk = vec![A::ZERO; d];
        let mut gsk = vec![A::ZERO; d];
        let mut gsq = vec![A::ZERO; d];
        let mut acc_z = A::ZERO;
        zeros(&mut self.dqs, n * d);
        for t in (0..n).rev() {
            let tt = A::from_f64((t + 1) as f64);
            let (it, ot, at, ct) = (self.i[t], self.o[t], self.a[t], self.c[t]);
            let g = &mut self.dvc[t * dv..(t + 1) * dv];
            let dct = vdot(level, g, &self.v[t * dv..(t + 1) * dv]);
            g.iter_mut().for_each(|x| *x *= ct);
            acc_z += -dct * ct / self.z[t];
            let de = dct * tt / self.z[t] + acc_z;
            let doh = de * self.e[t];
            let r = self.ohr[t];
            let dohr = if r >= -one && r <= one { doh } else { A::ZERO };
            let qt = &self.qs[t * d..(t + 1) * d];
            let kt = &self.ks[t * d..(t + 1) * d];
            for (x, &k) in gwq.iter_mut().zip(kt) {
                *x += dohr / tt * (k + eps);
            }
            let daqq = vdot(level, &self.daq[t * d..(t + 1) * d], qt);
            let dih = it * daqq * at * (one - at);
            for (x, &q) in gwk.iter_mut().zip(qt) {
                *x += dih / tt * (q + eps);
            }
            let di = at * daqq + tt * vdot(level, &gwq, qt);
            let dox = tt * vdot(level, &gwk, kt);
            let dini = -di * it * it;
            let dino = -dox * ot * ot;
            for (x, &q) in gsk.iter_mut().zip(qt) {
                *x += dini * (q + eps);
            }
            for (x, &k) in gsq.iter_mut().zip(kt) {
                *x += dino * (k + eps);
            }
            for c in 0..d {
                let i = t * d + c;
                let xq = at * it * self.daq[i]
                    + dih / tt * self.wk[i]
                    + tt * it * gwq[c]
                    + dini * self.sk[i]
                    + gsq[c];
                let xk = self.dks[i]
                    + dohr / tt * self.wq[i]
                    + tt * ot * gwk[c]
                    + dino * self.sq[i]
                    + gsk[c];
                let (sq, sk) = (self.qs[i], self.ks[i]);
                self.dqs[i] = xq * sq * (one - sq);
                self.dks[i] = xk * sk * (one - sk);
            }
        }
    }
}

fn check(d: &FlowDims, causal: bool) -> Result<(), KernelError> {
    // As the Python layer: the chunked core assumes at least one column.
    if d.head_dim == 0 || d.v_head_dim == 0 {
        return Err(KernelError::Argument(format!(
            "head_dim ({}) and v_head_dim ({}) must be positive",
            d.head_dim, d.v_head_dim
        )));
    }
    if causal && d.q_len != d.kv_len {
        return Err(KernelError::Argument(format!(
            "causal flow attention needs q_len == kv_len, got {} and {}",
            d.q_len, d.kv_len
        )));
    }
    Ok(())
}

/// Forward: `out` is `[batch, q_len, heads, v_head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Element>(
    d: &FlowDims,
    causal: bool,
    eps: f64,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
) -> Result<(), KernelError> {
    let (h, dk, dv, n, m) = (d.heads, d.head_dim, d.v_head_dim, d.q_len, d.kv_len);
    check(d, causal)?;
    check_len("q", q, d.batch * n * h * dk)?;
    check_len("k", k, d.batch * m * h * dk)?;
    check_len("v", v, d.batch * m * h * dv)?;
    check_len("out", out, d.batch * n * h * dv)?;
    // A fresh output (every call from Python) faults in 4 KiB at a time otherwise.
    crate::pages::prefer_huge(out);
    let level = simd::active();
    let e = E::Acc::from_f64(eps);
    if !causal && n > 0 && m > 0 {
        full::forward(level, d, e, q, k, v, out);
        return Ok(());
    }
    if !causal {
        // no queries, or no keys: nothing flows, the output is zero
        out.fill(E::from_acc(E::Acc::ZERO));
        return Ok(());
    }
    // Causal: the sequence streams through in segments small enough to stay in cache,
    // carrying the running sums of the scalars and the `D×Dv` state.
    let outp = SharedMut(out.as_mut_ptr());
    let seg_rows = n.min(SEGMENT);
    let per: PerThread<Scratch<E::Acc>> = PerThread::new();
    (0..d.batch * h).into_par_iter().for_each(|task| {
        let (b, hh) = (task / h, task % h);
        per.with(
            || Scratch::new(seg_rows, dk, dv),
            |sc| {
                let mut run = CausalRun::new(dk, e);
                let mut state = vec![E::Acc::ZERO; dk * dv];
                let mut next = vec![E::Acc::ZERO; dk * dv];
                for start in (0..n).step_by(SEGMENT) {
                    let sl = SEGMENT.min(n - start);
                    gather(q, b * n + start, sl, h, hh, dk, &mut sc.qs);
                    E::Acc::sigmoid(level, &mut sc.qs);
                    gather(k, b * n + start, sl, h, hh, dk, &mut sc.ks);
                    E::Acc::sigmoid(level, &mut sc.ks);
                    gather(v, b * n + start, sl, h, hh, dv, &mut sc.v);
                    sc.prep_causal(level, &mut run, sl, dk, dv, e, false);
                    zeros(&mut sc.out, sl * dv);
                    let core = Core {
                        lq: sl,
                        lk: sl,
                        k: dk,
                        v: dv,
                        causal: true,
                        normalize: false,
                    };
                    core.forward(
                        level,
                        &sc.aq,
                        &sc.ks,
                        &sc.vc,
                        (start > 0).then_some(&state[..]),
                        None,
                        &mut sc.out,
                        &mut next,
                        &mut [],
                        &mut sc.ws,
                    );
                    std::mem::swap(&mut state, &mut next);
                    // SAFETY: task (b, hh) owns its rows of head hh.
                    unsafe { scatter::<E>(&sc.out, b * n + start, sl, h, hh, dv, outp) };
                }
            },
        );
    });
    Ok(())
}

/// Backward: gradients `dq`, `dk`, `dv` of [`forward`] given `dout`.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element>(
    d: &FlowDims,
    causal: bool,
    eps: f64,
    q: &[E],
    k: &[E],
    v: &[E],
    dout: &[E],
    dq: &mut [E],
    dk_out: &mut [E],
    dv_out: &mut [E],
) -> Result<(), KernelError> {
    let (h, dk, dv, n, m) = (d.heads, d.head_dim, d.v_head_dim, d.q_len, d.kv_len);
    check(d, causal)?;
    check_len("q", q, d.batch * n * h * dk)?;
    check_len("k", k, d.batch * m * h * dk)?;
    check_len("v", v, d.batch * m * h * dv)?;
    check_len("dout", dout, d.batch * n * h * dv)?;
    check_len("dq", dq, d.batch * n * h * dk)?;
    check_len("dk", dk_out, d.batch * m * h * dk)?;
    check_len("dv", dv_out, d.batch * m * h * dv)?;
    for g in [&mut *dq, &mut *dk_out, &mut *dv_out] {
        crate::pages::prefer_huge(g);
    }
    let level = simd::active();
    let (dqp, dkp, dvp) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk_out.as_mut_ptr()),
        SharedMut(dv_out.as_mut_ptr()),
    );
    let e = E::Acc::from_f64(eps);
    if !causal && n > 0 && m > 0 {
        full_bwd::backward(level, d, e, q, k, v, dout, dq, dk_out, dv_out);
        return Ok(());
    }
    let per: PerThread<Scratch<E::Acc>> = PerThread::new();
    (0..d.batch * h).into_par_iter().for_each(|task| {
        let (b, hh) = (task / h, task % h);
        per.with(
            || Scratch::new(n.max(m), dk, dv),
            |sc| {
                gather(q, b * n, n, h, hh, dk, &mut sc.qs);
                E::Acc::sigmoid(level, &mut sc.qs);
                gather(k, b * m, m, h, hh, dk, &mut sc.ks);
                E::Acc::sigmoid(level, &mut sc.ks);
                gather(v, b * m, m, h, hh, dv, &mut sc.v);
                gather(dout, b * n, n, h, hh, dv, &mut sc.g);
                if causal {
                    sc.prep_causal(level, &mut CausalRun::new(dk, e), n, dk, dv, e, true);
                } else {
                    sc.prep_full(level, n, m, dk, dv, e);
                }
                zeros(&mut sc.daq, n * dk);
                zeros(&mut sc.dks, m * dk);
                zeros(&mut sc.dvc, m * dv);
                let core = Core {
                    lq: n,
                    lk: m,
                    k: dk,
                    v: dv,
                    causal,
                    normalize: false,
                };
                core.backward(
                    level,
                    &sc.aq,
                    &sc.ks,
                    &sc.vc,
                    None,
                    None,
                    &sc.g,
                    None,
                    None,
                    &mut sc.daq,
                    &mut sc.dks,
                    &mut sc.dvc,
                    &mut [],
                    &mut [],
                    &mut sc.ws,
                );
                if causal {
                    sc.chain_causal(level, n, dk, dv, e);
                } else {
                    sc.chain_full(level, n, m, dk, dv, e);
                }
                // SAFETY: task (b, hh) owns its rows of head hh.
                unsafe {
                    scatter::<E>(&sc.dqs, b * n, n, h, hh, dk, dqp);
                    scatter::<E>(&sc.dks, b * m, m, h, hh, dk, dkp);
                    scatter::<E>(&sc.dvc, b * m, m, h, hh, dv, dvp);
                }
            },
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests;
