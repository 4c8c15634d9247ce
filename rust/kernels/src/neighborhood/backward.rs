//! Backward pass (1-D calls go to `super::band_bwd`, small 2-D windows to
//! `super::lanes_bwd` instead): one task per (query tile, batch, kv head), recomputing `P`
//! from the saved lse one key panel at a time. A task owns dQ of its queries (every q head
//! of its kv head).
//! dK / dV of its key box are summed over those heads, then added into one shared
//! accumulator: tiles run in colour phases in which same-coloured tiles have disjoint key
//! boxes (`super::colours`), so concurrent tasks never touch the same key rows. (Per-worker
//! dK / dV copies cost more than the GEMMs at large inputs: fresh pages to fault in, zero
//! and sum at every call.)

use super::pack::{self, Rows};
use super::{colours, rows, tile_extent, tiles, Geo, NaDims, SharedMut, Tile};
use crate::buffer_pool::{take, PoolVec};
use crate::element::{Acc, Element};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::linear::core::vdot;
use crate::per_thread::PerThread;
use crate::simd::Level;
use rayon::prelude::*;
use std::any::TypeId;

/// Keys / values packed for the backward GEMMs.
struct PackedB<T: Acc> {
    /// Kᵀ panels, B of `S = Q·Kᵀ`.
    kt: Vec<T>,
    /// K column panels, B of `dQ += dS·K`.
    kp: Vec<T>,
    kps: usize,
    /// Vᵀ panels, B of `dP = dO·Vᵀ`.
    vt: Vec<T>,
    nk: usize,
}

impl<T: Acc> PackedB<T> {
    fn new() -> Self {
        PackedB {
            kt: Vec::new(),
            kp: Vec::new(),
            kps: 0,
            vt: Vec::new(),
            nk: 0,
        }
    }
}

fn pack_b<E: Element>(
    level: Level,
    kr: Rows<'_, E>,
    vr: Rows<'_, E>,
    tmp: &mut Vec<E::Acc>,
    out: &mut PackedB<E::Acc>,
) {
    pack::transposed(level, kr, tmp, &mut out.kt);
    out.kps = pack::cols(level, kr, tmp, &mut out.kp);
    pack::transposed(level, vr, tmp, &mut out.vt);
    out.nk = kr.pos.len();
}

/// The tile's queries, packed.
struct QSide<T: Acc> {
    /// `scale·log2e·Q` rows.
    qs: Vec<T>,
    /// Q column panels, B of `dK += dSᵀ·Q`.
    qp: Vec<T>,
    qps: usize,
    /// dO rows.
    dor: Vec<T>,
    /// dO column panels, B of `dV += Pᵀ·dO`.
    dop: Vec<T>,
    dops: usize,
    lse2: Vec<T>,
    delta: Vec<T>,
}

struct Scratch<E: Element> {
    tile: Tile,
    /// Index of the tile `tile` holds (tasks of one tile run back to back on a worker).
    tile_id: usize,
    qside: QSide<E::Acc>,
    packed: PackedB<E::Acc>,
    s: Vec<E::Acc>,
    dp: Vec<E::Acc>,
    /// dK / dV of the key box, summed over the task's heads.
    dkb: Vec<E::Acc>,
    dvb: Vec<E::Acc>,
    /// dK / dV of the additional keys for one head.
    dkx: Vec<E::Acc>,
    dvx: Vec<E::Acc>,
    dq: Vec<E::Acc>,
    tmp: Vec<E::Acc>,
    /// Per-worker additional-key dK / dV, unscaled dK.
    acc_ak: Vec<E::Acc>,
    acc_av: Vec<E::Acc>,
}

/// Where the shared dK / dV sums live: the outputs themselves when they already hold the
/// accumulation type, else pooled buffers converted at the end.
pub(super) enum Sums<'a, E: Element> {
    Direct,
    Pooled(PoolVec<E::Acc>, &'a mut [E]),
}

/// The shared sums for `dst`, zeroed when `zero` (else every row must be stored before it
/// is added to).
pub(super) fn sums<E: Element>(dst: &mut [E], zero: bool) -> (SharedMut<E::Acc>, Sums<'_, E>) {
    if TypeId::of::<E>() == TypeId::of::<E::Acc>() {
        if zero {
            dst.fill(E::from_acc(E::Acc::ZERO));
        }
        // SAFETY (the cast): `E` is `E::Acc`, same layout.
        (SharedMut(dst.as_mut_ptr() as *mut E::Acc), Sums::Direct)
    } else {
        let mut buf = take::<E::Acc>(dst.len());
        buf.resize(dst.len(), E::Acc::ZERO);
        (SharedMut(buf.as_mut_ptr()), Sums::Pooled(buf, dst))
    }
}

