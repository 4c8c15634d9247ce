//! Forward for small windows (AVX-512, f32 accumulation): sixteen neighbouring queries of a
//! line (the last spatial dimension) sit in the SIMD lanes, and every key offset of the
//! window is one vector operation across them.
//!
//! The tiled path computes a query tile against the box of keys its windows cover; at k = 7
//! only about a third of those scores lie inside a window, and its GEMMs have inner
//! dimension `head_dim`. Here the query, key and value lines of a band of rows are
//! transposed once (`[dim][x]`), so for window offset `dx` the keys of lanes `x0..x0+16` are
//! one unaligned load at `start(x0) + dx`: no score outside a window is computed, the softmax
//! is element-wise across the window's score vectors (no horizontal reductions, no online
//! rescaling), and `P·V` accumulates `[dv][16]` in registers. At a line's edges NATTEN
//! windows stop moving; there each load is permuted (`vpermps`) so lane `l` reads key
//! `start(x0 + l) + dx`. Needs stride 1 along the line (neighbouring lanes' windows then
//! start at most one key apart) and a 2-D input; other calls take the tiled path (see
//! [`applies`]).

use super::{group_window, Geo, NaDims, SharedMut};
use crate::buffer_pool::{take, PoolVec};
use crate::element::Element;
use crate::per_thread::PerThread;
use crate::simd::Level;
use rayon::prelude::*;
use std::any::TypeId;

/// Largest window (keys per query) taken here: the score vectors of a block stay in L1.
const MAX_KEYS: usize = 128;
/// Longest window along the line taken here: wide windows waste little of the tiled path's
/// key boxes, and cost this path an unaligned load per key (a 1-D k = 63 forward measured
/// 2.7× slower here).
const MAX_LINE_KERNEL: usize = 16;
/// Shortest line taken here: shorter lines leave most lanes idle.
const MIN_LINE: usize = 12;
/// Most query positions per task: a band of lines whose key lines are transposed together
/// (one kv head's transposed band, ~400 KB at 56 × 56 and head dim 32, stays in L2). Bands
/// of 512 positions measured ~6% slower at 56 × 56 k = 7 (more key lines transposed twice,
/// and seven bands for two threads).
const BAND: usize = 1024;

/// Whether the call runs here.
pub(super) fn applies<E: Element>(level: Level, dims: &NaDims, geo: &Geo) -> bool {
    cfg!(target_arch = "x86_64")
        && level == Level::Avx512
        && crate::simd::supported(level)
        && TypeId::of::<E::Acc>() == TypeId::of::<f32>()
        && dims.n_additional == 0
        && geo.s[2] == 1
        && geo.k.iter().product::<usize>() <= MAX_KEYS
        && geo.k[2] <= MAX_LINE_KERNEL
        // 2-D only. 3-D calls stay tiled: at 8×16×16, k = 3 that measured faster (short
        // lines, every block at a line edge). 1-D ones too: a single line has no neighbour
        // to share key loads with, nor bands to split across threads (L = 4096, k = 13
        // measured 3.5× slower here).
        && geo.len[0] == 1
        && geo.len[1] > 1
        && geo.group_len(2, geo.d[2] - 1) >= MIN_LINE
}

/// Per-thread buffers (the transposed key / value lines pooled across calls: fresh
/// allocations of their size fault in every page).
struct Scratch {
    qt: Vec<f32>,
    kt: PoolVec<f32>,
    vt: PoolVec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    rows: Vec<f32>,
}

/// Rows of one head of a heads-last tensor, as f32 (converted through `tmp` when needed).
struct Src<'a, E> {
    src: &'a [E],
    heads: usize,
    h: usize,
    w: usize,
}

