//! 3-D backward for small windows (AVX-512, f32 accumulation) in the lane layout of
//! [`super::cube`]: sixteen queries of a line in the SIMD lanes.
//!
//! A task owns one (batch entry, dilation group, kv head) and streams its planes in order,
//! the transposed key / value lines of the planes the current windows span in a ring, as
//! the forward does. Per step of query lines it recomputes S and P from the saved lse, dP,
//! dS and dQ with the forward's lane kernels. dK / dV are the adjoint of the forward's key
//! / value loads: for window column `dx` lane `l` read key column `base + idx[l] + dx`, so
//! the products `dS·Q` (`P·dO`) of a key row go back through the inverse permutation and
//! are added at `base + dx` into transposed dK / dV lines, a ring beside the key ring. A
//! plane's dK / dV are written out once no later window holds it, so nothing is shared
//! between tasks and nothing is zeroed but the ring slot a plane enters.

use super::cube::Ring;
use super::lanes::{x86 as lx, Band, Block, Src, LINES};
use super::lanes_bwd::Call;
use super::{Geo, NaDims};
use crate::buffer_pool::{take_filled, PoolVec};
use crate::element::Element;
use crate::per_thread::PerThread;
use crate::simd::Level;
use rayon::prelude::*;

/// Most bytes of a task's rings (transposed K, V, dK, dV planes).
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
    let xp = line_stride(geo.group_len(2, 0) + geo.k[2], geo.k[2]);
    let lines = geo.k[0] * geo.group_len(1, 0);
    2 * lines * (dims.head_dim + dims.v_head_dim) * xp * 4 <= MAX_TASK_BYTES
}

/// Row stride of a transposed line whose blocks' loads start at most at `base_max`.
fn line_stride(base_max: usize, k2: usize) -> usize {
    (base_max + k2 + 15).next_multiple_of(16)
}

/// Per-thread buffers; the rings pooled across calls with the values they held (every
/// value read is written first in its task).
struct Scratch {
    kt: PoolVec<f32>,
    vt: PoolVec<f32>,
    /// Per ring line and block, dS·Q / P·dO per window column in the query lanes:
    /// `[block][dx][channel][16]`.
    dks: PoolVec<f32>,
    dvs: PoolVec<f32>,
    /// Per ring line and block: not yet written this plane (its first sum stores).
    fresh: Vec<bool>,
    /// One key line's dK / dV in columns (`[channel][xp]`), folded from `dks` / `dvs`.
    fold: Vec<f32>,
    qt: Vec<f32>,
    dot: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
    o: Vec<f32>,
    lse2: Vec<f32>,
    delta: Vec<f32>,
    rows: Vec<f32>,
    ta: Vec<f32>,
    tb: Vec<f32>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            kt: take_filled(0),
            vt: take_filled(0),
            dks: take_filled(0),
            dvs: take_filled(0),
            fresh: Vec::new(),
            fold: Vec::new(),
            qt: Vec::new(),
            dot: Vec::new(),
            s: Vec::new(),
            dp: Vec::new(),
            o: Vec::new(),
            lse2: Vec::new(),
            delta: Vec::new(),
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
    let groups = geo.d.iter().product::<usize>();
    let hkv = dims.kv_heads;
    let scratch = PerThread::new();
    (0..dims.batch * groups * hkv)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|task| {
            let kh = task % hkv;
            let gi = (task / hkv) % groups;
            let b = task / (hkv * groups);
            let g = [
                gi / (geo.d[1] * geo.d[2]),
                (gi / geo.d[2]) % geo.d[1],
                gi % geo.d[2],
            ];
            let band = Band {
                geo,
                g,
                z: 0,
                y: (0, geo.group_len(1, g[1])),
                b,
                n: geo.n,
                dv: dims.v_head_dim,
            };
            // SAFETY: `applies` checked AVX-512F; this task alone writes dQ of its group's
            // queries of the kv head's q heads, and dK / dV of its group's keys of the kv
            // head.
            scratch.with(Scratch::new, |sc| unsafe { task_run(&call, &band, kh, sc) });
        });
}

