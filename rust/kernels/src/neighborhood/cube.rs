//! 3-D forward for small windows (AVX-512, f32 accumulation), in the lane layout of
//! [`super::lanes`]: sixteen neighbouring queries of a line (the last dimension) in the SIMD
//! lanes, every key offset of the window one vector operation across them.
//!
//! The tiled path's 3-D key boxes hold many keys no query of the tile needs (at k = 3 an
//! 8 × 2 × 4 tile's box has 240 keys for windows of 27). Here no score outside a window is
//! computed. A task owns one (batch entry, dilation group, kv head) and a run of planes
//! (the first dimension), streamed in order: every key / value line of the planes the
//! current windows span is transposed once into a ring of planes and serves each query
//! line (and q head) whose window holds it. Per plane, query lines go `LINES` at a time
//! through the 2-D lane kernel with the key rows of every plane of their window.

use super::lanes::{par_spans, spans, x86, Band, Block, Lines, Scratch, Src, LINES};
use super::{Geo, NaDims, SharedMut};
use crate::element::Element;
use crate::simd::Level;
use std::any::TypeId;

/// Largest window (keys per query) taken here.
const MAX_KEYS: usize = 64;
/// Longest window along the line (as in `lanes`).
const MAX_LINE_KERNEL: usize = 16;
/// Shortest line taken here: shorter lines leave most lanes idle.
const MIN_LINE: usize = 12;

/// Whether the call runs here.
pub(super) fn applies<E: Element>(level: Level, dims: &NaDims, geo: &Geo) -> bool {
    level == Level::Avx512
        && crate::simd::supported(level)
        && TypeId::of::<E::Acc>() == TypeId::of::<f32>()
        && dims.n_additional == 0
        // 3-D: a rank-3 call's leading kernel is at least 2.
        && geo.k[0] > 1
        && geo.s[2] == 1
        && geo.k.iter().product::<usize>() <= MAX_KEYS
        && geo.k[2] <= MAX_LINE_KERNEL
        && geo.group_len(2, geo.d[2] - 1) >= MIN_LINE
        && busy_lanes(geo.group_len(2, 0))
        && ring_bytes(dims, geo) <= MAX_RING_BYTES
}

/// Most bytes of a task's ring of transposed key / value planes; larger planes take the
/// tiled path, whose extra memory does not grow with the plane.
const MAX_RING_BYTES: usize = 32 << 20;

/// An upper bound on a task's ring: a window's planes of the longest group's lines, each of
/// `head_dim + v_head_dim` rows of the widest stride.
fn ring_bytes(dims: &NaDims, geo: &Geo) -> usize {
    let (ny, nx, k2) = (geo.group_len(1, 0), geo.group_len(2, 0), geo.k[2]);
    let xp = (nx + k2 + 15).next_multiple_of(16);
    geo.k[0]
        .saturating_mul(ny)
        .saturating_mul(dims.head_dim.saturating_add(dims.v_head_dim))
        .saturating_mul(xp)
        .saturating_mul(4)
}

/// Whether at least 3/4 of a line's lanes hold queries: lines of 20 (5/8 busy) measured
/// 25–35% slower here than tiled (8×20×20 k = 3, D = 64 and 128), of 24 mixed (D = 32
/// faster, D = 64 equal), of 12, 16, 32 and 48 faster.
fn busy_lanes(nx: usize) -> bool {
    4 * nx >= 3 * nx.next_multiple_of(16)
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
    // Runs of planes: every group's planes split into as few runs as give every thread the
    // same number of tasks (a run re-transposes the key planes it shares with its
    // neighbours).
    let tasks = geo.d.iter().product::<usize>() * dims.batch * dims.kv_heads;
    let threads = rayon::current_num_threads().max(1);
    let mut nr = 1;
    while nr < geo.group_len(0, 0) && !(tasks * nr).is_multiple_of(threads) {
        nr += 1;
    }
    let outp = SharedMut(out.as_mut_ptr());
    // SAFETY: `applies` checked that `E::Acc` is f32.
    let lse = unsafe { &mut *(lse as *mut [E::Acc] as *mut [f32]) };
    let lsep = SharedMut(lse.as_mut_ptr());
    par_spans(
        dims,
        geo,
        &spans(geo, 0, nr),
        0,
        (q, k, v),
        |band, z1, sc, qs, kv| {
            // SAFETY: `applies` checked AVX-512F; this task alone writes its planes' query rows
            // of these q heads.
            unsafe { planes(band, z1, sc, qs, kv, qscale, outp, lsep, hq) };
        },
    );
}

/// A line's 16-lane blocks and the row stride of its transposed lines: loads reach
/// `base + dx + 15 < base + k2 + 15`, and lines are transposed in whole blocks.
pub(super) fn line_blocks(band: &Band<'_>) -> (Vec<Block>, usize) {
    let (nx, k2) = (band.len(2), band.geo.k[2]);
    let blocks: Vec<Block> = (0..nx)
        .step_by(16)
        .map(|x0| Block::new(band, x0, k2))
        .collect();
    let xp = blocks
        .iter()
        .map(|b| b.base + k2 + 15)
        .max()
        .unwrap_or(0)
        .max(nx)
        .next_multiple_of(16);
    (blocks, xp)
}

