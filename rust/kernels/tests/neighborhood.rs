//! Neighborhood attention against a float64 reference that materialises the mask (the docs/neighborhood.md
//! window restated independently here), at every SIMD level this CPU offers.

#![allow(clippy::needless_range_loop)]

#[global_allocator]
static ALLOC: fastattn_kernels::alloc::CacheLineAligned = fastattn_kernels::alloc::CacheLineAligned;

use fastattn_kernels::neighborhood::{backward, forward, window, NaDims, NaParams};
use fastattn_kernels::simd::{self, Level};
use fastattn_kernels::{Element, KernelError};
use std::sync::Mutex;

static LEVEL_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// docs/neighborhood.md's window, written out literally (real coordinates in, real key coordinates out).
fn ref_keys(i: usize, l: usize, k: usize, s: usize, d: usize, causal: bool) -> Vec<usize> {
    let (k, s, d, l) = (k as i64, s as i64, d as i64, l as i64);
    let i = i as i64;
    let g = i % d;
    let ip = i / d;
    let n = (l - g + d - 1) / d;
    let left = k / 2;
    let (start, end) = if causal {
        let leader = ((ip / s) * s + s - 1).min(n - 1);
        ((leader - (k - 1)).max(0), (ip + 1).min(n))
    } else {
        let leader = ((ip / s) * s + s / 2).min(n - 1);
        let start = (leader - left).max(0).min(n - k);
        (start, start + k)
    };
    (start..end).map(|j| (j * d + g) as usize).collect()
}

#[derive(Debug, Clone)]
struct Case {
    b: usize,
    sp: Vec<usize>,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    na: usize,
    k: Vec<usize>,
    s: Vec<usize>,
    dil: Vec<usize>,
    c: Vec<bool>,
}

impl Case {
    fn dims(&self) -> NaDims {
        NaDims::new(
            self.b, &self.sp, self.hq, self.hkv, self.d, self.dv, self.na,
        )
    }
    fn params(&self) -> NaParams {
        NaParams::new(
            &self.k,
            &self.s,
            &self.dil,
            &self.c,
            1.0 / (self.d as f64).sqrt(),
        )
    }
    fn n(&self) -> usize {
        self.sp.iter().product()
    }
}

#[allow(clippy::too_many_arguments)]
fn case(
    b: usize,
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
        b,
        sp: sp.to_vec(),
        hq,
        hkv,
        d,
        dv,
        na,
        k: k.to_vec(),
        s: s.to_vec(),
        dil: dil.to_vec(),
        c: c.to_vec(),
    }
}

fn cases() -> Vec<Case> {
    vec![
        // Longer than one 1-D tile (192), with a partial last tile.
        case(1, &[450], 2, 1, 8, 8, 0, &[9], &[1], &[1], &[false]),
        case(1, &[421], 1, 1, 8, 8, 0, &[40], &[3], &[2], &[true]),
        case(1, &[20], 2, 1, 16, 16, 0, &[5], &[1], &[1], &[false]),
        case(2, &[37], 2, 2, 8, 8, 0, &[4], &[2], &[1], &[true]),
        case(1, &[70], 2, 2, 8, 12, 3, &[7], &[3], &[3], &[false]),
        case(1, &[100], 1, 1, 16, 16, 0, &[33], &[1], &[1], &[false]),
        case(1, &[150], 2, 1, 8, 8, 0, &[6], &[1], &[1], &[true]),
        case(1, &[9], 1, 1, 8, 8, 2, &[9], &[1], &[1], &[true]),
        case(1, &[9], 1, 1, 8, 8, 0, &[9], &[4], &[1], &[false]),
        case(1, &[30], 1, 1, 8, 8, 40, &[5], &[5], &[2], &[false]),
        case(
            1,
            &[11, 13],
            4,
            2,
            20,
            7,
            2,
            &[3, 5],
            &[1, 2],
            &[2, 1],
            &[false, true],
        ),
        case(
            1,
            &[9, 9],
            1,
            1,
            8,
            8,
            0,
            &[9, 9],
            &[1, 1],
            &[1, 1],
            &[false, false],
        ),
        case(
            1,
            &[17, 10],
            2,
            1,
            8,
            8,
            0,
            &[4, 3],
            &[3, 1],
            &[2, 3],
            &[true, false],
        ),
        case(
            1,
            &[20, 20],
            1,
            1,
            33,
            40,
            0,
            &[13, 13],
            &[1, 1],
            &[1, 1],
            &[false, false],
        ),
        case(
            1,
            &[12, 21],
            1,
            1,
            8,
            8,
            0,
            &[5, 7],
            &[2, 7],
            &[1, 1],
            &[true, true],
        ),
        case(
            1,
            &[5, 6, 7],
            2,
            1,
            8,
            8,
            5,
            &[3, 2, 4],
            &[1, 2, 3],
            &[1, 2, 1],
            &[false, false, true],
        ),
        case(
            2,
            &[4, 4, 9],
            1,
            1,
            8,
            4,
            0,
            &[4, 2, 3],
            &[1, 1, 2],
            &[1, 2, 3],
            &[true, false, false],
        ),
        case(
            1,
            &[9, 8, 10],
            1,
            1,
            8,
            8,
            0,
            &[3, 3, 3],
            &[1, 1, 1],
            &[1, 1, 1],
            &[false; 3],
        ),
    ]
}

