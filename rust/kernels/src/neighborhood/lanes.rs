//! Forward for small windows (AVX-512, f32 accumulation): sixteen neighbouring queries of a
//! line (the last spatial dimension) sit in the SIMD lanes, and every key offset of the
//! window is one vector operation across them.
//!
//! The tiled path computes a query tile against the box of keys its windows cover; at k = 7
//! only about a third of those scores lie inside a window, and its GEMMs have inner
//! dimension `head_dim`. Here the query, key and value lines are transposed once
//! (`[dim][x]`; keys and values into a ring of the lines the current windows span, see
//! [`Band::run`]), so for window offset `dx` the keys of lanes `x0..x0+16` are
//! one unaligned load at `start(x0) + dx`: no score outside a window is computed, the softmax
//! is element-wise across the window's score vectors (no horizontal reductions, no online
//! rescaling), and `P·V` accumulates `[dv][16]` in registers. At a line's edges NATTEN
//! windows stop moving; there each load is permuted (`vpermps`) so lane `l` reads key
//! `start(x0 + l) + dx`. Needs stride 1 along the line (neighbouring lanes' windows then
//! start at most one key apart) and a 2-D input; other calls take the tiled path (see
//! [`applies`]). The score and `P·V` loops (`x86::scores_rows`, `x86::pv_rows`) also serve
//! the backward of `super::lanes_bwd`.

use super::{group_window, Geo, NaDims, SharedMut};
use crate::buffer_pool::{take_filled, PoolVec};
use crate::element::Element;
use crate::per_thread::PerThread;
use crate::simd::Level;
use rayon::prelude::*;
use std::any::TypeId;

/// Largest window (keys per query) taken here: 16 × 16. Windows of 12 × 12 to 16 × 16
/// measured 15–35% faster here than tiled (64 × 64 k = 13 D = 32 / 64, 32 × 32 k = 12 and
/// k = 13 D = 128, 64 × 64 k = 15, 48 × 48 k = 16 D = 32, 96 × 96 k = 13 dilation 2): a
/// block's score vectors then outgrow L1, which costs less than the tiled path's key-box
/// waste.
const MAX_KEYS: usize = 256;
/// Longest window along the line taken here: wide windows waste little of the tiled path's
/// key boxes, and cost this path an unaligned load per key (a 1-D k = 63 forward measured
/// 2.7× slower here).
const MAX_LINE_KERNEL: usize = 16;
/// Neighbouring lines computed together: their windows share most key rows, and each key
/// / value vector loaded feeds every line whose window holds it. With one or two lines a
/// pass issues about as many (mostly cache-line-splitting) loads as FMAs; four measured
/// 5–10% faster than two on k = 7 and k = 11 forwards.
pub(super) const LINES: usize = 4;
/// Shortest line taken here: shorter lines leave most lanes idle.
const MIN_LINE: usize = 12;

/// Whether the call runs here.
pub(super) fn applies<E: Element>(level: Level, dims: &NaDims, geo: &Geo) -> bool {
    level == Level::Avx512
        && crate::simd::supported(level)
        && TypeId::of::<E::Acc>() == TypeId::of::<f32>()
        && dims.n_additional == 0
        && geo.s[2] == 1
        && geo.k.iter().product::<usize>() <= MAX_KEYS
        && geo.k[2] <= MAX_LINE_KERNEL
        // 2-D only. 3-D calls with small windows take `super::cube`, which streams planes
        // through these kernels. 1-D ones do not: a single line has no neighbour to share
        // key loads with, nor bands to split across threads (L = 4096, k = 13 measured
        // 3.5× slower here).
        && geo.len[0] == 1
        && geo.len[1] > 1
        && geo.group_len(2, geo.d[2] - 1) >= MIN_LINE
}

/// Per-thread buffers (the transposed key / value lines pooled across calls, with the
/// values they held: fresh allocations of their size fault in every page, and clearing
/// them cost ~10% of a forward).
pub(super) struct Scratch {
    pub(super) qt: Vec<f32>,
    pub(super) kt: PoolVec<f32>,
    pub(super) vt: PoolVec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    pub(super) rows: Vec<f32>,
}

impl Scratch {
    pub(super) fn new() -> Self {
        Scratch {
            qt: Vec::new(),
            kt: take_filled(0),
            vt: take_filled(0),
            s: Vec::new(),
            o: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Sizes the query, score and output buffers of one step, and the key / value lines to
    /// hold `lines` transposed lines.
    pub(super) fn fit(&mut self, geo: &Geo, d: usize, dv: usize, xp: usize, lines: usize) {
        self.kt.fit(lines * d * xp);
        self.vt.fit(lines * dv * xp);
        self.qt.resize(LINES * d * xp, 0.0);
        let nkeys = geo.k.iter().product::<usize>();
        self.s.resize(LINES * nkeys * 16, 0.0);
        self.o.resize(LINES * dv.next_multiple_of(16) * 16, 0.0);
    }
}

/// Rows of one head of a heads-last tensor, as f32 (converted through `tmp` when needed).
pub(super) struct Src<'a, E> {
    pub(super) src: &'a [E],
    pub(super) heads: usize,
    pub(super) h: usize,
    pub(super) w: usize,
}

impl<'a, E: Element> Src<'a, E> {
    pub(super) fn new(src: &'a [E], heads: usize, h: usize, w: usize) -> Self {
        Src { src, heads, h, w }
    }