/// # Safety
/// AVX-512F; the task owns the rows it writes (see `run`).
#[target_feature(enable = "avx512f")]
unsafe fn task_run<E: Element>(c: &Call<'_, E>, band: &Band<'_>, kh: usize, sc: &mut Scratch) {
    let geo = band.geo;
    let (d, dv) = (c.d, c.dv);
    let group = c.hq / c.hkv;
    let (nz, ny, nx, k2) = (band.len(0), band.len(1), band.len(2), geo.k[2]);
    let blocks: Vec<Block> = (0..nx)
        .step_by(16)
        .map(|x0| Block::new(band, x0, k2))
        .collect();
    let adj: Vec<Adjoint> = blocks.iter().map(Adjoint::new).collect();
    let base_max = blocks.iter().map(|b| b.base).max().unwrap_or(0);
    let xp = line_stride(base_max, k2).max(nx.next_multiple_of(16));
    let done = nx.next_multiple_of(16);
    let capz = (0..nz)
        .map(|z| {
            let (s, e) = band.win(0, z);
            e - s
        })
        .max()
        .unwrap_or(1);
    let nkeys = geo.k.iter().product::<usize>();
    let fit = |v: &mut Vec<f32>, len: usize| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    };
    let nb = blocks.len();
    fit(&mut sc.kt, capz * ny * d * xp);
    fit(&mut sc.vt, capz * ny * dv * xp);
    fit(&mut sc.dks, capz * ny * nb * k2 * d * 16);
    fit(&mut sc.dvs, capz * ny * nb * k2 * dv * 16);
    sc.fresh.resize(capz * ny * nb, true);
    fit(&mut sc.fold, d.max(dv) * xp);
    fit(&mut sc.qt, LINES * d * xp);
    fit(&mut sc.dot, LINES * dv * xp);
    fit(&mut sc.s, LINES * nkeys * 16);
    fit(&mut sc.dp, LINES * nkeys * 16);
    fit(&mut sc.o, LINES * d.next_multiple_of(16) * 16);
    fit(&mut sc.lse2, LINES * done);
    fit(&mut sc.delta, LINES * done);
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
    let mut znext = 0;
    let mut fin = 0;
    for z in 0..nz {
        // Planes entering a window: transposed K / V, their lane sums not yet written.
        while znext < band.win(0, z).1 {
            ring.load(
                band,
                znext,
                (&ks, &vs),
                &mut sc.kt,
                &mut sc.vt,
                &mut sc.rows,
            );
            let s = ring.slot(znext, 0);
            sc.fresh[s * nb..(s + ny) * nb].fill(true);
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
                let h = kh * group + hi;
                lines(c, &here, &step, &blocks, &keyrows, &krows, sc, h);
            }
        }
        // Planes no later window holds: dK / dV out.
        let until = if z + 1 < nz { band.win(0, z + 1).0 } else { nz };
        while fin < until {
            let at = Band { z: fin, ..*band };
            for y in 0..ny {
                let s = ring.slot(fin, y);
                write_line(c, &at, kh, y, sc, s, xp, &blocks, &adj);
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

/// Query lines of one step for q head `h`: dQ written out, dK / dV added into the rings.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn lines<E: Element>(
    c: &Call<'_, E>,
    band: &Band<'_>,
    st: &Step,
    blocks: &[Block],
    keyrows: &[lx::KeyRow],
    krows: &[lx::KeyRow],
    sc: &mut Scratch,
    h: usize,
) {
    use std::arch::x86_64::_mm512_loadu_si512;
    let (d, dv, xp, done) = (c.d, c.dv, st.xp, st.done);
    let k2 = band.geo.k[2];
    let nx = band.len(2);
    let nkm = band.geo.k.iter().product::<usize>();
    let qs = Src::new(c.q, c.hq, h, d);
    let dos = Src::new(c.dout, c.hq, h, dv);
    let os = Src::new(c.out, c.hq, h, dv);
    let log2e = std::f32::consts::LOG2_E;
    for j in 0..st.n {
        let y = st.y + j;
        band.transpose_line(&qs, y, c.qscale, xp, &mut sc.rows, &mut sc.qt[j * d * xp..]);
        band.transpose_line(&dos, y, 1.0, xp, &mut sc.rows, &mut sc.dot[j * dv * xp..]);
        // lse (base 2) and δ = O·dO per query; zero past the line's end.
        let (lse2, delta) = (
            &mut sc.lse2[j * done..(j + 1) * done],
            &mut sc.delta[j * done..(j + 1) * done],
        );
        lse2.fill(0.0);
        delta.fill(0.0);
        for x0 in (0..nx).step_by(16) {
            let nl = (nx - x0).min(16);
            let pos = |x: usize| band.geo.pos(band.g, [band.z, y, x]);
            let (mut pa, mut pb) = ([std::ptr::null(); 16], [std::ptr::null(); 16]);
            os.rows(band.b, band.n, (x0..x0 + nl).map(pos), &mut sc.ta, &mut pa);
            dos.rows(band.b, band.n, (x0..x0 + nl).map(pos), &mut sc.tb, &mut pb);
            for l in 0..nl {
                let (a, b) = (
                    std::slice::from_raw_parts(pa[l], dv),
                    std::slice::from_raw_parts(pb[l], dv),
                );
                delta[x0 + l] = crate::linear::core::vdot(Level::Avx512, a, b);
                lse2[x0 + l] = c.lse[band.row(c.hq, h, y, x0 + l)] * log2e;
            }
        }
    }
    let qt: [*const f32; LINES] = std::array::from_fn(|j| sc.qt.as_ptr().add(j * d * xp));
    let dot: [*const f32; LINES] = std::array::from_fn(|j| sc.dot.as_ptr().add(j * dv * xp));
    let sp: [*mut f32; LINES] = std::array::from_fn(|j| sc.s.as_mut_ptr().add(j * nkm * 16));
    let dpp: [*mut f32; LINES] = std::array::from_fn(|j| sc.dp.as_mut_ptr().add(j * nkm * 16));
    let osz = d.next_multiple_of(16) * 16;
    let op: [*mut f32; LINES] = std::array::from_fn(|j| sc.o.as_mut_ptr().add(j * osz));
    let f32_out = std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>();
    let nb = blocks.len();
    let (kt0, dks, dvs) = (sc.kt.as_ptr(), sc.dks.as_mut_ptr(), sc.dvs.as_mut_ptr());
    for (bi, blk) in blocks.iter().enumerate() {
        let x0 = 16 * bi;
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
                sc.delta.as_ptr().add(j * done + x0),
            );
        }
        // dQ = scale · dS·K, out through the rows.
        let dsv: [*const f32; LINES] = dpp.map(|p| p as *const f32);
        lx::pv_rows(krows, st.n, dsv, d, xp, k2, blk.base, idx, perm, op);
        for (j, &o) in op.iter().enumerate().take(st.n) {
            let y = st.y + j;
            let row = |l: usize| c.dq.get().add(band.row(c.hq, h, y, x0 + l) * d);
            let dst: [*mut f32; 16] = std::array::from_fn(|l| {
                if f32_out && l < blk.nl {
                    row(l) as *mut f32
                } else {
                    sc.ta.as_mut_ptr().add(l * d)
                }
            });
            lx::untranspose_strided(o, 16, d, c.scale, &dst, blk.nl);
            if !f32_out {
                for l in 0..blk.nl {
                    let out = std::slice::from_raw_parts_mut(row(l), d);
                    let src = &sc.ta[l * d..(l + 1) * d];
                    // SAFETY: `E::Acc` is f32.
                    E::from_acc_slice(&*(src as *const [f32] as *const [E::Acc]), out);
                }
            }
        }
        // dS·Q and P·dO per window column, in the query lanes (folded into key columns
        // when the line is finished).
        for r in keyrows {
            // The key row's ring offset (the same slot in every ring).
            let line = (r.k.offset_from(kt0) as usize) / (d * xp);
            let ds: [*const f32; LINES] = std::array::from_fn(|i| {
                dpp[(r.j0 + i).min(LINES - 1)].wrapping_add(r.at[i] * k2 * 16) as *const f32
            });
            let p: [*const f32; LINES] = std::array::from_fn(|i| {
                sp[(r.j0 + i).min(LINES - 1)].wrapping_add(r.at[i] * k2 * 16) as *const f32
            });
            let xq: [*const f32; LINES] =
                std::array::from_fn(|i| qt[(r.j0 + i).min(LINES - 1)].add(x0));
            let xo: [*const f32; LINES] =
                std::array::from_fn(|i| dot[(r.j0 + i).min(LINES - 1)].add(x0));
            let fresh = &mut sc.fresh[line * nb + bi];
            let gk = dks.add((line * nb + bi) * k2 * d * 16);
            let gv = dvs.add((line * nb + bi) * k2 * dv * 16);
            x86::lane_sums(r.n, *fresh, ds, xq, gk, d, xp, k2);
            x86::lane_sums(r.n, *fresh, p, xo, gv, dv, xp, k2);
            *fresh = false;
        }
    }
}

