//! Forward + backward at every SIMD level against a naive f64 reference, on shapes with many
//! tiles per dimension (several backward colour phases, partial edge tiles), odd head dims
//! (packing tails), GQA, `Dv ≠ D` and additional keys. The level goes straight to the
//! passes, so these tests never change the process-wide level other tests read.

use super::{backward, forward, validate, window, NaDims, NaParams};
use crate::simd;

struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }
}

struct Case {
    sp: Vec<usize>,
    dims: NaDims,
    p: NaParams,
}

#[allow(clippy::too_many_arguments)]
fn case(
    sp: &[usize],
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    na: usize,
    k: &[usize],
    s: &[usize],
    dil: &[usize],
    c: &[bool],
) -> Case {
    Case {
        sp: sp.to_vec(),
        dims: NaDims::new(2, sp, hq, hkv, d, dv, na),
        p: NaParams::new(k, s, dil, c, 1.0 / (d as f64).sqrt()),
    }
}

/// Every output of forward + backward, in f64.
type Outs = [Vec<f64>; 7];

/// Naive reference: per query, its keys listed from the windows.
fn reference(c: &Case, x: &[Vec<f64>; 6]) -> Outs {
    let (dm, r) = (&c.dims, c.sp.len());
    let n: usize = c.sp.iter().product();
    let (b, hq, hkv, d, dv, na) = (
        dm.batch,
        dm.q_heads,
        dm.kv_heads,
        dm.head_dim,
        dm.v_head_dim,
        dm.n_additional,
    );
    let [q, k, v, ak, av, dout] = x;
    let mut o: Outs = [
        vec![0.0; b * n * hq * dv],
        vec![0.0; b * n * hq],
        vec![0.0; q.len()],
        vec![0.0; k.len()],
        vec![0.0; v.len()],
        vec![0.0; ak.len()],
        vec![0.0; av.len()],
    ];
    let coords = |mut p: usize| {
        let mut xs = vec![0; r];
        for i in (0..r).rev() {
            xs[i] = p % c.sp[i];
            p /= c.sp[i];
        }
        xs
    };
    for i in 0..n {
        let xi = coords(i);
        let keys: Vec<usize> = (0..n)
            .filter(|&j| {
                let xj = coords(j);
                (0..r).all(|dd| {
                    let (lo, hi) = window(
                        xi[dd],
                        c.sp[dd],
                        c.p.kernel_size[dd],
                        c.p.stride[dd],
                        c.p.dilation[dd],
                        c.p.is_causal[dd],
                    );
                    let g = c.p.dilation[dd];
                    xj[dd] % g == xi[dd] % g && (lo..hi).contains(&(xj[dd] / g))
                })
            })
            .collect();
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / (hq / hkv);
                let row = (bi * n + i) * hq + h;
                // (additional?, k row)
                let all: Vec<(bool, usize)> = keys
                    .iter()
                    .map(|&j| (false, (bi * n + j) * hkv + kh))
                    .chain((0..na).map(|j| (true, (bi * na + j) * hkv + kh)))
                    .collect();
                let kr = |a: bool, kr: usize| {
                    if a {
                        &ak[kr * d..][..d]
                    } else {
                        &k[kr * d..][..d]
                    }
                };
                let vr = |a: bool, kr: usize| {
                    if a {
                        &av[kr * dv..][..dv]
                    } else {
                        &v[kr * dv..][..dv]
                    }
                };
                let qi = &q[row * d..][..d];
                let sc = c.p.scale;
                let s: Vec<f64> = all
                    .iter()
                    .map(|&(a, j)| sc * qi.iter().zip(kr(a, j)).map(|(x, y)| x * y).sum::<f64>())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + s.iter().map(|y| (y - m).exp()).sum::<f64>().ln();
                o[1][row] = lse;
                let p: Vec<f64> = s.iter().map(|y| (y - lse).exp()).collect();
                for (t, &(a, j)) in all.iter().enumerate() {
                    for cc in 0..dv {
                        o[0][row * dv + cc] += p[t] * vr(a, j)[cc];
                    }
                }
                let doi = &dout[row * dv..][..dv];
                let delta: f64 = doi
                    .iter()
                    .zip(&o[0][row * dv..][..dv])
                    .map(|(x, y)| x * y)
                    .sum();
                for (t, &(a, j)) in all.iter().enumerate() {
                    let dp: f64 = doi.iter().zip(vr(a, j)).map(|(x, y)| x * y).sum();
                    let ds = p[t] * (dp - delta);
                    for cc in 0..d {
                        o[2][row * d + cc] += sc * ds * kr(a, j)[cc];
                        o[if a { 5 } else { 3 }][j * d + cc] += sc * ds * qi[cc];
                    }
                    for cc in 0..dv {
                        o[if a { 6 } else { 4 }][j * dv + cc] += p[t] * doi[cc];
                    }
                }
            }
        }
    }
    o
}