impl<E: Element> Src<'_, E> {
    /// Pointers to the rows at flattened positions `pos` (of batch entry `b`) as f32: in
    /// place for f32 storage, else converted into `tmp[i·w ..]`.
    fn rows(
        &self,
        b: usize,
        n: usize,
        pos: impl Iterator<Item = usize>,
        tmp: &mut [f32],
        ptrs: &mut [*const f32; 16],
    ) {
        for (i, p) in pos.enumerate() {
            let off = ((b * n + p) * self.heads + self.h) * self.w;
            let row = &self.src[off..off + self.w];
            ptrs[i] = match E::as_acc_slice(row) {
                Some(a) => a.as_ptr() as *const f32,
                None => {
                    let dst = &mut tmp[i * self.w..(i + 1) * self.w];
                    // SAFETY: `applies` checked that `E::Acc` is f32.
                    E::to_acc_slice(row, unsafe { &mut *(dst as *mut [f32] as *mut [E::Acc]) });
                    dst.as_ptr()
                }
            };
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
    out: &mut [E],
    lse: &mut [E::Acc],
) {
    let (batch, hq, hkv, d, dv) = (
        dims.batch,
        dims.q_heads,
        dims.kv_heads,
        dims.head_dim,
        dims.v_head_dim,
    );
    let n = geo.n;
    let group = hq / hkv;
    let qscale = (scale * std::f64::consts::LOG2_E) as f32;
    // Bands: (group, first line, end line) (2-D: the leading internal dimension has length
    // 1); every group's lines are split evenly into `nb` bands.
    let n0 = [1, 2].map(|i| geo.group_len(i, 0));
    let nb = bands_per_group(
        n0,
        geo.d[1] * geo.d[2] * batch,
        rayon::current_num_threads(),
    );
    let mut bands = Vec::new();
    for g1 in 0..geo.d[1] {
        for g2 in 0..geo.d[2] {
            let len = geo.group_len(1, g1);
            bands.extend(
                (0..nb)
                    .map(|i| ([0, g1, g2], len * i / nb, len * (i + 1) / nb))
                    .filter(|&(_, a, b)| a < b),
            );
        }
    }
    // Largest band's key lines × padded line length.
    let kcap =
        (n0[0].div_ceil(nb) + geo.k[1]).min(n0[0]) * (n0[1] + geo.k[2] + 15).next_multiple_of(16);
    let outp = SharedMut(out.as_mut_ptr());
    // SAFETY: `applies` checked that `E::Acc` is f32.
    let lse = unsafe { &mut *(lse as *mut [E::Acc] as *mut [f32]) };
    let lsep = SharedMut(lse.as_mut_ptr());
    let scratch = PerThread::new();
    // A task takes every head of its band (as the tiled path takes every head of its
    // tile): q heads sharing a kv head reuse its transposed keys / values.
    (0..bands.len() * batch)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let (g, y0, y1) = bands[task % bands.len()];
            let bi = task / bands.len();
            let init = || Scratch {
                qt: Vec::new(),
                kt: take(kcap * d),
                vt: take(kcap * dv),
                s: Vec::new(),
                o: Vec::new(),
                rows: Vec::new(),
            };
            scratch.with(init, |sc| {
                let ctx = Band {
                    geo,
                    g,
                    y: (y0, y1),
                    b: bi,
                    n,
                    dv,
                };
                for h in 0..hq {
                    let kh = h / group;
                    let qs = Src {
                        src: q,
                        heads: hq,
                        h,
                        w: d,
                    };
                    let ks = Src {
                        src: k,
                        heads: hkv,
                        h: kh,
                        w: d,
                    };
                    let vs = Src {
                        src: v,
                        heads: hkv,
                        h: kh,
                        w: dv,
                    };
                    let kv = (h % group == 0).then_some((&ks, &vs));
                    // SAFETY: this task alone writes its band's query rows.
                    unsafe { ctx.run(sc, &qs, kv, qscale, outp, lsep, hq, h) };
                }
            })
        });
}

/// Bands per group for `n0 = [lines, line length]` of the largest group: the fewest of at
/// most [`BAND`] positions, raised until the tasks split evenly across `threads`.
fn bands_per_group(n0: [usize; 2], tasks: usize, threads: usize) -> usize {
    let lines = n0[0].max(1);
    let mut nb = lines.div_ceil((BAND / n0[1].max(1)).max(1));
    while nb < lines && !(tasks * nb).is_multiple_of(threads.max(1)) {
        nb += 1;
    }
    nb
}

/// One task's rows: group `g`, group rows `y.0..y.1`, batch entry `b`.
struct Band<'a> {
    geo: &'a Geo,
    g: [usize; 3],
    y: (usize, usize),
    b: usize,
    n: usize,
    /// Value head dim.
    dv: usize,
}