struct Grads {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dak: Vec<f64>,
    dav: Vec<f64>,
}

struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    ak: Vec<f64>,
    av: Vec<f64>,
    dout: Vec<f64>,
}

fn inputs(seed: u64, c: &Case) -> Inputs {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let n = c.n();
    Inputs {
        q: rng.vec(c.b * n * c.hq * c.d),
        k: rng.vec(c.b * n * c.hkv * c.d),
        v: rng.vec(c.b * n * c.hkv * c.dv),
        ak: rng.vec(c.b * c.na * c.hkv * c.d),
        av: rng.vec(c.b * c.na * c.hkv * c.dv),
        dout: rng.vec(c.b * n * c.hq * c.dv),
    }
}

/// Multi-index of flattened position `p`.
fn coords(p: usize, sp: &[usize]) -> Vec<usize> {
    let mut x = vec![0; sp.len()];
    let mut r = p;
    for i in (0..sp.len()).rev() {
        x[i] = r % sp[i];
        r /= sp[i];
    }
    x
}

fn reference(c: &Case, x: &Inputs) -> Grads {
    let n = c.n();
    let (b, hq, hkv, d, dv, na) = (c.b, c.hq, c.hkv, c.d, c.dv, c.na);
    let scale = 1.0 / (d as f64).sqrt();
    let g = hq / hkv;
    let mut r = Grads {
        out: vec![0.0; b * n * hq * dv],
        lse: vec![0.0; b * n * hq],
        dq: vec![0.0; x.q.len()],
        dk: vec![0.0; x.k.len()],
        dv: vec![0.0; x.v.len()],
        dak: vec![0.0; x.ak.len()],
        dav: vec![0.0; x.av.len()],
    };
    // Materialised mask.
    let allowed: Vec<Vec<bool>> = (0..n)
        .map(|i| {
            let xi = coords(i, &c.sp);
            let sets: Vec<Vec<usize>> = (0..c.sp.len())
                .map(|dd| ref_keys(xi[dd], c.sp[dd], c.k[dd], c.s[dd], c.dil[dd], c.c[dd]))
                .collect();
            (0..n)
                .map(|j| {
                    let xj = coords(j, &c.sp);
                    (0..c.sp.len()).all(|dd| sets[dd].contains(&xj[dd]))
                })
                .collect()
        })
        .collect();
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / g;
            for i in 0..n {
                let row = (bi * n + i) * hq + h;
                let qi = &x.q[row * d..][..d];
                // Keys: (is_additional, index, k offset, v offset).
                let mut keys: Vec<(bool, usize, usize, usize)> = Vec::new();
                for j in 0..n {
                    if allowed[i][j] {
                        let kr = (bi * n + j) * hkv + kh;
                        keys.push((false, j, kr * d, kr * dv));
                    }
                }
                for j in 0..na {
                    let kr = (bi * na + j) * hkv + kh;
                    keys.push((true, j, kr * d, kr * dv));
                }
                let kk = |a: bool| if a { &x.ak } else { &x.k };
                let vv = |a: bool| if a { &x.av } else { &x.v };
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&(a, _, ko, _)| {
                        scale
                            * qi.iter()
                                .zip(&kk(a)[ko..][..d])
                                .map(|(p, q)| p * q)
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|y| (y - m).exp()).sum();
                let lse = m + l.ln();
                r.lse[row] = lse;
                let p: Vec<f64> = s.iter().map(|y| (y - lse).exp()).collect();
                for (t, &(a, _, _, vo)) in keys.iter().enumerate() {
                    for cc in 0..dv {
                        r.out[row * dv + cc] += p[t] * vv(a)[vo + cc];
                    }
                }
                let doi = &x.dout[row * dv..][..dv];
                let delta: f64 = doi
                    .iter()
                    .zip(&r.out[row * dv..][..dv])
                    .map(|(p, q)| p * q)
                    .sum();
                for (t, &(a, _, ko, vo)) in keys.iter().enumerate() {
                    let dp: f64 = doi.iter().zip(&vv(a)[vo..][..dv]).map(|(p, q)| p * q).sum();
                    let ds = p[t] * (dp - delta);
                    for cc in 0..d {
                        r.dq[row * d + cc] += scale * ds * kk(a)[ko + cc];
                    }
                    let (dkk, dvv) = if a {
                        (&mut r.dak, &mut r.dav)
                    } else {
                        (&mut r.dk, &mut r.dv)
                    };
                    for cc in 0..d {
                        dkk[ko + cc] += scale * ds * qi[cc];
                    }
                    for cc in 0..dv {
                        dvv[vo + cc] += p[t] * doi[cc];
                    }
                }
            }
        }
    }
    r
}

