//! The forward driver: splits the work into (sequence, group of adjacent heads) tasks and
//! streams each through the chunked core.
//!
//! Heads are grouped because the tensors are `[rows, heads, width]`: one head's rows are
//! 256-byte runs 2 KiB apart (H=8, D=64), so a task per head reads every row's cache lines
//! from memory once per head, in a pattern the hardware prefetcher follows poorly. A task
//! of `g` adjacent heads reads each row's `g` runs as one, in segments whose per-head length
//! shrinks with `g` so the working set stays the same.

use super::rows::{can_stream, fit, gather_heads, scatter_heads, Block};
use super::{
    check_inputs, check_opt_out, decode_step, Core, LinearDims, LinearOpts, Scratch, SharedMut,
    CHUNK, SEGMENT,
};
use crate::buffer_pool::take;
use crate::element::{Acc, Element};
use crate::error::KernelError;
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::{self, Level};
use rayon::prelude::*;

/// Heads per task: the largest group (dividing the heads evenly) that still gives every
/// thread work, and either an even share of equal tasks or enough tasks to even out.
/// Measured at B=1, H=8, T=16384: four heads per task on 2 threads is ~15% faster than one.
pub(super) fn head_group(nseq: usize, heads: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    (1..=heads)
        .rev()
        .find(|&g| {
            let tasks = nseq * heads.div_ceil(g);
            heads.is_multiple_of(g)
                && tasks >= threads
                && (tasks.is_multiple_of(threads) || tasks >= 4 * threads)
        })
        .unwrap_or(1)
}

/// Forward. `out` is `[B, T, H, V]`; `final_kv` (`[N, H, K, V]`) and `final_z`
/// (`[N, 1, H, K]`) receive the states after each sequence, or are empty to skip.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Element>(
    d: &LinearDims,
    opts: &LinearOpts,
    cu_seqlens: Option<&[i64]>,
    q: &[E],
    k: &[E],
    v: &[E],
    init_kv: Option<&[E::Acc]>,
    init_z: Option<&[E::Acc]>,
    out: &mut [E],
    final_kv: &mut [E::Acc],
    final_z: &mut [E::Acc],
) -> Result<(), KernelError> {
    let (h, kd, vd) = (d.heads, d.head_dim, d.v_head_dim);
    let seqs = check_inputs(d, opts, cu_seqlens, q, k, v, "out", out, init_kv, init_z)?;
    let n = seqs.len();
    check_opt_out("final_kv", final_kv, n * h * kd * vd)?;
    check_opt_out("final_z", final_z, n * h * kd)?;
    if h == 0 {
        return Ok(());
    }
    let maxlen = seqs.iter().map(|s| s.1).max().unwrap_or(0);
    // Non-causal sequences need their whole length at once: one head per task keeps that
    // working set as small as it can be.
    let g = if opts.causal {
        head_group(n, h, rayon::current_num_threads())
    } else {
        1
    };
    let seg = if opts.causal {
        (SEGMENT / g / CHUNK).max(1) * CHUNK
    } else {
        maxlen.max(1)
    };
    let groups = h.div_ceil(g);
    let seg_rows = maxlen.min(seg);
    let level = simd::active();
    let stream = can_stream(level, out, vd);
    let run = Run {
        level,
        stream,
        opts,
        dims: (h, kd, vd),
        seg,
        io: (q, k, v),
        s0: init_kv,
        z0: init_z,
        outp: SharedMut(out.as_mut_ptr()),
        fin: (
            SharedMut(final_kv.as_mut_ptr()),
            SharedMut(final_z.as_mut_ptr()),
        ),
        want: (!final_kv.is_empty(), !final_z.is_empty()),
    };
    // A fresh output (every call from Python) is a fresh mapping that would otherwise
    // fault in 4 KiB at a time inside the loop below.
    crate::pages::prefer_huge(out);
    let per: PerThread<Scratch<E::Acc>> = PerThread::new();
    (0..n * groups).into_par_iter().for_each(|task| {
        let (si, gi) = (task / groups, task % groups);
        let (h0, gh) = (gi * g, g.min(h - gi * g));
        per.with(
            || Scratch::new(g * seg_rows * kd, g * seg_rows * vd),
            |sc| run.group(si, seqs[si], h0, gh, sc),
        );
    });
    Ok(())
}

/// What every task of one forward call shares.
struct Run<'a, E: Element> {
    level: Level,
    /// write the output with non-temporal stores (see [`can_stream`])
    stream: bool,
    opts: &'a LinearOpts,
    /// heads, key width, value width
    dims: (usize, usize, usize),
    /// rows per head per segment
    seg: usize,
    io: (&'a [E], &'a [E], &'a [E]),
    /// initial kv and z states
    s0: Option<&'a [E::Acc]>,
    z0: Option<&'a [E::Acc]>,
    outp: SharedMut<E>,
    fin: (SharedMut<E::Acc>, SharedMut<E::Acc>),
    want: (bool, bool),
}