impl Band<'_> {
    fn len(&self, dim: usize) -> usize {
        self.geo.group_len(dim, self.g[dim])
    }

    fn win(&self, dim: usize, i: usize) -> (usize, usize) {
        let geo = self.geo;
        group_window(i, self.len(dim), geo.k[dim], geo.s[dim], geo.c[dim])
    }

    /// Transposes line `y` of `src` into `dst[c·xp + x]` (times `scale`); columns from
    /// the line's end to `xp` are zero.
    #[allow(clippy::too_many_arguments)]
    fn transpose_line<E: Element>(
        &self,
        src: &Src<'_, E>,
        y: usize,
        scale: f32,
        xp: usize,
        rows: &mut Vec<f32>,
        dst: &mut [f32],
    ) {
        let (nx, w) = (self.len(2), src.w);
        let mut x0 = 0;
        while x0 < nx {
            let nr = (nx - x0).min(16);
            rows.resize(16 * w, 0.0);
            let pos = (x0..x0 + nr).map(|x| self.geo.pos(self.g, [0, y, x]));
            let mut ptrs = [std::ptr::null(); 16];
            src.rows(self.b, self.n, pos, rows, &mut ptrs);
            // SAFETY: `applies` checked AVX-512F; `ptrs[..nr]` are rows of `w` values (in
            // the source or in `rows`), `dst` holds `w` rows of `xp ≥ x0 + 16`.
            unsafe { x86::transpose_block(&ptrs, nr, w, scale, &mut dst[x0..], xp) };
            x0 += 16;
        }
        let done = nx.next_multiple_of(16);
        for c in 0..w {
            dst[c * xp + done..(c + 1) * xp].fill(0.0);
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn run<E: Element>(
        &self,
        sc: &mut Scratch,
        qs: &Src<'_, E>,
        kv: Option<(&Src<'_, E>, &Src<'_, E>)>,
        qscale: f32,
        outp: SharedMut<E>,
        lsep: SharedMut<f32>,
        hq: usize,
        h: usize,
    ) {
        let geo = self.geo;
        let (d, dv) = (qs.w, self.dv);
        let nx = self.len(2);
        let k2 = geo.k[2];
        // Loads reach `start + dx + 15 < nx + k2 + 15` (causal windows near the end).
        let xp = (nx + k2 + 15).next_multiple_of(16);
        // Key rows: the union of the band's windows (windows move monotonically).
        let ky = (self.win(1, self.y.0).0, self.win(1, self.y.1 - 1).1);
        let lines = ky.1 - ky.0;
        // Transposed keys / values of the band, kept for the q heads sharing a kv head.
        if let Some((ks, vs)) = kv {
            sc.kt.resize(lines * d * xp, 0.0);
            sc.vt.resize(lines * dv * xp, 0.0);
            for bb in ky.0..ky.1 {
                let li = bb - ky.0;
                let kt = &mut sc.kt[li * d * xp..(li + 1) * d * xp];
                self.transpose_line(ks, bb, 1.0, xp, &mut sc.rows, kt);
                let vt = &mut sc.vt[li * dv * xp..(li + 1) * dv * xp];
                self.transpose_line(vs, bb, 1.0, xp, &mut sc.rows, vt);
            }
        }
        sc.qt.resize(2 * d * xp, 0.0);
        let nkeys = geo.k.iter().product::<usize>();
        sc.s.resize(2 * nkeys * 16, 0.0);
        let osz = dv.next_multiple_of(16) * 16;
        sc.o.resize(2 * osz, 0.0);
        let mut keyrows: Vec<x86::KeyRow> = Vec::with_capacity(2 * nkeys);
        let mut qt = std::mem::take(&mut sc.qt);
        let ln2 = std::f32::consts::LN_2;
        // Every line of the group has the same blocks.
        let blocks: Vec<Block> = (0..nx)
            .step_by(16)
            .map(|x0| Block::new(self, x0, k2))
            .collect();
        let f32_out = TypeId::of::<E>() == TypeId::of::<f32>();
        // Two neighbouring lines at a time: most of their key rows are shared, and each
        // key / value vector loaded then feeds both.
        let mut y = self.y.0;
        while y < self.y.1 {
            let nlines = if y + 1 < self.y.1 { 2 } else { 1 };
            for j in 0..nlines {
                let dst = &mut qt[j * d * xp..(j + 1) * d * xp];
                self.transpose_line(qs, y + j, qscale, xp, &mut sc.rows, dst);
            }
            let wa = self.win(1, y);
            let wb = if nlines == 2 {
                self.win(1, y + 1)
            } else {
                (wa.0, wa.0)
            };
            keyrows.clear();
            let (mut ia, mut ib) = (0, 0);
            for bb in wa.0.min(wb.0)..wa.1.max(wb.1) {
                let (in_a, in_b) = ((wa.0..wa.1).contains(&bb), (wb.0..wb.1).contains(&bb));
                if !in_a && !in_b {
                    continue;
                }
                let li = bb - ky.0;
                keyrows.push(x86::KeyRow {
                    k: sc.kt.as_ptr().add(li * d * xp),
                    v: sc.vt.as_ptr().add(li * dv * xp),
                    a: in_a.then_some(ia),
                    b: in_b.then_some(ib),
                });
                ia += in_a as usize;
                ib += in_b as usize;
            }
            let (s_a, s_b) = sc.s.split_at_mut(nkeys * 16);
            let (o_a, o_b) = sc.o.split_at_mut(osz);
            for (bi, blk) in blocks.iter().enumerate() {
                let x0 = 16 * bi;
                let q = [qt.as_ptr().add(x0), qt.as_ptr().add(d * xp + x0)];
                let ml = x86::block(
                    blk,
                    q,
                    nlines,
                    &keyrows,
                    d,
                    dv,
                    xp,
                    k2,
                    [&mut *s_a, &mut *s_b],
                    [&mut *o_a, &mut *o_b],
                );
                for (j, (m, l)) in ml.iter().enumerate().take(nlines) {
                    // Rows out: `o[c][lane]` (already divided by l) transposed per lane,
                    // straight into the output for f32, else converted from `rows`.
                    let row = |lane: usize| {
                        let pos = geo.pos(self.g, [0, y + j, x0 + lane]);
                        (self.b * self.n + pos) * hq + h
                    };
                    sc.rows.resize(16 * dv, 0.0);
                    let mut dst = [std::ptr::null_mut::<f32>(); 16];
                    for (lane, p) in dst.iter_mut().enumerate().take(blk.nl) {
                        *p = if f32_out {
                            outp.get().add(row(lane) * dv) as *mut f32
                        } else {
                            sc.rows.as_mut_ptr().add(lane * dv)
                        };
                    }
                    x86::untranspose(if j == 0 { o_a } else { o_b }, dv, &dst, blk.nl);
                    for lane in 0..blk.nl {
                        let r = row(lane);
                        if !f32_out {
                            let dst = std::slice::from_raw_parts_mut(outp.get().add(r * dv), dv);
                            let src = &sc.rows[lane * dv..(lane + 1) * dv];
                            // SAFETY: `E::Acc` is f32.
                            E::from_acc_slice(&*(src as *const [f32] as *const [E::Acc]), dst);
                        }
                        *lsep.get().add(r) = m[lane] * ln2 + l[lane].ln();
                    }
                }
            }
            y += nlines;
        }
        sc.qt = qt;
    }
}

/// The lanes of one block of queries `x0 .. x0 + nl` of a line.
struct Block {
    nl: usize,
    /// First key column read (window start of lane 0).
    base: usize,
    /// Lane `l` reads column `base + idx[l] + dx`.
    idx: [u32; 16],
    /// Whether `idx` is the identity (no permute needed).
    plain: bool,
    /// Per window column `dx`, the lanes whose window holds it (causal windows are short
    /// near the start).
    mask: [u16; MAX_KEYS],
    /// Whether every lane holds every column.
    full: bool,
}

impl Block {
    fn new(band: &Band<'_>, x0: usize, k2: usize) -> Self {
        let nx = band.len(2);
        let nl = (nx - x0).min(16);
        let wins: [(usize, usize); 16] = std::array::from_fn(|l| band.win(2, x0 + l.min(nl - 1)));
        let base = wins[0].0;
        let idx = wins.map(|w| (w.0 - base) as u32);
        let plain = idx.iter().enumerate().all(|(l, &i)| i as usize == l);
        let mut mask = [0u16; MAX_KEYS];
        for (dx, m) in mask.iter_mut().enumerate().take(k2) {
            *m = (0..16).fold(0u16, |m, l| {
                let (s, e) = wins[l];
                m | (((s + dx < e) as u16) << l)
            });
        }
        let full = mask[..k2].iter().all(|&m| m == u16::MAX);
        Block {
            nl,
            base,
            idx,
            plain,
            mask,
            full,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Block;
    use crate::neighborhood::pack::transpose16;
    use crate::simd::math::x86_avx512::exp2v_masked;
    use std::arch::x86_64::*;

    /// `dst[c·xp + i] = scale · rows[i][c]` for `i < 16` (rows `nr..16` as zero).
    ///
    /// # Safety
    /// AVX-512F; `rows[..nr]` valid for `w` reads.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_block(
        rows: &[*const f32; 16],
        nr: usize,
        w: usize,
        scale: f32,
        dst: &mut [f32],
        xp: usize,
    ) {
        assert!(nr <= 16 && dst.len() >= (w - 1) * xp + 16);
        let sv = _mm512_set1_ps(scale);
        let mut r = [_mm512_setzero_ps(); 16];
        let mut c0 = 0;
        while c0 < w {
            let nc = (w - c0).min(16);
            let k = ((1u32 << nc) - 1) as __mmask16;
            for (i, ri) in r.iter_mut().enumerate() {
                *ri = if i < nr {
                    _mm512_maskz_loadu_ps(k, rows[i].add(c0))
                } else {
                    _mm512_setzero_ps()
                };
            }
            transpose16(&mut r);
            for (c, &rc) in r.iter().enumerate().take(nc) {
                _mm512_storeu_ps(dst.as_mut_ptr().add((c0 + c) * xp), _mm512_mul_ps(rc, sv));
            }
            c0 += 16;
        }
    }

    /// `dst[l][c] = o[c·16 + l]` for lanes `l < nl`.
    ///
    /// # Safety
    /// AVX-512F; `dst[..nl]` valid for `w` writes each.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn untranspose(o: &[f32], w: usize, dst: &[*mut f32; 16], nl: usize) {
        assert!(o.len() >= w.next_multiple_of(16) * 16 && nl <= 16);
        let mut r = [_mm512_setzero_ps(); 16];
        let mut c0 = 0;
        while c0 < w {
            let nc = (w - c0).min(16);
            for (c, rc) in r.iter_mut().enumerate() {
                *rc = _mm512_loadu_ps(o.as_ptr().add((c0 + c) * 16));
            }
            transpose16(&mut r);
            let k = ((1u32 << nc) - 1) as __mmask16;
            for (l, &rl) in r.iter().enumerate().take(nl) {
                _mm512_mask_storeu_ps(dst[l].add(c0), k, rl);
            }
            c0 += 16;
        }
    }

    /// A key row (one transposed key line and its value line) of the window of line A,
    /// line B or both: its index among that line's window rows.
    pub(super) struct KeyRow {
        pub k: *const f32,
        pub v: *const f32,
        pub a: Option<usize>,
        pub b: Option<usize>,
    }

    #[inline(always)]
    unsafe fn key<const PERM: bool>(p: *const f32, idx: __m512i) -> __m512 {
        let x = _mm512_loadu_ps(p);
        if PERM {
            _mm512_permutexvar_ps(idx, x)
        } else {
            x
        }
    }

    /// Scores of `W` consecutive window columns of one key row for line A (and B when
    /// `TWO`): `s[c·16 + l] = Σ_i q[i·xp + l] · k[i·xp + idx[l] + c]`.
    // Both lines' accumulators are indexed by column.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores<const W: usize, const PERM: bool, const TWO: bool>(
        q: [*const f32; 2],
        k: *const f32,
        d: usize,
        xp: usize,
        idx: __m512i,
        s: [*mut f32; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); W]; 2];
        for i in 0..d {
            let qa = _mm512_loadu_ps(q[0].add(i * xp));
            let qb = if TWO {
                _mm512_loadu_ps(q[1].add(i * xp))
            } else {
                qa
            };
            let kr = k.add(i * xp);
            for c in 0..W {
                let kv = key::<PERM>(kr.add(c), idx);
                acc[0][c] = _mm512_fmadd_ps(qa, kv, acc[0][c]);
                if TWO {
                    acc[1][c] = _mm512_fmadd_ps(qb, kv, acc[1][c]);
                }
            }
        }
        for (j, aj) in acc.iter().enumerate().take(1 + TWO as usize) {
            for (c, &a) in aj.iter().enumerate() {
                _mm512_storeu_ps(s[j].add(c * 16), a);
            }
        }
    }

    /// `o_j[c·16 + l] = Σ_rows Σ_dx p_j[(row_j·k2 + dx)·16 + l] · v_row[off + c·xp + idx[l] + dx]`
    /// for `C` value columns, line A (and B when `TWO`).
    // Both lines' accumulators are indexed by column.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const C: usize, const PERM: bool, const TWO: bool>(
        rows: &[KeyRow],
        p: [*const f32; 2],
        off: usize,
        k2: usize,
        xp: usize,
        idx: __m512i,
        o: [*mut f32; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; 2];
        for row in rows {
            let vr = row.v.add(off);
            match (row.a, row.b) {
                (Some(ia), Some(ib)) if TWO => {
                    for dx in 0..k2 {
                        let pa = _mm512_loadu_ps(p[0].add((ia * k2 + dx) * 16));
                        let pb = _mm512_loadu_ps(p[1].add((ib * k2 + dx) * 16));
                        for c in 0..C {
                            let x = key::<PERM>(vr.add(c * xp + dx), idx);
                            acc[0][c] = _mm512_fmadd_ps(pa, x, acc[0][c]);
                            acc[1][c] = _mm512_fmadd_ps(pb, x, acc[1][c]);
                        }
                    }
                }
                (ia, ib) => {
                    let (j, i) = match (ia, ib) {
                        (Some(i), _) => (0, i),
                        (None, Some(i)) if TWO => (1, i),
                        _ => continue,
                    };
                    for dx in 0..k2 {
                        let pj = _mm512_loadu_ps(p[j].add((i * k2 + dx) * 16));
                        for c in 0..C {
                            let x = key::<PERM>(vr.add(c * xp + dx), idx);
                            acc[j][c] = _mm512_fmadd_ps(pj, x, acc[j][c]);
                        }
                    }
                }
            }
        }
        for (j, aj) in acc.iter().enumerate().take(1 + TWO as usize) {
            for (c, &a) in aj.iter().enumerate() {
                _mm512_storeu_ps(o[j].add(c * 16), a);
            }
        }
    }

    macro_rules! by_width {
        ($w:expr, $perm:expr, $two:expr, $args:tt) => {
            by_width!(@ $w, $perm, $two, $args, 1 2 3 4 5 6 7 8)
        };
        (@ $w:expr, $perm:expr, $two:expr, $args:tt, $($n:literal)*) => {
            match ($w, $perm, $two) {
                $(
                    ($n, false, false) => scores::<$n, false, false> $args,
                    ($n, true, false) => scores::<$n, true, false> $args,
                    ($n, false, true) => scores::<$n, false, true> $args,
                    ($n, true, true) => scores::<$n, true, true> $args,
                )*
                _ => unreachable!("score width {}", $w),
            }
        };
    }

    /// Window columns per score call: `k2` split into near-equal parts of at most 8.
    fn column_parts(k2: usize) -> impl Iterator<Item = (usize, usize)> {
        let parts = k2.div_ceil(8);
        (0..parts).map(move |i| {
            let (a, b) = (i * k2 / parts, (i + 1) * k2 / parts);
            (a, b - a)
        })
    }

    /// One block of one or two lines (`nlines`): scores over the window rows × `k2`
    /// columns, softmax across them, `o = P·V / l`. Returns each line's per-lane max (base
    /// 2) and sum.
    ///
    /// # Safety
    /// AVX-512F; `q[j]` valid for `d` rows of stride `xp` (16 lanes each) for `j < nlines`;
    /// every row's `k` / `v` a transposed line of `d` / `dv` rows of `xp` columns with
    /// `blk.base + 15 + k2 ≤ xp`; rows flagged for line B only when `nlines == 2`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        blk: &Block,
        q: [*const f32; 2],
        nlines: usize,
        rows: &[KeyRow],
        d: usize,
        dv: usize,
        xp: usize,
        k2: usize,
        s: [&mut [f32]; 2],
        o: [&mut [f32]; 2],
    ) -> [([f32; 16], [f32; 16]); 2] {
        let two = nlines == 2;
        let nk = [
            rows.iter().filter(|r| r.a.is_some()).count() * k2,
            rows.iter().filter(|r| r.b.is_some()).count() * k2,
        ];
        assert!(s[0].len() >= nk[0] * 16 && s[1].len() >= nk[1] * 16);
        assert!(two || nk[1] == 0);
        let osz = dv.next_multiple_of(16) * 16;
        assert!(o[0].len() >= osz && o[1].len() >= osz);
        assert!(blk.base + k2 + 15 <= xp && k2 <= blk.mask.len());
        let idx = _mm512_loadu_si512(blk.idx.as_ptr() as *const _);
        let perm = !blk.plain;
        let sp = [s[0].as_mut_ptr(), s[1].as_mut_ptr()];
        for row in rows {
            for (c0, w) in column_parts(k2) {
                let kp = row.k.add(blk.base + c0);
                let at = |j: usize, i: usize| sp[j].add((i * k2 + c0) * 16);
                match (row.a, row.b) {
                    (Some(ia), Some(ib)) => {
                        by_width!(w, perm, true, (q, kp, d, xp, idx, [at(0, ia), at(1, ib)]))
                    }
                    (Some(ia), None) => {
                        by_width!(w, perm, false, (q, kp, d, xp, idx, [at(0, ia), at(0, ia)]))
                    }
                    (None, Some(ib)) => {
                        let qb = [q[1], q[1]];
                        by_width!(w, perm, false, (qb, kp, d, xp, idx, [at(1, ib), at(1, ib)]))
                    }
                    (None, None) => {}
                }
            }
        }
        // Softmax across the window, lane-wise.
        let mask = |t: usize| if blk.full { u16::MAX } else { blk.mask[t % k2] };
        let mut res = [([0f32; 16], [0f32; 16]); 2];
        for j in 0..nlines {
            let p = sp[j];
            let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
            for t in 0..nk[j] {
                mx = _mm512_mask_max_ps(mx, mask(t), mx, _mm512_loadu_ps(p.add(t * 16)));
            }
            let mut sum = _mm512_setzero_ps();
            for t in 0..nk[j] {
                let x = _mm512_sub_ps(_mm512_loadu_ps(p.add(t * 16)), mx);
                let e = exp2v_masked(mask(t), x);
                _mm512_storeu_ps(p.add(t * 16), e);
                sum = _mm512_add_ps(sum, e);
            }
            _mm512_storeu_ps(res[j].0.as_mut_ptr(), mx);
            _mm512_storeu_ps(res[j].1.as_mut_ptr(), sum);
        }
        let op = [o[0].as_mut_ptr(), o[1].as_mut_ptr()];
        let pp = [sp[0] as *const f32, sp[1] as *const f32];
        let mut c0 = 0;
        while c0 < dv {
            let left = dv - c0;
            let oc = [op[0].add(c0 * 16), op[1].add(c0 * 16)];
            let args = (rows, pp, blk.base + c0 * xp, k2, xp, idx, oc);
            let step = match (two, left) {
                (false, 16..) => 16,
                (true, 8..) | (false, 8..) => 8,
                (_, 4..) => 4,
                _ => 1,
            };
            macro_rules! call {
                ($($c:literal)*) => {
                    match (step, perm, two) {
                        $(
                            ($c, false, false) => pv::<$c, false, false>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
                            ($c, true, false) => pv::<$c, true, false>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
                            ($c, false, true) => pv::<$c, false, true>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
                            ($c, true, true) => pv::<$c, true, true>(args.0, args.1, args.2, args.3, args.4, args.5, args.6),
                        )*
                        _ => unreachable!(),
                    }
                };
            }
            call!(16 8 4 1);
            c0 += step;
        }
        for (j, r) in res.iter().enumerate().take(nlines) {
            let inv = _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_loadu_ps(r.1.as_ptr()));
            for c in 0..dv {
                let p = op[j].add(c * 16);
                _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), inv));
            }
        }
        res
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    //! Never reached: `applies` is false off x86-64.
    use super::Block;
    pub(super) struct KeyRow {
        pub k: *const f32,
        pub v: *const f32,
        pub a: Option<usize>,
        pub b: Option<usize>,
    }
    pub(super) unsafe fn transpose_block(
        _: &[*const f32; 16],
        _: usize,
        _: usize,
        _: f32,
        _: &mut [f32],
        _: usize,
    ) {
        unreachable!()
    }
    pub(super) unsafe fn untranspose(_: &[f32], _: usize, _: &[*mut f32; 16], _: usize) {
        unreachable!()
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        _: &Block,
        _: [*const f32; 2],
        _: usize,
        _: &[KeyRow],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: [&mut [f32]; 2],
        _: [&mut [f32]; 2],
    ) -> [([f32; 16], [f32; 16]); 2] {
        unreachable!()
    }
}
