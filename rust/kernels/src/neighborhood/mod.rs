//! Neighborhood attention (NATTEN 0.21 semantics, `docs/neighborhood.md`), forward and backward,
//! over 1–3 spatial dimensions, with GQA, `Dv ≠ D` and additional (unmasked) keys/values.
//!
//! Fused and tiled: each task takes a small block of neighbouring queries of one dilation
//! group (a run of up to 128 along the last dimension, a 16×8 block in 2-D, 8×2×4 in 3-D). The windows
//! of those queries are contained in one box of keys (per dimension, from the first query's
//! window start to the last one's end: windows move monotonically with the query), which is
//! gathered and packed once as GEMM panels. Scores are then computed one NR-wide key panel at
//! a time for only the contiguous range of queries that need a key of that panel (sub-tiles
//! no query needs are skipped), masked by per-query window bits over the box (only scores
//! inside the window are exponentiated, see `rows`), and folded into an online softmax;
//! `P·V` uses the same panel / query ranges. No `N × prod(kernel)` matrix is stored; the
//! backward pass recomputes `P` from the saved lse and adds dK / dV of each box into one
//! shared sum, in colour phases of tiles with disjoint boxes (`colours`).
//!
//! Small 2-D windows (up to 16 keys along the line and 256 in all, stride 1 along
//! the line, no additional keys) have a second forward for f32 accumulation at AVX-512,
//! `lanes`: sixteen queries of a line in the SIMD lanes, one vector operation per window
//! offset, so no score outside a window is computed. Up to 8 × 8 windows, with a (batch,
//! group, kv head) task for every thread, the backward runs in that layout too
//! (`lanes_bwd`): query lines streamed in order, each key line's dK / dV summed once no
//! later window holds it.
//!
//! 3-D calls with small windows (up to 64 keys, 16 along the line, stride 1 along it, lines
//! at least 3/4 busy) take the same lane kernels plane by plane (`cube`), and their
//! backward (`cube_bwd`) stores the query lines' P / dS and sums each finished key line's
//! dK / dV over them.
//!
//! 1-D calls (windows up to 1024 keys, no additional keys, f32 accumulation at AVX-512)
//! run in `band` / `band_bwd`: queries in the SIMD lanes, keys broadcast from their rows,
//! the diagonal band of the (key, query) plane covered 4 keys × 16 queries at a time.
//!
//! Dilation: every dilation group (per dimension, the positions `g, g + d, g + 2d, …`) is its
//! own sub-grid; tiles never mix groups, so they are dense within the group.

mod backward;
// AVX-512 only, like `lanes`.
#[cfg(target_arch = "x86_64")]
mod band;
#[cfg(target_arch = "x86_64")]
mod band_bwd;
#[cfg(target_arch = "x86_64")]
mod cube;
#[cfg(target_arch = "x86_64")]
mod cube_bwd;
mod forward;
// AVX-512 only: other targets always take the tiled path.
#[cfg(target_arch = "x86_64")]
mod lanes;
#[cfg(target_arch = "x86_64")]
mod lanes_bwd;
mod pack;
mod rows;
#[cfg(test)]
mod tests_e2e;

use crate::element::Element;
use crate::error::{check_len, KernelError};
use crate::gemm::NR;

/// Shapes of one neighborhood-attention call. Only the first `rank` entries of `spatial`
/// matter. Every buffer is contiguous heads-last: q `[batch, *spatial, q_heads, head_dim]`,
/// k `[batch, *spatial, kv_heads, head_dim]`, v `[batch, *spatial, kv_heads, v_head_dim]`,
/// out/dout `[batch, *spatial, q_heads, v_head_dim]`, lse `[batch, *spatial, q_heads]`,
/// additional k `[batch, n_additional, kv_heads, head_dim]`, additional v
/// `[batch, n_additional, kv_heads, v_head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NaDims {
    pub batch: usize,
    /// Number of spatial dimensions, 1 to 3.
    pub rank: usize,
    pub spatial: [usize; 3],
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub n_additional: usize,
}

