//! Forward for 1-D calls (AVX-512, f32 accumulation): queries in the SIMD lanes, keys
//! broadcast one at a time from their rows.
//!
//! In 1-D the windows of a run of queries form a diagonal band of the (key, query) plane.
//! The tiled path covers it with 32-key panels per query range (a window of 63 keys then
//! computes about 94 scores per query) and packs every tile's key box as Kᵀ panels. Here
//! only the queries are transposed (`Qᵀ[d][q]`, once per query); scores are computed as
//! `Sᵀ[key][q]` by a micro-kernel of 4 keys × up to 5 vectors of 16 queries that
//! broadcasts key elements straight from the key rows, so it covers the band in steps of
//! 4 keys × 16 queries (about 80 scores per query at k = 63). A task's whole band is in its
//! buffer, so the softmax runs down each 16-query column (lane-wise, no online rescaling),
//! and `P·V` takes 4 queries × up to 64 value columns per pass, broadcasting `P` and
//! loading value rows in place: output rows come out in their own layout.
//!
//! Any stride, dilation (each group is its own sub-sequence) and causal window: only the
//! windows' monotone starts and ends are used.

use super::lanes::Src;
use super::{group_window, Geo, NaDims, SharedMut};
use crate::buffer_pool::{take_filled, PoolVec};
use crate::element::Element;
use crate::per_thread::PerThread;
use crate::simd::Level;
use rayon::prelude::*;
use std::any::TypeId;

/// Queries per task (a multiple of 16).
pub(super) const QB: usize = 128;
/// Longest window taken here: the whole band of a task is held (`(QB + k) × QB` scores).
/// Up to k = 1023 this measured faster than the tiled path (L = 4096 D = 64: k = 255 5.0
/// against 6.4 ms, k = 1023 19.2 against 21.0), at k = 2047 slower (55 against 41).
const MAX_KERNEL: usize = 1024;

/// Whether the forward runs here.
pub(super) fn applies<E: Element>(level: Level, dims: &NaDims, geo: &Geo) -> bool {
    level == Level::Avx512
        && crate::simd::supported(level)
        && TypeId::of::<E::Acc>() == TypeId::of::<f32>()
        && dims.n_additional == 0
        && geo.len[0] == 1
        && geo.len[1] == 1
        && geo.k[2] <= MAX_KERNEL
}

/// Per-thread buffers (the large ones pooled across calls: fresh ones fault in their pages).
struct Scratch {
    qt: PoolVec<f32>,
    s: PoolVec<f32>,
    /// One column's `P` (`[row][16]`).
    p: Vec<f32>,
    /// Converted key / value rows (non-f32 storage only).
    kbuf: Vec<f32>,
    vbuf: Vec<f32>,
    rows: Vec<f32>,
    /// Output rows of 4 queries (non-f32 storage only).
    o: Vec<f32>,
    zero: Vec<f32>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            qt: take_filled(0),
            s: take_filled(0),
            p: Vec::new(),
            kbuf: Vec::new(),
            vbuf: Vec::new(),
            rows: Vec::new(),
            o: Vec::new(),
            zero: Vec::new(),
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
    let (batch, hq, hkv) = (dims.batch, dims.q_heads, dims.kv_heads);
    let group = hq / hkv;
    let qscale = (scale * std::f64::consts::LOG2_E) as f32;
    let mut blocks = Vec::new();
    // Every group's windows, computed once per call (tasks of other heads share them).
    let mut wins = Vec::new();
    for g in 0..geo.d[2] {
        let len = geo.group_len(2, g);
        blocks.extend((0..len).step_by(QB).map(|a| (g, a, (a + QB).min(len))));
        wins.push(
            (0..len)
                .map(|i| group_window(i, len, geo.k[2], geo.s[2], geo.c[2]))
                .collect::<Vec<_>>(),
        );
    }
    let outp = SharedMut(out.as_mut_ptr());
    // SAFETY: `applies` checked that `E::Acc` is f32.
    let lse = unsafe { &mut *(lse as *mut [E::Acc] as *mut [f32]) };
    let lsep = SharedMut(lse.as_mut_ptr());
    let scratch = PerThread::new();
    // Blocks of one (batch entry, head) run back to back: their key rows overlap.
    (0..batch * hq * blocks.len())
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let (g, q0, q1) = blocks[task % blocks.len()];
            let (bi, h) = (task / blocks.len() / hq, task / blocks.len() % hq);
            let kh = h / group;
            let t = Task {
                geo,
                g,
                q: (q0, q1),
                win: &wins[g][q0..q1],
                b: bi,
                h,
                hq,
                qscale,
            };
            let srcs = (
                Src::new(q, hq, h, dims.head_dim),
                Src::new(k, hkv, kh, dims.head_dim),
                Src::new(v, hkv, kh, dims.v_head_dim),
            );
            // SAFETY: this task alone writes the rows of its queries of head (bi, h).
            scratch.with(Scratch::new, |sc| unsafe { t.run(sc, &srcs, &outp, &lsep) });
        });
}

