//! Linear attention with flash-linear-attention semantics (docs/linear.md), forward and backward.
//!
//! Per sequence and head, with `φ` the feature map and `s` the scale:
//! `o_t = s φ(q_t) · (S0 + Σ_{j≤t} φ(k_j) v_jᵀ)`, and with `normalize` divided by
//! `s φ(q_t) · (z0 + Σ_{j≤t} φ(k_j)) + 1e-10`. Non-causal: the sums run over the whole
//! sequence (no initial state). States are `[N, H, K, V]` and `[N, 1, H, K]` in the
//! accumulation type. Sequences are the batch rows, or the `cu_seqlens` segments of one
//! packed row.
//!
//! The work runs on the chunked core in [`core`] (intra-chunk blocks and inter-chunk
//! `K×V` states on the packed GEMM), parallel over (sequence, head) — the forward over
//! (sequence, group of adjacent heads), see [`forward`].

pub mod core;
mod forward;
pub(crate) mod rows;

use crate::buffer_pool::{take, PoolVec};
use crate::element::{Acc, Element};
use crate::error::{check_len, KernelError};
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::{self, Level};
use rayon::prelude::*;

pub use self::core::{Core, Ws, CHUNK};
pub use self::forward::forward;
pub(crate) use self::rows::{fit, gather, gather_into, scatter};

/// Rows per streamed segment of the causal backward and flow forward (a multiple of
/// [`CHUNK`]); the causal forward streams `SEGMENT / g` rows of each of its `g` heads at a
/// time.
pub const SEGMENT: usize = 512;

/// Feature map applied to q and k inside the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureMap {
    Identity,
    /// `elu(x) + 1` (Katharopoulos et al.).
    Elu1,
    Relu,
}

impl FeatureMap {
    pub fn parse(s: &str) -> Option<FeatureMap> {
        match s {
            "identity" | "none" | "" => Some(FeatureMap::Identity),
            "elu1" | "elu+1" => Some(FeatureMap::Elu1),
            "relu" => Some(FeatureMap::Relu),
            _ => None,
        }
    }

