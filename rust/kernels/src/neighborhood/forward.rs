//! Forward pass: one task per (query tile, batch, query head); online softmax over chunks of
//! the tile's key box, then over the additional keys.

use super::{tile_extent, tiles, Geo, NaDims, SharedMut, Tile};
use crate::element::{Acc, Element};
use crate::gemm::pack::{pack_cols, pack_transposed, View};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::per_thread::PerThread;
use crate::simd::{self, Level};
use rayon::prelude::*;

/// Key panels per softmax chunk.
pub(super) const CH: usize = 16;

/// Packed keys/values: Kᵀ panels (`[panel][d][NR]`) and V column panels.
pub(super) struct Packed<T: Acc> {
    pub kt: Vec<T>,
    pub v: Vec<T>,
    pub vps: usize,
    pub nk: usize,
}

impl<T: Acc> Packed<T> {
    fn new() -> Self {
        Packed {
            kt: Vec::new(),
            v: Vec::new(),
            vps: 0,
            nk: 0,
        }
    }
}

struct Scratch<E: Element> {
    tile: Tile,
    kbox: Vec<E>,
    vbox: Vec<E>,
    packed: Packed<E::Acc>,
    q: Vec<E::Acc>,
    s: Vec<E::Acc>,
    o: Vec<E::Acc>,
    m: Vec<E::Acc>,
    l: Vec<E::Acc>,
    tmp: Vec<E::Acc>,
}

/// Gathers the rows `pos` of head `h` (of `heads`) of batch `b` from a heads-last tensor with
/// `n` positions and row width `w` into `dst` (`pos.len() × w`).
#[allow(clippy::too_many_arguments)]
pub(super) fn gather<E: Element>(
    src: &[E],
    pos: &[usize],
    b: usize,
    n: usize,
    heads: usize,
    h: usize,
    w: usize,
    dst: &mut Vec<E>,
) {
    dst.clear();
    for &p in pos {
        let off = ((b * n + p) * heads + h) * w;
        dst.extend_from_slice(&src[off..off + w]);
    }
}

/// Packs `nk × d` keys and `nk × dv` values (row-major) as GEMM panels.
pub(super) fn pack_kv<E: Element>(
    kbox: &[E],
    vbox: &[E],
    nk: usize,
    d: usize,
    dv: usize,
    out: &mut Packed<E::Acc>,
) {
    let one = E::Acc::ONE;
    pack_transposed(
        kbox,
        View {
            base: 0,
            rs: d,
            rows: nk,
            cols: d,
        },
        one,
        &mut out.kt,
    );
    out.vps = pack_cols(
        vbox,
        View {
            base: 0,
            rs: dv,
            rows: nk,
            cols: dv,
        },
        one,
        &mut out.v,
    );
    out.nk = nk;
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
    out: &mut [E],
    lse: &mut [E::Acc],
) {
    let level = simd::active();
    let (batch, hq, hkv, d, dv, na) = (
        dims.batch,
        dims.q_heads,
        dims.kv_heads,
        dims.head_dim,
        dims.v_head_dim,
        dims.n_additional,
    );
    let n = geo.n;
    let group = hq / hkv;
    let dv_pad = round_up_nr(dv);

    // Additional keys: packed once per (batch, kv head).
    let extra: Vec<Packed<E::Acc>> = if na == 0 {
        Vec::new()
    } else {
        (0..batch * hkv)
            .into_par_iter()
            .map(|bh| {
                let (bi, h) = (bh / hkv, bh % hkv);
                let pos: Vec<usize> = (0..na).collect();
                let (mut kb, mut vb) = (Vec::new(), Vec::new());
                gather(ak, &pos, bi, na, hkv, h, d, &mut kb);
                gather(av, &pos, bi, na, hkv, h, dv, &mut vb);
                let mut p = Packed::new();
                pack_kv(&kb, &vb, na, d, dv, &mut p);
                p
            })
            .collect()
    };

    let t = tile_extent(geo);
    let tl = tiles(geo, t);
    let tq = t[0] * t[1] * t[2];
    let heads = batch;
    let lds = CH * NR;
    let qscale = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let ln2 = E::Acc::from_f64(std::f64::consts::LN_2);
    let outp = SharedMut(out.as_mut_ptr());
    let lsep = SharedMut(lse.as_mut_ptr());
    let scratch = PerThread::new();

    (0..tl.len() * heads)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let init = || Scratch::<E> {
                tile: Tile::new(),
                kbox: Vec::new(),
                vbox: Vec::new(),
                packed: Packed::new(),
                q: Vec::new(),
                s: vec![E::Acc::ZERO; tq * lds],
                o: vec![E::Acc::ZERO; tq * dv_pad],
                m: vec![E::Acc::ZERO; tq],
                l: vec![E::Acc::ZERO; tq],
                tmp: vec![E::Acc::ZERO; d.max(dv)],
            };
            scratch.with(init, |sc| {
                let (g, origin) = tl[task / heads];
                let bi = task % heads;
                sc.tile.build(geo, g, origin, t);
                for h in 0..hq {
                    let kh = h / group;
                    let tile = &sc.tile;
                    let nq = tile.nq;
                    if h % group == 0 {
                        gather(k, &tile.kpos, bi, n, hkv, kh, d, &mut sc.kbox);
                        gather(v, &tile.kpos, bi, n, hkv, kh, dv, &mut sc.vbox);
                        pack_kv(&sc.kbox, &sc.vbox, tile.nk, d, dv, &mut sc.packed);
                    }
                    // Scaled queries.
                    sc.q.clear();
                    sc.q.resize(nq * d, E::Acc::ZERO);
                    for (qi, &p) in tile.qpos.iter().enumerate() {
                        let off = ((bi * n + p) * hq + h) * d;
                        let dst = &mut sc.q[qi * d..(qi + 1) * d];
                        E::to_acc_slice(&q[off..off + d], dst);
                        dst.iter_mut().for_each(|x| *x *= qscale);
                    }
                    sc.o[..nq * dv_pad].fill(E::Acc::ZERO);
                    sc.m[..nq].fill(E::Acc::NEG_INFINITY);
                    sc.l[..nq].fill(E::Acc::ZERO);

                    let np = panels(tile.nk);
                    let mut pc0 = 0;
                    while pc0 < np {
                        let pc1 = (pc0 + CH).min(np);
                        chunk(
                            level,
                            &sc.packed,
                            &sc.q,
                            &mut sc.s,
                            &mut sc.o,
                            &mut sc.m,
                            &mut sc.l,
                            nq,
                            d,
                            dv_pad,
                            pc0,
                            pc1,
                            |p| tile.range[p],
                            |qi| {
                                let (f, last) = tile.span[qi];
                                let (f, last) = (f.max(pc0), last.min(pc1 - 1));
                                (f <= last).then(|| (f * NR, ((last + 1) * NR).min(tile.nk)))
                            },
                            |qi, row, cs, ce| tile.mask(qi, row, cs, ce),
                        );
                        pc0 = pc1;
                    }
                    if na > 0 {
                        let ex = &extra[bi * hkv + kh];
                        let np = panels(na);
                        let mut pc0 = 0;
                        while pc0 < np {
                            let pc1 = (pc0 + CH).min(np);
                            chunk(
                                level,
                                ex,
                                &sc.q,
                                &mut sc.s,
                                &mut sc.o,
                                &mut sc.m,
                                &mut sc.l,
                                nq,
                                d,
                                dv_pad,
                                pc0,
                                pc1,
                                |_| (0, nq),
                                |_| Some((pc0 * NR, (pc1 * NR).min(na))),
                                |_, _, _, _| {},
                            );
                            pc0 = pc1;
                        }
                    }
                    // SAFETY: the tile's query rows of head (bi, h) belong to this task alone.
                    unsafe {
                        for qi in 0..nq {
                            let row = (bi * n + tile.qpos[qi]) * hq + h;
                            let l = sc.l[qi];
                            let inv = E::Acc::ONE / l;
                            for (x, &y) in sc.tmp[..dv].iter_mut().zip(&sc.o[qi * dv_pad..]) {
                                *x = y * inv;
                            }
                            let dst = std::slice::from_raw_parts_mut(outp.get().add(row * dv), dv);
                            E::from_acc_slice(&sc.tmp[..dv], dst);
                            *lsep.get().add(row) = sc.m[qi] * ln2 + l.ln();
                        }
                    }
                }
            })
        });
}

