//! Backward for 1-D calls in the layout of [`super::band`] (AVX-512, f32 accumulation, the
//! forward's window range): queries in the SIMD lanes, keys broadcast from their rows.
//!
//! A task owns one block of queries of one (batch entry, kv head) and runs every q head of
//! the kv head. Per head it recomputes `Sᵀ` and `dPᵀ = (dO·Vᵀ)ᵀ` with the forward's score
//! kernel over the band, turns each finished 16-query column into `P` and
//! `dS = P ⊙ (dP − δ)` in place (zero outside the windows), adds `dQ = scale · dS·K` with
//! the forward's `P·V` kernel and, once all columns are in, sums the block's dK / dV rows
//! key-centrically (`dSᵀ·Q`, `Pᵀ·dO`, 4 keys at a time) over the heads. Blocks whose key
//! ranges could overlap run in different colour phases, so each phase adds every key row
//! from one task only, in a fixed order.

use super::backward::sums;
use super::band::x86 as bx;
use super::band::{applies as band_applies, block_rows, key_blocks, rows_of, QB};
use super::lanes::Src;
use super::{group_window, Geo, NaDims, SharedMut};
use crate::buffer_pool::{take_filled, PoolVec};
use crate::element::Element;
use crate::linear::core::vdot;
use crate::per_thread::PerThread;
use crate::simd::Level;
use rayon::prelude::*;
use std::any::TypeId;

/// Whether the backward runs here: the forward's conditions.
pub(super) fn applies<E: Element>(level: Level, dims: &NaDims, geo: &Geo) -> bool {
    band_applies::<E>(level, dims, geo)
}

struct Scratch {
    qt: PoolVec<f32>,
    dot: PoolVec<f32>,
    s: PoolVec<f32>,
    dp: PoolVec<f32>,
    /// The block's dK / dV rows (`[key][d]`, `[key][dv]`), summed over the heads.
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Converted rows (non-f32 storage only): keys, values, queries, dO, O.
    kbuf: Vec<f32>,
    vbuf: Vec<f32>,
    qbuf: Vec<f32>,
    dobuf: Vec<f32>,
    obuf: Vec<f32>,
    rows: Vec<f32>,
    o: Vec<f32>,
    zero: Vec<f32>,
    lse2: Vec<f32>,
    delta: Vec<f32>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            qt: take_filled(0),
            dot: take_filled(0),
            s: take_filled(0),
            dp: take_filled(0),
            dk: Vec::new(),
            dv: Vec::new(),
            kbuf: Vec::new(),
            vbuf: Vec::new(),
            qbuf: Vec::new(),
            dobuf: Vec::new(),
            obuf: Vec::new(),
            rows: Vec::new(),
            o: Vec::new(),
            zero: Vec::new(),
            lse2: Vec::new(),
            delta: Vec::new(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run<E: Element>(
    dims: &NaDims,
    geo: &Geo,
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
    let (batch, hq, hkv) = (dims.batch, dims.q_heads, dims.kv_heads);
    let group = hq / hkv;
    // SAFETY (the cast): `applies` checked that `E::Acc` is f32.
    let lse = unsafe { &*(lse as *const [E::Acc] as *const [f32]) };
    let (k2, s2, c2, dil) = (geo.k[2], geo.s[2], geo.c[2], geo.d[2]);
    let mut blocks = Vec::new();
    let mut wins = Vec::new();
    // Colours: blocks `C` apart never share a key (a key's queries span fewer than
    // `(C − 1)·QB + 1` indices).
    let mut span = 1;
    for g in 0..dil {
        let len = geo.group_len(2, g);
        blocks.extend((0..len).step_by(QB).map(|a| (g, a, (a + QB).min(len))));
        let w: Vec<(usize, usize)> = (0..len).map(|i| group_window(i, len, k2, s2, c2)).collect();
        let (mut lo, mut hi) = (0, 0);
        for j in 0..len {
            while lo < len && w[lo].1 <= j {
                lo += 1;
            }
            while hi < len && w[hi].0 <= j {
                hi += 1;
            }
            span = span.max(hi.saturating_sub(lo));
        }
        wins.push(w);
    }
    let colours = span.div_ceil(QB) + 1;
    let dqp = SharedMut(dq.as_mut_ptr());
    // Not zeroed: every key row is in some block's key range, and the first block to reach
    // it (lowest colour) stores it.
    let (dkp, dk_sums) = sums(dk, false);
    let (dvp, dv_sums) = sums(dv, false);
    // `E::Acc` is f32 (`applies`).
    let (dkp, dvp) = (
        SharedMut(dkp.get() as *mut f32),
        SharedMut(dvp.get() as *mut f32),
    );
    let scratch = PerThread::new();
    let f32_io = TypeId::of::<E>() == TypeId::of::<f32>();
    for phase in 0..colours {
        let ids: Vec<usize> = (0..blocks.len())
            .filter(|&i| blocks[i].1 / QB % colours == phase)
            .collect();
        (0..ids.len() * batch * hkv)
            .into_par_iter()
            .with_max_len(1)
            .for_each(|task| {
                let bi = ids[task % ids.len()];
                let (g, q0, q1) = blocks[bi];
                // Keys another block of an earlier colour reaches: added to, not stored.
                let krange = |i: usize| {
                    let (g, a, z) = blocks[i];
                    (g, wins[g][a].0, wins[g][z - 1].1)
                };
                let earlier: Vec<(usize, usize)> = (bi.saturating_sub(colours)
                    ..(bi + colours).min(blocks.len()))
                    .filter(|&i| i != bi && blocks[i].1 / QB % colours < phase)
                    .filter_map(|i| {
                        let (gi, lo, hi) = krange(i);
                        (gi == g).then_some((lo, hi))
                    })
                    .collect();
                let bk = task / ids.len();
                let (b, kh) = (bk / hkv, bk % hkv);
                let win = &wins[g][q0..q1];
                scratch.with(Scratch::new, |sc| {
                    let t = BwdTask {
                        geo,
                        g,
                        q0,
                        win,
                        b,
                        kh,
                        group,
                        hq,
                        scale: scale as f32,
                        earlier: &earlier,
                    };
                    let srcs = Srcs {
                        k: Src::new(k, hkv, kh, dims.head_dim),
                        v: Src::new(v, hkv, kh, dims.v_head_dim),
                        q,
                        out,
                        dout,
                        d: dims.head_dim,
                        dv: dims.v_head_dim,
                    };
                    // SAFETY: AVX-512F (`applies`); this task alone writes its queries' dQ
                    // rows and, within the phase, its keys' dK / dV rows.
                    unsafe { t.run(sc, &srcs, lse, f32_io, &dqp, (&dkp, &dvp)) };
                })
            });
    }
    dk_sums.finish();
    dv_sums.finish();
}

struct Srcs<'a, E> {
    k: Src<'a, E>,
    v: Src<'a, E>,
    q: &'a [E],
    out: &'a [E],
    dout: &'a [E],
    d: usize,
    dv: usize,
}

struct BwdTask<'a> {
    geo: &'a Geo,
    g: usize,
    q0: usize,
    win: &'a [(usize, usize)],
    b: usize,
    kh: usize,
    group: usize,
    hq: usize,
    scale: f32,
    /// Key ranges (group indices) of blocks of earlier colours near this one.
    earlier: &'a [(usize, usize)],
}