impl<E: Element> Sums<'_, E> {
    pub(super) fn finish(self) {
        if let Sums::Pooled(buf, dst) = self {
            const C: usize = 4096;
            dst.par_chunks_mut(C)
                .zip(buf.par_chunks(C))
                .for_each(|(d, s)| E::from_acc_slice(s, d));
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run<E: Element>(
    level: Level,
    dims: &NaDims,
    geo: &Geo,
    scale: f64,
    q: &[E],
    k: &[E],
    v: &[E],
    ak: &[E],
    av: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dq: &mut [E],
    dk: &mut [E],
    dv: &mut [E],
    dak: &mut [E],
    dav: &mut [E],
) {
    #[cfg(target_arch = "x86_64")]
    if super::band_bwd::applies::<E>(level, dims, geo) {
        super::band_bwd::run(dims, geo, scale, q, k, v, out, dout, lse, dq, dk, dv);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::cube_bwd::applies::<E>(level, dims, geo) {
        super::cube_bwd::run(dims, geo, scale, q, k, v, out, dout, lse, dq, dk, dv);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::lanes_bwd::applies::<E>(level, dims, geo) {
        super::lanes_bwd::run(dims, geo, scale, q, k, v, out, dout, lse, dq, dk, dv);
        return;
    }
    let (batch, hq, hkv, d, dvd, na) = (
        dims.batch,
        dims.q_heads,
        dims.kv_heads,
        dims.head_dim,
        dims.v_head_dim,
        dims.n_additional,
    );
    let n = geo.n;
    let group = hq / hkv;
    let d_pad = round_up_nr(d);
    let dv_pad = round_up_nr(dvd);
    let one = E::Acc::ONE;
    let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
    let qscale = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let scale_t = E::Acc::from_f64(scale);

    let extra: Vec<PackedB<E::Acc>> = if na == 0 {
        Vec::new()
    } else {
        (0..batch * hkv)
            .into_par_iter()
            .map(|bh| {
                let (bi, h) = (bh / hkv, bh % hkv);
                let pos: Vec<usize> = (0..na).collect();
                let rows = |src, w| Rows {
                    src,
                    pos: &pos,
                    b: bi,
                    n: na,
                    heads: hkv,
                    h,
                    w,
                };
                let mut p = PackedB::new();
                pack_b(level, rows(ak, d), rows(av, dvd), &mut Vec::new(), &mut p);
                p
            })
            .collect()
    };

    let t = tile_extent(geo);
    let tl = tiles(geo, t);
    let tq = t[0] * t[1] * t[2];
    let col = colours(geo, t);
    let dqp = SharedMut(dq.as_mut_ptr());
    let (dkp, dk_sums) = sums(dk, true);
    let (dvp, dv_sums) = sums(dv, true);
    let scratch = PerThread::new();
    let (lak, lav) = (dak.len(), dav.len());

    for phase in 0..col[0] * col[1] * col[2] {
        let ids: Vec<usize> = (0..tl.len())
            .filter(|&i| {
                let o = tl[i].1;
                let c = [0, 1, 2].map(|j| (o[j] / t[j]) % col[j]);
                (c[0] * col[1] + c[1]) * col[2] + c[2] == phase
            })
            .collect();
        (0..ids.len() * batch * hkv)
            .into_par_iter()
            .with_max_len(1)
            .for_each(|task| {
                let init = || Scratch::<E> {
                    tile: Tile::new(),
                    tile_id: usize::MAX,
                    qside: QSide {
                        qs: Vec::new(),
                        qp: Vec::new(),
                        qps: 0,
                        dor: Vec::new(),
                        dop: Vec::new(),
                        dops: 0,
                        lse2: Vec::new(),
                        delta: Vec::new(),
                    },
                    packed: PackedB::new(),
                    s: vec![E::Acc::ZERO; tq * NR],
                    dp: vec![E::Acc::ZERO; tq * NR],
                    dkb: Vec::new(),
                    dvb: Vec::new(),
                    dkx: Vec::new(),
                    dvx: Vec::new(),
                    dq: vec![E::Acc::ZERO; tq * d_pad],
                    tmp: vec![E::Acc::ZERO; d.max(dvd)],
                    acc_ak: vec![E::Acc::ZERO; lak],
                    acc_av: vec![E::Acc::ZERO; lav],
                };
                scratch.with(init, |sc| {
                    // Batch-major, kv heads innermost (their rows share cache lines).
                    let (bi, tid, kh) = (
                        task / (ids.len() * hkv),
                        ids[(task / hkv) % ids.len()],
                        task % hkv,
                    );
                    if sc.tile_id != tid {
                        let (g, origin) = tl[tid];
                        sc.tile.build(geo, g, origin, t);
                        sc.tile_id = tid;
                    }
                    let tile = &sc.tile;
                    let (nq, nk) = (tile.nq, tile.nk);
                    let rows = |src, pos, heads, h, w| Rows {
                        src,
                        pos,
                        b: bi,
                        n,
                        heads,
                        h,
                        w,
                    };
                    pack_b(
                        level,
                        rows(k, &tile.kpos, hkv, kh, d),
                        rows(v, &tile.kpos, hkv, kh, dvd),
                        &mut sc.tmp,
                        &mut sc.packed,
                    );
                    // Not cleared: the group's first q head writes each computed panel's
                    // rows (zeroing them per task was ~5% of a k = 7 backward), and the
                    // rows of panels no query needs are never read.
                    sc.dkb.resize(round_up_nr(nk) * d_pad, E::Acc::ZERO);
                    sc.dvb.resize(round_up_nr(nk) * dv_pad, E::Acc::ZERO);
                    for h in kh * group..(kh + 1) * group {
                        // Query side.
                        let qsd = &mut sc.qside;
                        let qr = rows(q, &tile.qpos, hq, h, d);
                        let dor = rows(dout, &tile.qpos, hq, h, dvd);
                        pack::rows(level, qr, qscale, &mut sc.tmp, &mut qsd.qs);
                        qsd.qps = pack::cols(level, qr, &mut sc.tmp, &mut qsd.qp);
                        pack::rows(level, dor, one, &mut sc.tmp, &mut qsd.dor);
                        qsd.dops = pack::cols(level, dor, &mut sc.tmp, &mut qsd.dop);
                        qsd.lse2.clear();
                        for &p in &tile.qpos {
                            qsd.lse2.push(lse[(bi * n + p) * hq + h] * log2e);
                        }
                        // δ = O·dO straight from the output rows (packing them was a
                        // copy read once).
                        qsd.delta.clear();
                        let (delta, dorp) = (&mut qsd.delta, &qsd.dor);
                        rows(out, &tile.qpos, hq, h, dvd).each(&mut sc.tmp, |qi, o| {
                            delta.push(vdot(level, o, &dorp[qi * dvd..(qi + 1) * dvd]))
                        });
                        sc.dq[..nq * d_pad].fill(E::Acc::ZERO);
                        for p in 0..panels(nk) {
                            let (qa, qb) = tile.range[p];
                            if qa >= qb {
                                continue;
                            }
                            panel(
                                level,
                                &sc.packed,
                                &sc.qside,
                                &mut sc.s,
                                &mut sc.dp,
                                &mut sc.dkb,
                                &mut sc.dvb,
                                &mut sc.dq,
                                p,
                                qa,
                                qb,
                                d,
                                dvd,
                                h == kh * group,
                                |qi| Some(tile.bits(qi)),
                            );
                        }
                        if na > 0 {
                            let ex = &extra[bi * hkv + kh];
                            sc.dkx.clear();
                            sc.dkx.resize(round_up_nr(na) * d_pad, E::Acc::ZERO);
                            sc.dvx.clear();
                            sc.dvx.resize(round_up_nr(na) * dv_pad, E::Acc::ZERO);
                            for p in 0..panels(na) {
                                panel(
                                    level,
                                    ex,
                                    &sc.qside,
                                    &mut sc.s,
                                    &mut sc.dp,
                                    &mut sc.dkx,
                                    &mut sc.dvx,
                                    &mut sc.dq,
                                    p,
                                    0,
                                    nq,
                                    d,
                                    dvd,
                                    false,
                                    |_| None,
                                );
                            }
                            for j in 0..na {
                                let row = (bi * na + j) * hkv + kh;
                                for (a, &x) in sc.acc_ak[row * d..(row + 1) * d]
                                    .iter_mut()
                                    .zip(&sc.dkx[j * d_pad..])
                                {
                                    *a += x;
                                }
                                for (a, &x) in sc.acc_av[row * dvd..(row + 1) * dvd]
                                    .iter_mut()
                                    .zip(&sc.dvx[j * dv_pad..])
                                {
                                    *a += x;
                                }
                            }
                        }
                        // SAFETY: the tile's query rows of head (bi, h) belong to this task
                        // alone.
                        unsafe {
                            for qi in 0..nq {
                                let row = (bi * n + tile.qpos[qi]) * hq + h;
                                for (x, &y) in sc.tmp[..d].iter_mut().zip(&sc.dq[qi * d_pad..]) {
                                    *x = y * scale_t;
                                }
                                let dst = std::slice::from_raw_parts_mut(dqp.get().add(row * d), d);
                                E::from_acc_slice(&sc.tmp[..d], dst);
                            }
                        }
                    }
                    // SAFETY: within a phase, tasks' key boxes are disjoint (colouring) or
                    // belong to other (batch, kv head) rows; phases run one after another.
                    unsafe {
                        for (j, &p) in tile.kpos.iter().enumerate() {
                            let (qa, qb) = tile.range[j / NR];
                            if qa >= qb {
                                continue;
                            }
                            let row = (bi * n + p) * hkv + kh;
                            let a = std::slice::from_raw_parts_mut(dkp.get().add(row * d), d);
                            for (a, &x) in a.iter_mut().zip(&sc.dkb[j * d_pad..]) {
                                *a += x * scale_t;
                            }
                            let a = std::slice::from_raw_parts_mut(dvp.get().add(row * dvd), dvd);
                            for (a, &x) in a.iter_mut().zip(&sc.dvb[j * dv_pad..]) {
                                *a += x;
                            }
                        }
                    }
                })
            });
    }
    dk_sums.finish();
    dv_sums.finish();
    let parts = scratch.into_values();
    reduce(&parts, |s| &s.acc_ak, dak, scale_t);
    reduce(&parts, |s| &s.acc_av, dav, one);
}

/// `dst = scale · Σ parts`.
fn reduce<E: Element>(
    parts: &[Scratch<E>],
    get: impl Fn(&Scratch<E>) -> &Vec<E::Acc> + Sync,
    dst: &mut [E],
    scale: E::Acc,
) {
    const C: usize = 4096;
    dst.par_chunks_mut(C).enumerate().for_each(|(ci, out)| {
        let mut sum = vec![E::Acc::ZERO; out.len()];
        for p in parts {
            for (s, &x) in sum.iter_mut().zip(&get(p)[ci * C..]) {
                *s += x;
            }
        }
        sum.iter_mut().for_each(|x| *x *= scale);
        E::from_acc_slice(&sum, out);
    });
}

/// One key panel `p` of `kv` against queries `qa..qb`: dK / dV of the panel's keys into
/// `dkb` / `dvb` (rows `p·NR..`; written when `first`, else added to), dQ added into `dq`.
#[allow(clippy::too_many_arguments)]
fn panel<'b, T: Acc>(
    level: Level,
    kv: &PackedB<T>,
    qs: &QSide<T>,
    s: &mut [T],
    dp: &mut [T],
    dkb: &mut [T],
    dvb: &mut [T],
    dq: &mut [T],
    p: usize,
    qa: usize,
    qb: usize,
    d: usize,
    dvd: usize,
    first: bool,
    bits: impl Fn(usize) -> Option<&'b [u64]>,
) {
    let mq = qb - qa;
    let kc = NR.min(kv.nk - p * NR);
    let d_pad = round_up_nr(d);
    let dv_pad = round_up_nr(dvd);
    // S, then P = 2^(S − lse2) in place, masked.
    let g = GemmDims {
        m: mq,
        npanels: 1,
        k: d,
        rsa: d,
        csa: 1,
        bps: d * NR,
        ldc: NR,
        accumulate: false,
    };
    gemm(level, &g, &qs.qs[qa * d..], &kv.kt[p * d * NR..], s);
    for r in 0..mq {
        let row = &mut s[r * NR..r * NR + kc];
        rows::exp_fixed(level, row, bits(qa + r), p * NR, qs.lse2[qa + r]);
    }
    if dvd > 0 {
        // dV += Pᵀ dO
        let g = GemmDims {
            m: kc,
            npanels: dv_pad / NR,
            k: mq,
            rsa: 1,
            csa: NR,
            bps: qs.dops,
            ldc: dv_pad,
            accumulate: !first,
        };
        gemm(
            level,
            &g,
            s,
            &qs.dop[qa * NR..],
            &mut dvb[p * NR * dv_pad..],
        );
    }
    // dP = dO Vᵀ, then dS = P ⊙ (dP − δ).
    let g = GemmDims {
        m: mq,
        npanels: 1,
        k: dvd,
        rsa: dvd,
        csa: 1,
        bps: dvd * NR,
        ldc: NR,
        accumulate: false,
    };
    gemm(level, &g, &qs.dor[qa * dvd..], &kv.vt[p * dvd * NR..], dp);
    for r in 0..mq {
        T::mul_sub(
            level,
            &mut dp[r * NR..r * NR + kc],
            &s[r * NR..],
            qs.delta[qa + r],
        );
    }
    if d > 0 {
        // dK += dSᵀ Q
        let g = GemmDims {
            m: kc,
            npanels: d_pad / NR,
            k: mq,
            rsa: 1,
            csa: NR,
            bps: qs.qps,
            ldc: d_pad,
            accumulate: !first,
        };
        gemm(level, &g, dp, &qs.qp[qa * NR..], &mut dkb[p * NR * d_pad..]);
        // dQ += dS K
        let g = GemmDims {
            m: mq,
            npanels: d_pad / NR,
            k: kc,
            rsa: NR,
            csa: 1,
            bps: kv.kps,
            ldc: d_pad,
            accumulate: true,
        };
        gemm(level, &g, dp, &kv.kp[p * NR * NR..], &mut dq[qa * d_pad..]);
    }
}
