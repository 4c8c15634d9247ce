//! 3-D backward for small windows (AVX-512, f32 accumulation) in the lane layout of
//! [`super::cube`]: sixteen queries of a line in the SIMD lanes.
//!
//! A task owns one (batch entry, dilation group, kv head) and streams its planes in order,
//! the transposed key / value lines of the planes the current windows span in a ring, as
//! the forward does. Per step of query lines it recomputes S and P from the saved lse, dP,
//! dS and dQ with the forward's lane kernels, and keeps the lines' Qᵀ, dOᵀ, P and dS in a
//! ring of query planes. Once no later window holds a key plane, each of its key lines sums
//! `dS·Q` (`P·dO`) over every stored query line whose window holds it, per window column
//! in the query lanes (accumulators in registers), then sends the sums back through the
//! adjoint of the forward's key loads (for window column `dx` lane `l` read key column
//! `base + idx[l] + dx`) into the key columns, and writes dK / dV once: nothing is shared
//! between tasks or zeroed in memory.

use super::cube::{line_blocks, planes_held, Ring};
use super::lanes::{par_groups, x86 as lx, Band, Block, Src, LINES};
use super::lanes_bwd::{line_stats, Call};
use super::{Geo, NaDims};
use crate::buffer_pool::{take_filled, PoolVec};
use crate::element::Element;
use crate::per_thread::PerThread;
use crate::simd::Level;

/// Most bytes of a task's rings (transposed key / value planes, stored query planes).
const MAX_TASK_BYTES: usize = 32 << 20;

/// Whether the backward runs here: the forward's conditions, a (batch, group, kv head)
/// task for every thread, rings within [`MAX_TASK_BYTES`].
pub(super) fn applies<E: Element>(level: Level, dims: &NaDims, geo: &Geo) -> bool {
    if !super::cube::applies::<E>(level, dims, geo) {
        return false;
    }
    let tasks = dims.batch * geo.d.iter().product::<usize>() * dims.kv_heads;
    if tasks < rayon::current_num_threads() {
        return false;
    }
    // Group 0 is the longest in every dimension.
    let band = Band::group(geo, [0; 3], 0, dims.v_head_dim);
    let layout = Layout::new(&band, dims.q_heads / dims.kv_heads);
    layout.bytes(dims.head_dim, dims.v_head_dim) <= MAX_TASK_BYTES
}

/// Per-thread buffers; the rings pooled across calls with the values they held (every
/// value read is written first in its task).
struct Scratch {
    kt: PoolVec<f32>,
    vt: PoolVec<f32>,
    /// Stored query lines (see [`Store`]): Qᵀ (times `scale·log2 e`), dOᵀ, P, dS.
    qt: PoolVec<f32>,
    dot: PoolVec<f32>,
    p: PoolVec<f32>,
    ds: PoolVec<f32>,
    /// One key line's dK / dV in columns (`[channel][xp]`).
    fold: Vec<f32>,
    /// One block's sums per window column, `[dx][channel][16]`.
    cols: Vec<f32>,
    o: Vec<f32>,
    lse2: Vec<f32>,
    rows: Vec<f32>,
    ta: Vec<f32>,
    tb: Vec<f32>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            kt: take_filled(0),
            vt: take_filled(0),
            qt: take_filled(0),
            dot: take_filled(0),
            p: take_filled(0),
            ds: take_filled(0),
            fold: Vec::new(),
            cols: Vec::new(),
            o: Vec::new(),
            lse2: Vec::new(),
            rows: Vec::new(),
            ta: Vec::new(),
            tb: Vec::new(),
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
    // SAFETY: `applies` checked that `E::Acc` is f32; tasks write disjoint rows (below).
    let call = unsafe { Call::new(dims, scale, q, k, v, out, dout, lse, dq, dk, dv) };
    let scratch = PerThread::new();
    par_groups(dims, geo, |band, kh| {
        // SAFETY: `applies` checked AVX-512F; this task alone writes dQ of its group's
        // queries of the kv head's q heads, and dK / dV of its group's keys of the kv head.
        scratch.with(Scratch::new, |sc| unsafe { task_run(&call, band, kh, sc) });
    });
}