    /// Pointers to the rows at flattened positions `pos` (of batch entry `b`) as f32: in
    /// place for f32 storage, else converted into `tmp[i·w ..]`.
    pub(super) fn rows(
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

    /// Prefetches the rows at flattened positions `pos` (of batch entry `b`).
    pub(super) fn prefetch(&self, b: usize, n: usize, pos: impl Iterator<Item = usize>) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = self.w * std::mem::size_of::<E>();
        for p in pos {
            let off = ((b * n + p) * self.heads + self.h) * self.w;
            let row = self.src[off..off + self.w].as_ptr() as *const i8;
            for c in (0..bytes).step_by(64) {
                // SAFETY: `c` lies inside the row; a prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.add(c)) };
            }
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
    let hq = dims.q_heads;
    let qscale = (scale * std::f64::consts::LOG2_E) as f32;
    // Bands: every group's lines split evenly into `nb` bands (2-D: the leading internal
    // dimension has length 1), as few as give every thread the same number of (band,
    // batch entry, kv head) tasks.
    let nb = bands_per_group(
        geo.group_len(1, 0),
        geo.d[1] * geo.d[2] * dims.batch * dims.kv_heads,
        rayon::current_num_threads(),
    );
    let outp = SharedMut(out.as_mut_ptr());
    // SAFETY: `applies` checked that `E::Acc` is f32.
    let lse = unsafe { &mut *(lse as *mut [E::Acc] as *mut [f32]) };
    let lsep = SharedMut(lse.as_mut_ptr());
    // A task streams its band's lines for the q heads of one kv head: each key / value line
    // is transposed once (into a ring of the lines the current windows span) and serves
    // every q head sharing it.
    par_spans(
        dims,
        geo,
        &spans(geo, 1, nb),
        1,
        (q, k, v),
        |band, _, sc, qs, kv| {
            // SAFETY: this task alone writes its band's query rows of these q heads.
            unsafe { band.run(sc, qs, kv, qscale, outp, lsep, hq) };
        },
    );
}

/// Group `gi` of a call's dilation groups, row-major over the three dimensions.
pub(super) fn group_at(geo: &Geo, gi: usize) -> [usize; 3] {
    [
        gi / (geo.d[1] * geo.d[2]),
        (gi / geo.d[2]) % geo.d[1],
        gi % geo.d[2],
    ]
}

/// Every group's planes (`dim` 0) or lines (`dim` 1) split into `parts` near-equal runs
/// `(group, start, end)`.
pub(super) fn spans(geo: &Geo, dim: usize, parts: usize) -> Vec<([usize; 3], usize, usize)> {
    let mut out = Vec::new();
    for gi in 0..geo.d.iter().product::<usize>() {
        let g = group_at(geo, gi);
        let len = geo.group_len(dim, g[dim]);
        out.extend(
            (0..parts)
                .map(|i| (g, len * i / parts, len * (i + 1) / parts))
                .filter(|&(_, a, b)| a < b),
        );
    }
    out
}

/// Runs `f(band, end, scratch, q sources, (key, value sources))` for every (span, batch
/// entry, kv head) task in parallel, with this worker's scratch: the band starts at the
/// span (plane `start` with every line for `dim` 0, lines `start..end` of plane 0 for
/// `dim` 1) and the sources are the kv head's and its q heads'.
pub(super) fn par_spans<E: Element>(
    dims: &NaDims,
    geo: &Geo,
    spans: &[([usize; 3], usize, usize)],
    dim: usize,
    (q, k, v): (&[E], &[E], &[E]),
    f: impl Fn(&Band<'_>, usize, &mut Scratch, &[Src<'_, E>], (&Src<'_, E>, &Src<'_, E>)) + Sync,
) {
    let (hq, hkv, d, dv) = (dims.q_heads, dims.kv_heads, dims.head_dim, dims.v_head_dim);
    let group = hq / hkv;
    let scratch = PerThread::new();
    (0..spans.len() * dims.batch * hkv)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let kh = task % hkv;
            let (g, a, e) = spans[(task / hkv) % spans.len()];
            let mut band = Band::group(geo, g, task / (hkv * spans.len()), dv);
            if dim == 0 {
                band.z = a;
            } else {
                band.y = (a, e);
            }
            let (ks, vs) = (Src::new(k, hkv, kh, d), Src::new(v, hkv, kh, dv));
            let qs: Vec<Src<'_, E>> = (kh * group..(kh + 1) * group)
                .map(|h| Src::new(q, hq, h, d))
                .collect();
            scratch.with(Scratch::new, |sc| f(&band, e, sc, &qs, (&ks, &vs)));
        });
}