/// Rows `i0..i0 + cnt` (group indices `i·dil + g`) of one head of `src` at a fixed stride: in
/// place for f32 storage, else converted into `buf`. Returns the first row and the stride.
#[allow(clippy::too_many_arguments)]
pub(super) fn rows_of<E: Element>(
    src: &Src<'_, E>,
    b: usize,
    n: usize,
    dil: usize,
    g: usize,
    i0: usize,
    cnt: usize,
    buf: &mut Vec<f32>,
) -> (*const f32, usize) {
    let w = src.w;
    let off = |i: usize| ((b * n + i * dil + g) * src.heads + src.h) * w;
    if let Some(all) = E::as_acc_slice(src.src) {
        // SAFETY (the cast): `E::Acc` is f32 (`applies`).
        return (all[off(i0)..].as_ptr() as *const f32, dil * src.heads * w);
    }
    buf.resize(cnt * w, 0.0);
    for (j, dst) in buf.chunks_exact_mut(w).enumerate() {
        // SAFETY: `E::Acc` is f32 (`applies`).
        let dst = unsafe { &mut *(dst as *mut [f32] as *mut [E::Acc]) };
        E::to_acc_slice(&src.src[off(i0 + j)..off(i0 + j) + w], dst);
    }
    (buf.as_ptr(), w)
}

/// The rows (first, stride) of keys `jb..jb + 4` of `nk`; those past the last are `zero`.
///
/// # Safety
/// The keys before `nk` are rows of the tensor or buffer `first` points into.
pub(super) unsafe fn block_rows(
    (first, stride): (*const f32, usize),
    jb: usize,
    nk: usize,
    zero: *const f32,
) -> [*const f32; 4] {
    std::array::from_fn(|r| {
        if jb + r < nk {
            first.add((jb + r) * stride)
        } else {
            zero
        }
    })
}

/// Per block of 4 keys (`jb`: its first, counted from the task's first key `kb`; `nk`
/// keys in all), the queries `lo..hi` (indices into `win`) whose windows hold one of its
/// keys. Windows move monotonically, so two pointers find them.
pub(super) fn key_blocks(
    win: &[(usize, usize)],
    kb: usize,
    nk: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let nq = win.len();
    let (mut lo, mut hi) = (0, 0);
    (0..nk.next_multiple_of(4)).step_by(4).map(move |jb| {
        let (first, last) = (kb + jb, kb + (jb + 3).min(nk - 1));
        while lo < nq && win[lo].1 <= first {
            lo += 1;
        }
        while hi < nq && win[hi].0 <= last {
            hi += 1;
        }
        (jb, lo, hi)
    })
}

/// Queries `q.0..q.1` of dilation group `g` of batch entry `b`, q head `h` of `hq`.
struct Task<'a> {
    geo: &'a Geo,
    g: usize,
    q: (usize, usize),
    /// The queries' windows (group indices).
    win: &'a [(usize, usize)],
    b: usize,
    h: usize,
    hq: usize,
    qscale: f32,
}