/// Key planes held for query planes `z0..z1`: their widest window along the planes
/// (windows move monotonically, so a plane before the current window's first is not
/// needed again).
pub(super) fn planes_held(band: &Band<'_>, z0: usize, z1: usize) -> usize {
    (z0..z1)
        .map(|z| {
            let (s, e) = band.win(0, z);
            e - s
        })
        .max()
        .unwrap_or(1)
}

/// Planes `band.z .. z1` of the band's group for the q heads `qs` of one kv head `kv`.
///
/// # Safety
/// AVX-512F; the caller owns these planes' out / lse rows of the q heads.
#[allow(clippy::too_many_arguments)]
unsafe fn planes<E: Element>(
    band: &Band<'_>,
    z1: usize,
    sc: &mut Scratch,
    qs: &[Src<'_, E>],
    kv: (&Src<'_, E>, &Src<'_, E>),
    qscale: f32,
    outp: SharedMut<E>,
    lsep: SharedMut<f32>,
    hq: usize,
) {
    let geo = band.geo;
    let (d, dv) = (kv.0.w, band.dv);
    let ny = band.len(1);
    let z0 = band.z;
    let (blocks, xp) = line_blocks(band);
    let capz = planes_held(band, z0, z1);
    sc.fit(geo, d, dv, xp, capz * ny);
    let ring = Ring {
        capz,
        ny,
        d,
        dv,
        xp,
    };
    let mut qt = std::mem::take(&mut sc.qt);
    let mut keyrows: Vec<x86::KeyRow> = Vec::new();
    let mut znext = band.win(0, z0).0;
    for z in z0..z1 {
        while znext < band.win(0, z).1 {
            ring.load(band, znext, kv, &mut sc.kt, &mut sc.vt, &mut sc.rows);
            znext += 1;
        }
        let here = Band { z, ..*band };
        for y in (0..ny).step_by(LINES) {
            let nlines = LINES.min(ny - y);
            ring.rows(
                &here,
                y,
                nlines,
                sc.kt.as_ptr(),
                sc.vt.as_ptr(),
                &mut keyrows,
            );
            let lines = Lines {
                y,
                n: nlines,
                xp,
                rows: &keyrows,
                blocks: &blocks,
            };
            for qsh in qs {
                here.lines(&lines, sc, &mut qt, qsh, qscale, outp, lsep, hq);
            }
        }
    }
    sc.qt = qt;
}

/// Transposed key / value lines of the planes the current windows span: `capz` planes of
/// `ny` lines, plane `z` in slots `(z mod capz)·ny ..`; lines of `d` / `dv` rows of `xp`
/// columns.
pub(super) struct Ring {
    pub(super) capz: usize,
    pub(super) ny: usize,
    pub(super) d: usize,
    pub(super) dv: usize,
    pub(super) xp: usize,
}

impl Ring {
    pub(super) fn slot(&self, z: usize, y: usize) -> usize {
        (z % self.capz) * self.ny + y
    }

    /// Transposes the key and value lines of plane `z` (of `band`'s group) into their slots.
    pub(super) fn load<E: Element>(
        &self,
        band: &Band<'_>,
        z: usize,
        kv: (&Src<'_, E>, &Src<'_, E>),
        kt: &mut [f32],
        vt: &mut [f32],
        rows: &mut Vec<f32>,
    ) {
        let (d, dv, xp) = (self.d, self.dv, self.xp);
        let at = Band { z, ..*band };
        for y in 0..self.ny {
            let s = self.slot(z, y);
            at.transpose_line(
                kv.0,
                y,
                1.0,
                xp,
                rows,
                &mut kt[s * d * xp..(s + 1) * d * xp],
            );
            at.transpose_line(
                kv.1,
                y,
                1.0,
                xp,
                rows,
                &mut vt[s * dv * xp..(s + 1) * dv * xp],
            );
        }
    }

    /// The key rows of query lines `y .. y + nlines` of plane `here.z`: the lines of every
    /// plane of their window, from the ring at `kt` / `vt`. Returns each line's count.
    pub(super) fn rows(
        &self,
        here: &Band<'_>,
        y: usize,
        nlines: usize,
        kt: *const f32,
        vt: *const f32,
        out: &mut Vec<x86::KeyRow>,
    ) -> [usize; LINES] {
        out.clear();
        let mut next = [0usize; LINES];
        let (zs, ze) = here.win(0, here.z);
        for zz in zs..ze {
            here.push_rows(y, nlines, &mut next, out, |bb| {
                let s = self.slot(zz, bb);
                (
                    kt.wrapping_add(s * self.d * self.xp),
                    vt.wrapping_add(s * self.dv * self.xp),
                )
            });
        }
        next
    }
}