/// Runs `f(band, kv head)` for every (batch entry, dilation group, kv head) in parallel,
/// the band the whole group.
pub(super) fn par_groups(dims: &NaDims, geo: &Geo, f: impl Fn(&Band<'_>, usize) + Sync) {
    let groups = geo.d.iter().product::<usize>();
    let hkv = dims.kv_heads;
    (0..dims.batch * groups * hkv)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let g = group_at(geo, (task / hkv) % groups);
            let band = Band::group(geo, g, task / (hkv * groups), dims.v_head_dim);
            f(&band, task % hkv);
        });
}

/// Bands per group of `lines` lines (the largest group's): the fewest that give every one
/// of `threads` at least four tasks and the same number. (Two per thread measured 5–20%
/// slower at 56 × 56 k = 7 and 64 × 64 k = 3, where one late worker delays the whole call;
/// four equal at 64 × 64 k = 13, whose bands then transpose 12 extra key lines.)
fn bands_per_group(lines: usize, tasks: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let mut nb = 1;
    while nb < lines && (!(tasks * nb).is_multiple_of(threads) || tasks * nb < 4 * threads) {
        nb += 1;
    }
    nb
}

/// One task's rows: group `g`, group rows `y.0..y.1` of plane `z`, batch entry `b`.
#[derive(Clone, Copy)]
pub(super) struct Band<'a> {
    pub(super) geo: &'a Geo,
    pub(super) g: [usize; 3],
    /// Plane (group coordinate of the leading dimension; 0 in 2-D).
    pub(super) z: usize,
    pub(super) y: (usize, usize),
    pub(super) b: usize,
    pub(super) n: usize,
    /// Value head dim.
    pub(super) dv: usize,
}

impl<'a> Band<'a> {
    /// All of group `g` of batch entry `b`: plane 0, every line.
    pub(super) fn group(geo: &'a Geo, g: [usize; 3], b: usize, dv: usize) -> Self {
        Band {
            geo,
            g,
            z: 0,
            y: (0, geo.group_len(1, g[1])),
            b,
            n: geo.n,
            dv,
        }
    }

    pub(super) fn len(&self, dim: usize) -> usize {
        self.geo.group_len(dim, self.g[dim])
    }

    /// Row index of group position `(y, x)` for head `h` of `heads`.
    pub(super) fn row(&self, heads: usize, h: usize, y: usize, x: usize) -> usize {
        (self.b * self.n + self.geo.pos(self.g, [self.z, y, x])) * heads + h
    }

    /// Whether line transposes and row writes prefetch the next line's rows: with
    /// dilation along the line a line's rows are strided, which the hardware prefetchers
    /// do not follow (128 × 128 k = 7 dilation 2 D = 32: forward 12.5–13.2 → 9.4–9.7 ms,
    /// fwd + bwd 50.9 → 45.4 ms). Contiguous lines measured up to 10% slower with it.
    pub(super) fn prefetch(&self) -> bool {
        self.geo.d[2] > 1
    }

    pub(super) fn win(&self, dim: usize, i: usize) -> (usize, usize) {
        let geo = self.geo;
        group_window(i, self.len(dim), geo.k[dim], geo.s[dim], geo.c[dim])
    }