impl Task<'_> {
    /// Flattened position of group index `i`.
    fn pos(&self, i: usize) -> usize {
        i * self.geo.d[2] + self.g
    }

    /// # Safety
    /// AVX-512F; the task's output and lse rows are written by no other task.
    unsafe fn run<E: Element>(
        &self,
        sc: &mut Scratch,
        srcs: &(Src<'_, E>, Src<'_, E>, Src<'_, E>),
        outp: &SharedMut<E>,
        lsep: &SharedMut<f32>,
    ) {
        let (qs, ks, vs) = srcs;
        let (d, dv) = (ks.w, vs.w);
        let geo = self.geo;
        let (q0, q1) = self.q;
        let nq = q1 - q0;
        let win = self.win;
        let kb = win[0].0;
        let nk = win[nq - 1].1 - kb;
        let nk4 = nk.next_multiple_of(4);
        let qp = nq.next_multiple_of(16);
        // Row stride of Qᵀ and Sᵀ: an odd number of cache lines, so that a column's rows
        // spread over every L1 set (at 128 floats they share an eighth of them).
        let ss = qp + 16;

        // Qᵀ, scaled into base 2; lanes past the last query are zero.
        sc.qt.fit(d * ss);
        sc.rows.resize(16 * d.max(dv), 0.0);
        for c in (0..qp).step_by(16) {
            let nr = (nq - c).min(16);
            let mut ptrs = [std::ptr::null(); 16];
            let pos = (q0 + c..q0 + c + nr).map(|i| self.pos(i));
            qs.rows(self.b, geo.n, pos, &mut sc.rows, &mut ptrs);
            super::lanes::x86::transpose_block(&ptrs, nr, d, self.qscale, &mut sc.qt[c..], ss);
        }
        let (k0, kst) = rows_of(ks, self.b, geo.n, geo.d[2], self.g, kb, nk, &mut sc.kbuf);
        let (v0, vst) = rows_of(vs, self.b, geo.n, geo.d[2], self.g, kb, nk, &mut sc.vbuf);
        // Key rows past the last (a block of 4 reaches up to 3 of them) read zeros.
        sc.zero.resize(d, 0.0);

        // Scores Sᵀ[key][query], for each block of 4 keys only over the query vectors
        // whose windows hold one of them.
        sc.s.fit(nk4 * ss);
        sc.o.resize(4 * dv, 0.0);
        // A column is finished (softmax, P·V, output) as soon as its last key row is in,
        // while its scores are still in cache.
        let f32_out = TypeId::of::<E>() == TypeId::of::<f32>();
        let cols = qp / 16;
        let col_end = |c: usize| win[(16 * c + 15).min(nq - 1)].1 - kb;
        let mut next = 0;
        for (jb, lo, hi) in key_blocks(win, kb, nk) {
            let kr = block_rows((k0, kst), jb, nk, sc.zero.as_ptr());
            let (mut c, c1) = (lo / 16, hi.div_ceil(16));
            while c < c1 {
                let nv = (c1 - c).min(x86::QK_VECS);
                let qt = sc.qt.as_ptr().add(16 * c);
                let s = sc.s.as_mut_ptr().add(jb * ss + 16 * c);
                x86::qk(nv, qt, ss, kr, d, s, ss);
                c += nv;
            }
            while next < cols && col_end(next) <= jb + 4 {
                self.column(sc, next, kb, ss, (v0, vst, dv), f32_out, outp, lsep);
                next += 1;
            }
        }
        debug_assert_eq!(next, cols);
    }

    /// Softmax down query column `c` (16 queries) over its key rows, then `P·V` and the
    /// column's output and lse rows. `(v0, vst, dv)`: the value rows from the task's first key
    /// (first, stride) and their width.
    #[allow(clippy::too_many_arguments)]
    unsafe fn column<E: Element>(
        &self,
        sc: &mut Scratch,
        c: usize,
        kb: usize,
        ss: usize,
        (v0, vst, dv): (*const f32, usize, usize),
        f32_out: bool,
        outp: &SharedMut<E>,
        lsep: &SharedMut<f32>,
    ) {
        let geo = self.geo;
        let (q0, nq) = (self.q.0, self.q.1 - self.q.0);
        let win = self.win;
        let c0 = 16 * c;
        let nl = (nq - c0).min(16);
        let mut wlo = [i32::MAX; 16];
        let mut whi = [0i32; 16];
        for l in 0..nl {
            wlo[l] = (win[c0 + l].0 - kb) as i32;
            whi[l] = (win[c0 + l].1 - kb) as i32;
        }
        // The column's P, compact (`[row][16]` from row `top`): its rows then share no L1
        // set with the score rows.
        let (top, bottom) = (wlo[0] as usize, whi[nl - 1] as usize);
        sc.p.resize((bottom - top) * 16, 0.0);
        let s = sc.s.as_ptr().add(c0);
        let (m, l) = x86::softmax(s, ss, sc.p.as_mut_ptr(), top, bottom, &wlo, &whi);

        // P·V, 4 queries at a time (P is zero outside each window over the column's rows);
        // rows past the last query, and every row when the output is not f32, go through
        // `o`.
        let ln2 = std::f32::consts::LN_2;
        for a in (c0..c0 + nl).step_by(4) {
            let nr = (c0 + nl - a).min(4);
            let (r0, r1) = (win[a].0 - kb, win[a + nr - 1].1 - kb);
            let p = sc.p.as_ptr().add((r0 - top) * 16 + a - c0);
            let row = |r: usize| (self.b * geo.n + self.pos(q0 + a + r)) * self.hq + self.h;
            let dst: [*mut f32; 4] = std::array::from_fn(|r| {
                if f32_out && r < nr {
                    outp.get().add(row(r) * dv) as *mut f32
                } else {
                    sc.o.as_mut_ptr().add(r * dv)
                }
            });
            let inv: [f32; 4] = std::array::from_fn(|r| 1.0 / l[a - c0 + r]);
            x86::pv(
                p,
                (16, 1),
                (v0.add(r0 * vst), vst, r1 - r0),
                dv,
                inv,
                dst,
                false,
            );
            for r in 0..nr {
                let lane = a - c0 + r;
                if !f32_out {
                    let dst = std::slice::from_raw_parts_mut(outp.get().add(row(r) * dv), dv);
                    let src = &sc.o[r * dv..(r + 1) * dv];
                    // SAFETY: `E::Acc` is f32 (`applies`).
                    E::from_acc_slice(&*(src as *const [f32] as *const [E::Acc]), dst);
                }
                *lsep.get().add(row(r)) = m[lane] * ln2 + l[lane].ln();
            }
        }
    }
}