impl BwdTask<'_> {
    fn pos(&self, i: usize) -> usize {
        i * self.geo.d[2] + self.g
    }

    /// # Safety
    /// AVX-512F; see `run`.
    unsafe fn run<E: Element>(
        &self,
        sc: &mut Scratch,
        x: &Srcs<'_, E>,
        lse: &[f32],
        f32_io: bool,
        dqp: &SharedMut<E>,
        (dkp, dvp): (&SharedMut<f32>, &SharedMut<f32>),
    ) {
        let geo = self.geo;
        let (n, dil) = (geo.n, geo.d[2]);
        let (d, dvw) = (x.d, x.dv);
        let win = self.win;
        let nq = win.len();
        let kb = win[0].0;
        let nk = win[nq - 1].1 - kb;
        let nk4 = nk.next_multiple_of(4);
        let qp = nq.next_multiple_of(16);
        let ss = qp + 16;
        let (k0, kst) = rows_of(&x.k, self.b, n, dil, self.g, kb, nk, &mut sc.kbuf);
        let (v0, vst) = rows_of(&x.v, self.b, n, dil, self.g, kb, nk, &mut sc.vbuf);
        sc.zero.resize(d.max(dvw), 0.0);
        sc.qt.fit(d * ss);
        sc.dot.fit(dvw * ss);
        sc.s.fit(nk4 * ss);
        sc.dp.fit(nk4 * ss);
        sc.dk.resize(nk4 * d, 0.0);
        sc.dv.resize(nk4 * dvw, 0.0);
        sc.rows.resize(16 * d.max(dvw), 0.0);
        sc.o.resize(4 * d, 0.0);
        let qscale = self.scale * std::f32::consts::LOG2_E;
        let zp = sc.zero.as_ptr();
        for (hi_, h) in (self.kh * self.group..(self.kh + 1) * self.group).enumerate() {
            let qs = Src::new(x.q, self.hq, h, d);
            let dos = Src::new(x.dout, self.hq, h, dvw);
            let os = Src::new(x.out, self.hq, h, dvw);
            // Qᵀ (base 2) and dOᵀ; per query the base-2 lse and δ = O·dO.
            for c in (0..qp).step_by(16) {
                let nr = (nq - c).min(16);
                let mut ptrs = [std::ptr::null(); 16];
                let pos = (self.q0 + c..self.q0 + c + nr).map(|i| self.pos(i));
                qs.rows(self.b, n, pos.clone(), &mut sc.rows, &mut ptrs);
                super::lanes::x86::transpose_block(&ptrs, nr, d, qscale, &mut sc.qt[c..], ss);
                dos.rows(self.b, n, pos, &mut sc.rows, &mut ptrs);
                super::lanes::x86::transpose_block(&ptrs, nr, dvw, 1.0, &mut sc.dot[c..], ss);
            }
            let (do0, dost) = rows_of(&dos, self.b, n, dil, self.g, self.q0, nq, &mut sc.dobuf);
            let (o0, ost) = rows_of(&os, self.b, n, dil, self.g, self.q0, nq, &mut sc.obuf);
            sc.lse2.clear();
            sc.delta.clear();
            for i in 0..nq {
                let row = (self.b * n + self.pos(self.q0 + i)) * self.hq + h;
                sc.lse2.push(lse[row] * std::f32::consts::LOG2_E);
                let o = std::slice::from_raw_parts(o0.add(i * ost), dvw);
                let dor = std::slice::from_raw_parts(do0.add(i * dost), dvw);
                sc.delta.push(vdot(Level::Avx512, o, dor));
            }
            // Scores and dP over the band; each finished column becomes P and dS, and its
            // dQ rows are written.
            let cols = qp / 16;
            let col_end = |c: usize| win[(16 * c + 15).min(nq - 1)].1 - kb;
            let mut next = 0;
            for (jb, lo, hi) in key_blocks(win, kb, nk) {
                let kr = block_rows((k0, kst), jb, nk, zp);
                let vr = block_rows((v0, vst), jb, nk, zp);
                let (mut c, c1) = (lo / 16, hi.div_ceil(16));
                while c < c1 {
                    let nv = (c1 - c).min(bx::QK_VECS);
                    let off = jb * ss + 16 * c;
                    bx::qk(
                        nv,
                        sc.qt.as_ptr().add(16 * c),
                        ss,
                        kr,
                        d,
                        sc.s.as_mut_ptr().add(off),
                        ss,
                    );
                    bx::qk(
                        nv,
                        sc.dot.as_ptr().add(16 * c),
                        ss,
                        vr,
                        dvw,
                        sc.dp.as_mut_ptr().add(off),
                        ss,
                    );
                    c += nv;
                }
                while next < cols && col_end(next) <= jb + 4 {
                    self.column(sc, next, kb, nk4, ss, (k0, kst, d), h, f32_io, dqp);
                    next += 1;
                }
            }
            // dK / dV of the block's keys, 4 at a time over the queries holding one of them.
            let (q0r, qst) = rows_of(&qs, self.b, n, dil, self.g, self.q0, nq, &mut sc.qbuf);
            for (jb, lo, hi) in key_blocks(win, kb, nk) {
                let add = hi_ > 0;
                let dst: [*mut f32; 4] =
                    std::array::from_fn(|r| sc.dk.as_mut_ptr().add((jb + r) * d));
                bx::pv(
                    sc.dp.as_ptr().add(jb * ss + lo),
                    (1, ss),
                    (q0r.add(lo * qst), qst, hi - lo),
                    d,
                    [self.scale; 4],
                    dst,
                    add,
                );
                let dst: [*mut f32; 4] =
                    std::array::from_fn(|r| sc.dv.as_mut_ptr().add((jb + r) * dvw));
                bx::pv(
                    sc.s.as_ptr().add(jb * ss + lo),
                    (1, ss),
                    (do0.add(lo * dost), dost, hi - lo),
                    dvw,
                    [1.0; 4],
                    dst,
                    add,
                );
            }
        }
        // Into the shared sums: this phase's only writer of these rows; stored where no
        // block of an earlier colour reached the key.
        for j in 0..nk {
            let add = self
                .earlier
                .iter()
                .any(|&(lo, hi)| (lo..hi).contains(&(kb + j)));
            let pos = self.pos(kb + j);
            let krow = ((self.b * n + pos) * x.k.heads + self.kh) * d;
            let vrow = ((self.b * n + pos) * x.v.heads + self.kh) * dvw;
            let a = std::slice::from_raw_parts_mut(dkp.get().add(krow), d);
            let b = std::slice::from_raw_parts_mut(dvp.get().add(vrow), dvw);
            if add {
                for (a, &y) in a.iter_mut().zip(&sc.dk[j * d..]) {
                    *a += y;
                }
                for (a, &y) in b.iter_mut().zip(&sc.dv[j * dvw..]) {
                    *a += y;
                }
            } else {
                a.copy_from_slice(&sc.dk[j * d..(j + 1) * d]);
                b.copy_from_slice(&sc.dv[j * dvw..(j + 1) * dvw]);
            }
        }
    }

    /// Column `c`: P and dS in place over its rows (and the 3 on each side a key block of
    /// the dK / dV pass may read), zero outside each lane's window; then its dQ rows.
    #[allow(clippy::too_many_arguments)]
    unsafe fn column<E: Element>(
        &self,
        sc: &mut Scratch,
        c: usize,
        kb: usize,
        nk4: usize,
        ss: usize,
        (k0, kst, d): (*const f32, usize, usize),
        h: usize,
        f32_io: bool,
        dqp: &SharedMut<E>,
    ) {
        let geo = self.geo;
        let win = self.win;
        let nq = win.len();
        let c0 = 16 * c;
        let nl = (nq - c0).min(16);
        let mut wlo = [i32::MAX; 16];
        let mut whi = [0i32; 16];
        let mut lse2 = [0f32; 16];
        let mut delta = [0f32; 16];
        for l in 0..nl {
            wlo[l] = (win[c0 + l].0 - kb) as i32;
            whi[l] = (win[c0 + l].1 - kb) as i32;
            lse2[l] = sc.lse2[c0 + l];
            delta[l] = sc.delta[c0 + l];
        }
        let (top, bottom) = (wlo[0] as usize, whi[nl - 1] as usize);
        let (r0, r1) = (top.saturating_sub(3), (bottom + 3).min(nk4));
        x86::p_ds(
            sc.s.as_mut_ptr().add(c0),
            sc.dp.as_mut_ptr().add(c0),
            ss,
            (r0, r1),
            (&wlo, &whi),
            (&lse2, &delta),
        );
        for a in (c0..c0 + nl).step_by(4) {
            let nr = (c0 + nl - a).min(4);
            let (r0, r1) = (win[a].0 - kb, win[a + nr - 1].1 - kb);
            let row = |r: usize| (self.b * geo.n + self.pos(self.q0 + a + r)) * self.hq + h;
            let dst: [*mut f32; 4] = std::array::from_fn(|r| {
                if f32_io && r < nr {
                    dqp.get().add(row(r) * d) as *mut f32
                } else {
                    sc.o.as_mut_ptr().add(r * d)
                }
            });
            let p = sc.dp.as_ptr().add(r0 * ss + a);
            bx::pv(
                p,
                (ss, 1),
                (k0.add(r0 * kst), kst, r1 - r0),
                d,
                [self.scale; 4],
                dst,
                false,
            );
            if !f32_io {
                for r in 0..nr {
                    let dst = std::slice::from_raw_parts_mut(dqp.get().add(row(r) * d), d);
                    let src = &sc.o[r * d..(r + 1) * d];
                    // SAFETY: `E::Acc` is f32 (`applies`).
                    E::from_acc_slice(&*(src as *const [f32] as *const [E::Acc]), dst);
                }
            }
        }
    }
}