/// The task's schedule along the planes and its ring of stored query planes: after query
/// plane `z`, the key planes before `win(z + 1).0` are finished; a finished key plane sums
/// over the query planes whose windows hold it (`inv`), all within the last `capq`.
struct Store {
    /// Per key plane, the query planes `[first, end)` whose windows hold it.
    inv_z: Vec<(usize, usize)>,
    /// Per key line, the query lines `[first, end)` whose windows hold it.
    inv_y: Vec<(usize, usize)>,
    capq: usize,
    ny: usize,
    group: usize,
    nb: usize,
    nkeys: usize,
}

impl Store {
    fn new(band: &Band<'_>, group: usize, nb: usize) -> Self {
        let inv = |dim: usize| -> Vec<(usize, usize)> {
            let n = band.len(dim);
            let mut inv = vec![(usize::MAX, 0); n];
            for i in 0..n {
                let (s, e) = band.win(dim, i);
                for r in &mut inv[s..e] {
                    r.0 = r.0.min(i);
                    r.1 = i + 1;
                }
            }
            inv
        };
        let (inv_z, inv_y) = (inv(0), inv(1));
        let nz = band.len(0);
        let mut capq = 1;
        let mut fin = 0;
        for z in 0..nz {
            let until = Self::until(band, z);
            for &(first, _) in &inv_z[fin..until] {
                if first <= z {
                    capq = capq.max(z + 1 - first);
                }
            }
            fin = fin.max(until);
        }
        Store {
            inv_z,
            inv_y,
            capq,
            ny: band.len(1),
            group,
            nb,
            nkeys: band.geo.k.iter().product(),
        }
    }

    /// Key planes before this one are finished once query plane `z` is done.
    fn until(band: &Band<'_>, z: usize) -> usize {
        if z + 1 < band.len(0) {
            band.win(0, z + 1).0
        } else {
            band.len(0)
        }
    }

    /// Index of query line `y` of plane `z`, q head `hi` of the group.
    fn line(&self, z: usize, y: usize, hi: usize) -> usize {
        ((z % self.capq) * self.ny + y) * self.group + hi
    }

    fn lines(&self) -> usize {
        self.capq * self.ny * self.group
    }

    /// Offset of block `bi`'s P / dS of stored line `i`: `[window key][16]`.
    fn pds(&self, i: usize, bi: usize) -> usize {
        (i * self.nb + bi) * self.nkeys * 16
    }
}

/// A task's blocks along the line, line stride, key planes held and stored query lines.
struct Layout {
    blocks: Vec<Block>,
    xp: usize,
    capz: usize,
    store: Store,
}

impl Layout {
    fn new(band: &Band<'_>, group: usize) -> Self {
        let (blocks, xp) = line_blocks(band);
        let capz = planes_held(band, 0, band.len(0));
        let store = Store::new(band, group, blocks.len());
        Layout {
            blocks,
            xp,
            capz,
            store,
        }
    }

    /// Bytes of the task's key / value ring and stored query lines.
    fn bytes(&self, d: usize, dv: usize) -> usize {
        let (st, xp) = (&self.store, self.xp);
        let kv = self.capz * st.ny * (d + dv) * xp;
        let q = st.lines() * (d + dv) * xp + 2 * st.pds(st.lines(), 0);
        4 * (kv + q)
    }
}

