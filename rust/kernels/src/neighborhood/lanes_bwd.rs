//! Backward for small windows (AVX-512, f32 accumulation) in the lane layout of
//! [`super::lanes`]: sixteen neighbouring queries of a line in the SIMD lanes.
//!
//! The tiled backward computes each query tile against the whole box of keys its windows
//! cover (at k = 7 about a sixth of those products lie inside a window) and adds every box's
//! dK / dV into shared sums in colour phases. Here a task owns one (batch entry, dilation
//! group, kv head) and streams the group's query lines in order. Per line it computes S, P,
//! dP, dS and dQ with the forward's lane kernels, and keeps the line's P, dS and transposed
//! Q / dO while a later key line may still need them. A key line is finished once no later
//! query line's window holds it: its dK / dV are then summed key-centrically — lane `l` of
//! key block `j0` takes, for window column `dx`, query `j0 + l + a − dx` (`a`: an interior
//! query's distance to its window start), one unaligned load per operand — and written
//! once, so no accumulator is zeroed or shared. Queries near a line's ends, whose windows
//! stop moving, do not fit that shift: their P / dS are stored as zero and their dK / dV go
//! through a small row-layout buffer of the line-end key columns instead.

use super::lanes::{par_groups, x86 as lx, Band, Block, Src, LINES};
use super::{Geo, NaDims, SharedMut};
use crate::buffer_pool::{take_filled, PoolVec};
use crate::element::Element;
use crate::linear::core::axpy;
use crate::per_thread::PerThread;
use crate::simd::math::VecMath;
use crate::simd::Level;

/// Left padding of the stored query lines: key-centric loads start up to `k2 − 1 ≤ 15`
/// columns before a line's first query.
const LP: usize = 16;
/// Largest window taken here: 8 × 8. With 7 × 7 this path measured 5–20% faster than the
/// tiled one (56 × 56 and 128 × 128 dilation 2), with 8 × 8 4–10% (64 × 64 D = 32, 48 × 48
/// D = 64), with 9 × 9 15% slower (more stored rows per query line, each read by more key
/// lines).
const MAX_KEYS: usize = 64;
/// Most bytes of stored lines per task; longer lines or larger windows take the tiled path.
const MAX_TASK_BYTES: usize = 8 << 20;

/// Whether the backward runs here: the forward's lane conditions, a (batch, group, kv
/// head) task for every thread, and a task's stored lines within [`MAX_TASK_BYTES`].
pub(super) fn applies<E: Element>(level: Level, dims: &NaDims, geo: &Geo) -> bool {
    if !super::lanes::applies::<E>(level, dims, geo)
        || geo.k[1] * geo.k[2] > MAX_KEYS
        || dims.head_dim == 0
        || dims.v_head_dim == 0
    {
        return false;
    }
    let tasks = dims.batch * geo.d[1] * geo.d[2] * dims.kv_heads;
    if tasks < rayon::current_num_threads() {
        return false;
    }
    let group = dims.q_heads / dims.kv_heads;
    largest_plan(dims, geo)
        .rings(dims.head_dim, dims.v_head_dim, group)
        .iter()
        .sum::<usize>()
        * 4
        <= MAX_TASK_BYTES
}

/// The plan of group 0, the longest in every dimension.
fn largest_plan(dims: &NaDims, geo: &Geo) -> Plan {
    Plan::new(&Band::group(geo, [0; 3], 0, dims.v_head_dim))
}

/// A group's line schedule: which key lines are finished after which query line, and how
/// many lines each ring holds.
struct Plan {
    nx: usize,
    k2: usize,
    /// Row stride of every transposed line (and of the stored P / dS rows).
    xp: usize,
    /// An interior query's distance to its window start along the line.
    a: usize,
    /// Window rows `[start, end)` of every query line.
    wins: Vec<(usize, usize)>,
    /// Query lines alive at once (stored until their last key line is finished).
    capq: usize,
    /// Key lines a query line's window spans (transposed K / V ring).
    capk: usize,
    /// Key lines open at once (started, not yet finished).
    cape: usize,
    /// Most window keys of a query line.
    nkmax: usize,
}

