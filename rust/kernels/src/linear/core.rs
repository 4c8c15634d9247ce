//! The chunked linear-attention core shared by `linear` and `flow`: one head, operands
//! already converted to the accumulation type, feature-mapped and scaled, rows contiguous.
//!
//! Causal form, chunk `c` of `C` rows (`a` = queries, `κ` = keys, `S`/`z` = the states
//! *before* the chunk, `M` = lower-triangular mask including the diagonal):
//!
//! ```text
//! P   = M ⊙ (a κᵀ)                    intra-chunk scores (C × C, gemm)
//! o   = a S + P v                      numerator (gemm)
//! den = a·z + rowsum(P) + 1e-10        normaliser (only with `normalize`)
//! S  += κᵀ v,  z += Σ κ                inter-chunk state (gemm)
//! ```
//!
//! Backward (`do' = dout / den`, `dden = −dout·out / den`, `G`/`gz` = reverse states, the
//! gradients of everything after the chunk):
//!
//! ```text
//! dP  = M ⊙ (do' vᵀ + dden 1ᵀ)
//! da  = do' Sᵀ + dden zᵀ + dP κ                    (forward sweep, recomputing S, z)
//! dκ  = dPᵀ a + v Gᵀ + gz,   dv = Pᵀ do' + κ G      (reverse sweep)
//! G  += aᵀ do',  gz += aᵀ dden
//! ```
//!
//! The non-causal form uses the whole-sequence states for every row and no intra-chunk part.

use crate::element::Acc;
use crate::gemm::{self, panels, round_up_nr, GemmDims, NR};
use crate::simd::Level;

/// Rows per chunk: a multiple of `NR` (the scores' columns start on panel boundaries).
pub const CHUNK: usize = 64;

/// Normaliser epsilon (fla's `1e-10`).
pub const NORM_EPS: f64 = 1e-10;

/// Sizes and mode of one head's core call.
#[derive(Debug, Clone, Copy)]
pub struct Core {
    /// Query rows.
    pub lq: usize,
    /// Key/value rows (must equal `lq` when causal).
    pub lk: usize,
    /// Query/key width.
    pub k: usize,
    /// Value width.
    pub v: usize,
    pub causal: bool,
    pub normalize: bool,
}

/// Reusable scratch of one worker.
#[derive(Default)]
pub struct Ws<A> {
    bk: Vec<A>,
    bv: Vec<A>,
    bs: Vec<A>,
    bx: Vec<A>,
    p: Vec<A>,
    dp: Vec<A>,
    o: Vec<A>,
    da: Vec<A>,
    s: Vec<A>,
    z: Vec<A>,
    g: Vec<A>,
    gz: Vec<A>,
}

/// Packs `Xᵀ` as a GEMM `B` (`X` is `rows × cols` at `src[r·rs + c]`): panels over X's rows.
/// Returns the panel stride (`cols · NR`).
pub(crate) fn pack_t<A: Acc>(
    src: &[A],
    rs: usize,
    rows: usize,
    cols: usize,
    out: &mut Vec<A>,
) -> usize {
    let len = panels(rows) * cols * NR;
    out.resize(len, A::ZERO);
    if !rows.is_multiple_of(NR) {
        // the last panel's missing rows must read as zeros
        let start = (rows / NR) * cols * NR;
        out[start..len].fill(A::ZERO);
    }
    // Eight rows at a time (a tile never straddles a panel, NR being a multiple of 8):
    // each column then stores eight adjacent values, which the compiler combines, instead
    // of one scattered store per value (the transposes were ~6% of a causal forward).
    const TILE: usize = 8;
    let full = rows / TILE * TILE;
    for r0 in (0..full).step_by(TILE) {
        let panel = &mut out[(r0 / NR) * cols * NR..][..cols * NR];
        let jj = r0 % NR;
        let tile: [&[A]; TILE] = std::array::from_fn(|i| &src[(r0 + i) * rs..][..cols]);
        for (c, dst) in panel.chunks_exact_mut(NR).enumerate() {
            let dst = &mut dst[jj..jj + TILE];
            for i in 0..TILE {
                dst[i] = tile[i][c];
            }
        }
    }
    for r in full..rows {
        let panel = &mut out[(r / NR) * cols * NR..];
        let jj = r % NR;
        for (c, &x) in src[r * rs..r * rs + cols].iter().enumerate() {
            panel[c * NR + jj] = x;
        }
    }
    cols * NR
}