/// # Safety
/// AVX-512F; the task owns the rows it writes (see `run`).
#[target_feature(enable = "avx512f")]
unsafe fn task_run<E: Element>(c: &Call<'_, E>, band: &Band<'_>, kh: usize, sc: &mut Scratch) {
    let geo = band.geo;
    let (d, dv) = (c.d, c.dv);
    let group = c.hq / c.hkv;
    let (nz, ny, nx, k2) = (band.len(0), band.len(1), band.len(2), geo.k[2]);
    let Layout {
        blocks,
        xp,
        capz,
        store,
    } = Layout::new(band, group);
    let adj: Vec<Adjoint> = blocks.iter().map(Adjoint::new).collect();
    let done = nx.next_multiple_of(16);
    let fit = |v: &mut Vec<f32>, len: usize| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    };
    let nl = store.lines();
    sc.kt.fit(capz * ny * d * xp);
    sc.vt.fit(capz * ny * dv * xp);
    sc.qt.fit(nl * d * xp);
    sc.dot.fit(nl * dv * xp);
    sc.p.fit(store.pds(nl, 0));
    sc.ds.fit(store.pds(nl, 0));
    fit(&mut sc.fold, d.max(dv) * xp);
    fit(&mut sc.cols, k2 * d.max(dv) * 16);
    fit(&mut sc.o, LINES * d.next_multiple_of(16) * 16);
    fit(&mut sc.lse2, LINES * done);
    fit(&mut sc.ta, 16 * d.max(dv));
    fit(&mut sc.tb, 16 * d.max(dv));
    let (ks, vs) = (Src::new(c.k, c.hkv, kh, d), Src::new(c.v, c.hkv, kh, dv));
    let ring = Ring {
        capz,
        ny,
        d,
        dv,
        xp,
    };
    let mut keyrows: Vec<lx::KeyRow> = Vec::new();
    let mut krows: Vec<lx::KeyRow> = Vec::new();
    let mut pairs = Pairs::default();
    let mut znext = 0;
    let mut fin = 0;
    for z in 0..nz {
        while znext < band.win(0, z).1 {
            ring.load(
                band,
                znext,
                (&ks, &vs),
                &mut sc.kt,
                &mut sc.vt,
                &mut sc.rows,
            );
            znext += 1;
        }
        let here = Band { z, ..*band };
        for y in (0..ny).step_by(LINES) {
            let nlines = LINES.min(ny - y);
            let next = ring.rows(
                &here,
                y,
                nlines,
                sc.kt.as_ptr(),
                sc.vt.as_ptr(),
                &mut keyrows,
            );
            // dQ = dS·K reads the keys where the forward reads values.
            krows.clear();
            krows.extend(keyrows.iter().map(|r| lx::KeyRow { v: r.k, ..*r }));
            let step = Step {
                y,
                n: nlines,
                nk: next.map(|n| n * k2),
                xp,
                done,
            };
            for hi in 0..group {
                lines(
                    c, &here, &step, &store, &blocks, &keyrows, &krows, sc, kh, hi,
                );
            }
        }
        // Key planes no later window holds: dK / dV summed and written out.
        let until = Store::until(band, z);
        while fin < until {
            let at = Band { z: fin, ..*band };
            for y in 0..ny {
                finish_line(c, &at, kh, y, sc, &store, xp, &blocks, &adj, &mut pairs);
            }
            fin += 1;
        }
    }
}

/// One step's query lines: `y .. y + n` of the band's plane, `nk[j]` window keys of line
/// `j`; row stride `xp`, lanes per line `done`.
struct Step {
    y: usize,
    n: usize,
    nk: [usize; LINES],
    xp: usize,
    done: usize,
}