impl NaDims {
    /// Dims from a spatial shape slice of length 1 to 3 (a longer or empty slice gives a
    /// rank the kernels reject).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        spatial: &[usize],
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        v_head_dim: usize,
        n_additional: usize,
    ) -> Self {
        let mut s = [1usize; 3];
        for (d, &x) in s.iter_mut().zip(spatial) {
            *d = x;
        }
        NaDims {
            batch,
            rank: spatial.len(),
            spatial: s,
            q_heads,
            kv_heads,
            head_dim,
            v_head_dim,
            n_additional,
        }
    }
}

/// Window parameters per spatial dimension (first `rank` entries used) and the softmax scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NaParams {
    pub kernel_size: [usize; 3],
    pub stride: [usize; 3],
    pub dilation: [usize; 3],
    pub is_causal: [bool; 3],
    pub scale: f64,
}

impl NaParams {
    /// Parameters from per-dimension slices (each as long as the rank).
    pub fn new(
        kernel_size: &[usize],
        stride: &[usize],
        dilation: &[usize],
        is_causal: &[bool],
        scale: f64,
    ) -> Self {
        fn arr<T: Copy>(x: &[T], fill: T) -> [T; 3] {
            let mut a = [fill; 3];
            for (d, &v) in a.iter_mut().zip(x) {
                *d = v;
            }
            a
        }
        NaParams {
            kernel_size: arr(kernel_size, 1),
            stride: arr(stride, 1),
            dilation: arr(dilation, 1),
            is_causal: arr(is_causal, false),
            scale,
        }
    }
}

/// The 1-D window of query `i` on a dimension of length `len` (docs/neighborhood.md), as a half-open range
/// `[start, end)` of indices *inside the query's dilation group* (key `j` of the group is
/// position `j * dilation + i % dilation`).
pub fn window(
    i: usize,
    len: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    causal: bool,
) -> (usize, usize) {
    let g = i % dilation;
    let ig = i / dilation;
    let n = (len - g).div_ceil(dilation);
    group_window(ig, n, kernel, stride, causal)
}

/// [`window`] in group coordinates: query `ig` of a group of length `n`.
#[inline]
fn group_window(ig: usize, n: usize, k: usize, s: usize, causal: bool) -> (usize, usize) {
    if causal {
        let leader = ((ig / s) * s + s - 1).min(n - 1);
        let start = (leader + 1).saturating_sub(k);
        (start, (ig + 1).min(n))
    } else {
        let leader = ((ig / s) * s + s / 2).min(n - 1);
        let start = leader.saturating_sub(k / 2).min(n - k);
        (start, start + k)
    }
}

/// Internal 3-D geometry: the user's dimensions are the last `rank` ones, leading
/// dimensions are padding of length 1 with a kernel of 1.
#[derive(Debug, Clone, Copy)]
struct Geo {
    len: [usize; 3],
    k: [usize; 3],
    s: [usize; 3],
    d: [usize; 3],
    c: [bool; 3],
    /// Number of spatial positions.
    n: usize,
}

impl Geo {
    fn group_len(&self, dim: usize, g: usize) -> usize {
        (self.len[dim] - g).div_ceil(self.d[dim])
    }
    /// Flattened position of group coordinates `x` in group `g`.
    #[inline]
    fn pos(&self, g: [usize; 3], x: [usize; 3]) -> usize {
        let p = |i: usize| x[i] * self.d[i] + g[i];
        (p(0) * self.len[1] + p(1)) * self.len[2] + p(2)
    }
}