    /// Transposes line `y` of `src` into `dst[c·xp + x]` (times `scale`); columns from
    /// the line's end to the last block's end are zero. Columns after that are left as
    /// they were: the forward kernels' loads reach them only in permuted blocks, whose
    /// permutation drops them (a block of idle lanes is never the identity).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn transpose_line<E: Element>(
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
            let pos = (x0..x0 + nr).map(|x| self.geo.pos(self.g, [self.z, y, x]));
            let mut ptrs = [std::ptr::null(); 16];
            src.rows(self.b, self.n, pos, rows, &mut ptrs);
            if self.prefetch() && y + 1 < self.len(1) {
                let next = (x0..x0 + nr).map(|x| self.geo.pos(self.g, [self.z, y + 1, x]));
                src.prefetch(self.b, self.n, next);
            }
            // SAFETY: `applies` checked AVX-512F; `ptrs[..nr]` are rows of `w` values (in
            // the source or in `rows`), `dst` holds `w` rows of `xp ≥ x0 + 16`.
            unsafe { x86::transpose_block(&ptrs, nr, w, scale, &mut dst[x0..], xp) };
            x0 += 16;
        }
    }

    /// [`Self::transpose_line`], with the `k2` columns after the last block zero too (the
    /// backward's key-centric sums read them).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn transpose_line_padded<E: Element>(
        &self,
        src: &Src<'_, E>,
        y: usize,
        scale: f32,
        xp: usize,
        rows: &mut Vec<f32>,
        dst: &mut [f32],
    ) {
        self.transpose_line(src, y, scale, xp, rows, dst);
        let w = src.w;
        let done = self.len(2).next_multiple_of(16);
        let end = (done + self.geo.k[2]).min(xp);
        if end > done {
            assert!(dst.len() >= (w - 1) * xp + end);
            // SAFETY: `applies` checked AVX-512F; every row's columns `done..end` lie
            // inside `dst`.
            unsafe { x86::zero_cols(dst.as_mut_ptr(), w, xp, done, end) };
        }
    }

    /// The band's lines for the q heads `qs` of one kv head `kv` (keys, values).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run<E: Element>(
        &self,
        sc: &mut Scratch,
        qs: &[Src<'_, E>],
        kv: (&Src<'_, E>, &Src<'_, E>),
        qscale: f32,
        outp: SharedMut<E>,
        lsep: SharedMut<f32>,
        hq: usize,
    ) {
        let geo = self.geo;
        let (d, dv) = (kv.0.w, self.dv);
        let nx = self.len(2);
        let k2 = geo.k[2];
        // Loads reach `start + dx + 15 < nx + k2 + 15` (causal windows near the end).
        let xp = (nx + k2 + 15).next_multiple_of(16);
        let steps = || (self.y.0..self.y.1).step_by(LINES);
        let span = |y: usize| {
            let last = (y + LINES).min(self.y.1) - 1;
            (self.win(1, y).0, self.win(1, last).1)
        };
        // Key lines held: what one step's windows span (windows move monotonically, so a
        // line older than the current step's first is not needed again).
        let cap = steps().map(|y| span(y).1 - span(y).0).max().unwrap_or(1);
        sc.fit(geo, d, dv, xp, cap);
        let mut keyrows: Vec<x86::KeyRow> = Vec::new();
        let mut qt = std::mem::take(&mut sc.qt);
        // Every line of the group has the same blocks.
        let blocks: Vec<Block> = (0..nx)
            .step_by(16)
            .map(|x0| Block::new(self, x0, k2))
            .collect();
        let mut knext = self.win(1, self.y.0).0;
        for y in steps() {
            let nlines = LINES.min(self.y.1 - y);
            while knext < span(y).1 {
                let slot = knext % cap;
                let kt = &mut sc.kt[slot * d * xp..(slot + 1) * d * xp];
                self.transpose_line(kv.0, knext, 1.0, xp, &mut sc.rows, kt);
                let vt = &mut sc.vt[slot * dv * xp..(slot + 1) * dv * xp];
                self.transpose_line(kv.1, knext, 1.0, xp, &mut sc.rows, vt);
                knext += 1;
            }
            keyrows.clear();
            let mut next = [0usize; LINES];
            let (kt, vt) = (sc.kt.as_ptr(), sc.vt.as_ptr());
            self.push_rows(y, nlines, &mut next, &mut keyrows, |bb| {
                let slot = bb % cap;
                (kt.add(slot * d * xp), vt.add(slot * dv * xp))
            });
            let lines = Lines {
                y,
                n: nlines,
                xp,
                rows: &keyrows,
                blocks: &blocks,
            };
            for qsh in qs {
                self.lines(&lines, sc, &mut qt, qsh, qscale, outp, lsep, hq);
            }
        }
        sc.qt = qt;
    }

    /// Appends the key rows of one key plane's lines for query lines `y .. y + nlines`
    /// (of this band's plane), in order, counting each line's window rows in `next`;
    /// `line(bb)` gives key line `bb`'s transposed keys and values.
    pub(super) fn push_rows(
        &self,
        y: usize,
        nlines: usize,
        next: &mut [usize; LINES],
        rows: &mut Vec<x86::KeyRow>,
        line: impl Fn(usize) -> (*const f32, *const f32),
    ) {
        let wins: [(usize, usize); LINES] =
            std::array::from_fn(|j| self.win(1, y + j.min(nlines - 1)));
        for bb in wins[0].0..wins[nlines - 1].1 {
            let mut inside = (0..nlines).filter(|&j| (wins[j].0..wins[j].1).contains(&bb));
            let Some(j0) = inside.next() else {
                continue;
            };
            let n = 1 + inside.count();
            let (k, v) = line(bb);
            rows.push(x86::KeyRow {
                k,
                v,
                j0,
                n,
                at: std::array::from_fn(|i| next[(j0 + i).min(LINES - 1)]),
            });
            for c in &mut next[j0..j0 + n] {
                *c += 1;
            }
        }
    }

    /// One step's query lines (`l.y ..`, this band's plane) of q head `qsh` against the key
    /// rows `l.rows`: out rows and lse written.
    ///
    /// # Safety
    /// AVX-512F; the rows' pointers valid transposed lines of `l.xp` columns; the caller
    /// owns these queries' out / lse rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn lines<E: Element>(
        &self,
        l: &Lines<'_>,
        sc: &mut Scratch,
        qt: &mut [f32],
        qsh: &Src<'_, E>,
        qscale: f32,
        outp: SharedMut<E>,
        lsep: SharedMut<f32>,
        hq: usize,
    ) {
        let (d, dv, xp, k2) = (qsh.w, self.dv, l.xp, self.geo.k[2]);
        let (y, nlines) = (l.y, l.n);
        let nkeys = self.geo.k.iter().product::<usize>();
        let osz = dv.next_multiple_of(16) * 16;
        let ln2 = std::f32::consts::LN_2;
        let h = qsh.h;
        for j in 0..nlines {
            let dst = &mut qt[j * d * xp..(j + 1) * d * xp];
            self.transpose_line(qsh, y + j, qscale, xp, &mut sc.rows, dst);
        }
        for (bi, blk) in l.blocks.iter().enumerate() {
            let x0 = 16 * bi;
            let q = std::array::from_fn(|j| qt.as_ptr().add(j * d * xp + x0));
            let mut s_it = sc.s.chunks_exact_mut(nkeys * 16);
            let mut o_it = sc.o.chunks_exact_mut(osz);
            let ml = x86::block(
                blk,
                q,
                nlines,
                l.rows,
                d,
                dv,
                xp,
                k2,
                std::array::from_fn(|_| s_it.next().unwrap()),
                std::array::from_fn(|_| o_it.next().unwrap()),
            );
            for (j, (m, lsum)) in ml.iter().enumerate().take(nlines) {
                // `o[c][lane]` is already divided by l.
                let o = sc.o[j * osz..].as_ptr();
                let put = (outp, hq, h);
                self.put_rows(o, 16, dv, 1.0, put, y + j, x0, blk.nl, &mut sc.rows);
                for lane in 0..blk.nl {
                    let r = self.row(hq, h, y + j, x0 + lane);
                    *lsep.get().add(r) = m[lane] * ln2 + lsum[lane].ln();
                }
            }
        }
    }

    /// Rows `x0 .. x0 + nl` of line `y` of head `h` of an output with `heads` heads and
    /// rows of `w`: row `l` is `scale · o[c·stride + l]`, written in place for f32, else
    /// converted through `tmp`.
    ///
    /// # Safety
    /// AVX-512F; `o` valid for 16 reads at each `c·stride`, `c < w`; the caller owns these
    /// rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn put_rows<E: Element>(
        &self,
        o: *const f32,
        stride: usize,
        w: usize,
        scale: f32,
        (outp, heads, h): (SharedMut<E>, usize, usize),
        y: usize,
        x0: usize,
        nl: usize,
        tmp: &mut Vec<f32>,
    ) {
        let f32_out = TypeId::of::<E>() == TypeId::of::<f32>();
        if tmp.len() < 16 * w {
            tmp.resize(16 * w, 0.0);
        }
        let row = |l: usize| outp.get().add(self.row(heads, h, y, x0 + l) * w);
        if self.prefetch() && y + 1 < self.len(1) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
            let bytes = w * std::mem::size_of::<E>();
            for l in 0..nl {
                let r = outp.get().add(self.row(heads, h, y + 1, x0 + l) * w) as *const i8;
                for c in (0..bytes).step_by(64) {
                    // A prefetch never faults.
                    _mm_prefetch::<_MM_HINT_ET0>(r.add(c));
                }
            }
        }
        let dst: [*mut f32; 16] = std::array::from_fn(|l| {
            if f32_out && l < nl {
                row(l) as *mut f32
            } else {
                tmp.as_mut_ptr().add(l * w)
            }
        });
        x86::untranspose_strided(o, stride, w, scale, &dst, nl);
        if !f32_out {
            for l in 0..nl {
                let out = std::slice::from_raw_parts_mut(row(l), w);
                let src = &tmp[l * w..(l + 1) * w];
                // SAFETY: `E::Acc` is f32 (the lane paths' condition).
                E::from_acc_slice(&*(src as *const [f32] as *const [E::Acc]), out);
            }
        }
    }
}