fn run_f32(level: simd::Level, c: &Case, x: &[Vec<f64>; 6]) -> Outs {
    let f = |v: &Vec<f64>| v.iter().map(|&y| y as f32).collect::<Vec<f32>>();
    let [q, k, v, ak, av, dout] = x.each_ref().map(f);
    let geo = validate(&c.dims, &c.p).unwrap();
    let (mut out, mut lse) = (
        vec![0f32; dout.len()],
        vec![0f32; dout.len() / c.dims.v_head_dim.max(1)],
    );
    lse.truncate(c.dims.batch * geo.n * c.dims.q_heads);
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    let (mut dak, mut dav) = (vec![0f32; ak.len()], vec![0f32; av.len()]);
    forward::run(
        level, &c.dims, &geo, c.p.scale, &q, &k, &v, &ak, &av, &mut out, &mut lse,
    );
    backward::run(
        level, &c.dims, &geo, c.p.scale, &q, &k, &v, &ak, &av, &out, &dout, &lse, &mut dq, &mut dk,
        &mut dv, &mut dak, &mut dav,
    );
    [out, lse, dq, dk, dv, dak, dav].map(|v| v.iter().map(|&y| y as f64).collect())
}

#[test]
fn many_tiles_match_reference_every_level() {
    let cases = [
        case(
            &[40, 37],
            2,
            1,
            33,
            20,
            0,
            &[7, 7],
            &[1, 1],
            &[1, 2],
            &[false, false],
        ),
        case(
            &[34, 30],
            2,
            2,
            16,
            16,
            3,
            &[5, 7],
            &[2, 1],
            &[2, 1],
            &[true, false],
        ),
        case(
            &[9, 10, 11],
            2,
            1,
            8,
            17,
            0,
            &[3, 3, 3],
            &[1, 1, 2],
            &[1, 2, 1],
            &[false, true, false],
        ),
        case(&[450], 2, 1, 32, 32, 2, &[9], &[1], &[2], &[false]),
    ];
    for (ci, c) in cases.iter().enumerate() {
        check_every_level(ci, c, 0x9E37_79B9_7F4A_7C15 + ci as u64);
    }
}

/// Forward + backward of `c` on seeded inputs at every level against the reference.
fn check_every_level(ci: usize, c: &Case, seed: u64) {
    let dm = &c.dims;
    let n: usize = c.sp.iter().product();
    let mut rng = Rng(seed);
    let x = [
        rng.vec(dm.batch * n * dm.q_heads * dm.head_dim),
        rng.vec(dm.batch * n * dm.kv_heads * dm.head_dim),
        rng.vec(dm.batch * n * dm.kv_heads * dm.v_head_dim),
        rng.vec(dm.batch * dm.n_additional * dm.kv_heads * dm.head_dim),
        rng.vec(dm.batch * dm.n_additional * dm.kv_heads * dm.v_head_dim),
        rng.vec(dm.batch * n * dm.q_heads * dm.v_head_dim),
    ];
    let want = reference(c, &x);
    for level in simd::available() {
        let got = run_f32(level, c, &x);
        for (name, (g, w)) in ["out", "lse", "dq", "dk", "dv", "dak", "dav"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert_eq!(g.len(), w.len());
            let e = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(e <= 1e-4, "case {ci} {level:?} {name}: {e}");
        }
    }
}