fn validate(dims: &NaDims, p: &NaParams) -> Result<Geo, KernelError> {
    let arg = |m: String| Err(KernelError::Argument(m));
    if !(1..=3).contains(&dims.rank) {
        return arg(format!("rank must be 1, 2 or 3, got {}", dims.rank));
    }
    if dims.q_heads > 0 && (dims.kv_heads == 0 || !dims.q_heads.is_multiple_of(dims.kv_heads)) {
        return arg(format!(
            "q_heads ({}) must be a multiple of kv_heads ({})",
            dims.q_heads, dims.kv_heads
        ));
    }
    // As the Python layer: a zero-width head has no attention to compute (and the packing
    // and lane kernels assume at least one column).
    if dims.head_dim == 0 || dims.v_head_dim == 0 {
        return arg(format!(
            "head_dim ({}) and v_head_dim ({}) must be positive",
            dims.head_dim, dims.v_head_dim
        ));
    }
    if !p.scale.is_finite() {
        return arg(format!("scale must be finite, got {}", p.scale));
    }
    let r = dims.rank;
    let mut geo = Geo {
        len: [1; 3],
        k: [1; 3],
        s: [1; 3],
        d: [1; 3],
        c: [false; 3],
        n: 1,
    };
    for i in 0..r {
        let (l, k, s, d) = (
            dims.spatial[i],
            p.kernel_size[i],
            p.stride[i],
            p.dilation[i],
        );
        if k < 2 {
            return arg(format!("kernel_size[{i}] must be >= 2, got {k}"));
        }
        if s < 1 || s > k {
            return arg(format!(
                "stride[{i}] must be in 1..=kernel_size ({k}), got {s}"
            ));
        }
        if d < 1 {
            return arg(format!("dilation[{i}] must be >= 1, got {d}"));
        }
        if k.checked_mul(d).is_none_or(|kd| kd > l) {
            return arg(format!(
                "kernel_size[{i}] * dilation[{i}] ({k} * {d}) exceeds the input size {l}"
            ));
        }
        let j = 3 - r + i;
        geo.len[j] = l;
        geo.k[j] = k;
        geo.s[j] = s;
        geo.d[j] = d;
        geo.c[j] = p.is_causal[i];
    }
    geo.n = mul("spatial", &geo.len)?;
    Ok(geo)
}

fn mul(name: &'static str, xs: &[usize]) -> Result<usize, KernelError> {
    xs.iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or_else(|| KernelError::Argument(format!("`{name}` size overflows usize")))
}

struct Lens {
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    lse: usize,
    ak: usize,
    av: usize,
}

fn lens(d: &NaDims, n: usize) -> Result<Lens, KernelError> {
    Ok(Lens {
        q: mul("q", &[d.batch, n, d.q_heads, d.head_dim])?,
        k: mul("k", &[d.batch, n, d.kv_heads, d.head_dim])?,
        v: mul("v", &[d.batch, n, d.kv_heads, d.v_head_dim])?,
        o: mul("out", &[d.batch, n, d.q_heads, d.v_head_dim])?,
        lse: mul("lse", &[d.batch, n, d.q_heads])?,
        ak: mul(
            "additional_k",
            &[d.batch, d.n_additional, d.kv_heads, d.head_dim],
        )?,
        av: mul(
            "additional_v",
            &[d.batch, d.n_additional, d.kv_heads, d.v_head_dim],
        )?,
    })
}

/// One task's block of queries (group coordinates `origin .. origin + t`) and the box of
/// keys their windows cover, with the per-panel query ranges.
struct Tile {
    /// Queries in the tile, row-major over `t`.
    nq: usize,
    t: [usize; 3],
    /// Flattened spatial position of each query.
    qpos: Vec<usize>,
    /// Per dimension and per tile offset, the window relative to the box start.
    wlo: [Vec<usize>; 3],
    whi: [Vec<usize>; 3],
    /// Box extent per dimension.
    u: [usize; 3],
    /// Keys in the box (row-major over `u`) and their flattened positions.
    nk: usize,
    kpos: Vec<usize>,
    /// Per key panel, the queries `[qa, qb)` that need one of its keys (`qa == qb`: none).
    range: Vec<(usize, usize)>,
    /// Per query, the first and last panel whose range holds it (`first > last`: none).
    span: Vec<(usize, usize)>,
    /// Per query, `nw` words of window bits over the box keys.
    bits: Vec<u64>,
    nw: usize,
}