/// One step of a band: query lines `y .. y + n`, their key rows, the line's blocks.
pub(super) struct Lines<'a> {
    pub(super) y: usize,
    pub(super) n: usize,
    /// Row stride of the transposed lines.
    pub(super) xp: usize,
    pub(super) rows: &'a [x86::KeyRow],
    pub(super) blocks: &'a [Block],
}

/// The lanes of one block of queries `x0 .. x0 + nl` of a line.
pub(super) struct Block {
    pub(super) nl: usize,
    /// First key column read (window start of lane 0).
    pub(super) base: usize,
    /// Lane `l` reads column `base + idx[l] + dx`.
    pub(super) idx: [u32; 16],
    /// Whether `idx` is the identity (no permute needed).
    pub(super) plain: bool,
    /// Per window column `dx`, the lanes whose window holds it (causal windows are short
    /// near the start).
    pub(super) mask: [u16; MAX_KEYS],
    /// Whether every lane holds every column.
    pub(super) full: bool,
}

impl Block {
    pub(super) fn new(band: &Band<'_>, x0: usize, k2: usize) -> Self {
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

pub(super) mod x86 {
    /// Calls macro `$m` with every `(first, count)` range of the [`LINES`] lines, for
    /// dispatch to code generic in both.
    macro_rules! line_ranges {
        ($m:ident) => {
            $m!(
                (0, 1),
                (0, 2),
                (0, 3),
                (0, 4),
                (1, 1),
                (1, 2),
                (1, 3),
                (2, 1),
                (2, 2),
                (3, 1)
            )
        };
    }
    pub(in crate::neighborhood) use line_ranges;

    use super::{Block, LINES};
    use crate::neighborhood::pack::transpose16;
    use crate::simd::math::x86_avx512::exp2v_masked;
    use std::arch::x86_64::*;

    /// `dst[c·xp + i] = scale · rows[i][c]` for `i < 16` (rows `nr..16` as zero).
    ///
    /// # Safety
    /// AVX-512F; `rows[..nr]` valid for `w` reads.
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn transpose_block(
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

    /// Zeroes columns `a..b` of `w` rows of stride `xp`.
    ///
    /// # Safety
    /// AVX-512F; `dst` valid for writes at `c·xp + a .. c·xp + b`, `c < w`.
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn zero_cols(
        dst: *mut f32,
        w: usize,
        xp: usize,
        a: usize,
        b: usize,
    ) {
        for c in 0..w {
            let mut x = a;
            while x < b {
                let n = (b - x).min(16);
                let k = ((1u32 << n) - 1) as __mmask16;
                _mm512_mask_storeu_ps(dst.add(c * xp + x), k, _mm512_setzero_ps());
                x += n;
            }
        }
    }

    /// `dst[l][c] = o[c·16 + l]` for lanes `l < nl`.
    ///
    /// # Safety
    /// AVX-512F; `dst[..nl]` valid for `w` writes each.
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn untranspose(
        o: &[f32],
        w: usize,
        dst: &[*mut f32; 16],
        nl: usize,
    ) {
        assert!(o.len() >= w * 16 && nl <= 16);
        untranspose_strided(o.as_ptr(), 16, w, 1.0, dst, nl);
    }

    /// `dst[l][c] = scale · o[c·stride + l]` for lanes `l < nl`, columns `c < w`.
    ///
    /// # Safety
    /// AVX-512F; `o` valid for 16 reads at each `c·stride`, `dst[..nl]` for `w` writes each.
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn untranspose_strided(
        o: *const f32,
        stride: usize,
        w: usize,
        scale: f32,
        dst: &[*mut f32; 16],
        nl: usize,
    ) {
        let sv = _mm512_set1_ps(scale);
        let mut r = [_mm512_setzero_ps(); 16];
        let mut c0 = 0;
        while c0 < w {
            let nc = (w - c0).min(16);
            for (c, rc) in r.iter_mut().enumerate() {
                *rc = if c < nc {
                    _mm512_mul_ps(_mm512_loadu_ps(o.add((c0 + c) * stride)), sv)
                } else {
                    _mm512_setzero_ps()
                };
            }
            transpose16(&mut r);
            let k = ((1u32 << nc) - 1) as __mmask16;
            for (l, &rl) in r.iter().enumerate().take(nl) {
                _mm512_mask_storeu_ps(dst[l].add(c0), k, rl);
            }
            c0 += 16;
        }
    }

    /// A key row (one transposed key line and its value line) and the lines whose windows
    /// hold it: `n` consecutive lines from `j0` (windows move monotonically, so they are
    /// consecutive), for which it is window row `at[i]` of line `j0 + i`.
    pub(in crate::neighborhood) struct KeyRow {
        pub k: *const f32,
        pub v: *const f32,
        pub j0: usize,
        pub n: usize,
        pub at: [usize; LINES],
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

    /// Scores of `W` consecutive window columns of one key row for `N` lines:
    /// `s_j[c·16 + l] = Σ_i q_j[i·xp + l] · k[i·xp + idx[l] + c]`. Each key vector loaded
    /// feeds all `N` lines.
    // The lines' accumulators are indexed by column.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn scores<
        const W: usize,
        const PERM: bool,
        const N: usize,
    >(
        q: [*const f32; LINES],
        k: *const f32,
        d: usize,
        xp: usize,
        idx: __m512i,
        s: [*mut f32; LINES],
    ) {
        let mut acc = [[_mm512_setzero_ps(); W]; N];
        for i in 0..d {
            let qv: [__m512; N] = std::array::from_fn(|j| _mm512_loadu_ps(q[j].add(i * xp)));
            let kr = k.add(i * xp);
            for c in 0..W {
                let kv = key::<PERM>(kr.add(c), idx);
                for j in 0..N {
                    acc[j][c] = _mm512_fmadd_ps(qv[j], kv, acc[j][c]);
                }
            }
        }
        for (j, aj) in acc.iter().enumerate() {
            for (c, &a) in aj.iter().enumerate() {
                _mm512_storeu_ps(s[j].add(c * 16), a);
            }
        }
    }

    /// One key row's part of `o_j[c·16 + l] += Σ_dx p_j[(at_j·k2 + dx)·16 + l] ·
    /// v[off + c·xp + idx[l] + dx]` for its `N` lines from `J0`, `C` value columns.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn pv_row<
        const C: usize,
        const PERM: bool,
        const L: usize,
        const J0: usize,
        const N: usize,
    >(
        acc: &mut [[__m512; C]; L],
        row: &KeyRow,
        p: [*const f32; LINES],
        off: usize,
        k2: usize,
        xp: usize,
        idx: __m512i,
    ) {
        let vr = row.v.add(off);
        let pr: [*const f32; N] = std::array::from_fn(|i| p[J0 + i].add(row.at[i] * k2 * 16));
        for dx in 0..k2 {
            let pv: [__m512; N] = std::array::from_fn(|i| _mm512_loadu_ps(pr[i].add(dx * 16)));
            for c in 0..C {
                let x = key::<PERM>(vr.add(c * xp + dx), idx);
                for i in 0..N {
                    acc[J0 + i][c] = _mm512_fmadd_ps(pv[i], x, acc[J0 + i][c]);
                }
            }
        }
    }

    /// `o_j = Σ_rows` [`pv_row`] for the `L` lines of a block, `C` value columns.
    // `$j0 + $n <= L` reads as the lines' range, also where `$j0` is 0.
    #[allow(
        clippy::needless_range_loop,
        clippy::too_many_arguments,
        clippy::int_plus_one
    )]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn pv<const C: usize, const PERM: bool, const L: usize>(
        rows: &[KeyRow],
        p: [*const f32; LINES],
        off: usize,
        k2: usize,
        xp: usize,
        idx: __m512i,
        o: [*mut f32; LINES],
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; L];
        for row in rows {
            macro_rules! go {
                ($(($j0:literal, $n:literal)),*) => {
                    match (row.j0, row.n) {
                        $(($j0, $n) if $j0 + $n <= L => {
                            pv_row::<C, PERM, L, $j0, $n>(&mut acc, row, p, off, k2, xp, idx)
                        })*
                        _ => unreachable!("lines {}+{} of {}", row.j0, row.n, L),
                    }
                };
            }
            line_ranges!(go);
        }
        for (j, aj) in acc.iter().enumerate() {
            for (c, &a) in aj.iter().enumerate() {
                _mm512_storeu_ps(o[j].add(c * 16), a);
            }
        }
    }

    /// Widest score call for `n` lines: `n·W` accumulators, `n` query vectors and a key
    /// vector stay within the 32 registers.
    fn max_width(n: usize) -> usize {
        [8, 8, 7, 6][n - 1]
    }

    /// Window columns per score call: `k2` split into near-equal parts of at most `max`.
    pub(in crate::neighborhood) fn column_parts(
        k2: usize,
        max: usize,
    ) -> impl Iterator<Item = (usize, usize)> {
        let parts = k2.div_ceil(max);
        (0..parts).map(move |i| {
            let (a, b) = (i * k2 / parts, (i + 1) * k2 / parts);
            (a, b - a)
        })
    }

    /// Scores of every key row against its lines: `s_j[(at·k2 + dx)·16 + l]` for the rows'
    /// lines `j`, with `key(row)` the transposed key lines and `q[j]` the lines' `d` rows.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn scores_rows(
        rows: &[KeyRow],
        key: impl Fn(&KeyRow) -> *const f32,
        q: [*const f32; LINES],
        sp: [*mut f32; LINES],
        d: usize,
        xp: usize,
        k2: usize,
        base: usize,
        idx: __m512i,
        perm: bool,
    ) {
        for row in rows {
            let qq: [*const f32; LINES] = std::array::from_fn(|i| q[(row.j0 + i).min(LINES - 1)]);
            for (c0, w) in column_parts(k2, max_width(row.n)) {
                let kp = key(row).add(base + c0);
                let ss: [*mut f32; LINES] = std::array::from_fn(|i| {
                    if i < row.n {
                        sp[row.j0 + i].add((row.at[i] * k2 + c0) * 16)
                    } else {
                        std::ptr::null_mut()
                    }
                });
                macro_rules! call {
                    ($($w:literal)*) => {
                        match (w, perm, row.n) {
                            $(
                                ($w, false, 1) => scores::<$w, false, 1>(qq, kp, d, xp, idx, ss),
                                ($w, true, 1) => scores::<$w, true, 1>(qq, kp, d, xp, idx, ss),
                                ($w, false, 2) => scores::<$w, false, 2>(qq, kp, d, xp, idx, ss),
                                ($w, true, 2) => scores::<$w, true, 2>(qq, kp, d, xp, idx, ss),
                                ($w, false, 3) => scores::<$w, false, 3>(qq, kp, d, xp, idx, ss),
                                ($w, true, 3) => scores::<$w, true, 3>(qq, kp, d, xp, idx, ss),
                                ($w, false, 4) => scores::<$w, false, 4>(qq, kp, d, xp, idx, ss),
                                ($w, true, 4) => scores::<$w, true, 4>(qq, kp, d, xp, idx, ss),
                            )*
                            _ => unreachable!("score width {} for {} lines", w, row.n),
                        }
                    };
                }
                call!(1 2 3 4 5 6 7 8);
            }
        }
    }