/// Query lines of one step for q head `hi` of kv head `kh`'s group: dQ written out; Qᵀ,
/// dOᵀ, P and dS stored.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn lines<E: Element>(
    c: &Call<'_, E>,
    band: &Band<'_>,
    st: &Step,
    store: &Store,
    blocks: &[Block],
    keyrows: &[lx::KeyRow],
    krows: &[lx::KeyRow],
    sc: &mut Scratch,
    kh: usize,
    hi: usize,
) {
    use std::arch::x86_64::_mm512_loadu_si512;
    let h = kh * store.group + hi;
    let (d, dv, xp, done) = (c.d, c.dv, st.xp, st.done);
    let k2 = band.geo.k[2];
    let qs = Src::new(c.q, c.hq, h, d);
    let dos = Src::new(c.dout, c.hq, h, dv);
    let li: [usize; LINES] =
        std::array::from_fn(|j| store.line(band.z, st.y + j.min(st.n - 1), hi));
    for (j, &i) in li.iter().enumerate().take(st.n) {
        let y = st.y + j;
        let (q0, o0) = (i * d * xp, i * dv * xp);
        band.transpose_line(
            &qs,
            y,
            c.qscale,
            xp,
            &mut sc.rows,
            &mut sc.qt[q0..q0 + d * xp],
        );
        band.transpose_line(
            &dos,
            y,
            1.0,
            xp,
            &mut sc.rows,
            &mut sc.dot[o0..o0 + dv * xp],
        );
        let lse2 = &mut sc.lse2[j * done..(j + 1) * done];
        line_stats(c, band, h, y, lse2, None, (&mut sc.ta, &mut sc.tb));
    }
    let qt: [*const f32; LINES] = li.map(|i| sc.qt.as_ptr().add(i * d * xp));
    let dot: [*const f32; LINES] = li.map(|i| sc.dot.as_ptr().add(i * dv * xp));
    let osz = d.next_multiple_of(16) * 16;
    let op: [*mut f32; LINES] = std::array::from_fn(|j| sc.o.as_mut_ptr().add(j * osz));
    for (bi, blk) in blocks.iter().enumerate() {
        let x0 = 16 * bi;
        let sp: [*mut f32; LINES] = li.map(|i| sc.p.as_mut_ptr().add(store.pds(i, bi)));
        let dpp: [*mut f32; LINES] = li.map(|i| sc.ds.as_mut_ptr().add(store.pds(i, bi)));
        let idx = _mm512_loadu_si512(blk.idx.as_ptr() as *const _);
        let perm = !blk.plain;
        let at = |p: [*const f32; LINES]| p.map(|p| p.add(x0));
        lx::scores_rows(keyrows, |r| r.k, at(qt), sp, d, xp, k2, blk.base, idx, perm);
        lx::scores_rows(
            keyrows,
            |r| r.v,
            at(dot),
            dpp,
            dv,
            xp,
            k2,
            blk.base,
            idx,
            perm,
        );
        for j in 0..st.n {
            x86::softmax_grad(
                blk,
                st.nk[j],
                k2,
                sp[j],
                dpp[j],
                sc.lse2.as_ptr().add(j * done + x0),
            );
        }
        // dQ = scale · dS·K, out through the rows.
        let dsv: [*const f32; LINES] = dpp.map(|p| p as *const f32);
        lx::pv_rows(krows, st.n, dsv, d, xp, k2, blk.base, idx, perm, op);
        for (j, &o) in op.iter().enumerate().take(st.n) {
            let put = (c.dq, c.hq, h);
            band.put_rows(o, 16, d, c.scale, put, st.y + j, x0, blk.nl, &mut sc.ta);
        }
    }
}

/// The stored query lines one key line sums over: each line's index and the key line's
/// window row in it, and per block its dS (P) at that row and its Qᵀ (dOᵀ) at the block.
#[derive(Default)]
struct Pairs {
    lines: Vec<(usize, usize)>,
    s: Vec<*const f32>,
    x: Vec<*const f32>,
}