impl Plan {
    fn new(band: &Band<'_>) -> Self {
        let geo = band.geo;
        let (ny, nx, k2) = (band.len(1), band.len(2), geo.k[2]);
        let xp = (LP + nx + k2 + 15).next_multiple_of(16);
        let a = if geo.c[2] { k2 - 1 } else { k2 / 2 };
        let wins: Vec<(usize, usize)> = (0..ny).map(|y| band.win(1, y)).collect();
        let (mut capq, mut capk, mut cape, mut rows) = (1, 1, 1, 1);
        let (mut oldest, mut fin) = (0, 0);
        // The task's schedule: `LINES` query lines at a time.
        for y0 in (0..ny).step_by(LINES) {
            let y1 = (y0 + LINES).min(ny);
            let (s, e) = (wins[y0].0, wins[y1 - 1].1);
            rows = (y0..y1).fold(rows, |m, y| m.max(wins[y].1 - wins[y].0));
            capk = capk.max(e - s);
            cape = cape.max(e - fin);
            capq = capq.max(y1 - oldest);
            fin = fin.max(Self::finished(&wins, y1 - 1));
            while oldest < y1 && wins[oldest].1 <= fin {
                oldest += 1;
            }
        }
        Plan {
            nx,
            k2,
            xp,
            a,
            wins,
            capq,
            capk,
            cape,
            nkmax: rows * k2,
        }
    }

    /// Key lines before this one are finished once query line `y` is done: later windows
    /// start at or after it (windows move monotonically).
    fn finished(wins: &[(usize, usize)], y: usize) -> usize {
        wins.get(y + 1).map_or(wins.len(), |w| w.0)
    }

    /// Lengths of the rings `kt, vt, qt, dot, p, ds, ek, ev` (see [`Scratch`]).
    fn rings(&self, d: usize, dv: usize, group: usize) -> [usize; 8] {
        let (q, xp) = (self.capq * group, self.xp);
        [
            self.capk * d * xp,
            self.capk * dv * xp,
            q * d * xp,
            q * dv * xp,
            q * self.nkmax * xp,
            q * self.nkmax * xp,
            self.cape * self.nx * d,
            self.cape * self.nx * dv,
        ]
    }

    /// Columns before / after a stored line that the key-centric sums read: key block `j0`
    /// at window column `dx` reads query columns `j0 + a − dx ..` 16 on.
    fn pads(&self) -> (usize, usize) {
        (self.k2 - 1 - self.a, self.a)
    }

    /// Whether key column `j` can take a contribution from a query whose window stopped
    /// moving (those windows start at 0 or end at the line's end).
    fn edge_col(&self, j: usize) -> bool {
        j < self.k2 || j + self.k2 >= self.nx
    }
}

/// Per-thread buffers; the rings are pooled across calls with the values they held (every
/// value read is written first in its task, pads included).
struct Scratch {
    kt: PoolVec<f32>,
    vt: PoolVec<f32>,
    qt: PoolVec<f32>,
    dot: PoolVec<f32>,
    p: PoolVec<f32>,
    ds: PoolVec<f32>,
    ek: PoolVec<f32>,
    ev: PoolVec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
    o: Vec<f32>,
    rows: Vec<f32>,
    ta: Vec<f32>,
    tb: Vec<f32>,
    lse2: Vec<f32>,
    delta: Vec<f32>,
    qrow: Vec<f32>,
    dorow: Vec<f32>,
}

impl Scratch {
    /// Rings sized for `plan` (group 0's, the largest).
    fn new(plan: &Plan, d: usize, dv: usize, group: usize) -> Self {
        let [kt, vt, qt, dot, p, ds, ek, ev] = plan.rings(d, dv, group).map(take_filled);
        Scratch {
            kt,
            vt,
            qt,
            dot,
            p,
            ds,
            ek,
            ev,
            s: Vec::new(),
            dp: Vec::new(),
            o: Vec::new(),
            rows: Vec::new(),
            ta: Vec::new(),
            tb: Vec::new(),
            lse2: Vec::new(),
            delta: Vec::new(),
            qrow: Vec::new(),
            dorow: Vec::new(),
        }
    }
}