// Register blocks read best indexed.
#[allow(clippy::needless_range_loop)]
pub(super) mod x86 {
    use crate::simd::math::x86_avx512::exp2v_masked;
    use std::arch::x86_64::*;

    /// Query vectors per score pass: at 4 keys that is 20 accumulators, and a block of 4
    /// keys of a window of `k` needs `(k + 3) / 16 + 1` vectors.
    pub(in crate::neighborhood) const QK_VECS: usize = 5;

    /// `s[r·ss + i] = Σ_c k[r][c] · qt[c·qs + i]` for keys `r < 4`, lanes `i < 16·nv`.
    ///
    /// # Safety
    /// AVX-512F; `1 ≤ nv ≤ QK_VECS`; `k[r]` valid for `d` reads, `qt` for `d` rows of
    /// stride `qs` and `16·nv` columns, `s` for 4 rows of stride `ss`.
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn qk(
        nv: usize,
        qt: *const f32,
        qs: usize,
        k: [*const f32; 4],
        d: usize,
        s: *mut f32,
        ss: usize,
    ) {
        match nv {
            1 => qk_n::<1>(qt, qs, k, d, s, ss),
            2 => qk_n::<2>(qt, qs, k, d, s, ss),
            3 => qk_n::<3>(qt, qs, k, d, s, ss),
            4 => qk_n::<4>(qt, qs, k, d, s, ss),
            5 => qk_n::<5>(qt, qs, k, d, s, ss),
            _ => unreachable!("nv = {nv}"),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn qk_n<const NV: usize>(
        qt: *const f32,
        qs: usize,
        k: [*const f32; 4],
        d: usize,
        s: *mut f32,
        ss: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; 4];
        for c in 0..d {
            let qv: [__m512; NV] =
                std::array::from_fn(|j| _mm512_loadu_ps(qt.add(c * qs + 16 * j)));
            for r in 0..4 {
                let kv = _mm512_set1_ps(*k[r].add(c));
                for j in 0..NV {
                    acc[r][j] = _mm512_fmadd_ps(kv, qv[j], acc[r][j]);
                }
            }
        }
        for r in 0..4 {
            for j in 0..NV {
                _mm512_storeu_ps(s.add(r * ss + 16 * j), acc[r][j]);
            }
        }
    }

    /// Base-2 softmax down rows `r0..r1` (stride `ps`) of one 16-lane column of scores `s`,
    /// written to `p[(r − r0)·16 ..]`: lane `l` takes rows `lo[l]..hi[l]`, and its other
    /// rows become 0. Returns the lanes' max and sum.
    ///
    /// # Safety
    /// AVX-512F; `s` valid for rows `r0..r1` of 16 values at stride `ps`, `p` for
    /// `(r1 − r0)·16` writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax(
        s: *const f32,
        ps: usize,
        p: *mut f32,
        r0: usize,
        r1: usize,
        lo: &[i32; 16],
        hi: &[i32; 16],
    ) -> ([f32; 16], [f32; 16]) {
        let lo = _mm512_loadu_si512(lo.as_ptr() as *const _);
        let hi = _mm512_loadu_si512(hi.as_ptr() as *const _);
        let mask = |r: usize| {
            let j = _mm512_set1_epi32(r as i32);
            _mm512_cmp_epi32_mask::<_MM_CMPINT_NLT>(j, lo)
                & _mm512_cmp_epi32_mask::<_MM_CMPINT_LT>(j, hi)
        };
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for r in r0..r1 {
            mx = _mm512_mask_max_ps(mx, mask(r), mx, _mm512_loadu_ps(s.add(r * ps)));
        }
        let mut sum = _mm512_setzero_ps();
        for r in r0..r1 {
            let x = _mm512_sub_ps(_mm512_loadu_ps(s.add(r * ps)), mx);
            let e = exp2v_masked(mask(r), x);
            _mm512_storeu_ps(p.add((r - r0) * 16), e);
            sum = _mm512_add_ps(sum, e);
        }
        let (mut m, mut l) = ([0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(m.as_mut_ptr(), mx);
        _mm512_storeu_ps(l.as_mut_ptr(), sum);
        (m, l)
    }

    /// `o[r][c] (+)= inv[r] · Σ_t p[t·ts + r·rs] · v[t][c]` for 4 rows `r` (queries, or
    /// keys in the backward), columns `c < dv`; added to `o` when `add`.
    ///
    /// # Safety
    /// AVX-512F; `p` valid at those offsets for `t < v.2`, `r < 4`; `v` that many rows
    /// (first, stride) of `dv` readable values; every `o[r]` valid for `dv` reads and
    /// writes.
    #[target_feature(enable = "avx512f")]
    pub(in crate::neighborhood) unsafe fn pv(
        p: *const f32,
        ps: (usize, usize),
        v: (*const f32, usize, usize),
        dv: usize,
        inv: [f32; 4],
        o: [*mut f32; 4],
        add: bool,
    ) {
        let mut c0 = 0;
        while c0 < dv {
            let rem = dv - c0;
            let last = if rem.is_multiple_of(16) || rem > 64 {
                u16::MAX
            } else {
                (1u16 << (rem % 16)) - 1
            };
            let o = o.map(|o| o.add(c0));
            match rem.div_ceil(16).min(4) {
                1 => pv_n::<1>(p, ps, v, c0, last, inv, o, add),
                2 => pv_n::<2>(p, ps, v, c0, last, inv, o, add),
                3 => pv_n::<3>(p, ps, v, c0, last, inv, o, add),
                _ => pv_n::<4>(p, ps, v, c0, last, inv, o, add),
            }
            c0 += 64;
        }
    }

    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv_n<const NV: usize>(
        p: *const f32,
        (ts, rs): (usize, usize),
        (v0, vst, nv): (*const f32, usize, usize),
        c0: usize,
        last: __mmask16,
        inv: [f32; 4],
        o: [*mut f32; 4],
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; 4];
        for t in 0..nv {
            let vr = v0.add(t * vst + c0);
            let vv: [__m512; NV] = std::array::from_fn(|j| {
                let k = if j + 1 == NV { last } else { u16::MAX };
                _mm512_maskz_loadu_ps(k, vr.add(16 * j))
            });
            let pr = p.add(t * ts);
            for r in 0..4 {
                let pb = _mm512_set1_ps(*pr.add(r * rs));
                for j in 0..NV {
                    acc[r][j] = _mm512_fmadd_ps(pb, vv[j], acc[r][j]);
                }
            }
        }
        for r in 0..4 {
            let iv = _mm512_set1_ps(inv[r]);
            for j in 0..NV {
                let k = if j + 1 == NV { last } else { u16::MAX };
                let mut x = _mm512_mul_ps(acc[r][j], iv);
                if add {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(k, o[r].add(16 * j)));
                }
                _mm512_mask_storeu_ps(o[r].add(16 * j), k, x);
            }
        }
    }
}