/// Key line `y` of plane `at.z`: dK = Σ dS·Q (times ln 2: Q was stored times
/// `scale·log2 e`) and dV = Σ P·dO over the stored query lines whose windows hold it,
/// written to the outputs.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn finish_line<E: Element>(
    c: &Call<'_, E>,
    at: &Band<'_>,
    kh: usize,
    y: usize,
    sc: &mut Scratch,
    store: &Store,
    xp: usize,
    blocks: &[Block],
    adj: &[Adjoint],
    pairs: &mut Pairs,
) {
    let nx = at.len(2);
    let k2 = at.geo.k[2];
    let (zk, d, dv) = (at.z, c.d, c.dv);
    // (stored line, the key line's window row in it) of every query line whose window
    // holds the key line.
    let (iz, iy) = (store.inv_z[zk], store.inv_y[y]);
    pairs.lines.clear();
    for zq in iz.0..iz.1 {
        let zs = at.win(0, zq).0;
        for yq in iy.0..iy.1 {
            let (ys, ye) = at.win(1, yq);
            let row = (zk - zs) * (ye - ys) + (y - ys);
            pairs
                .lines
                .extend((0..store.group).map(|hi| (store.line(zq, yq, hi), row)));
        }
    }
    // Only the columns the blocks' sums reach, and not those block 0's first window
    // column stores.
    let end = blocks.last().map_or(0, |b| b.base + k2 + 15).min(xp);
    let first = blocks[0].base;
    let (ds, qt, p, dot) = (
        sc.ds.as_ptr(),
        sc.qt.as_ptr(),
        sc.p.as_ptr(),
        sc.dot.as_ptr(),
    );
    for (s, x, w, outp, mul) in [
        (ds, qt, d, c.dk, std::f32::consts::LN_2),
        (p, dot, dv, c.dvv, 1.0),
    ] {
        let fold = sc.fold.as_mut_ptr();
        lx::zero_cols(fold, w, xp, 0, first);
        lx::zero_cols(fold, w, xp, first + 16, end);
        for (bi, blk) in blocks.iter().enumerate() {
            pairs.s.clear();
            pairs.x.clear();
            for &(i, row) in &pairs.lines {
                pairs.s.push(s.add(store.pds(i, bi) + row * k2 * 16));
                pairs.x.push(x.add(i * w * xp + 16 * bi));
            }
            // Per row all window columns at once (each Qᵀ / dOᵀ vector loaded once), into
            // `sc.cols`, then shifted into the key columns.
            let t = sc.cols.as_mut_ptr();
            let n = pairs.s.len();
            // Chunks of near-equal size within the kernel's register budget.
            let chunk = n.div_ceil(n.div_ceil(x86::max_pairs(k2)).max(1)).max(1);
            for (i, (s, x)) in pairs.s.chunks(chunk).zip(pairs.x.chunks(chunk)).enumerate() {
                x86::col_sums(s, x, t, i == 0, w, xp, k2, !blk.plain, &adj[bi]);
            }
            let f = fold.add(blk.base);
            if n > 0 {
                x86::shift_add(t, f, w, xp, k2, bi == 0);
            } else if bi == 0 {
                lx::zero_cols(fold, w, xp, first, first + 16);
            }
        }
        for x0 in (0..nx).step_by(16) {
            let nl = (nx - x0).min(16);
            let (o, put) = (sc.fold.as_ptr().add(x0), (outp, c.hkv, kh));
            at.put_rows(o, xp, w, mul, put, y, x0, nl, &mut sc.ta);
        }
    }
}

/// Stored lines summed in registers at once.
const MAX_PAIRS: usize = 12;

/// The adjoint of a block's key load (`vpermps` by `idx`): target lane `m` sums the lanes
/// `l < nl` with `idx[l] = m`, in layers of one lane per target (windows stop moving at a
/// line's ends, so several lanes can read one key column there).
pub(super) struct Adjoint {
    idx: [[u32; 16]; 16],
    mask: [u16; 16],
    layers: usize,
}

impl Adjoint {
    fn new(blk: &Block) -> Self {
        let mut a = Adjoint {
            idx: [[0; 16]; 16],
            mask: [0; 16],
            layers: 0,
        };
        let mut count = [0usize; 16];
        for l in 0..blk.nl {
            let m = blk.idx[l] as usize;
            let r = count[m];
            count[m] += 1;
            a.layers = a.layers.max(r + 1);
            a.idx[r][m] = l as u32;
            a.mask[r] |= 1 << m;
        }
        a
    }
}

mod x86 {
    use super::{Adjoint, Block, MAX_PAIRS};
    use crate::simd::math::x86_avx512::exp2v_masked;
    use std::arch::x86_64::*;