    #[inline]
    pub fn apply<A: Acc>(self, x: A) -> A {
        match self {
            FeatureMap::Identity => x,
            FeatureMap::Elu1 => {
                if x > A::ZERO {
                    x + A::ONE
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => {
                if x > A::ZERO {
                    x
                } else {
                    A::ZERO
                }
            }
        }
    }

    /// Maps `x` in place to `φ(x)` (vector exp for elu+1); with `deriv`, also writes
    /// `φ'(x)` there, read off `φ(x)`: elu+1 → `min(φ, 1)`, relu → `[φ > 0]`, identity → 1.
    pub fn apply_rows<A: Acc>(
        self,
        level: Level,
        x: &mut [A],
        tmp: &mut Vec<A>,
        deriv: Option<&mut Vec<A>>,
    ) {
        match self {
            FeatureMap::Identity => {}
            FeatureMap::Relu => x.iter_mut().for_each(|v| {
                if *v < A::ZERO {
                    *v = A::ZERO
                }
            }),
            FeatureMap::Elu1 => {
                let c = A::from_f64(std::f64::consts::LOG2_E);
                tmp.clear();
                // exp(x) = 2^(x·log2 e), only used where x <= 0 (no overflow there)
                tmp.extend(x.iter().map(|&v| if v > A::ZERO { A::ZERO } else { v * c }));
                A::exp2_sub_sum(level, tmp, A::ZERO);
                for (v, &e) in x.iter_mut().zip(tmp.iter()) {
                    *v = if *v > A::ZERO { *v + A::ONE } else { e };
                }
            }
        }
        if let Some(d) = deriv {
            d.clear();
            d.extend(x.iter().map(|&f| match self {
                FeatureMap::Identity => A::ONE,
                FeatureMap::Relu => {
                    if f > A::ZERO {
                        A::ONE
                    } else {
                        A::ZERO
                    }
                }
                FeatureMap::Elu1 => {
                    if f > A::ONE {
                        A::ONE
                    } else {
                        f
                    }
                }
            }));
        }
    }

    /// Derivative at `x`.
    #[inline]
    pub fn deriv<A: Acc>(self, x: A) -> A {
        match self {
            FeatureMap::Identity => A::ONE,
            FeatureMap::Elu1 => {
                if x > A::ZERO {
                    A::ONE
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => {
                if x > A::ZERO {
                    A::ONE
                } else {
                    A::ZERO
                }
            }
        }
    }
}

/// Shapes: q/k `[batch, seq_len, heads, head_dim]`, v `[batch, seq_len, heads, v_head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct LinearDims {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

/// What the op computes.
#[derive(Debug, Clone, Copy)]
pub struct LinearOpts {
    pub scale: f64,
    pub causal: bool,
    pub normalize: bool,
    pub feature_map: FeatureMap,
}

/// A raw pointer tasks write disjoint rows through.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: each task writes only its own rows (distinct (sequence, head) pairs).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// `off..off + len` must be in bounds and written by no one else meanwhile.
    #[inline]
    pub(crate) unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// `(first row in the flattened [B·T] rows, length)` of every sequence.
pub fn sequences(
    batch: usize,
    seq_len: usize,
    cu_seqlens: Option<&[i64]>,
) -> Result<Vec<(usize, usize)>, KernelError> {
    match cu_seqlens {
        None => Ok((0..batch).map(|b| (b * seq_len, seq_len)).collect()),
        Some(cu) => {
            if batch != 1 {
                return Err(KernelError::Argument(format!(
                    "cu_seqlens needs batch size 1, got {batch}"
                )));
            }
            if cu.len() < 2 || cu[0] != 0 || *cu.last().unwrap() != seq_len as i64 {
                return Err(KernelError::Argument(format!(
                    "cu_seqlens must start at 0 and end at the sequence length {seq_len}"
                )));
            }
            let mut out = Vec::with_capacity(cu.len() - 1);
            for w in cu.windows(2) {
                if w[1] < w[0] {
                    return Err(KernelError::Argument(
                        "cu_seqlens must be non-decreasing".into(),
                    ));
                }
                out.push((w[0] as usize, (w[1] - w[0]) as usize));
            }
            Ok(out)
        }
    }
}

fn check_state<A>(name: &'static str, s: Option<&[A]>, n: usize) -> Result<(), KernelError> {
    match s {
        Some(s) => check_len(name, s, n),
        None => Ok(()),
    }
}

fn check_opt_out<A>(name: &'static str, s: &[A], n: usize) -> Result<(), KernelError> {
    if s.is_empty() {
        Ok(())
    } else {
        check_len(name, s, n)
    }
}

/// Per-worker buffers, pooled across calls (fresh multi-megabyte buffers page-fault).
struct Scratch<A: Acc> {
    ws: Ws<A>,
    aq: PoolVec<A>,
    kf: PoolVec<A>,
    v: PoolVec<A>,
    o: PoolVec<A>,
    g: PoolVec<A>,
    dk: PoolVec<A>,
    dv: PoolVec<A>,
    tmp: PoolVec<A>,
    qd: PoolVec<A>,
    kd: PoolVec<A>,
}

impl<A: Acc> Scratch<A> {
    /// `nk`/`nv`: the largest `len·K` / `len·V` a task needs.
    fn new(nk: usize, nv: usize) -> Self {
        Scratch {
            ws: Ws::default(),
            aq: take(nk),
            kf: take(nk),
            v: take(nv),
            o: take(nk.max(nv)),
            g: take(nv),
            dk: take(nk),
            dv: take(nv),
            tmp: take(nk),
            qd: take(nk),
            kd: take(nk),
        }
    }
}

/// The checks both directions share: lengths of q, k, v and of `o` (the output or its
/// gradient, named `o_name`), the sequences, the options and the initial states. Returns
/// the sequences.
#[allow(clippy::too_many_arguments)]
fn check_inputs<E, A>(
    d: &LinearDims,
    opts: &LinearOpts,
    cu_seqlens: Option<&[i64]>,
    q: &[E],
    k: &[E],
    v: &[E],
    o_name: &'static str,
    o: &[E],
    init_kv: Option<&[A]>,
    init_z: Option<&[A]>,
) -> Result<Vec<(usize, usize)>, KernelError> {
    let (h, kd, vd) = (d.heads, d.head_dim, d.v_head_dim);
    // As the Python layer: the chunked core assumes at least one column.
    if kd == 0 || vd == 0 {
        return Err(KernelError::Argument(format!(
            "head_dim ({kd}) and v_head_dim ({vd}) must be positive"
        )));
    }
    let rows = d.batch * d.seq_len;
    check_len("q", q, rows * h * kd)?;
    check_len("k", k, rows * h * kd)?;
    check_len("v", v, rows * h * vd)?;
    check_len(o_name, o, rows * h * vd)?;
    let seqs = sequences(d.batch, d.seq_len, cu_seqlens)?;
    if !opts.causal && (init_kv.is_some() || init_z.is_some()) {
        return Err(KernelError::Argument(
            "initial_state is only defined for causal linear attention".into(),
        ));
    }
    if !opts.scale.is_finite() {
        return Err(KernelError::Argument("scale must be finite".into()));
    }
    let n = seqs.len();
    check_state("initial_kv", init_kv, n * h * kd * vd)?;
    check_state("initial_z", init_z, n * h * kd)?;
    Ok(seqs)
}

/// Backward: gradients of [`forward`] given `dout` and, optionally, the gradients of the
/// final states. `d_init_kv`/`d_init_z` receive the initial states' gradients, or are
/// empty to skip.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element>(
    d: &LinearDims,
    opts: &LinearOpts,
    cu_seqlens: Option<&[i64]>,
    q: &[E],
    k: &[E],
    v: &[E],
    init_kv: Option<&[E::Acc]>,
    init_z: Option<&[E::Acc]>,
    dout: &[E],
    d_final_kv: Option<&[E::Acc]>,
    d_final_z: Option<&[E::Acc]>,
    dq: &mut [E],
    dk: &mut [E],
    dv: &mut [E],
    d_init_kv: &mut [E::Acc],
    d_init_z: &mut [E::Acc],
) -> Result<(), KernelError> {
    let (h, kd, vd) = (d.heads, d.head_dim, d.v_head_dim);
    let rows = d.batch * d.seq_len;
    let seqs = check_inputs(d, opts, cu_seqlens, q, k, v, "dout", dout, init_kv, init_z)?;
    check_len("dq", dq, rows * h * kd)?;
    check_len("dk", dk, rows * h * kd)?;
    check_len("dv", dv, rows * h * vd)?;
    let n = seqs.len();
    check_state("d_final_kv", d_final_kv, n * h * kd * vd)?;
    check_state("d_final_z", d_final_z, n * h * kd)?;
    check_opt_out("d_initial_kv", d_init_kv, n * h * kd * vd)?;
    check_opt_out("d_initial_z", d_init_z, n * h * kd)?;
    let level: Level = simd::active();
    // fresh gradient tensors fault page by page otherwise (see `crate::pages`)
    crate::pages::prefer_huge(dq);
    crate::pages::prefer_huge(dk);
    crate::pages::prefer_huge(dv);
    let (dqp, dkp, dvp) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    let (dskv, dsz) = (
        SharedMut(d_init_kv.as_mut_ptr()),
        SharedMut(d_init_z.as_mut_ptr()),
    );
    let (want_kv, want_z) = (!d_init_kv.is_empty(), !d_init_z.is_empty());
    let scale = E::Acc::from_f64(opts.scale);
    let fm = opts.feature_map;
    let maxlen = seqs.iter().map(|s| s.1).max().unwrap_or(0);
    // Long causal sequences run backward segment by segment (see `backward_segmented`).
    let rows_max = if opts.causal {
        maxlen.min(SEGMENT)
    } else {
        maxlen
    };
    let per: PerThread<Scratch<E::Acc>> = PerThread::new();
    (0..n * h).into_par_iter().for_each(|task| {
        let (si, hh) = (task / h, task % h);
        let (row0, len) = seqs[si];
        per.with(
            || Scratch::new(rows_max * kd, rows_max * vd),
            |sc| {
                let states = Opt4 {
                    s0: init_kv.map(|s| &s[task * kd * vd..(task + 1) * kd * vd]),
                    z0: init_z.map(|s| &s[task * kd..(task + 1) * kd]),
                    gs: d_final_kv.map(|s| &s[task * kd * vd..(task + 1) * kd * vd]),
                    gz: d_final_z.map(|s| &s[task * kd..(task + 1) * kd]),
                };
                if opts.causal && len > SEGMENT {
                    let io = SegIo {
                        q,
                        k,
                        v,
                        dout,
                        heads: h,
                        h: hh,
                        kd,
                        vd,
                        row0,
                        len,
                    };
                    let (gs, gz) =
                        backward_segmented(level, opts, &io, &states, sc, (dqp, dkp, dvp));
                    // SAFETY: task `task` owns state slot `task`.
                    unsafe {
                        if want_kv {
                            dskv.slice(task * kd * vd, kd * vd).copy_from_slice(&gs);
                        }
                        if want_z {
                            dsz.slice(task * kd, kd).copy_from_slice(&gz);
                        }
                    }
                    return;
                }
                gather(q, row0, len, h, hh, kd, &mut sc.aq);
                gather(k, row0, len, h, hh, kd, &mut sc.kf);
                gather(v, row0, len, h, hh, vd, &mut sc.v);
                fm.apply_rows(level, &mut sc.aq, &mut sc.tmp, Some(&mut sc.qd));
                fm.apply_rows(level, &mut sc.kf, &mut sc.tmp, Some(&mut sc.kd));
                sc.aq.iter_mut().for_each(|x| *x *= scale);
                gather(dout, row0, len, h, hh, vd, &mut sc.g);
                let zero = <E::Acc as Acc>::ZERO;
                sc.o.clear();
                sc.o.resize(len * kd, zero);
                sc.dk.clear();
                sc.dk.resize(len * kd, zero);
                sc.dv.clear();
                sc.dv.resize(len * vd, zero);
                let core = Core {
                    lq: len,
                    lk: len,
                    k: kd,
                    v: vd,
                    causal: opts.causal,
                    normalize: opts.normalize,
                };
                let Opt4 { s0, z0, gs, gz } = states;
                // SAFETY: task `task` owns state slot `task` and rows (row0.., head hh).
                let (ds0, dz0) = unsafe {
                    (
                        if want_kv {
                            dskv.slice(task * kd * vd, kd * vd)
                        } else {
                            &mut [][..]
                        },
                        if want_z {
                            dsz.slice(task * kd, kd)
                        } else {
                            &mut [][..]
                        },
                    )
                };
                core.backward(
                    level, &sc.aq, &sc.kf, &sc.v, s0, z0, &sc.g, gs, gz, &mut sc.o, &mut sc.dk,
                    &mut sc.dv, ds0, dz0, &mut sc.ws,
                );
                // Chain through the scale and feature map.
                for ((g, &d), (gk, &dk)) in
                    sc.o.iter_mut()
                        .zip(sc.qd.iter())
                        .zip(sc.dk.iter_mut().zip(sc.kd.iter()))
                {
                    *g = *g * scale * d;
                    *gk *= dk;
                }
                unsafe {
                    scatter::<E>(&sc.o, row0, len, h, hh, kd, dqp);
                    scatter::<E>(&sc.dk, row0, len, h, hh, kd, dkp);
                    scatter::<E>(&sc.dv, row0, len, h, hh, vd, dvp);
                }
            },
        );
    });
    Ok(())
}

/// One causal step from a state (a decode step): `S' = S + φ(k) vᵀ`, `z' = z + φ(k)`,
/// `o = s φ(q) S'` (divided by `s φ(q)·z' + 1e-10` when normalising), without the chunked
/// core's packing and copies. The output is `a·S + (a·φ(k)) v` with `a = s φ(q)`: one
/// vector-matrix product over `S`, so `S'` is only formed when the caller asks for it.
#[allow(clippy::type_complexity)]
fn decode_step<E: Element>(
    level: Level,
    opts: &LinearOpts,
    (q, k, v): (&[E], &[E], &[E]),
    (s0, z0): (Option<&[E::Acc]>, Option<&[E::Acc]>),
    out: &mut [E],
    (s_fin, z_fin): (&mut [E::Acc], &mut [E::Acc]),
    sc: &mut Scratch<E::Acc>,
) {
    let zero = <E::Acc as Acc>::ZERO;
    let (kd, vd) = (q.len(), v.len());
    for (buf, x) in [(&mut sc.aq, q), (&mut sc.kf, k)] {
        buf.clear();
        buf.resize(kd, zero);
        E::to_acc_slice(x, buf);
    }
    opts.feature_map
        .apply_rows(level, &mut sc.aq, &mut sc.tmp, None);
    opts.feature_map
        .apply_rows(level, &mut sc.kf, &mut sc.tmp, None);
    E::Acc::scale(level, &mut sc.aq, E::Acc::from_f64(opts.scale));
    sc.v.clear();
    sc.v.resize(vd, zero);
    E::to_acc_slice(v, &mut sc.v);
    sc.o.clear();
    sc.o.resize(vd, zero);
    if let Some(s) = s0 {
        E::Acc::axpy_rows(level, &mut sc.o, &sc.aq, s, vd);
    }
    let c = core::vdot(level, &sc.aq, &sc.kf);
    E::Acc::axpy_rows(level, &mut sc.o, &[c], &sc.v, vd);
    if !s_fin.is_empty() {
        for (r, row) in s_fin.chunks_exact_mut(vd).enumerate().take(kd) {
            match s0 {
                Some(s) => row.copy_from_slice(&s[r * vd..(r + 1) * vd]),
                None => row.fill(zero),
            }
            E::Acc::axpy_rows(level, row, &sc.kf[r..r + 1], &sc.v, vd);
        }
    }
    if !z_fin.is_empty() {
        for (r, z) in z_fin.iter_mut().enumerate().take(kd) {
            *z = z0.map_or(zero, |z0| z0[r]) + sc.kf[r];
        }
    }
    if opts.normalize {
        let den = c + z0.map_or(zero, |z0| core::vdot(level, &sc.aq, z0));
        let inv = E::Acc::ONE / (den + E::Acc::from_f64(core::NORM_EPS));
        E::Acc::scale(level, &mut sc.o, inv);
    }
    E::from_acc_slice(&sc.o, out);
}

/// A task's optional initial states and final-state gradients.
#[derive(Clone, Copy)]
struct Opt4<'a, A> {
    s0: Option<&'a [A]>,
    z0: Option<&'a [A]>,
    gs: Option<&'a [A]>,
    gz: Option<&'a [A]>,
}

/// Where one (sequence, head) task reads its rows.
struct SegIo<'a, E> {
    q: &'a [E],
    k: &'a [E],
    v: &'a [E],
    dout: &'a [E],
    heads: usize,
    h: usize,
    kd: usize,
    vd: usize,
    row0: usize,
    len: usize,
}

/// Causal backward of one long (sequence, head) in segments of [`SEGMENT`] rows, so the
/// working set stays in cache: a forward sweep keeps the states entering each segment, then
/// segments run backward from last to first, each handing the gradient of its entering
/// state to the one before. Writes dq/dk/dv; returns the initial states' gradients.
fn backward_segmented<E: Element>(
    level: Level,
    opts: &LinearOpts,
    io: &SegIo<'_, E>,
    st: &Opt4<'_, E::Acc>,
    sc: &mut Scratch<E::Acc>,
    (dqp, dkp, dvp): (SharedMut<E>, SharedMut<E>, SharedMut<E>),
) -> (Vec<E::Acc>, Vec<E::Acc>) {
    let zero = <E::Acc as Acc>::ZERO;
    let (heads, h, kd, vd, len) = (io.heads, io.h, io.kd, io.vd, io.len);
    let (scale, fm) = (E::Acc::from_f64(opts.scale), opts.feature_map);
    let vp = crate::gemm::round_up_nr(vd);
    let nseg = len.div_ceil(SEGMENT);
    // States entering each segment (S padded to `vp` columns for the GEMM).
    let mut ck_s = vec![zero; nseg * kd * vp];
    let mut ck_z = vec![zero; nseg * kd];
    if let Some(s0) = st.s0 {
        for r in 0..kd {
            ck_s[r * vp..r * vp + vd].copy_from_slice(&s0[r * vd..(r + 1) * vd]);
        }
    }
    if let Some(z0) = st.z0 {
        ck_z[..kd].copy_from_slice(z0);
    }
    let mut packed = Vec::new();
    for si in 0..nseg - 1 {
        let (start, sl) = (si * SEGMENT, SEGMENT);
        gather(io.k, io.row0 + start, sl, heads, h, kd, &mut sc.kf);
        fm.apply_rows(level, &mut sc.kf, &mut sc.tmp, None);
        gather(io.v, io.row0 + start, sl, heads, h, vd, &mut sc.v);
        let (done, next) = ck_s.split_at_mut((si + 1) * kd * vp);
        let next = &mut next[..kd * vp];
        next.copy_from_slice(&done[si * kd * vp..]);
        let bps = core::pack_n(&sc.v, vd, sl, vd, &mut packed);
        core::mm(
            level, kd, sl, &sc.kf, 1, kd, &packed, bps, vd, next, vp, true,
        );
        let (zd, zn) = ck_z.split_at_mut((si + 1) * kd);
        zn[..kd].copy_from_slice(&zd[si * kd..]);
        for row in sc.kf.chunks_exact(kd) {
            zn[..kd].iter_mut().zip(row).for_each(|(z, &x)| *z += x);
        }
    }
    let mut gs = st.gs.map_or_else(|| vec![zero; kd * vd], <[_]>::to_vec);
    let mut gz = st.gz.map_or_else(|| vec![zero; kd], <[_]>::to_vec);
    let (mut ds0, mut dz0) = (vec![zero; kd * vd], vec![zero; kd]);
    let mut s_in = vec![zero; kd * vd];
    for si in (0..nseg).rev() {
        let start = si * SEGMENT;
        let sl = SEGMENT.min(len - start);
        let rows = io.row0 + start;
        gather(io.q, rows, sl, heads, h, kd, &mut sc.aq);
        gather(io.k, rows, sl, heads, h, kd, &mut sc.kf);
        gather(io.v, rows, sl, heads, h, vd, &mut sc.v);
        fm.apply_rows(level, &mut sc.aq, &mut sc.tmp, Some(&mut sc.qd));
        fm.apply_rows(level, &mut sc.kf, &mut sc.tmp, Some(&mut sc.kd));
        sc.aq.iter_mut().for_each(|x| *x *= scale);
        gather(io.dout, rows, sl, heads, h, vd, &mut sc.g);
        for (buf, n) in [
            (&mut sc.o, sl * kd),
            (&mut sc.dk, sl * kd),
            (&mut sc.dv, sl * vd),
        ] {
            buf.clear();
            buf.resize(n, zero);
        }
        for r in 0..kd {
            s_in[r * vd..(r + 1) * vd].copy_from_slice(&ck_s[(si * kd + r) * vp..][..vd]);
        }
        let first = si == 0;
        let core = Core {
            lq: sl,
            lk: sl,
            k: kd,
            v: vd,
            causal: true,
            normalize: opts.normalize,
        };
        core.backward(
            level,
            &sc.aq,
            &sc.kf,
            &sc.v,
            if first && st.s0.is_none() {
                None
            } else {
                Some(&s_in[..])
            },
            if first && st.z0.is_none() {
                None
            } else {
                Some(&ck_z[si * kd..(si + 1) * kd])
            },
            &sc.g,
            Some(&gs[..]),
            Some(&gz[..]),
            &mut sc.o,
            &mut sc.dk,
            &mut sc.dv,
            &mut ds0,
            &mut dz0,
            &mut sc.ws,
        );
        std::mem::swap(&mut gs, &mut ds0);
        std::mem::swap(&mut gz, &mut dz0);
        for ((g, &d), (gk, &dk)) in
            sc.o.iter_mut()
                .zip(sc.qd.iter())
                .zip(sc.dk.iter_mut().zip(sc.kd.iter()))
        {
            *g = *g * scale * d;
            *gk *= dk;
        }
        // SAFETY: the task owns these rows of head `h`.
        unsafe {
            scatter::<E>(&sc.o, rows, sl, heads, h, kd, dqp);
            scatter::<E>(&sc.dk, rows, sl, heads, h, kd, dkp);
            scatter::<E>(&sc.dv, rows, sl, heads, h, vd, dvp);
        }
    }
    (gs, gz)
}

#[cfg(test)]
mod tests;