impl Tile {
    fn new() -> Self {
        Tile {
            nq: 0,
            t: [0; 3],
            qpos: Vec::new(),
            wlo: Default::default(),
            whi: Default::default(),
            u: [0; 3],
            nk: 0,
            kpos: Vec::new(),
            range: Vec::new(),
            span: Vec::new(),
            bits: Vec::new(),
            nw: 0,
        }
    }

    /// Builds the tile at group coordinates `origin` (extent `t`, clipped to the group).
    fn build(&mut self, geo: &Geo, g: [usize; 3], origin: [usize; 3], t: [usize; 3]) {
        let mut n = [0; 3];
        let mut lo = [0; 3];
        for dim in 0..3 {
            n[dim] = geo.group_len(dim, g[dim]);
            let t_d = t[dim].min(n[dim] - origin[dim]);
            self.t[dim] = t_d;
            self.wlo[dim].clear();
            self.whi[dim].clear();
            let (mut blo, mut bhi) = (usize::MAX, 0);
            for a in 0..t_d {
                let (s, e) =
                    group_window(origin[dim] + a, n[dim], geo.k[dim], geo.s[dim], geo.c[dim]);
                blo = blo.min(s);
                bhi = bhi.max(e);
                self.wlo[dim].push(s);
                self.whi[dim].push(e);
            }
            lo[dim] = blo;
            self.u[dim] = bhi - blo;
            for x in self.wlo[dim].iter_mut() {
                *x -= blo;
            }
            for x in self.whi[dim].iter_mut() {
                *x -= blo;
            }
        }
        let t = self.t;
        self.nq = t[0] * t[1] * t[2];
        self.qpos.clear();
        for a0 in 0..t[0] {
            for a1 in 0..t[1] {
                for a2 in 0..t[2] {
                    self.qpos
                        .push(geo.pos(g, [origin[0] + a0, origin[1] + a1, origin[2] + a2]));
                }
            }
        }
        let u = self.u;
        self.nk = u[0] * u[1] * u[2];
        self.kpos.clear();
        for b0 in 0..u[0] {
            for b1 in 0..u[1] {
                for b2 in 0..u[2] {
                    self.kpos
                        .push(geo.pos(g, [lo[0] + b0, lo[1] + b1, lo[2] + b2]));
                }
            }
        }
        // Window membership as one bit per (query, box key), then which queries need each
        // panel: a panel's 32 keys are one half-word of a query's bits.
        let nw = self.nk.div_ceil(64);
        self.nw = nw;
        self.bits.clear();
        self.bits.resize(self.nq * nw, 0);
        for qi in 0..self.nq {
            let a = [qi / (t[1] * t[2]), (qi / t[2]) % t[1], qi % t[2]];
            let row = &mut self.bits[qi * nw..(qi + 1) * nw];
            let (w2lo, w2hi) = (self.wlo[2][a[2]], self.whi[2][a[2]]);
            for b0 in self.wlo[0][a[0]]..self.whi[0][a[0]] {
                for b1 in self.wlo[1][a[1]]..self.whi[1][a[1]] {
                    let base = (b0 * u[1] + b1) * u[2];
                    set_bits(row, base + w2lo, base + w2hi);
                }
            }
        }
        let np = self.nk.div_ceil(NR);
        self.range.clear();
        self.range.resize(np, (usize::MAX, 0));
        self.span.clear();
        self.span.resize(self.nq, (usize::MAX, 0));
        for qi in 0..self.nq {
            let row = &self.bits[qi * nw..(qi + 1) * nw];
            for (p, r) in self.range.iter_mut().enumerate() {
                if (row[p / 2] >> (32 * (p % 2))) as u32 != 0 {
                    r.0 = r.0.min(qi);
                    r.1 = qi + 1;
                }
            }
        }
        for (p, r) in self.range.iter_mut().enumerate() {
            if r.0 >= r.1 {
                *r = (0, 0);
                continue;
            }
            for sp in &mut self.span[r.0..r.1] {
                sp.0 = sp.0.min(p);
                sp.1 = sp.1.max(p);
            }
        }
    }

    /// Window bits of query `qi` (bit `j`: box key `j` is in its window).
    #[inline]
    fn bits(&self, qi: usize) -> &[u64] {
        &self.bits[qi * self.nw..(qi + 1) * self.nw]
    }
}