/// Packs `X` itself as a GEMM `B`: panels over X's columns. Returns the panel stride
/// (`rows · NR`).
pub(crate) fn pack_n<A: Acc>(
    src: &[A],
    rs: usize,
    rows: usize,
    cols: usize,
    out: &mut Vec<A>,
) -> usize {
    out.resize(panels(cols) * rows * NR, A::ZERO);
    for p in 0..panels(cols) {
        let c0 = p * NR;
        let nc = NR.min(cols - c0);
        for r in 0..rows {
            let dst = &mut out[(p * rows + r) * NR..][..NR];
            if nc == NR {
                // a constant length the compiler copies inline (a libc memcpy call per
                // panel row cost ~4% of a causal forward)
                dst.copy_from_slice(&src[r * rs + c0..][..NR]);
            } else {
                dst[..nc].copy_from_slice(&src[r * rs + c0..][..nc]);
                dst[nc..].fill(A::ZERO);
            }
        }
    }
    rows * NR
}

/// `C[m × npanels·NR] (+)= A[m × k] · B`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn mm<A: Acc>(
    level: Level,
    m: usize,
    k: usize,
    a: &[A],
    rsa: usize,
    csa: usize,
    b: &[A],
    bps: usize,
    ncols: usize,
    c: &mut [A],
    ldc: usize,
    accumulate: bool,
) {
    let d = GemmDims {
        m,
        npanels: panels(ncols),
        k,
        rsa,
        csa,
        bps,
        ldc,
        accumulate,
    };
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + round_up_nr(ncols)].fill(A::ZERO);
            }
        }
        return;
    }
    gemm::gemm(level, &d, a, b, c);
}