/// Key line `y` of plane `at.z` (ring line `s`): its lane sums folded into key columns
/// through the adjoint of the blocks' key loads, dK (times ln 2: the sums used Q times
/// `scale·log2 e`) and dV written to the outputs.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn write_line<E: Element>(
    c: &Call<'_, E>,
    at: &Band<'_>,
    kh: usize,
    y: usize,
    sc: &mut Scratch,
    s: usize,
    xp: usize,
    blocks: &[Block],
    adj: &[Adjoint],
) {
    let nx = at.len(2);
    let k2 = at.geo.k[2];
    let nb = blocks.len();
    let f32_out = std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>();
    for (sums, outp, w, mul) in [
        (&sc.dks, c.dk, c.d, std::f32::consts::LN_2),
        (&sc.dvs, c.dvv, c.dv, 1.0),
    ] {
        let fold = &mut sc.fold[..w * xp];
        // Only the columns the blocks' sums reach.
        let end = blocks.last().map_or(0, |b| b.base + k2 + 15).min(xp);
        lx::zero_cols(fold.as_mut_ptr(), w, xp, 0, end);
        for (bi, blk) in blocks.iter().enumerate() {
            if sc.fresh[s * nb + bi] {
                continue;
            }
            let src = sums.as_ptr().add((s * nb + bi) * k2 * w * 16);
            x86::fold(
                src,
                fold.as_mut_ptr().add(blk.base),
                w,
                xp,
                k2,
                !blk.plain,
                &adj[bi],
            );
        }
        for x0 in (0..nx).step_by(16) {
            let nl = (nx - x0).min(16);
            let row = |l: usize| outp.get().add(at.row(c.hkv, kh, y, x0 + l) * w);
            let dst: [*mut f32; 16] = std::array::from_fn(|l| {
                if f32_out && l < nl {
                    row(l) as *mut f32
                } else {
                    sc.ta.as_mut_ptr().add(l * w)
                }
            });
            lx::untranspose_strided(sc.fold.as_ptr().add(x0), xp, w, mul, &dst, nl);
            if !f32_out {
                for l in 0..nl {
                    let out = std::slice::from_raw_parts_mut(row(l), w);
                    let src = &sc.ta[l * w..(l + 1) * w];
                    // SAFETY: `E::Acc` is f32.
                    E::from_acc_slice(&*(src as *const [f32] as *const [E::Acc]), out);
                }
            }
        }
    }
}

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
    use super::{Adjoint, Block, LINES};
    use crate::simd::math::x86_avx512::exp2v_masked;
    use std::arch::x86_64::*;

    /// `s ← P = 2^(s − lse2)` (inside the window), `dp ← dS = P·(dp − δ)`, lane-wise over
    /// the `nk` window columns of one line of a block.
    ///
    /// # Safety
    /// AVX-512F; `s`, `dp` valid for `nk·16`, `lse2`, `delta` for 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_grad(
        blk: &Block,
        nk: usize,
        k2: usize,
        s: *mut f32,
        dp: *mut f32,
        lse2: *const f32,
        delta: *const f32,
    ) {
        let (l, dl) = (_mm512_loadu_ps(lse2), _mm512_loadu_ps(delta));
        for t in 0..nk {
            let m = if blk.full { u16::MAX } else { blk.mask[t % k2] };
            let p = exp2v_masked(m, _mm512_sub_ps(_mm512_loadu_ps(s.add(t * 16)), l));
            let ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp.add(t * 16)), dl));
            _mm512_storeu_ps(s.add(t * 16), p);
            _mm512_storeu_ps(dp.add(t * 16), ds);
        }
    }

    /// [`sums`] for the `n` lines of one key row.
    ///
    /// # Safety
    /// As [`sums`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lane_sums(
        n: usize,
        store: bool,
        s: [*const f32; LINES],
        x: [*const f32; LINES],
        g: *mut f32,
        w: usize,
        xp: usize,
        k2: usize,
    ) {
        macro_rules! go {
            ($($n:literal)*) => {
                match (n, store) {
                    $(
                        ($n, false) => sums::<$n, false>(s, x, g, w, xp, k2),
                        ($n, true) => sums::<$n, true>(s, x, g, w, xp, k2),
                    )*
                    _ => unreachable!("{} lines", n),
                }
            };
        }
        go!(1 2 3 4);
    }

    /// `g[(dx·w + c)·16 + l] (+)= Σ_i s_i[dx·16 + l] · x_i[c·xp + l]` for window columns
    /// `dx < k2` and rows `c < w` (`STORE`: written, else added).
    ///
    /// # Safety
    /// AVX-512F; `s[..N]` valid for `k2·16`, `x[..N]` for `w` rows of stride `xp` (16 lanes
    /// each), `g` for `k2·w·16`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sums<const N: usize, const STORE: bool>(
        s: [*const f32; LINES],
        x: [*const f32; LINES],
        g: *mut f32,
        w: usize,
        xp: usize,
        k2: usize,
    ) {
        for dx in 0..k2 {
            let sv: [__m512; N] = std::array::from_fn(|i| _mm512_loadu_ps(s[i].add(dx * 16)));
            let gd = g.add(dx * w * 16);
            for ch in 0..w {
                let mut t = _mm512_mul_ps(sv[0], _mm512_loadu_ps(x[0].add(ch * xp)));
                for i in 1..N {
                    t = _mm512_fmadd_ps(sv[i], _mm512_loadu_ps(x[i].add(ch * xp)), t);
                }
                let p = gd.add(ch * 16);
                if !STORE {
                    t = _mm512_add_ps(_mm512_loadu_ps(p), t);
                }
                _mm512_storeu_ps(p, t);
            }
        }
    }

    /// `f[c·xp + dx + m] += Σ_{l: idx[l] = m} g[(dx·w + c)·16 + l]`: one block's lane sums
    /// into key columns (`perm`: through `adj`'s layers, else `idx` the identity).
    ///
    /// # Safety
    /// AVX-512F; `g` valid for `k2·w·16`, `f` for 16 at every `c·xp + dx`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fold(
        g: *const f32,
        f: *mut f32,
        w: usize,
        xp: usize,
        k2: usize,
        perm: bool,
        adj: &Adjoint,
    ) {
        for dx in 0..k2 {
            for ch in 0..w {
                let mut t = _mm512_loadu_ps(g.add((dx * w + ch) * 16));
                if perm {
                    let mut u = _mm512_setzero_ps();
                    for r in 0..adj.layers {
                        let idx = _mm512_loadu_si512(adj.idx[r].as_ptr() as *const _);
                        u = _mm512_add_ps(u, _mm512_maskz_permutexvar_ps(adj.mask[r], idx, t));
                    }
                    t = u;
                }
                let p = f.add(ch * xp + dx);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), t));
            }
        }
    }
}