struct Run<E: Element> {
    out: Vec<E>,
    lse: Vec<E::Acc>,
    dq: Vec<E>,
    dk: Vec<E>,
    dv: Vec<E>,
    dak: Vec<E>,
    dav: Vec<E>,
}

fn run<E: Element>(c: &Case, x: &Inputs, conv: impl Fn(f64) -> E) -> Run<E> {
    let f = |v: &[f64]| v.iter().map(|&y| conv(y)).collect::<Vec<E>>();
    let (q, k, v, ak, av, dout) = (f(&x.q), f(&x.k), f(&x.v), f(&x.ak), f(&x.av), f(&x.dout));
    let z = conv(0.0);
    let zacc = <E::Acc as fastattn_kernels::element::Acc>::ZERO;
    let mut r = Run {
        out: vec![z; dout.len()],
        lse: vec![zacc; c.b * c.n() * c.hq],
        dq: vec![z; q.len()],
        dk: vec![z; k.len()],
        dv: vec![z; v.len()],
        dak: vec![z; ak.len()],
        dav: vec![z; av.len()],
    };
    let (dims, params) = (c.dims(), c.params());
    forward(&dims, &params, &q, &k, &v, &ak, &av, &mut r.out, &mut r.lse).unwrap();
    backward(
        &dims, &params, &q, &k, &v, &ak, &av, &r.out, &dout, &r.lse, &mut r.dq, &mut r.dk,
        &mut r.dv, &mut r.dak, &mut r.dav,
    )
    .unwrap();
    r
}

fn max_err(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
    let mut e = 0.0f64;
    let mut n = 0;
    for (g, &w) in got.zip(want) {
        n += 1;
        let d = (g - w).abs();
        e = e.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    assert_eq!(n, want.len());
    e
}

fn sweep(check: impl Fn(Level, &Case, &Inputs, &Grads)) {
    let _g = lock();
    let cs = cases();
    let refs: Vec<(Inputs, Grads)> = cs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let x = inputs(i as u64, c);
            let r = reference(c, &x);
            (x, r)
        })
        .collect();
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        for (c, (x, r)) in cs.iter().zip(&refs) {
            check(level, c, x, r);
        }
    }
    simd::force(None).unwrap();
}

#[test]
fn f32_matches_reference() {
    sweep(|level, c, x, r| {
        let got = run::<f32>(c, x, |y| y as f32);
        let up = |v: &[f32]| v.iter().map(|&y| y as f64).collect::<Vec<_>>().into_iter();
        let ctx = format!("{level:?} {c:?}");
        for (name, g, w, tol) in [
            ("out", &got.out, &r.out, 1e-4),
            ("lse", &got.lse, &r.lse, 1e-4),
            ("dq", &got.dq, &r.dq, 1e-4),
            ("dk", &got.dk, &r.dk, 1e-4),
            ("dv", &got.dv, &r.dv, 1e-4),
            ("dak", &got.dak, &r.dak, 1e-4),
            ("dav", &got.dav, &r.dav, 1e-4),
        ] {
            let e = max_err(up(g), w);
            assert!(e <= tol, "{name} {ctx}: {e}");
        }
    });
}

#[test]
fn f64_matches_reference() {
    sweep(|level, c, x, r| {
        let got = run::<f64>(c, x, |y| y);
        let ctx = format!("{level:?} {c:?}");
        for (name, g, w) in [
            ("out", &got.out, &r.out),
            ("lse", &got.lse, &r.lse),
            ("dq", &got.dq, &r.dq),
            ("dk", &got.dk, &r.dk),
            ("dv", &got.dv, &r.dv),
            ("dak", &got.dak, &r.dak),
            ("dav", &got.dav, &r.dav),
        ] {
            let e = max_err(g.iter().cloned(), w);
            assert!(e <= 1e-10, "{name} {ctx}: {e}");
        }
    });
}

#[test]
fn bf16_forward_close() {
    use half::bf16;
    let _g = lock();
    let c = &cases()[10];
    let x = inputs(99, c);
    let r = reference(c, &x);
    let got = run::<bf16>(c, &x, bf16::from_f64);
    let e = max_err(got.out.iter().map(|y| y.to_f64()), &r.out);
    assert!(e <= 2e-2, "bf16 out {e}");
}