/// Shapes the lanes path (`super::lanes`) takes at AVX-512: line lengths that are not
/// multiples of 16, line edges (permuted loads), causal lines, even kernels, a kernel as
/// long as its dimension, dilation, stride on the outer dimension, odd head dims.
#[test]
fn lanes_path_matches_reference() {
    let cases = [
        case(
            &[20, 33],
            2,
            1,
            32,
            32,
            0,
            &[7, 7],
            &[1, 1],
            &[1, 1],
            &[false, false],
        ),
        case(
            &[12, 40],
            2,
            2,
            16,
            24,
            0,
            &[4, 6],
            &[1, 1],
            &[1, 2],
            &[true, true],
        ),
        case(
            &[6, 29],
            1,
            1,
            8,
            5,
            0,
            &[2, 5],
            &[2, 1],
            &[2, 1],
            &[true, true],
        ),
        case(
            &[3, 100],
            3,
            1,
            17,
            9,
            0,
            &[2, 13],
            &[1, 1],
            &[1, 1],
            &[false, true],
        ),
        case(
            &[2, 64],
            1,
            1,
            40,
            40,
            0,
            &[2, 16],
            &[1, 1],
            &[1, 1],
            &[false, false],
        ),
        case(
            &[16, 18],
            2,
            1,
            16,
            16,
            0,
            &[16, 8],
            &[4, 1],
            &[1, 1],
            &[false, false],
        ),
        case(
            &[24, 30],
            2,
            1,
            24,
            20,
            0,
            &[13, 15],
            &[1, 1],
            &[1, 1],
            &[true, false],
        ),
        case(
            &[18, 26],
            2,
            2,
            16,
            8,
            0,
            &[8, 8],
            &[1, 1],
            &[1, 1],
            &[false, true],
        ),
    ];
    for (ci, c) in cases.iter().enumerate() {
        // The lanes module exists on x86-64 only; elsewhere every call is tiled.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            super::lanes::applies::<f32>(
                simd::Level::Avx512,
                &c.dims,
                &validate(&c.dims, &c.p).unwrap()
            ),
            simd::available().contains(&simd::Level::Avx512),
            "case {ci}"
        );
        // Its backward too, up to 8 × 8 windows (every case has a (batch, kv head) task per
        // test thread).
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            super::lanes_bwd::applies::<f32>(
                simd::Level::Avx512,
                &c.dims,
                &validate(&c.dims, &c.p).unwrap()
            ),
            simd::available().contains(&simd::Level::Avx512)
                && c.p.kernel_size.iter().product::<usize>() <= 64,
            "case {ci}"
        );
        check_every_level(ci, c, 0x5851_F42D_4C95_7F2D + ci as u64);
    }
}

/// 1-D calls (windows up to 1024 keys) take the band forward and backward at AVX-512;
/// every case checks both against the reference at every level.
#[test]
fn band_path_matches_reference() {
    let cases = [
        // Several 128-query blocks, the last partial; D, Dv not multiples of 16, Dv > 64.
        case(&[300], 2, 2, 33, 70, 0, &[63], &[1], &[1], &[false]),
        // Even window, GQA, stride.
        case(&[203], 4, 2, 16, 24, 0, &[20], &[3], &[1], &[false]),
        // Dilation 3 (groups of 67 and 66 queries), causal.
        case(&[200], 2, 1, 20, 8, 0, &[17], &[1], &[3], &[true]),
        // Causal with stride, window reaching a block edge.
        case(&[261], 1, 1, 64, 64, 0, &[33], &[4], &[1], &[true]),
        // Window equal to the input.
        case(&[40], 2, 1, 8, 16, 0, &[40], &[1], &[1], &[false]),
        // Small window; the largest window taken here.
        case(&[150], 1, 1, 16, 16, 0, &[3], &[1], &[1], &[false]),
        case(&[1100], 1, 1, 4, 4, 0, &[1024], &[1], &[1], &[true]),
    ];
    for (ci, c) in cases.iter().enumerate() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            super::band::applies::<f32>(
                simd::Level::Avx512,
                &c.dims,
                &validate(&c.dims, &c.p).unwrap()
            ),
            simd::available().contains(&simd::Level::Avx512),
            "case {ci}"
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            super::band_bwd::applies::<f32>(
                simd::Level::Avx512,
                &c.dims,
                &validate(&c.dims, &c.p).unwrap()
            ),
            simd::available().contains(&simd::Level::Avx512),
            "case {ci}"
        );
        check_every_level(ci, c, 0x2545_F491_4F6C_DD1D + ci as u64);
    }
}