    /// `o_j[c·16 + l] = Σ_rows Σ_dx p_j[(at·k2 + dx)·16 + l] · v[c·xp + base + idx[l] + dx]`
    /// for the `nlines` lines and `dv` columns `c`, `v` each row's `v` lines.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn pv_rows(
        rows: &[KeyRow],
        nlines: usize,
        pp: [*const f32; LINES],
        dv: usize,
        xp: usize,
        k2: usize,
        base: usize,
        idx: __m512i,
        perm: bool,
        op: [*mut f32; LINES],
    ) {
        let mut c0 = 0;
        while c0 < dv {
            let left = dv - c0;
            let oc: [*mut f32; LINES] = op.map(|p| p.wrapping_add(c0 * 16));
            let off = base + c0 * xp;
            // Value columns per pass: `nlines·C` accumulators, the lines' `p` vectors and a
            // value vector stay within the 32 registers.
            // Four lines take six columns while no one-column passes are left over (64: 6·9
            // + 6 + 4; 32: 6·3 + 6 + 4 + 4): a k = 13 D = 64 forward measured 6% faster.
            let step = match (nlines, left) {
                (1, 16..) => 16,
                (1..=3, 8..) => 8,
                (4, 10..) | (4, 6) => 6,
                (_, 4..) => 4,
                _ => 1,
            };
            macro_rules! call {
                ($(($c:literal, $l:literal)),*) => {
                    match (step, nlines, perm) {
                        $(
                            ($c, $l, false) => pv::<$c, false, $l>(rows, pp, off, k2, xp, idx, oc),
                            ($c, $l, true) => pv::<$c, true, $l>(rows, pp, off, k2, xp, idx, oc),
                        )*
                        _ => unreachable!("{} value columns for {} lines", step, nlines),
                    }
                };
            }
            call!(
                (16, 1),
                (8, 1),
                (4, 1),
                (1, 1),
                (8, 2),
                (4, 2),
                (1, 2),
                (8, 3),
                (4, 3),
                (1, 3),
                (6, 4),
                (4, 4),
                (1, 4)
            );
            c0 += step;
        }
    }

    /// One block of `nlines` consecutive lines: scores over the window rows × `k2`
    /// columns, softmax across them, `o = P·V / l`. Returns each line's per-lane max (base
    /// 2) and sum.
    ///
    /// # Safety
    /// AVX-512F; `q[j]` valid for `d` rows of stride `xp` (16 lanes each) for `j < nlines`;
    /// every row's `k` / `v` a transposed line of `d` / `dv` rows of `xp` columns with
    /// `blk.base + 15 + k2 ≤ xp`; rows' lines within `nlines`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        blk: &Block,
        q: [*const f32; LINES],
        nlines: usize,
        rows: &[KeyRow],
        d: usize,
        dv: usize,
        xp: usize,
        k2: usize,
        s: [&mut [f32]; LINES],
        o: [&mut [f32]; LINES],
    ) -> [([f32; 16], [f32; 16]); LINES] {
        assert!((1..=LINES).contains(&nlines));
        let mut nk = [0usize; LINES];
        for r in rows {
            assert!(r.n >= 1 && r.j0 + r.n <= nlines);
            for (i, j) in (r.j0..r.j0 + r.n).enumerate() {
                assert!(r.at[i] == nk[j] / k2);
                nk[j] += k2;
            }
        }
        for j in 0..nlines {
            assert!(s[j].len() >= nk[j] * 16);
        }
        let osz = dv.next_multiple_of(16) * 16;
        assert!(o[..nlines].iter().all(|o| o.len() >= osz));
        assert!(blk.base + k2 + 15 <= xp && k2 <= blk.mask.len());
        let idx = _mm512_loadu_si512(blk.idx.as_ptr() as *const _);
        let perm = !blk.plain;
        let sp: [*mut f32; LINES] = std::array::from_fn(|j| s[j].as_mut_ptr());
        scores_rows(rows, |r| r.k, q, sp, d, xp, k2, blk.base, idx, perm);
        // Softmax across the window, lane-wise.
        let mask = |t: usize| if blk.full { u16::MAX } else { blk.mask[t % k2] };
        let mut res = [([0f32; 16], [0f32; 16]); LINES];
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
        let op: [*mut f32; LINES] = std::array::from_fn(|j| o[j].as_mut_ptr());
        let pp: [*const f32; LINES] = sp.map(|p| p as *const f32);
        pv_rows(rows, nlines, pp, dv, xp, k2, blk.base, idx, perm, op);
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