/// Folds key panels `pc0..pc1` of `kv` into the online softmax of the tile's queries.
/// `range(p)`: the queries computing panel `p`; `span(qi)`: the key columns `[cs, ce)` of
/// this chunk query `qi` computed (None: none); `mask` sets the scores outside the window to
/// `-inf`.
#[allow(clippy::too_many_arguments)]
fn chunk<T: Acc>(
    level: Level,
    kv: &Packed<T>,
    q: &[T],
    s: &mut [T],
    o: &mut [T],
    m: &mut [T],
    l: &mut [T],
    nq: usize,
    d: usize,
    dv_pad: usize,
    pc0: usize,
    pc1: usize,
    range: impl Fn(usize) -> (usize, usize),
    span: impl Fn(usize) -> Option<(usize, usize)>,
    mask: impl Fn(usize, &mut [T], usize, usize),
) {
    let lds = CH * NR;
    let base = pc0 * NR;
    for p in pc0..pc1 {
        let (qa, qb) = range(p);
        if qa >= qb {
            continue;
        }
        let g = GemmDims {
            m: qb - qa,
            npanels: 1,
            k: d,
            rsa: d,
            csa: 1,
            bps: d * NR,
            ldc: lds,
            accumulate: false,
        };
        gemm(
            level,
            &g,
            &q[qa * d..],
            &kv.kt[p * d * NR..],
            &mut s[qa * lds + p * NR - base..],
        );
    }
    for qi in 0..nq {
        let Some((cs, ce)) = span(qi) else { continue };
        let row = &mut s[qi * lds + cs - base..qi * lds + ce - base];
        mask(qi, row, cs, ce);
        let mx = T::row_max(level, row);
        let m_old = m[qi];
        #[allow(clippy::eq_op)]
        let m_new = if mx > m_old || mx != mx { mx } else { m_old };
        let m_ref = if m_new == T::NEG_INFINITY {
            T::ZERO
        } else {
            m_new
        };
        let sum = T::exp2_sub_sum(level, row, m_ref);
        let alpha = if m_old == m_new {
            T::ONE
        } else {
            T::exp2(m_old - m_ref)
        };
        l[qi] = l[qi] * alpha + sum;
        m[qi] = m_new;
        if alpha != T::ONE {
            T::scale(level, &mut o[qi * dv_pad..(qi + 1) * dv_pad], alpha);
        }
    }
    let nvp = dv_pad / NR;
    if nvp == 0 {
        return;
    }
    for p in pc0..pc1 {
        let (qa, qb) = range(p);
        if qa >= qb {
            continue;
        }
        let kc = NR.min(kv.nk - p * NR);
        let g = GemmDims {
            m: qb - qa,
            npanels: nvp,
            k: kc,
            rsa: lds,
            csa: 1,
            bps: kv.vps,
            ldc: dv_pad,
            accumulate: true,
        };
        gemm(
            level,
            &g,
            &s[qa * lds + p * NR - base..],
            &kv.v[p * NR * NR..],
            &mut o[qa * dv_pad..],
        );
    }
}