/// Sets bits `[a, b)` of a little-endian bitset.
fn set_bits(words: &mut [u64], a: usize, b: usize) {
    let mut i = a;
    while i < b {
        let (w, sh) = (i / 64, i % 64);
        let n = (64 - sh).min(b - i);
        let m = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << sh
        };
        words[w] |= m;
        i += n;
    }
}

/// Query-tile extent (in group coordinates) for a call.
fn tile_extent(geo: &Geo) -> [usize; 3] {
    // Longest group per dimension.
    let n = |i: usize| geo.group_len(i, 0);
    let (n0, n1, n2) = (n(0), n(1), n(2));
    // Queries per tile: 1-D runs are long (the per-panel query ranges keep the waste at the
    // window edges small); 2-D / 3-D blocks stay small so their key box stays close to the
    // windows.
    const TQ_1D: usize = 128;
    const TQ: usize = 64;
    // 2-D: 16 × 8 blocks (measured best of 4×8, 8×8, 8×16, 16×16 on k = 7 and 13).
    const TQ_2D: usize = 128;
    if n0 > 1 {
        // 3-D: 8 × 2 × 4 (then as many rows of the middle dimension as make 64 queries)
        // measured 5–15% faster forward + backward than 4 × 4 × 4 on 8×16×16, 16³ and
        // 12×24×24 (dilation 2) at k = 3 and 8×32×32 at k = 5, equal at 16³ k = 7;
        // 8 × 2 × 2 was faster still at k = 3 but 12% slower at k = 7.
        let (t0, t2) = (n0.min(8), n2.min(4));
        return [t0, n1.min((TQ / (t0 * t2)).max(1)), t2];
    }
    let t2 = if n1 == 1 { n2.min(TQ_1D) } else { n2.min(8) };
    let t1 = n1.min((TQ_2D / t2).max(1));
    [1, t1.max(1), t2.max(1)]
}