/// The call's tensors and constants, shared by every task (of this backward and of
/// `super::cube_bwd`).
pub(super) struct Call<'a, E> {
    pub(super) d: usize,
    pub(super) dv: usize,
    pub(super) hq: usize,
    pub(super) hkv: usize,
    pub(super) scale: f32,
    pub(super) qscale: f32,
    pub(super) q: &'a [E],
    pub(super) k: &'a [E],
    pub(super) v: &'a [E],
    pub(super) out: &'a [E],
    pub(super) dout: &'a [E],
    pub(super) lse: &'a [f32],
    pub(super) dq: SharedMut<E>,
    pub(super) dk: SharedMut<E>,
    pub(super) dvv: SharedMut<E>,
}

impl<'a, E: Element> Call<'a, E> {
    /// # Safety
    /// `E::Acc` is f32; the tasks write disjoint parts of dq / dk / dv (through the
    /// `SharedMut`s) while the call lives.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn new(
        dims: &NaDims,
        scale: f64,
        q: &'a [E],
        k: &'a [E],
        v: &'a [E],
        out: &'a [E],
        dout: &'a [E],
        lse: &'a [E::Acc],
        dq: &mut [E],
        dk: &mut [E],
        dv: &mut [E],
    ) -> Self {
        Call {
            d: dims.head_dim,
            dv: dims.v_head_dim,
            hq: dims.q_heads,
            hkv: dims.kv_heads,
            scale: scale as f32,
            qscale: (scale * std::f64::consts::LOG2_E) as f32,
            q,
            k,
            v,
            out,
            dout,
            lse: &*(lse as *const [E::Acc] as *const [f32]),
            dq: SharedMut(dq.as_mut_ptr()),
            dk: SharedMut(dk.as_mut_ptr()),
            dvv: SharedMut(dv.as_mut_ptr()),
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
    let plan0 = largest_plan(dims, geo);
    let group = dims.q_heads / dims.kv_heads;
    let init = || Scratch::new(&plan0, dims.head_dim, dims.v_head_dim, group);
    let scratch = PerThread::new();
    par_groups(dims, geo, |band, kh| {
        // SAFETY: this task alone writes dQ of its group's queries of the kv head's q
        // heads, and dK / dV of its group's keys of the kv head.
        scratch.with(init, |sc| unsafe { task_run(&call, band, kh, sc) });
    });
}

/// # Safety
/// AVX-512F (checked by `applies`); the task owns the rows it writes (see `run`).
#[target_feature(enable = "avx512f")]
unsafe fn task_run<E: Element>(c: &Call<'_, E>, band: &Band<'_>, kh: usize, sc: &mut Scratch) {
    let plan = Plan::new(band);
    let (d, dv) = (c.d, c.dv);
    let group = c.hq / c.hkv;
    let (nx, k2, xp) = (plan.nx, plan.k2, plan.xp);
    let ny = plan.wins.len();
    let done = nx.next_multiple_of(16);
    let fit = |v: &mut Vec<f32>, len: usize| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    };
    let rings = [
        &mut sc.kt,
        &mut sc.vt,
        &mut sc.qt,
        &mut sc.dot,
        &mut sc.p,
        &mut sc.ds,
        &mut sc.ek,
        &mut sc.ev,
    ];
    for (r, len) in rings.into_iter().zip(plan.rings(d, dv, group)) {
        fit(r, len);
    }
    fit(&mut sc.s, LINES * plan.nkmax * 16);
    fit(&mut sc.dp, LINES * plan.nkmax * 16);
    fit(
        &mut sc.o,
        2 * LINES.max(KEY_LINES) * d.next_multiple_of(16).max(dv.next_multiple_of(16)) * 16,
    );
    fit(&mut sc.ta, 16 * d.max(dv));
    fit(&mut sc.tb, 16 * d.max(dv));
    fit(&mut sc.lse2, LINES * done);
    fit(&mut sc.delta, LINES * done);
    fit(&mut sc.qrow, d);
    fit(&mut sc.dorow, dv);
    let blocks: Vec<Block> = (0..nx)
        .step_by(16)
        .map(|x0| Block::new(band, x0, k2))
        .collect();
    let (ks, vs) = (Src::new(c.k, c.hkv, kh, d), Src::new(c.v, c.hkv, kh, dv));
    let mut knext = 0;
    let mut opened = 0;
    let (mut oldest, mut fin) = (0, 0);
    let mut terms_k: Vec<Term> = Vec::new();
    let mut terms_v: Vec<Term> = Vec::new();
    let mut y0 = 0;
    while y0 < ny {
        let y1 = (y0 + LINES).min(ny);
        let ye = plan.wins[y1 - 1].1;
        // Transposed key / value lines of these windows.
        while knext < ye {
            let slot = knext % plan.capk;
            let kt = &mut sc.kt[slot * d * xp..(slot + 1) * d * xp];
            band.transpose_line_padded(&ks, knext, 1.0, xp, &mut sc.rows, kt);
            let vt = &mut sc.vt[slot * dv * xp..(slot + 1) * dv * xp];
            band.transpose_line_padded(&vs, knext, 1.0, xp, &mut sc.rows, vt);
            knext += 1;
        }
        // Key lines entering a window: clear their line-end dK / dV columns.
        while opened < ye {
            let e = opened % plan.cape;
            for j in (0..nx).filter(|&j| plan.edge_col(j)) {
                sc.ek[(e * nx + j) * d..(e * nx + j + 1) * d].fill(0.0);
                sc.ev[(e * nx + j) * dv..(e * nx + j + 1) * dv].fill(0.0);
            }
            opened += 1;
        }
        for hi in 0..group {
            let h = kh * group + hi;
            let slots = std::array::from_fn(|j| ((y0 + j) % plan.capq) * group + hi);
            lines(c, band, &plan, &blocks, sc, y0, y1 - y0, h, slots);
        }
        // Finish the key lines no later window holds.
        let until = Plan::finished(&plan.wins, y1 - 1);
        while fin < until {
            let nb = (until - fin).min(KEY_LINES);
            finish_lines(
                c,
                band,
                &plan,
                sc,
                kh,
                fin,
                nb,
                oldest..y1,
                &mut terms_k,
                &mut terms_v,
            );
            fin += nb;
        }
        while oldest < y1 && plan.wins[oldest].1 <= fin {
            oldest += 1;
        }
        y0 = y1;
    }
}