mod x86 {
    use crate::simd::math::x86_avx512::exp2v_masked;
    use std::arch::x86_64::*;

    /// Rows `r0..r1` (stride `ps`) of one 16-lane column: `s` becomes `P = 2^(s − lse2)`
    /// and `dp` becomes `dS = P ⊙ (dp − δ)` in lane `l`'s rows `lo[l]..hi[l]`, 0 elsewhere.
    ///
    /// # Safety
    /// AVX-512F; both valid for rows `r0..r1` of 16 values at stride `ps`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn p_ds(
        s: *mut f32,
        dp: *mut f32,
        ps: usize,
        (r0, r1): (usize, usize),
        (lo, hi): (&[i32; 16], &[i32; 16]),
        (lse2, delta): (&[f32; 16], &[f32; 16]),
    ) {
        let lo = _mm512_loadu_si512(lo.as_ptr() as *const _);
        let hi = _mm512_loadu_si512(hi.as_ptr() as *const _);
        let m = _mm512_loadu_ps(lse2.as_ptr());
        let dl = _mm512_loadu_ps(delta.as_ptr());
        for r in r0..r1 {
            let j = _mm512_set1_epi32(r as i32);
            let k = _mm512_cmp_epi32_mask::<_MM_CMPINT_NLT>(j, lo)
                & _mm512_cmp_epi32_mask::<_MM_CMPINT_LT>(j, hi);
            let p = exp2v_masked(k, _mm512_sub_ps(_mm512_loadu_ps(s.add(r * ps)), m));
            _mm512_storeu_ps(s.add(r * ps), p);
            let x = _mm512_sub_ps(_mm512_loadu_ps(dp.add(r * ps)), dl);
            _mm512_storeu_ps(dp.add(r * ps), _mm512_maskz_mul_ps(k, p, x));
        }
    }
}