    /// `s ← P = 2^(s − lse2)` (inside the window), `dp ← dS = P·(dp − δ)` with
    /// `δ = Σ P·dp`, lane-wise over the `nk` window columns of one line of a block.
    ///
    /// # Safety
    /// AVX-512F; `s`, `dp` valid for `nk·16`, `lse2` for 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_grad(
        blk: &Block,
        nk: usize,
        k2: usize,
        s: *mut f32,
        dp: *mut f32,
        lse2: *const f32,
    ) {
        let l = _mm512_loadu_ps(lse2);
        // δ = Σ P·dP over the window (= O·dO for O = P·V): 27 products at k = 3 instead of
        // a head-dim dot with the output row, which is not read at all.
        let mut dl = _mm512_setzero_ps();
        for t in 0..nk {
            let m = if blk.full { u16::MAX } else { blk.mask[t % k2] };
            let p = exp2v_masked(m, _mm512_sub_ps(_mm512_loadu_ps(s.add(t * 16)), l));
            _mm512_storeu_ps(s.add(t * 16), p);
            dl = _mm512_fmadd_ps(p, _mm512_loadu_ps(dp.add(t * 16)), dl);
        }
        for t in 0..nk {
            let p = _mm512_loadu_ps(s.add(t * 16));
            let ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp.add(t * 16)), dl));
            _mm512_storeu_ps(dp.add(t * 16), ds);
        }
    }

    /// Widest window along the line (`super::super::cube`'s limit).
    const MAX_COLS: usize = 16;

    /// `t[(dx·w + c)·16 + m] (+)= Σ_{l: idx[l] = m} Σ_i s_i[dx·16 + l] · x_i[c·xp + l]`
    /// for window columns `dx < k2 ≤ 16` and rows `c < w` (`first`: written, else
    /// added; `perm`: through `adj`'s layers, else `idx` is the identity).
    ///
    /// # Safety
    /// AVX-512F; `s.len() == x.len() ≤ MAX_PAIRS`, `s[i]` valid for `k2·16`, `x[i]` for `w`
    /// rows of stride `xp` (16 lanes each), `t` for `k2·w·16`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn col_sums(
        s: &[*const f32],
        x: &[*const f32],
        t: *mut f32,
        first: bool,
        w: usize,
        xp: usize,
        k2: usize,
        perm: bool,
        adj: &Adjoint,
    ) {
        // Narrow windows: the lines' dS / P vectors in registers.
        macro_rules! fixed {
            ($(($k:literal, $n:literal)),*) => {
                match (k2, s.len(), perm) {
                    $(
                        ($k, $n, false) => return fixed::<$k, $n, false>(s, x, t, first, w, xp, adj),
                        ($k, $n, true) => return fixed::<$k, $n, true>(s, x, t, first, w, xp, adj),
                    )*
                    _ => {}
                }
            };
        }
        fixed!(
            (2, 1),
            (2, 2),
            (2, 3),
            (2, 4),
            (2, 5),
            (2, 6),
            (2, 7),
            (2, 8),
            (2, 9),
            (2, 10),
            (2, 11),
            (2, 12),
            (3, 1),
            (3, 2),
            (3, 3),
            (3, 4),
            (3, 5),
            (3, 6),
            (3, 7),
            (3, 8),
            (3, 9),
            (4, 1),
            (4, 2),
            (4, 3),
            (4, 4),
            (4, 5),
            (4, 6)
        );
        macro_rules! go {
            ($($k:literal)*) => {
                match (k2, perm) {
                    $(
                        ($k, false) => cols::<$k, false>(s, x, t, first, w, xp, adj),
                        ($k, true) => cols::<$k, true>(s, x, t, first, w, xp, adj),
                    )*
                    _ => unreachable!("{} window columns", k2),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    }

    /// Lines summed at once by [`col_sums`] for `k2` window columns: `N·K2` dS / P
    /// vectors, `K2` sums and a Qᵀ vector within the 32 registers for narrow windows.
    pub(super) fn max_pairs(k2: usize) -> usize {
        match k2 {
            2 => 12,
            3 => 9,
            4 => 6,
            _ => MAX_PAIRS,
        }
    }

    /// [`cols`] with the line count fixed.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fixed<const K2: usize, const N: usize, const PERM: bool>(
        s: &[*const f32],
        x: &[*const f32],
        t: *mut f32,
        first: bool,
        w: usize,
        xp: usize,
        adj: &Adjoint,
    ) {
        let sv: [[__m512; K2]; N] =
            std::array::from_fn(|i| std::array::from_fn(|dx| _mm512_loadu_ps(s[i].add(dx * 16))));
        let x: [*const f32; N] = std::array::from_fn(|i| x[i]);
        for ch in 0..w {
            let mut acc = [_mm512_setzero_ps(); K2];
            for i in 0..N {
                let xv = _mm512_loadu_ps(x[i].add(ch * xp));
                for dx in 0..K2 {
                    acc[dx] = _mm512_fmadd_ps(sv[i][dx], xv, acc[dx]);
                }
            }
            store_cols::<K2, PERM>(acc, t, ch, w, first, adj);
        }
    }

    /// Row `ch` of every window column's sums into `t` (through the adjoint for `PERM`).
    #[inline(always)]
    unsafe fn store_cols<const K2: usize, const PERM: bool>(
        acc: [__m512; K2],
        t: *mut f32,
        ch: usize,
        w: usize,
        first: bool,
        adj: &Adjoint,
    ) {
        for (dx, &a) in acc.iter().enumerate() {
            let u = if PERM { adjoint(a, adj) } else { a };
            let p = t.add((dx * w + ch) * 16);
            let u = if first {
                u
            } else {
                _mm512_add_ps(_mm512_loadu_ps(p), u)
            };
            _mm512_storeu_ps(p, u);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn cols<const K2: usize, const PERM: bool>(
        s: &[*const f32],
        x: &[*const f32],
        t: *mut f32,
        first: bool,
        w: usize,
        xp: usize,
        adj: &Adjoint,
    ) {
        let n = s.len();
        assert!(n <= MAX_PAIRS && x.len() == n);
        let mut sv = [_mm512_setzero_ps(); MAX_PAIRS * MAX_COLS];
        for i in 0..n {
            for dx in 0..K2 {
                sv[i * K2 + dx] = _mm512_loadu_ps(s[i].add(dx * 16));
            }
        }
        for ch in 0..w {
            let mut acc = [_mm512_setzero_ps(); K2];
            for i in 0..n {
                let xv = _mm512_loadu_ps(x[i].add(ch * xp));
                for dx in 0..K2 {
                    acc[dx] = _mm512_fmadd_ps(sv[i * K2 + dx], xv, acc[dx]);
                }
            }
            store_cols::<K2, PERM>(acc, t, ch, w, first, adj);
        }
    }

    /// `f[c·xp + dx + m] += t[(dx·w + c)·16 + m]` (window column `dx` reads key column
    /// `base + dx + idx[l]`); `store`: window column 0 is stored instead.
    ///
    /// # Safety
    /// AVX-512F; `t` valid for `k2·w·16`, `f` for 16 at every `c·xp + dx`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn shift_add(
        t: *const f32,
        f: *mut f32,
        w: usize,
        xp: usize,
        k2: usize,
        store: bool,
    ) {
        // Window columns outer: a row's overlapping stores lie `w` iterations apart.
        for dx in 0..k2 {
            for ch in 0..w {
                let p = f.add(ch * xp + dx);
                let u = _mm512_loadu_ps(t.add((dx * w + ch) * 16));
                let u = if store && dx == 0 {
                    u
                } else {
                    _mm512_add_ps(_mm512_loadu_ps(p), u)
                };
                _mm512_storeu_ps(p, u);
            }
        }
    }

    /// Lane `m` of the result sums the lanes `l` with `idx[l] = m`.
    #[inline(always)]
    unsafe fn adjoint(t: __m512, adj: &Adjoint) -> __m512 {
        let mut u = _mm512_setzero_ps();
        for r in 0..adj.layers {
            let idx = _mm512_loadu_si512(adj.idx[r].as_ptr() as *const _);
            u = _mm512_add_ps(u, _mm512_maskz_permutexvar_ps(adj.mask[r], idx, t));
        }
        u
    }
}