impl<E: Element> Run<'_, E> {
    /// Sequence `si` (`row0`, `len`), heads `h0..h0+gh`.
    fn group(
        &self,
        si: usize,
        (row0, len): (usize, usize),
        h0: usize,
        gh: usize,
        sc: &mut Scratch<E::Acc>,
    ) {
        let (h, kd, vd) = self.dims;
        let (q, k, v) = self.io;
        let (s0, z0) = (self.s0, self.z0);
        let zero = <E::Acc as Acc>::ZERO;
        let slot = |j: usize| si * h + h0 + j;
        if self.opts.causal && len == 1 {
            for j in 0..gh {
                let t = slot(j);
                let off = |w: usize| (row0 * h + h0 + j) * w;
                let rows = (
                    &q[off(kd)..off(kd) + kd],
                    &k[off(kd)..off(kd) + kd],
                    &v[off(vd)..off(vd) + vd],
                );
                let init = (
                    s0.map(|s| &s[t * kd * vd..(t + 1) * kd * vd]),
                    z0.map(|s| &s[t * kd..(t + 1) * kd]),
                );
                // SAFETY: this task owns head h0+j's output row and state slots.
                let (o, fin) = unsafe { (self.outp.slice(off(vd), vd), self.fin_slots(t)) };
                decode_step(self.level, self.opts, rows, init, o, fin, sc);
            }
            return;
        }
        // Running states of the group's heads, head-major: kv in `dk`, z in `dv`.
        for (buf, w, init) in [(&mut sc.dk, kd * vd, s0), (&mut sc.dv, kd, z0)] {
            buf.clear();
            buf.resize(gh * w, zero);
            if let Some(s) = init {
                buf.copy_from_slice(&s[slot(0) * w..slot(gh) * w]);
            }
        }
        let (mut have_s, mut have_z) = (s0.is_some(), z0.is_some());
        let mut s_next = take::<E::Acc>(kd * vd);
        s_next.resize(kd * vd, zero);
        let mut z_next = take::<E::Acc>(kd);
        z_next.resize(kd, zero);
        let (fm, scale) = (self.opts.feature_map, E::Acc::from_f64(self.opts.scale));
        let mut start = 0;
        while start < len {
            let sl = self.seg.min(len - start);
            let blk = |width| Block {
                row0: row0 + start,
                len: sl,
                heads: h,
                h0,
                g: gh,
                width,
            };
            gather_heads(q, &blk(kd), &mut sc.aq);
            gather_heads(k, &blk(kd), &mut sc.kf);
            gather_heads(v, &blk(vd), &mut sc.v);
            fm.apply_rows(self.level, &mut sc.aq, &mut sc.tmp, None);
            fm.apply_rows(self.level, &mut sc.kf, &mut sc.tmp, None);
            if scale != <E::Acc as Acc>::ONE {
                E::Acc::scale(self.level, &mut sc.aq, scale);
            }
            // the core writes every row of its output
            fit(&mut sc.o, gh * sl * vd);
            let core = Core {
                lq: sl,
                lk: sl,
                k: kd,
                v: vd,
                causal: self.opts.causal,
                normalize: self.opts.normalize,
            };
            for j in 0..gh {
                let (sk, sv) = (
                    j * sl * kd..(j + 1) * sl * kd,
                    j * sl * vd..(j + 1) * sl * vd,
                );
                let (sj, zj) = (j * kd * vd..(j + 1) * kd * vd, j * kd..(j + 1) * kd);
                core.forward(
                    self.level,
                    &sc.aq[sk.clone()],
                    &sc.kf[sk],
                    &sc.v[sv.clone()],
                    have_s.then_some(&sc.dk[sj.clone()]),
                    have_z.then_some(&sc.dv[zj.clone()]),
                    &mut sc.o[sv],
                    &mut s_next,
                    &mut z_next,
                    &mut sc.ws,
                );
                sc.dk[sj].copy_from_slice(&s_next);
                sc.dv[zj].copy_from_slice(&z_next);
            }
            (have_s, have_z) = (true, true);
            // SAFETY: this task owns these rows of heads h0..h0+gh.
            unsafe { scatter_heads(&sc.o, &blk(vd), self.outp, self.stream) };
            start += sl;
        }
        for j in 0..gh {
            // SAFETY: this task owns the state slots of its heads.
            let (fkv, fz) = unsafe { self.fin_slots(slot(j)) };
            if self.want.0 {
                fkv.copy_from_slice(&sc.dk[j * kd * vd..(j + 1) * kd * vd]);
            }
            if self.want.1 {
                fz.copy_from_slice(&sc.dv[j * kd..(j + 1) * kd]);
            }
        }
    }

    /// Final-state slots of (sequence, head) `t`, empty where not wanted.
    ///
    /// # Safety
    /// The caller must own slot `t`.
    unsafe fn fin_slots<'b>(&self, t: usize) -> (&'b mut [E::Acc], &'b mut [E::Acc]) {
        let (kd, vd) = (self.dims.1, self.dims.2);
        (
            if self.want.0 {
                self.fin.0.slice(t * kd * vd, kd * vd)
            } else {
                &mut []
            },
            if self.want.1 {
                self.fin.1.slice(t * kd, kd)
            } else {
                &mut []
            },
        )
    }
}