/// Query lines `y0 .. y0 + nlines` of head `h`, stored in ring slots `slots`: S, P, dP, dS
/// and dQ per block (dQ written out), P / dS / Qᵀ / dOᵀ kept for the key lines, the
/// line-end queries' dK / dV added into the row-layout buffers.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn lines<E: Element>(
    c: &Call<'_, E>,
    band: &Band<'_>,
    plan: &Plan,
    blocks: &[Block],
    sc: &mut Scratch,
    y0: usize,
    nlines: usize,
    h: usize,
    slots: [usize; LINES],
) {
    use std::arch::x86_64::_mm512_loadu_si512;
    let (d, dv, nx, k2, xp) = (c.d, c.dv, plan.nx, plan.k2, plan.xp);
    let done = nx.next_multiple_of(16);
    let nkm = plan.nkmax;
    let (left, right) = plan.pads();
    let qs = Src::new(c.q, c.hq, h, d);
    let dos = Src::new(c.dout, c.hq, h, dv);
    for (j, &slot) in slots.iter().enumerate().take(nlines) {
        let y = y0 + j;
        // Transposed Q (times scale·log2e) and dO, zero where the key-centric sums read
        // outside the line (`Plan::pads`; the transpose zeroes `k2 > a` columns after it).
        for (buf, s, w, scale) in [(&mut sc.qt, &qs, d, c.qscale), (&mut sc.dot, &dos, dv, 1.0)] {
            let base = slot * w * xp;
            band.transpose_line_padded(
                s,
                y,
                scale,
                xp,
                &mut sc.rows,
                &mut buf[base + LP..base + w * xp],
            );
            for ch in 0..w {
                let r = base + ch * xp + LP;
                buf[r - left..r].fill(0.0);
            }
        }
        let (lse2, delta) = (
            &mut sc.lse2[j * done..(j + 1) * done],
            &mut sc.delta[j * done..(j + 1) * done],
        );
        line_stats(c, band, h, y, lse2, Some(delta), (&mut sc.ta, &mut sc.tb));
    }
    // Key rows of the lines' windows, as the forward builds them (rows shared by
    // consecutive lines); `krows` reads the keys where the forward reads values (dQ = dS·K).
    let wins: [(usize, usize); LINES] = std::array::from_fn(|j| plan.wins[y0 + j.min(nlines - 1)]);
    let mut keyrows: Vec<lx::KeyRow> = Vec::with_capacity(LINES * k2);
    let mut next = [0usize; LINES];
    for bb in wins[0].0..wins[nlines - 1].1 {
        let mut inside = (0..nlines).filter(|&j| (wins[j].0..wins[j].1).contains(&bb));
        let Some(j0) = inside.next() else {
            continue;
        };
        let n = 1 + inside.count();
        let slot = bb % plan.capk;
        keyrows.push(lx::KeyRow {
            k: sc.kt.as_ptr().add(slot * d * xp),
            v: sc.vt.as_ptr().add(slot * dv * xp),
            j0,
            n,
            at: std::array::from_fn(|i| next[(j0 + i).min(LINES - 1)]),
        });
        for cnt in &mut next[j0..j0 + n] {
            *cnt += 1;
        }
    }
    let krows: Vec<lx::KeyRow> = keyrows
        .iter()
        .map(|r| lx::KeyRow {
            k: r.k,
            v: r.k,
            j0: r.j0,
            n: r.n,
            at: r.at,
        })
        .collect();
    let nk: [usize; LINES] = std::array::from_fn(|j| next[j] * k2);
    let qt: [*const f32; LINES] = slots.map(|s| sc.qt.as_ptr().add(s * d * xp + LP));
    let dot: [*const f32; LINES] = slots.map(|s| sc.dot.as_ptr().add(s * dv * xp + LP));
    let pl: [*mut f32; LINES] = slots.map(|s| sc.p.as_mut_ptr().add(s * nkm * xp + LP));
    let dsl: [*mut f32; LINES] = slots.map(|s| sc.ds.as_mut_ptr().add(s * nkm * xp + LP));
    let sp: [*mut f32; LINES] = std::array::from_fn(|j| sc.s.as_mut_ptr().add(j * nkm * 16));
    let dpp: [*mut f32; LINES] = std::array::from_fn(|j| sc.dp.as_mut_ptr().add(j * nkm * 16));
    let osz = d.next_multiple_of(16) * 16;
    let op: [*mut f32; LINES] = std::array::from_fn(|j| sc.o.as_mut_ptr().add(j * osz));
    for (bi, blk) in blocks.iter().enumerate() {
        let x0 = 16 * bi;
        let idx = _mm512_loadu_si512(blk.idx.as_ptr() as *const _);
        let perm = !blk.plain;
        let at = |p: [*const f32; LINES]| p.map(|p| p.add(x0));
        lx::scores_rows(
            &keyrows,
            |r| r.k,
            at(qt),
            sp,
            d,
            xp,
            k2,
            blk.base,
            idx,
            perm,
        );
        lx::scores_rows(
            &keyrows,
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
        // Lanes whose window starts `a` before them: their products go key-centric.
        let mut reg = 0u16;
        for l in 0..blk.nl {
            if blk.base + blk.idx[l] as usize + plan.a == x0 + l {
                reg |= 1 << l;
            }
        }
        let edge = (((1u32 << blk.nl) - 1) as u16) & !reg;
        for j in 0..nlines {
            x86::softmax_grad(
                blk,
                nk[j],
                k2,
                sp[j],
                dpp[j],
                sc.lse2.as_ptr().add(j * done + x0),
                sc.delta.as_ptr().add(j * done + x0),
                reg,
                pl[j].add(x0),
                dsl[j].add(x0),
                xp,
            );
            // Line-end queries: dK / dV into the row-layout buffers of their key columns.
            let ys = wins[j].0;
            for l in (0..16).filter(|&l| edge >> l & 1 == 1) {
                let x = x0 + l;
                for ch in 0..d {
                    sc.qrow[ch] = *qt[j].add(ch * xp + x);
                }
                for ch in 0..dv {
                    sc.dorow[ch] = *dot[j].add(ch * xp + x);
                }
                let start = blk.base + blk.idx[l] as usize;
                for r in 0..nk[j] / k2 {
                    let e = (ys + r) % plan.cape;
                    for dx in 0..k2 {
                        if !blk.full && blk.mask[dx] >> l & 1 == 0 {
                            continue;
                        }
                        let t = (r * k2 + dx) * 16 + l;
                        let (pv, dsv) = (*sp[j].add(t), *dpp[j].add(t));
                        let col = start + dx;
                        let ek = &mut sc.ek[(e * nx + col) * d..(e * nx + col + 1) * d];
                        axpy(ek, dsv, &sc.qrow);
                        let ev = &mut sc.ev[(e * nx + col) * dv..(e * nx + col + 1) * dv];
                        axpy(ev, pv, &sc.dorow);
                    }
                }
            }
        }
        // dQ = scale · dS·K, out through the rows.
        let dsv: [*const f32; LINES] = dpp.map(|p| p as *const f32);
        lx::pv_rows(&krows, nlines, dsv, d, xp, k2, blk.base, idx, perm, op);
        for (j, &o) in op.iter().enumerate().take(nlines) {
            let put = (c.dq, c.hq, h);
            band.put_rows(o, 16, d, c.scale, put, y0 + j, x0, blk.nl, &mut sc.ta);
        }
    }
    // Stored P / dS rows: zero where the key-centric sums read outside the line.
    for j in 0..nlines {
        for t in 0..nk[j] {
            for base in [pl[j], dsl[j]] {
                let r = base.add(t * xp);
                std::slice::from_raw_parts_mut(r.sub(left), left).fill(0.0);
                std::slice::from_raw_parts_mut(r.add(done), right).fill(0.0);
            }
        }
    }
}

/// lse (base 2) and, if asked, δ = O·dO of the queries of line `y` (q head `h`), zero past
/// the line's end; `tmp` converts half rows.
///
/// # Safety
/// AVX-512F; `lse2` / `delta` hold the line's blocks.
pub(super) unsafe fn line_stats<E: Element>(
    c: &Call<'_, E>,
    band: &Band<'_>,
    h: usize,
    y: usize,
    lse2: &mut [f32],
    mut delta: Option<&mut [f32]>,
    tmp: (&mut [f32], &mut [f32]),
) {
    let (dv, nx) = (c.dv, band.len(2));
    let (os, dos) = (Src::new(c.out, c.hq, h, dv), Src::new(c.dout, c.hq, h, dv));
    lse2.fill(0.0);
    for x0 in (0..nx).step_by(16) {
        let nl = (nx - x0).min(16);
        for l in 0..nl {
            lse2[x0 + l] = c.lse[band.row(c.hq, h, y, x0 + l)] * std::f32::consts::LOG2_E;
        }
        let Some(delta) = delta.as_deref_mut() else {
            continue;
        };
        delta[x0..x0 + 16].fill(0.0);
        let pos = |x: usize| band.geo.pos(band.g, [band.z, y, x]);
        let (mut pa, mut pb) = ([std::ptr::null(); 16], [std::ptr::null(); 16]);
        os.rows(band.b, band.n, (x0..x0 + nl).map(pos), &mut *tmp.0, &mut pa);
        dos.rows(band.b, band.n, (x0..x0 + nl).map(pos), &mut *tmp.1, &mut pb);
        if band.prefetch() && y + 1 < band.len(1) {
            let next = |x: usize| band.geo.pos(band.g, [band.z, y + 1, x]);
            os.prefetch(band.b, band.n, (x0..x0 + nl).map(next));
            dos.prefetch(band.b, band.n, (x0..x0 + nl).map(next));
        }
        for l in 0..nl {
            let (a, b) = (
                std::slice::from_raw_parts(pa[l], dv),
                std::slice::from_raw_parts(pb[l], dv),
            );
            delta[x0 + l] = crate::linear::core::vdot(Level::Avx512, a, b);
        }
    }
}

/// A stored query line's part of a batch of key lines: `x` its Qᵀ (or dOᵀ) at the shifted
/// column, `s` its dS (or P) row for the batch's key line `i0`, which holds key lines `i0 ..
/// i0 + n` of the batch (rows of consecutive key lines are `k2·xp` apart).
#[derive(Clone, Copy)]
struct Term {
    s: *const f32,
    x: *const f32,
    i0: usize,
    n: usize,
}

/// Key lines finished together: each Qᵀ / dOᵀ vector loaded feeds every one of them whose
/// window row the query line holds (as the forward's lines share key loads).
const KEY_LINES: usize = LINES;

/// dK / dV of key lines `b0 .. b0 + nb` (`nb ≤ KEY_LINES`) from the stored query lines
/// `live` whose windows hold any of them, plus the line-end buffers; written to the
/// outputs.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn finish_lines<E: Element>(
    c: &Call<'_, E>,
    band: &Band<'_>,
    plan: &Plan,
    sc: &mut Scratch,
    kh: usize,
    b0: usize,
    nb: usize,
    live: impl Iterator<Item = usize>,
    terms_k: &mut Vec<Term>,
    terms_v: &mut Vec<Term>,
) {
    let (d, dv, nx, k2, xp) = (c.d, c.dv, plan.nx, plan.k2, plan.xp);
    let group = c.hq / c.hkv;
    let osz = d.next_multiple_of(16).max(dv.next_multiple_of(16)) * 16;
    // (ring slot, window row of key line b0 + i0, i0, n) per stored query line and head.
    let lines: Vec<(usize, usize, usize, usize)> = live
        .filter_map(|yy| {
            let (ys, ye) = plan.wins[yy];
            let (lo, hi) = (ys.max(b0), ye.min(b0 + nb));
            (lo < hi).then_some((yy, lo - ys, lo - b0, hi - lo))
        })
        .flat_map(|(yy, r, i0, n)| {
            (0..group).map(move |hi| ((yy % plan.capq) * group + hi, r, i0, n))
        })
        .collect();
    let f32_out = std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>();
    let ln2 = std::f32::consts::LN_2;
    for j0 in (0..nx).step_by(16) {
        let nl = (nx - j0).min(16);
        terms_k.clear();
        terms_v.clear();
        for &(slot, r, i0, n) in &lines {
            let qt = sc.qt.as_ptr().add(slot * d * xp);
            let dot = sc.dot.as_ptr().add(slot * dv * xp);
            let pl = sc.p.as_ptr().add(slot * plan.nkmax * xp);
            let dsl = sc.ds.as_ptr().add(slot * plan.nkmax * xp);
            for dx in 0..k2 {
                let off = LP + j0 + plan.a - dx;
                let t = (r * k2 + dx) * xp + off;
                terms_k.push(Term {
                    s: dsl.add(t),
                    x: qt.add(off),
                    i0,
                    n,
                });
                terms_v.push(Term {
                    s: pl.add(t),
                    x: dot.add(off),
                    i0,
                    n,
                });
            }
        }
        // o[(which·KEY_LINES + i)·osz + c·16 + l]: dK (which 0) / dV (1) of batch line i.
        let o = sc.o.as_mut_ptr();
        for (which, terms, w) in [(0, &*terms_k, d), (1, &*terms_v, dv)] {
            let out: [*mut f32; KEY_LINES] =
                std::array::from_fn(|i| o.add((which * KEY_LINES + i) * osz));
            let mut c0 = 0;
            while c0 < w {
                let step = match w - c0 {
                    6.. => 6,
                    4.. => 4,
                    _ => 1,
                };
                x86::key_sum(step, terms, c0, xp, k2 * xp, out.map(|p| p.add(c0 * 16)));
                c0 += step;
            }
        }
        for i in 0..nb {
            let bb = b0 + i;
            let e = bb % plan.cape;
            for (which, w) in [(0usize, d), (1, dv)] {
                let (ext, outp, mul) = if which == 0 {
                    (&sc.ek, c.dk.get(), ln2)
                } else {
                    (&sc.ev, c.dvv.get(), 1.0)
                };
                let ob = o.add((which * KEY_LINES + i) * osz);
                if mul != 1.0 {
                    f32::scale(
                        Level::Avx512,
                        std::slice::from_raw_parts_mut(ob, w * 16),
                        mul,
                    );
                }
                let tmp = if which == 0 { &mut sc.ta } else { &mut sc.tb };
                let orow = |l: usize| outp.add(band.row(c.hkv, kh, bb, j0 + l) * w);
                let dst: [*mut f32; 16] = std::array::from_fn(|l| {
                    if f32_out && l < nl {
                        orow(l) as *mut f32
                    } else {
                        tmp.as_mut_ptr().add(l * w)
                    }
                });
                lx::untranspose(std::slice::from_raw_parts(ob, osz), w, &dst, nl);
                for (l, &dl) in dst.iter().enumerate().take(nl) {
                    let j = j0 + l;
                    let r = std::slice::from_raw_parts_mut(dl, w);
                    if plan.edge_col(j) {
                        axpy(r, mul, &ext[(e * nx + j) * w..(e * nx + j + 1) * w]);
                    }
                    if !f32_out {
                        let out = std::slice::from_raw_parts_mut(orow(l), w);
                        // SAFETY: `E::Acc` is f32.
                        E::from_acc_slice(&*(r as *const [f32] as *const [E::Acc]), out);
                    }
                }
            }
        }
    }
}

