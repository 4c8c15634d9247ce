//! Forward pass: one task per (query tile, batch, query head); online softmax over chunks of
//! the tile's key box, then over the additional keys.

use super::pack::{self, Rows};
use super::{rows, tile_extent, tiles, Geo, NaDims, SharedMut, Tile};
use crate::buffer_pool::{take_filled, PoolVec};
use crate::element::{Acc, Element};
use crate::gemm::{gemm, panels, round_up_nr, GemmDims, NR};
use crate::per_thread::PerThread;
use crate::simd::Level;
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
    packed: Packed<E::Acc>,
    q: Vec<E::Acc>,
    /// Scores of a chunk (pooled: at 128 queries × 512 keys a fresh one is an `mmap` whose
    /// pages fault in on every call).
    s: PoolVec<E::Acc>,
    o: Vec<E::Acc>,
    m: Vec<E::Acc>,
    l: Vec<E::Acc>,
    tmp: Vec<E::Acc>,
}

/// Packs keys and values `kr`, `vr` as Kᵀ panels and V column panels.
pub(super) fn pack_kv<E: Element>(
    level: Level,
    kr: Rows<'_, E>,
    vr: Rows<'_, E>,
    tmp: &mut Vec<E::Acc>,
    out: &mut Packed<E::Acc>,
) {
    pack::transposed(level, kr, tmp, &mut out.kt);
    out.vps = pack::cols(level, vr, tmp, &mut out.v);
    out.nk = kr.pos.len();
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
    out: &mut [E],
    lse: &mut [E::Acc],
) {
    #[cfg(target_arch = "x86_64")]
    if super::band::applies::<E>(level, dims, geo) {
        super::band::run(dims, geo, scale, q, k, v, out, lse);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::cube::applies::<E>(level, dims, geo) {
        super::cube::run(dims, geo, scale, q, k, v, out, lse);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::lanes::applies::<E>(level, dims, geo) {
        super::lanes::run(dims, geo, scale, q, k, v, out, lse);
        return;
    }
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
                let rows = |src, w| Rows {
                    src,
                    pos: &pos,
                    b: bi,
                    n: na,
                    heads: hkv,
                    h,
                    w,
                };
                let mut p = Packed::new();
                pack_kv(level, rows(ak, d), rows(av, dv), &mut Vec::new(), &mut p);
                p
            })
            .collect()
    };

    let t = tile_extent(geo);
    let tl = tiles(geo, t);
    let tq = t[0] * t[1] * t[2];
    let lds = CH * NR;
    let qscale = E::Acc::from_f64(scale * std::f64::consts::LOG2_E);
    let ln2 = E::Acc::from_f64(std::f64::consts::LN_2);
    let outp = SharedMut(out.as_mut_ptr());
    let lsep = SharedMut(lse.as_mut_ptr());
    let scratch = PerThread::new();

    // Batch-major: neighbouring tiles of one batch entry run back to back, so the rows
    // their key boxes share are still in cache.
    (0..tl.len() * batch)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let init = || Scratch::<E> {
                tile: Tile::new(),
                packed: Packed::new(),
                q: Vec::new(),
                s: {
                    // Scores are read only where computed this chunk (masked loads).
                    let mut s = take_filled(tq * lds);
                    s.resize(tq * lds, E::Acc::ZERO);
                    s
                },
                o: vec![E::Acc::ZERO; tq * dv_pad],
                m: vec![E::Acc::ZERO; tq],
                l: vec![E::Acc::ZERO; tq],
                tmp: vec![E::Acc::ZERO; d.max(dv)],
            };
            scratch.with(init, |sc| {
                let (g, origin) = tl[task % tl.len()];
                let bi = task / tl.len();
                sc.tile.build(geo, g, origin, t);
                for h in 0..hq {
                    let kh = h / group;
                    let tile = &sc.tile;
                    let nq = tile.nq;
                    let rows = |src, pos, heads, h, w| Rows {
                        src,
                        pos,
                        b: bi,
                        n,
                        heads,
                        h,
                        w,
                    };
                    if h % group == 0 {
                        pack_kv(
                            level,
                            rows(k, &tile.kpos, hkv, kh, d),
                            rows(v, &tile.kpos, hkv, kh, dv),
                            &mut sc.tmp,
                            &mut sc.packed,
                        );
                    }
                    pack::rows(
                        level,
                        rows(q, &tile.qpos, hq, h, d),
                        qscale,
                        &mut sc.tmp,
                        &mut sc.q,
                    );
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
                            |qi| Some(tile.bits(qi)),
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
                                |_| None,
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
                            let dst = std::slice::from_raw_parts_mut(outp.get().add(row * dv), dv);
                            pack::store_scaled(level, &sc.o[qi * dv_pad..], inv, &mut sc.tmp, dst);
                            *lsep.get().add(row) = sc.m[qi] * ln2 + l.ln();
                        }
                    }
                }
            })
        });
}

/// Folds key panels `pc0..pc1` of `kv` into the online softmax of the tile's queries.
/// `range(p)`: the queries computing panel `p`; `span(qi)`: the key columns `[cs, ce)` of
/// this chunk query `qi` computed (None: none); `bits(qi)`: its window over the key columns
/// (None: every key).
#[allow(clippy::too_many_arguments)]
fn chunk<'b, T: Acc>(
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
    bits: impl Fn(usize) -> Option<&'b [u64]>,
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
        let m_old = m[qi];
        let (m_new, m_ref, sum) = rows::online(level, row, bits(qi), cs, m_old);
        // While the max is still -inf nothing was accumulated: the rescale by 0 of a zero
        // row (every query's first chunk) is skipped.
        let alpha = if m_old == m_new || m_old == T::NEG_INFINITY {
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