/// Every (dilation group, tile origin) of a call.
fn tiles(geo: &Geo, t: [usize; 3]) -> Vec<([usize; 3], [usize; 3])> {
    let mut out = Vec::new();
    for g0 in 0..geo.d[0] {
        for g1 in 0..geo.d[1] {
            for g2 in 0..geo.d[2] {
                let g = [g0, g1, g2];
                let n = [
                    geo.group_len(0, g0),
                    geo.group_len(1, g1),
                    geo.group_len(2, g2),
                ];
                for o0 in (0..n[0]).step_by(t[0]) {
                    for o1 in (0..n[1]).step_by(t[1]) {
                        for o2 in (0..n[2]).step_by(t[2]) {
                            out.push((g, [o0, o1, o2]));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Per dimension, the number of colours `c` such that two tiles of one group whose tile
/// indices agree modulo `c` have disjoint key boxes (the backward's phases).
fn colours(geo: &Geo, t: [usize; 3]) -> [usize; 3] {
    let mut col = [1; 3];
    for (dim, c) in col.iter_mut().enumerate() {
        let (k, s, causal) = (geo.k[dim], geo.s[dim], geo.c[dim]);
        for g in 0..geo.d[dim] {
            let n = geo.group_len(dim, g);
            let boxes: Vec<(usize, usize)> = (0..n)
                .step_by(t[dim])
                .map(|o| {
                    (o..(o + t[dim]).min(n))
                        .map(|i| group_window(i, n, k, s, causal))
                        .fold((usize::MAX, 0), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)))
                })
                .collect();
            while *c < boxes.len()
                && boxes
                    .iter()
                    .zip(&boxes[*c..])
                    .any(|(x, y)| x.1 > y.0 && y.1 > x.0)
            {
                *c += 1;
            }
        }
    }
    col
}

/// A raw pointer tasks write disjoint elements through.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every user writes only the elements of its own task (see the call sites).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    #[inline(always)]
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Forward: writes `out` and the natural-log `lse`. Every query sees at least one key, so
/// rows are never empty.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Element>(
    dims: &NaDims,
    params: &NaParams,
    q: &[E],
    k: &[E],
    v: &[E],
    additional_k: &[E],
    additional_v: &[E],
    out: &mut [E],
    lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    let geo = validate(dims, params)?;
    let n = lens(dims, geo.n)?;
    check_len("q", q, n.q)?;
    check_len("k", k, n.k)?;
    check_len("v", v, n.v)?;
    check_len("additional_k", additional_k, n.ak)?;
    check_len("additional_v", additional_v, n.av)?;
    check_len("out", out, n.o)?;
    check_len("lse", lse, n.lse)?;
    if n.lse == 0 {
        return Ok(());
    }
    // A fresh output (every call from Python) faults in 4 KiB at a time otherwise.
    crate::pages::prefer_huge(out);
    forward::run(
        crate::simd::active(),
        dims,
        &geo,
        params.scale,
        q,
        k,
        v,
        additional_k,
        additional_v,
        out,
        lse,
    );
    Ok(())
}

/// Backward from the saved `out` and `lse`: writes (overwrites) dq, dk, dv and the gradients
/// of the additional keys / values.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element>(
    dims: &NaDims,
    params: &NaParams,
    q: &[E],
    k: &[E],
    v: &[E],
    additional_k: &[E],
    additional_v: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dq: &mut [E],
    dk: &mut [E],
    dv: &mut [E],
    d_additional_k: &mut [E],
    d_additional_v: &mut [E],
) -> Result<(), KernelError> {
    let geo = validate(dims, params)?;
    let n = lens(dims, geo.n)?;
    check_len("q", q, n.q)?;
    check_len("k", k, n.k)?;
    check_len("v", v, n.v)?;
    check_len("additional_k", additional_k, n.ak)?;
    check_len("additional_v", additional_v, n.av)?;
    check_len("out", out, n.o)?;
    check_len("dout", dout, n.o)?;
    check_len("lse", lse, n.lse)?;
    check_len("dq", dq, n.q)?;
    check_len("dk", dk, n.k)?;
    check_len("dv", dv, n.v)?;
    check_len("d_additional_k", d_additional_k, n.ak)?;
    check_len("d_additional_v", d_additional_v, n.av)?;
    let zero = E::from_acc(<E::Acc as crate::element::Acc>::ZERO);
    if n.lse == 0 {
        for b in [dq, dk, dv, d_additional_k, d_additional_v] {
            b.fill(zero);
        }
        return Ok(());
    }
    for g in [&mut *dq, &mut *dk, &mut *dv] {
        crate::pages::prefer_huge(g);
    }
    backward::run(
        crate::simd::active(),
        dims,
        &geo,
        params.scale,
        q,
        k,
        v,
        additional_k,
        additional_v,
        out,
        dout,
        lse,
        dq,
        dk,
        dv,
        d_additional_k,
        d_additional_v,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(i: usize, l: usize, k: usize, s: usize, d: usize, c: bool) -> Vec<usize> {
        let (a, b) = window(i, l, k, s, d, c);
        (a..b).map(|j| j * d + i % d).collect()
    }

    fn geo(len: [usize; 3], k: [usize; 3], s: [usize; 3], d: [usize; 3], c: [bool; 3]) -> Geo {
        Geo {
            len,
            k,
            s,
            d,
            c,
            n: len.iter().product(),
        }
    }

    /// Same-coloured tiles never share a key (the backward adds dK / dV of their boxes
    /// concurrently), and the window bits match the window.
    #[test]
    fn colours_separate_boxes_and_bits_match_windows() {
        let geos = [
            geo([1, 56, 56], [1, 7, 7], [1, 1, 1], [1, 1, 1], [false; 3]),
            geo(
                [1, 40, 37],
                [1, 7, 5],
                [1, 1, 3],
                [1, 2, 3],
                [false, false, true],
            ),
            geo([1, 1, 450], [1, 1, 63], [1, 1, 1], [1, 1, 2], [false; 3]),
            geo(
                [1, 1, 421],
                [1, 1, 40],
                [1, 1, 3],
                [1, 1, 1],
                [false, false, true],
            ),
            geo(
                [9, 10, 11],
                [3, 3, 3],
                [1, 2, 1],
                [1, 1, 2],
                [true, false, false],
            ),
            geo([12, 8, 20], [5, 2, 13], [5, 1, 4], [2, 3, 1], [false; 3]),
        ];
        for g in &geos {
            let t = tile_extent(g);
            let col = colours(g, t);
            let tl = tiles(g, t);
            let mut owner = vec![usize::MAX; g.n];
            let colour = |o: [usize; 3]| [0, 1, 2].map(|j| (o[j] / t[j]) % col[j]);
            let mut tile = Tile::new();
            for c in 0..col[0] * col[1] * col[2] {
                owner.fill(usize::MAX);
                for (i, &(gg, o)) in tl.iter().enumerate() {
                    let cc = colour(o);
                    if (cc[0] * col[1] + cc[1]) * col[2] + cc[2] != c {
                        continue;
                    }
                    tile.build(g, gg, o, t);
                    for &p in &tile.kpos {
                        assert!(owner[p] == usize::MAX || owner[p] == i, "{g:?} {t:?}");
                        owner[p] = i;
                    }
                    // Bits: key j of the box is set iff it is in query qi's window.
                    for qi in 0..tile.nq {
                        let x = coords(tile.qpos[qi], g.len);
                        for (j, &p) in tile.kpos.iter().enumerate() {
                            let y = coords(p, g.len);
                            let inside = (0..3).all(|dd| {
                                let (a, b) =
                                    window(x[dd], g.len[dd], g.k[dd], g.s[dd], g.d[dd], g.c[dd]);
                                y[dd] % g.d[dd] == x[dd] % g.d[dd]
                                    && (a..b).contains(&(y[dd] / g.d[dd]))
                            });
                            let b = tile.bits(qi)[j / 64] >> (j % 64) & 1 == 1;
                            assert_eq!(b, inside, "{g:?} q {qi} key {j}");
                            // A set bit's panel lists the query.
                            let (qa, qb) = tile.range[j / NR];
                            assert!(!b || (qa..qb).contains(&qi));
                        }
                    }
                }
            }
        }
    }

    fn coords(p: usize, len: [usize; 3]) -> [usize; 3] {
        [p / (len[1] * len[2]), (p / len[2]) % len[1], p % len[2]]
    }

    #[test]
    fn spec_worked_examples() {
        assert_eq!(keys(0, 10, 3, 1, 1, false), vec![0, 1, 2]);
        assert_eq!(keys(9, 10, 3, 1, 1, false), vec![7, 8, 9]);
        assert_eq!(keys(4, 10, 4, 2, 1, true), vec![2, 3, 4]);
        assert_eq!(keys(5, 10, 4, 2, 1, true), vec![2, 3, 4, 5]);
        for i in 0..5 {
            assert_eq!(keys(i, 10, 5, 5, 1, false), vec![0, 1, 2, 3, 4]);
        }
        for i in 5..10 {
            assert_eq!(keys(i, 10, 5, 5, 1, false), vec![5, 6, 7, 8, 9]);
        }
        // Dilation 2 on 10: groups of 5; query 3 is index 1 of group 1.
        assert_eq!(keys(3, 10, 3, 1, 2, false), vec![1, 3, 5]);
        assert_eq!(keys(9, 10, 3, 1, 2, false), vec![5, 7, 9]);
        // Odd split: L = 7, d = 2 → groups of 4 and 3.
        assert_eq!(keys(5, 7, 3, 1, 2, false), vec![1, 3, 5]);
        // Even kernel, non-causal: left = k/2 keys before the query.
        assert_eq!(keys(5, 10, 4, 1, 1, false), vec![3, 4, 5, 6]);
        // Causal stride 1: the k−1 previous keys and the query.
        assert_eq!(keys(1, 10, 3, 1, 1, true), vec![0, 1]);
        assert_eq!(keys(6, 10, 3, 1, 1, true), vec![4, 5, 6]);
    }
}