mod x86 {
    use super::{lx, Term, KEY_LINES};
    use crate::neighborhood::lanes::Block;
    use crate::simd::math::x86_avx512::exp2v_masked;
    use std::arch::x86_64::*;

    /// `P = 2^(S − lse2)` (masked to each lane's window) over `s`, `dS = P ⊙ (dP − δ)`
    /// over `dp`, both in place; the lanes in `keep` also stored at `p_out` / `ds_out`
    /// (row `t` at `t·xp`), the others stored as zero.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_grad(
        blk: &Block,
        nk: usize,
        k2: usize,
        s: *mut f32,
        dp: *mut f32,
        lse2: *const f32,
        delta: *const f32,
        keep: u16,
        p_out: *mut f32,
        ds_out: *mut f32,
        xp: usize,
    ) {
        let (l2, dl) = (_mm512_loadu_ps(lse2), _mm512_loadu_ps(delta));
        for t in 0..nk {
            let m = if blk.full { u16::MAX } else { blk.mask[t % k2] };
            let p = exp2v_masked(m, _mm512_sub_ps(_mm512_loadu_ps(s.add(t * 16)), l2));
            let ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp.add(t * 16)), dl));
            _mm512_storeu_ps(s.add(t * 16), p);
            _mm512_storeu_ps(dp.add(t * 16), ds);
            _mm512_storeu_ps(p_out.add(t * xp), _mm512_maskz_mov_ps(keep, p));
            _mm512_storeu_ps(ds_out.add(t * xp), _mm512_maskz_mov_ps(keep, ds));
        }
    }

    /// `o_i[c·16 + l] = Σ_terms holding line i  s_i[l] · x[(c0 + c)·xp + l]` for `step`
    /// columns `c` and the batch's key lines `i`, with `s_i = term.s + (i − i0)·ks`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn key_sum(
        step: usize,
        terms: &[Term],
        c0: usize,
        xp: usize,
        ks: usize,
        o: [*mut f32; KEY_LINES],
    ) {
        match step {
            6 => key_sum_n::<6>(terms, c0, xp, ks, o),
            4 => key_sum_n::<4>(terms, c0, xp, ks, o),
            1 => key_sum_n::<1>(terms, c0, xp, ks, o),
            _ => unreachable!("{} columns", step),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn key_sum_n<const C: usize>(
        terms: &[Term],
        c0: usize,
        xp: usize,
        ks: usize,
        o: [*mut f32; KEY_LINES],
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; KEY_LINES];
        for t in terms {
            let x = t.x.add(c0 * xp);
            macro_rules! go {
                ($(($i0:literal, $n:literal)),*) => {
                    match (t.i0, t.n) {
                        $(($i0, $n) => term::<C, $i0, $n>(&mut acc, t.s, x, xp, ks),)*
                        _ => unreachable!("key lines {}+{}", t.i0, t.n),
                    }
                };
            }
            lx::line_ranges!(go);
        }
        for (i, ai) in acc.iter().enumerate() {
            for (c, &a) in ai.iter().enumerate() {
                _mm512_storeu_ps(o[i].add(c * 16), a);
            }
        }
    }

    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn term<const C: usize, const I0: usize, const N: usize>(
        acc: &mut [[__m512; C]; KEY_LINES],
        s: *const f32,
        x: *const f32,
        xp: usize,
        ks: usize,
    ) {
        let sv: [__m512; N] = std::array::from_fn(|i| _mm512_loadu_ps(s.add(i * ks)));
        for c in 0..C {
            let xv = _mm512_loadu_ps(x.add(c * xp));
            for i in 0..N {
                acc[I0 + i][c] = _mm512_fmadd_ps(sv[i], xv, acc[I0 + i][c]);
            }
        }
    }
}