#[test]
fn window_matches_spec_reference() {
    for l in 2..14 {
        for k in 2..=l {
            for s in 1..=k {
                for d in 1..=(l / k) {
                    for c in [false, true] {
                        for i in 0..l {
                            let (a, b) = window(i, l, k, s, d, c);
                            let got: Vec<usize> = (a..b).map(|j| j * d + i % d).collect();
                            assert_eq!(got, ref_keys(i, l, k, s, d, c), "{i} {l} {k} {s} {d} {c}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let c = case(1, &[10], 1, 1, 4, 4, 0, &[3], &[1], &[1], &[false]);
    let x = inputs(1, &c);
    let f = |v: &[f64]| v.iter().map(|&y| y as f32).collect::<Vec<f32>>();
    let (q, k, v) = (f(&x.q), f(&x.k), f(&x.v));
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; 10];
    let try_p = |p: NaParams, dims: NaDims, q: &[f32], out: &mut [f32], lse: &mut [f32]| {
        forward(&dims, &p, q, &k, &v, &[], &[], out, lse)
    };
    let dims = c.dims();
    let bad = [
        NaParams::new(&[11], &[1], &[1], &[false], 0.5),
        NaParams::new(&[1], &[1], &[1], &[false], 0.5),
        NaParams::new(&[3], &[4], &[1], &[false], 0.5),
        NaParams::new(&[3], &[0], &[1], &[false], 0.5),
        NaParams::new(&[3], &[1], &[0], &[false], 0.5),
        NaParams::new(&[3], &[1], &[4], &[false], 0.5),
    ];
    for p in bad {
        assert!(matches!(
            try_p(p, dims, &q, &mut out, &mut lse),
            Err(KernelError::Argument(_))
        ));
    }
    let p = c.params();
    assert!(matches!(
        try_p(p, dims, &q[1..], &mut out, &mut lse),
        Err(KernelError::Length { name: "q", .. })
    ));
    assert!(matches!(
        try_p(p, dims, &q, &mut out, &mut lse[1..]),
        Err(KernelError::Length { name: "lse", .. })
    ));
    let mut d0 = dims;
    d0.rank = 0;
    assert!(try_p(p, d0, &q, &mut out, &mut lse).is_err());
    let mut d4 = dims;
    d4.rank = 4;
    assert!(try_p(p, d4, &q, &mut out, &mut lse).is_err());
    let mut g = dims;
    g.q_heads = 3;
    g.kv_heads = 2;
    assert!(try_p(p, g, &q, &mut out, &mut lse).is_err());
    // Backward checks its lengths too.
    let mut z = vec![0f32; q.len()];
    let (mut dk, mut dv) = (vec![0f32; k.len()], vec![0f32; v.len()]);
    assert!(backward(
        &dims,
        &p,
        &q,
        &k,
        &v,
        &[],
        &[],
        &out,
        &out,
        &lse[1..],
        &mut z,
        &mut dk,
        &mut dv,
        &mut [],
        &mut []
    )
    .is_err());
    assert!(try_p(p, dims, &q, &mut out, &mut lse).is_ok());
}

/// Zero-width heads (`head_dim` or `v_head_dim` 0) are argument errors, also on shapes the
/// 1-D band and 2-D lanes paths would take, at every level (they once reached a packing
/// routine's slice bounds).
#[test]
fn zero_width_heads_are_errors() {
    let _g = lock();
    let shapes: [(&[usize], &[usize]); 2] = [(&[40], &[7]), (&[14, 20], &[3, 5])];
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        for (sp, ks) in shapes {
            for (d, dv) in [(0, 4), (4, 0), (0, 0)] {
                let n: usize = sp.iter().product();
                let dims = NaDims::new(1, sp, 2, 1, d, dv, 0);
                let r = sp.len();
                let p = NaParams::new(ks, &vec![1; r], &vec![1; r], &vec![false; r], 0.5);
                let q = vec![0.5f32; n * 2 * d];
                let k = vec![0.25f32; n * d];
                let v = vec![1.0f32; n * dv];
                let mut out = vec![0f32; n * 2 * dv];
                let mut lse = vec![0f32; n * 2];
                let f = forward(&dims, &p, &q, &k, &v, &[], &[], &mut out, &mut lse);
                assert!(
                    matches!(f, Err(KernelError::Argument(_))),
                    "{level:?} {sp:?}"
                );
                let (mut dq, mut dk, mut dvv) = (q.clone(), k.clone(), v.clone());
                let b = backward(
                    &dims,
                    &p,
                    &q,
                    &k,
                    &v,
                    &[],
                    &[],
                    &out,
                    &out,
                    &lse,
                    &mut dq,
                    &mut dk,
                    &mut dvv,
                    &mut [],
                    &mut [],
                );
                assert!(
                    matches!(b, Err(KernelError::Argument(_))),
                    "{level:?} {sp:?}"
                );
            }
        }
    }
    simd::force(None).unwrap();
}