/// 3-D calls with small windows take the cube forward and (with a task per thread) backward
/// at AVX-512: lines that are not multiples of 16, line edges (permuted loads and their
/// adjoint), causal and even kernels, a kernel as long as its dimension, stride, dilation,
/// GQA, `Dv ≠ D`.
#[test]
fn cube_path_matches_reference() {
    let cases = [
        case(
            &[5, 7, 28],
            2,
            1,
            16,
            24,
            0,
            &[3, 3, 3],
            &[1, 1, 1],
            &[1, 1, 1],
            &[false, false, false],
        ),
        case(
            &[6, 9, 37],
            2,
            2,
            8,
            8,
            0,
            &[2, 3, 5],
            &[2, 1, 1],
            &[1, 2, 1],
            &[true, false, true],
        ),
        case(
            &[4, 5, 16],
            2,
            2,
            17,
            9,
            0,
            &[4, 4, 4],
            &[1, 1, 1],
            &[1, 1, 1],
            &[false, false, false],
        ),
        case(
            &[7, 6, 26],
            2,
            2,
            12,
            12,
            0,
            &[3, 2, 3],
            &[3, 1, 1],
            &[2, 1, 2],
            &[false, true, false],
        ),
        case(
            &[3, 4, 12],
            2,
            2,
            16,
            16,
            0,
            &[2, 2, 12],
            &[1, 2, 1],
            &[1, 1, 1],
            &[false, false, true],
        ),
    ];
    for (ci, c) in cases.iter().enumerate() {
        #[cfg(target_arch = "x86_64")]
        {
            let geo = validate(&c.dims, &c.p).unwrap();
            let avx512 = simd::available().contains(&simd::Level::Avx512);
            let lvl = simd::Level::Avx512;
            assert_eq!(
                super::cube::applies::<f32>(lvl, &c.dims, &geo),
                avx512,
                "case {ci}"
            );
            let tasks = c.dims.batch * geo.d.iter().product::<usize>() * c.dims.kv_heads;
            assert_eq!(
                super::cube_bwd::applies::<f32>(lvl, &c.dims, &geo),
                avx512 && tasks >= rayon::current_num_threads(),
                "case {ci}"
            );
        }
        check_every_level(ci, c, 0x94D0_49BB_1331_11EB + ci as u64);
    }
}

/// 3-D planes too large for a task's ring of transposed lines stay tiled (the forward's
/// extra memory must not grow with the plane).
#[cfg(target_arch = "x86_64")]
#[test]
fn cube_path_declines_large_planes() {
    let small = case(
        &[4, 16, 16],
        4,
        4,
        64,
        64,
        0,
        &[3, 3, 3],
        &[1; 3],
        &[1; 3],
        &[false; 3],
    );
    let large = case(
        &[4, 512, 512],
        4,
        4,
        64,
        64,
        0,
        &[3, 3, 3],
        &[1; 3],
        &[1; 3],
        &[false; 3],
    );
    let lvl = simd::Level::Avx512;
    let applies =
        |c: &Case| super::cube::applies::<f32>(lvl, &c.dims, &validate(&c.dims, &c.p).unwrap());
    assert_eq!(applies(&small), simd::available().contains(&lvl));
    assert!(!applies(&large));
}