#[inline]
pub(crate) fn dot<A: Acc>(a: &[A], b: &[A]) -> A {
    let mut s = A::ZERO;
    for (&x, &y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// `a · b` on the SIMD level (equal lengths).
#[inline]
pub(crate) fn vdot<A: Acc>(level: Level, a: &[A], b: &[A]) -> A {
    let mut o = [A::ZERO];
    A::dot_rows(level, &a[..b.len()], b.len(), b, &mut o);
    o[0]
}

#[inline]
pub(crate) fn axpy<A: Acc>(y: &mut [A], a: A, x: &[A]) {
    for (d, &s) in y.iter_mut().zip(x) {
        *d += a * s;
    }
}

/// Zeroes `p[t][j]` for `j > t`, `t, j < n`, and adds `add[t]` to the kept entries.
fn mask_add<A: Acc>(p: &mut [A], ld: usize, n: usize, add: Option<&[A]>) {
    for t in 0..n {
        let row = &mut p[t * ld..t * ld + n];
        if let Some(add) = add {
            let a = add[t];
            row[..=t].iter_mut().for_each(|x| *x += a);
        }
        row[t + 1..].fill(A::ZERO);
    }
}

fn load_state<A: Acc>(dst: &mut Vec<A>, src: Option<&[A]>, rows: usize, cols: usize, ld: usize) {
    dst.clear();
    dst.resize(rows * ld, A::ZERO);
    if let Some(src) = src {
        for r in 0..rows {
            dst[r * ld..r * ld + cols].copy_from_slice(&src[r * cols..(r + 1) * cols]);
        }
    }
}

fn store_state<A: Acc>(src: &[A], dst: &mut [A], rows: usize, cols: usize, ld: usize) {
    if dst.is_empty() {
        return;
    }
    for r in 0..rows {
        dst[r * cols..(r + 1) * cols].copy_from_slice(&src[r * ld..r * ld + cols]);
    }
}

/// `z += Σ_rows x[r]`.
fn add_colsum<A: Acc>(z: &mut [A], x: &[A], rows: usize, cols: usize) {
    for r in 0..rows {
        axpy(z, A::ONE, &x[r * cols..(r + 1) * cols]);
    }
}

impl Core {
    /// `S += κᵀ v` over `n` rows whose values are packed in `bv`, `z += Σ κ`.
    #[allow(clippy::too_many_arguments)]
    fn update_state<A: Acc>(
        &self,
        level: Level,
        kf: &[A],
        n: usize,
        bv: &[A],
        bvps: usize,
        s: &mut [A],
        z: &mut [A],
    ) {
        let vp = round_up_nr(self.v);
        mm(
            level, self.k, n, kf, 1, self.k, bv, bvps, self.v, s, vp, true,
        );
        add_colsum(z, kf, n, self.k);
    }

    /// Whole-sequence states `S = S0 + Σ κᵀ v`, `z = z0 + Σ κ` into `ws.s`, `ws.z`.
    fn full_state<A: Acc>(
        &self,
        level: Level,
        kf: &[A],
        v: &[A],
        s0: Option<&[A]>,
        z0: Option<&[A]>,
        ws: &mut Ws<A>,
    ) {
        let (kd, vd) = (self.k, self.v);
        load_state(&mut ws.s, s0, kd, vd, round_up_nr(vd));
        load_state(&mut ws.z, z0, 1, kd, kd);
        for t0 in (0..self.lk).step_by(CHUNK) {
            let n = CHUNK.min(self.lk - t0);
            let bvps = pack_n(&v[t0 * vd..], vd, n, vd, &mut ws.bv);
            self.update_state(level, &kf[t0 * kd..], n, &ws.bv, bvps, &mut ws.s, &mut ws.z);
        }
    }

    /// `P = M ⊙ (a κᵀ)` for the chunk at `t0` with `n` rows into `ws.p`.
    fn scores<A: Acc>(
        &self,
        level: Level,
        aq: &[A],
        kf: &[A],
        t0: usize,
        n: usize,
        ws: &mut Ws<A>,
    ) {
        let kd = self.k;
        let cp = round_up_nr(CHUNK);
        ws.p.resize(CHUNK * cp, A::ZERO);
        let bps = pack_t(&kf[t0 * kd..], kd, n, kd, &mut ws.bk);
        mm(
            level,
            n,
            kd,
            &aq[t0 * kd..],
            kd,
            1,
            &ws.bk,
            bps,
            n,
            &mut ws.p,
            cp,
            false,
        );
        mask_add(&mut ws.p, cp, n, None);
    }

    /// Forward. `out` is `lq × v`; `s_fin`/`z_fin` (`k × v`, `k`, or empty to skip) receive
    /// the states after the last row.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<A: Acc>(
        &self,
        level: Level,
        aq: &[A],
        kf: &[A],
        v: &[A],
        s0: Option<&[A]>,
        z0: Option<&[A]>,
        out: &mut [A],
        s_fin: &mut [A],
        z_fin: &mut [A],
        ws: &mut Ws<A>,
    ) {
        let (kd, vd) = (self.k, self.v);
        let vp = round_up_nr(vd);
        let cp = round_up_nr(CHUNK);
        let eps = A::from_f64(NORM_EPS);
        ws.o.resize(CHUNK * vp, A::ZERO);
        if !self.causal {
            self.full_state(level, kf, v, s0, z0, ws);
            let bsps = pack_n(&ws.s, vp, kd, vd, &mut ws.bs);
            for t0 in (0..self.lq).step_by(CHUNK) {
                let n = CHUNK.min(self.lq - t0);
                let aqc = &aq[t0 * kd..];
                mm(
                    level, n, kd, aqc, kd, 1, &ws.bs, bsps, vd, &mut ws.o, vp, false,
                );
                for t in 0..n {
                    let inv = if self.normalize {
                        A::ONE / (vdot(level, &aqc[t * kd..(t + 1) * kd], &ws.z[..kd]) + eps)
                    } else {
                        A::ONE
                    };
                    let dst = &mut out[(t0 + t) * vd..(t0 + t + 1) * vd];
                    for (d, &x) in dst.iter_mut().zip(&ws.o[t * vp..t * vp + vd]) {
                        *d = x * inv;
                    }
                }
            }
            store_state(&ws.s, s_fin, kd, vd, vp);
            if !z_fin.is_empty() {
                z_fin.copy_from_slice(&ws.z[..kd]);
            }
            return;
        }
        load_state(&mut ws.s, s0, kd, vd, vp);
        load_state(&mut ws.z, z0, 1, kd, kd);
        let mut have_state = s0.is_some();
        for t0 in (0..self.lq).step_by(CHUNK) {
            let n = CHUNK.min(self.lq - t0);
            let aqc = &aq[t0 * kd..];
            self.scores(level, aq, kf, t0, n, ws);
            let bvps = pack_n(&v[t0 * vd..], vd, n, vd, &mut ws.bv);
            if have_state {
                let bsps = pack_n(&ws.s, vp, kd, vd, &mut ws.bs);
                mm(
                    level, n, kd, aqc, kd, 1, &ws.bs, bsps, vd, &mut ws.o, vp, false,
                );
            }
            mm(
                level, n, n, &ws.p, cp, 1, &ws.bv, bvps, vd, &mut ws.o, vp, have_state,
            );
            // Normalisers of the whole chunk as two matrix-vector products on the SIMD level:
            // row sums of P (zero past the diagonal) and a·z. Row by row they were ~4% of
            // the forward.
            let (mut den, mut qz) = ([A::ZERO; CHUNK], [A::ZERO; CHUNK]);
            if self.normalize {
                A::dot_rows(level, &ws.p, cp, &[A::ONE; CHUNK][..n], &mut den[..n]);
                A::dot_rows(level, aqc, kd, &ws.z[..kd], &mut qz[..n]);
            }
            for t in 0..n {
                let inv = if self.normalize {
                    A::ONE / (den[t] + qz[t] + eps)
                } else {
                    A::ONE
                };
                let dst = &mut out[(t0 + t) * vd..(t0 + t + 1) * vd];
                for (d, &x) in dst.iter_mut().zip(&ws.o[t * vp..t * vp + vd]) {
                    *d = x * inv;
                }
            }
            self.update_state(level, &kf[t0 * kd..], n, &ws.bv, bvps, &mut ws.s, &mut ws.z);
            have_state = true;
        }
        store_state(&ws.s, s_fin, kd, vd, vp);
        if !z_fin.is_empty() {
            z_fin.copy_from_slice(&ws.z[..kd]);
        }
    }

    /// Backward. `dout` is `lq × v`; `ds_fin`/`dz_fin` are the gradients of the final
    /// states (if used). Writes `daq` (`lq × k`), `dkf` (`lk × k`), `dv` (`lk × v`) and,
    /// when non-empty, `ds0` (`k × v`) and `dz0` (`k`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<A: Acc>(
        &self,
        level: Level,
        aq: &[A],
        kf: &[A],
        v: &[A],
        s0: Option<&[A]>,
        z0: Option<&[A]>,
        dout: &[A],
        ds_fin: Option<&[A]>,
        dz_fin: Option<&[A]>,
        daq: &mut [A],
        dkf: &mut [A],
        dv: &mut [A],
        ds0: &mut [A],
        dz0: &mut [A],
        ws: &mut Ws<A>,
    ) {
        let (kd, vd) = (self.k, self.v);
        let (vp, kp, cp) = (round_up_nr(vd), round_up_nr(kd), round_up_nr(CHUNK));
        let eps = A::from_f64(NORM_EPS);
        ws.o.resize(CHUNK * vp, A::ZERO);
        ws.da.resize(CHUNK * kp, A::ZERO);
        ws.dp.resize(CHUNK * cp, A::ZERO);
        let mut dos = crate::buffer_pool::take::<A>(if self.normalize { self.lq * vd } else { 0 });
        let mut dden = crate::buffer_pool::take::<A>(self.lq);
        dden.clear();
        dden.resize(self.lq, A::ZERO);
        if self.normalize {
            dos.clear();
            dos.resize(self.lq * vd, A::ZERO);
        }

        // ---- forward sweep: daq (and do', dden) ----
        if self.causal {
            load_state(&mut ws.s, s0, kd, vd, vp);
            load_state(&mut ws.z, z0, 1, kd, kd);
        } else {
            self.full_state(level, kf, v, s0, z0, ws);
        }
        let mut have_state = !self.causal || s0.is_some();
        for t0 in (0..self.lq).step_by(CHUNK) {
            let n = CHUNK.min(self.lq - t0);
            let aqc = &aq[t0 * kd..];
            let mut bvps = 0;
            if self.causal {
                bvps = pack_n(&v[t0 * vd..], vd, n, vd, &mut ws.bv);
            }
            let bsps = if have_state {
                pack_n(&ws.s, vp, kd, vd, &mut ws.bs)
            } else {
                0
            };
            if self.normalize {
                if have_state {
                    mm(
                        level, n, kd, aqc, kd, 1, &ws.bs, bsps, vd, &mut ws.o, vp, false,
                    );
                }
                if self.causal {
                    self.scores(level, aq, kf, t0, n, ws);
                    mm(
                        level, n, n, &ws.p, cp, 1, &ws.bv, bvps, vd, &mut ws.o, vp, have_state,
                    );
                }
                for t in 0..n {
                    let row = if self.causal {
                        ws.p[t * cp..t * cp + t + 1]
                            .iter()
                            .fold(A::ZERO, |s, &x| s + x)
                    } else {
                        A::ZERO
                    };
                    let den = row + vdot(level, &aqc[t * kd..(t + 1) * kd], &ws.z[..kd]) + eps;
                    let inv = A::ONE / den;
                    let g = &dout[(t0 + t) * vd..(t0 + t + 1) * vd];
                    let o = &ws.o[t * vp..t * vp + vd];
                    // dden = -(dout · o/den) / den
                    dden[t0 + t] = -(dot(g, o) * inv * inv);
                    for (d, &x) in dos[(t0 + t) * vd..(t0 + t + 1) * vd].iter_mut().zip(g) {
                        *d = x * inv;
                    }
                }
            }
            let dosr: &[A] = if self.normalize { &dos } else { dout };
            let dosc = &dosr[t0 * vd..];
            // daq = do' Sᵀ (+ dP κ) + dden z
            if have_state {
                let bps = pack_t(&ws.s, vp, kd, vd, &mut ws.bx);
                mm(
                    level, n, vd, dosc, vd, 1, &ws.bx, bps, kd, &mut ws.da, kp, false,
                );
            }
            if self.causal {
                let bps = pack_t(&v[t0 * vd..], vd, n, vd, &mut ws.bx);
                mm(
                    level, n, vd, dosc, vd, 1, &ws.bx, bps, n, &mut ws.dp, cp, false,
                );
                mask_add(&mut ws.dp, cp, n, Some(&dden[t0..t0 + n]));
                let bps = pack_n(&kf[t0 * kd..], kd, n, kd, &mut ws.bx);
                mm(
                    level, n, n, &ws.dp, cp, 1, &ws.bx, bps, kd, &mut ws.da, kp, have_state,
                );
            } else if !have_state {
                ws.da.fill(A::ZERO);
            }
            for t in 0..n {
                let dst = &mut daq[(t0 + t) * kd..(t0 + t + 1) * kd];
                dst.copy_from_slice(&ws.da[t * kp..t * kp + kd]);
                if self.normalize {
                    axpy(dst, dden[t0 + t], &ws.z[..kd]);
                }
            }
            if self.causal && t0 + n < self.lq {
                self.update_state(level, &kf[t0 * kd..], n, &ws.bv, bvps, &mut ws.s, &mut ws.z);
                have_state = true;
            }
        }

        // ---- reverse states G, gz ----
        load_state(&mut ws.g, ds_fin, kd, vd, vp);
        load_state(&mut ws.gz, dz_fin, 1, kd, kd);
        let dosr: &[A] = if self.normalize { &dos } else { dout };
        let mut have_g = ds_fin.is_some();
        if !self.causal {
            // G = Σ aᵀ do', gz = Σ aᵀ dden over all query rows.
            for t0 in (0..self.lq).step_by(CHUNK) {
                let n = CHUNK.min(self.lq - t0);
                let bps = pack_n(&dosr[t0 * vd..], vd, n, vd, &mut ws.bx);
                mm(
                    level,
                    kd,
                    n,
                    &aq[t0 * kd..],
                    1,
                    kd,
                    &ws.bx,
                    bps,
                    vd,
                    &mut ws.g,
                    vp,
                    true,
                );
                if self.normalize {
                    for t in 0..n {
                        axpy(
                            &mut ws.gz,
                            dden[t0 + t],
                            &aq[(t0 + t) * kd..(t0 + t + 1) * kd],
                        );
                    }
                }
            }
            have_g = true;
        }
        let nchunks = self.lk.div_ceil(CHUNK);
        for c in (0..nchunks).rev() {
            let t0 = c * CHUNK;
            let n = CHUNK.min(self.lk - t0);
            let kfc = &kf[t0 * kd..];
            let vc = &v[t0 * vd..];
            // dκ = dPᵀ a + v Gᵀ + gz ; dv = Pᵀ do' + κ G
            if have_g {
                let bps = pack_t(&ws.g, vp, kd, vd, &mut ws.bx);
                mm(
                    level, n, vd, vc, vd, 1, &ws.bx, bps, kd, &mut ws.da, kp, false,
                );
                let bps = pack_n(&ws.g, vp, kd, vd, &mut ws.bs);
                mm(
                    level, n, kd, kfc, kd, 1, &ws.bs, bps, vd, &mut ws.o, vp, false,
                );
            }
            let mut bdps = 0;
            if self.causal {
                let dosc = &dosr[t0 * vd..];
                self.scores(level, aq, kf, t0, n, ws);
                let bps = pack_t(vc, vd, n, vd, &mut ws.bx);
                mm(
                    level, n, vd, dosc, vd, 1, &ws.bx, bps, n, &mut ws.dp, cp, false,
                );
                mask_add(&mut ws.dp, cp, n, Some(&dden[t0..t0 + n]));
                let bps = pack_n(&aq[t0 * kd..], kd, n, kd, &mut ws.bx);
                mm(
                    level, n, n, &ws.dp, 1, cp, &ws.bx, bps, kd, &mut ws.da, kp, have_g,
                );
                bdps = pack_n(dosc, vd, n, vd, &mut ws.bv);
                mm(
                    level, n, n, &ws.p, 1, cp, &ws.bv, bdps, vd, &mut ws.o, vp, have_g,
                );
            } else if !have_g {
                ws.da.fill(A::ZERO);
                ws.o.fill(A::ZERO);
            }
            for t in 0..n {
                let dst = &mut dkf[(t0 + t) * kd..(t0 + t + 1) * kd];
                for ((d, &x), &g) in dst.iter_mut().zip(&ws.da[t * kp..]).zip(&ws.gz) {
                    *d = x + g;
                }
                dv[(t0 + t) * vd..(t0 + t + 1) * vd].copy_from_slice(&ws.o[t * vp..t * vp + vd]);
            }
            if self.causal {
                let aqc = &aq[t0 * kd..];
                mm(
                    level, kd, n, aqc, 1, kd, &ws.bv, bdps, vd, &mut ws.g, vp, true,
                );
                if self.normalize {
                    for t in 0..n {
                        axpy(&mut ws.gz, dden[t0 + t], &aqc[t * kd..(t + 1) * kd]);
                    }
                }
                have_g = true;
            }
        }
        store_state(&ws.g, ds0, kd, vd, vp);
        if !dz0.is_empty() {
            dz0.copy_from_slice(&ws.gz[..kd]);
        }
    }
}
