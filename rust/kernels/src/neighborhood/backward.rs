//! Backward pass: one task per (query tile, batch, query head), recomputing `P` from the saved
//! lse one key panel at a time. A task owns dQ of its queries; dK / dV of the key box (boxes of
//! neighbouring tiles overlap) go to per-worker accumulators summed at the end.

use super::forward::gather;
use super::{tile_extent, tiles, Geo, NaDims, SharedMut, Tile};
use crate::element::{Acc, Element};
use crate::gemm::pack::{pack_cols, pack_transposed, View};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::per_thread::PerThread;
use crate::simd::{self, Level};
use rayon::prelude::*;

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
    kbox: &[E],
    vbox: &[E],
    nk: usize,
    d: usize,
    dv: usize,
    out: &mut PackedB<E::Acc>,
) {
    let one = E::Acc::ONE;
    let kv = View {
        base: 0,
        rs: d,
        rows: nk,
        cols: d,
    };
    pack_transposed(kbox, kv, one, &mut out.kt);
    out.kps = pack_cols(kbox, kv, one, &mut out.kp);
    pack_transposed(
        vbox,
        View {
            base: 0,
            rs: dv,
            rows: nk,
            cols: dv,
        },
        one,
        &mut out.vt,
    );
    out.nk = nk;
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
    qbox: Vec<E>,
    dobox: Vec<E>,
    kbox: Vec<E>,
    vbox: Vec<E>,
    qside: QSide<E::Acc>,
    packed: PackedB<E::Acc>,
    s: Vec<E::Acc>,
    dp: Vec<E::Acc>,
    dkb: Vec<E::Acc>,
    dvb: Vec<E::Acc>,
    dq: Vec<E::Acc>,
    tmp: Vec<E::Acc>,
    /// Per-worker dK / dV (and additional) accumulators, unscaled dK.
    acc_k: Vec<E::Acc>,
    acc_v: Vec<E::Acc>,
    acc_ak: Vec<E::Acc>,
    acc_av: Vec<E::Acc>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run<E: Element>(
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
    let level = simd::active();
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
                let (mut kb, mut vb) = (Vec::new(), Vec::new());
                gather(ak, &pos, bi, na, hkv, h, d, &mut kb);
                gather(av, &pos, bi, na, hkv, h, dvd, &mut vb);
                let mut p = PackedB::new();
                pack_b(&kb, &vb, na, d, dvd, &mut p);
                p
            })
            .collect()
    };

    let t = tile_extent(geo);
    let tl = tiles(geo, t);
    let tq = t[0] * t[1] * t[2];
    let heads = batch;
    let dqp = SharedMut(dq.as_mut_ptr());
    let scratch = PerThread::new();
    let (lk, lv) = (dk.len(), dv.len());
    let (lak, lav) = (dak.len(), dav.len());

    (0..tl.len() * heads)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let init = || Scratch::<E> {
                tile: Tile::new(),
                qbox: Vec::new(),
                dobox: Vec::new(),
                kbox: Vec::new(),
                vbox: Vec::new(),
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
                dq: vec![E::Acc::ZERO; tq * d_pad],
                tmp: vec![E::Acc::ZERO; d.max(dvd)],
                acc_k: vec![E::Acc::ZERO; lk],
                acc_v: vec![E::Acc::ZERO; lv],
                acc_ak: vec![E::Acc::ZERO; lak],
                acc_av: vec![E::Acc::ZERO; lav],
            };
            scratch.with(init, |sc| {
                let (g, origin) = tl[task / heads];
                let bi = task % heads;
                sc.tile.build(geo, g, origin, t);
                for h in 0..hq {
                    let kh = h / group;
                    let tile = &sc.tile;
                    let nq = tile.nq;
                    // Query side.
                    gather(q, &tile.qpos, bi, n, hq, h, d, &mut sc.qbox);
                    gather(dout, &tile.qpos, bi, n, hq, h, dvd, &mut sc.dobox);
                    let qsd = &mut sc.qside;
                    qsd.qs.clear();
                    qsd.qs.resize(nq * d, E::Acc::ZERO);
                    E::to_acc_slice(&sc.qbox, &mut qsd.qs);
                    qsd.qs.iter_mut().for_each(|x| *x *= qscale);
                    qsd.qps = pack_cols(
                        &sc.qbox,
                        View {
                            base: 0,
                            rs: d,
                            rows: nq,
                            cols: d,
                        },
                        one,
                        &mut qsd.qp,
                    );
                    qsd.dor.clear();
                    qsd.dor.resize(nq * dvd, E::Acc::ZERO);
                    E::to_acc_slice(&sc.dobox, &mut qsd.dor);
                    qsd.dops = pack_cols(
                        &sc.dobox,
                        View {
                            base: 0,
                            rs: dvd,
                            rows: nq,
                            cols: dvd,
                        },
                        one,
                        &mut qsd.dop,
                    );
                    qsd.lse2.clear();
                    qsd.delta.clear();
                    for (qi, &p) in tile.qpos.iter().enumerate() {
                        let row = (bi * n + p) * hq + h;
                        qsd.lse2.push(lse[row] * log2e);
                        E::to_acc_slice(&out[row * dvd..(row + 1) * dvd], &mut sc.tmp[..dvd]);
                        let mut s = E::Acc::ZERO;
                        for (&x, &y) in sc.tmp[..dvd].iter().zip(&qsd.dor[qi * dvd..]) {
                            s += x * y;
                        }
                        qsd.delta.push(s);
                    }
                    // Key box.
                    if h % group == 0 {
                        gather(k, &tile.kpos, bi, n, hkv, kh, d, &mut sc.kbox);
                        gather(v, &tile.kpos, bi, n, hkv, kh, dvd, &mut sc.vbox);
                        pack_b(&sc.kbox, &sc.vbox, tile.nk, d, dvd, &mut sc.packed);
                    }
                    let nk = tile.nk;
                    sc.dkb.clear();
                    sc.dkb.resize(round_up_nr(nk) * d_pad, E::Acc::ZERO);
                    sc.dvb.clear();
                    sc.dvb.resize(round_up_nr(nk) * dv_pad, E::Acc::ZERO);
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
                            |qi, row, cs, ce| tile.mask(qi, row, cs, ce),
                        );
                    }
                    for (j, &p) in tile.kpos.iter().enumerate() {
                        let row = (bi * n + p) * hkv + kh;
                        for (a, &x) in sc.acc_k[row * d..(row + 1) * d]
                            .iter_mut()
                            .zip(&sc.dkb[j * d_pad..])
                        {
                            *a += x;
                        }
                        for (a, &x) in sc.acc_v[row * dvd..(row + 1) * dvd]
                            .iter_mut()
                            .zip(&sc.dvb[j * dv_pad..])
                        {
                            *a += x;
                        }
                    }
                    if na > 0 {
                        let ex = &extra[bi * hkv + kh];
                        sc.dkb.clear();
                        sc.dkb.resize(round_up_nr(na) * d_pad, E::Acc::ZERO);
                        sc.dvb.clear();
                        sc.dvb.resize(round_up_nr(na) * dv_pad, E::Acc::ZERO);
                        for p in 0..panels(na) {
                            panel(
                                level,
                                ex,
                                &sc.qside,
                                &mut sc.s,
                                &mut sc.dp,
                                &mut sc.dkb,
                                &mut sc.dvb,
                                &mut sc.dq,
                                p,
                                0,
                                nq,
                                d,
                                dvd,
                                |_, _, _, _| {},
                            );
                        }
                        for j in 0..na {
                            let row = (bi * na + j) * hkv + kh;
                            for (a, &x) in sc.acc_ak[row * d..(row + 1) * d]
                                .iter_mut()
                                .zip(&sc.dkb[j * d_pad..])
                            {
                                *a += x;
                            }
                            for (a, &x) in sc.acc_av[row * dvd..(row + 1) * dvd]
                                .iter_mut()
                                .zip(&sc.dvb[j * dv_pad..])
                            {
                                *a += x;
                            }
                        }
                    }
                    // SAFETY: the tile's query rows of head (bi, h) belong to this task alone.
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
            })
        });

    let parts = scratch.into_values();
    reduce(&parts, |s| &s.acc_k, dk, scale_t);
    reduce(&parts, |s| &s.acc_v, dv, one);
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
/// `dkb` / `dvb` (rows `p·NR..`), dQ into `dq`.
#[allow(clippy::too_many_arguments)]
fn panel<T: Acc>(
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
    mask: impl Fn(usize, &mut [T], usize, usize),
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
        mask(qa + r, row, p * NR, p * NR + kc);
        T::exp2_sub_sum(level, row, qs.lse2[qa + r]);
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
            accumulate: true,
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
            accumulate: true,
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
