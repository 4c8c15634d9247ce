//! Dense attention against a float64 reference that materialises the score matrix, at
//! every SIMD level this CPU offers.

#![allow(clippy::needless_range_loop)] // the reference spells the formulas out

#[global_allocator]
static ALLOC: fastattn_kernels::alloc::CacheLineAligned = fastattn_kernels::alloc::CacheLineAligned;

use fastattn_kernels::attention::{backward, forward, AttnDims};
use fastattn_kernels::simd::{self, Level};
use fastattn_kernels::{Element, KernelError};
use half::{bf16, f16};
use std::sync::Mutex;

/// `simd::force` is process-global; tests that run kernels hold this lock.
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

fn dims(b: usize, tq: usize, tk: usize, hq: usize, hkv: usize, d: usize, dv: usize) -> AttnDims {
    AttnDims {
        batch: b,
        q_len: tq,
        kv_len: tk,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        v_head_dim: dv,
    }
}

struct Grads {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// Naive reference: full score rows, analytic gradients.
#[allow(clippy::too_many_arguments)]
fn reference(
    a: &AttnDims,
    scale: f64,
    causal: bool,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
) -> Grads {
    let (b, tq, tk, hq, hkv, d, dv) = (
        a.batch,
        a.q_len,
        a.kv_len,
        a.q_heads,
        a.kv_heads,
        a.head_dim,
        a.v_head_dim,
    );
    let g = hq / hkv.max(1);
    let mut r = Grads {
        out: vec![0.0; b * tq * hq * dv],
        lse: vec![0.0; b * tq * hq],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / g;
            for i in 0..tq {
                let qi = &q[((bi * tq + i) * hq + h) * d..][..d];
                let lim = if causal {
                    (i as isize + tk as isize - tq as isize + 1).clamp(0, tk as isize) as usize
                } else {
                    tk
                };
                let row = (bi * tq + i) * hq + h;
                if lim == 0 {
                    r.lse[row] = f64::NEG_INFINITY;
                    continue;
                }
                let s: Vec<f64> = (0..lim)
                    .map(|j| {
                        let kj = &k[((bi * tk + j) * hkv + kh) * d..][..d];
                        scale * qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let lse = m + l.ln();
                r.lse[row] = lse;
                let p: Vec<f64> = s.iter().map(|x| (x - lse).exp()).collect();
                for (j, &pj) in p.iter().enumerate() {
                    let vj = &v[((bi * tk + j) * hkv + kh) * dv..][..dv];
                    for c in 0..dv {
                        r.out[row * dv + c] += pj * vj[c];
                    }
                }
                let doi = &dout[row * dv..][..dv];
                let delta: f64 = doi
                    .iter()
                    .zip(&r.out[row * dv..][..dv])
                    .map(|(x, y)| x * y)
                    .sum();
                for (j, &pj) in p.iter().enumerate() {
                    let kr = ((bi * tk + j) * hkv + kh) * d;
                    let vr = ((bi * tk + j) * hkv + kh) * dv;
                    let dp: f64 = doi.iter().zip(&v[vr..][..dv]).map(|(x, y)| x * y).sum();
                    let ds = pj * (dp - delta);
                    for c in 0..d {
                        r.dq[row * d + c] += scale * ds * k[kr + c];
                        r.dk[kr + c] += scale * ds * qi[c];
                    }
                    for c in 0..dv {
                        r.dv[vr + c] += pj * doi[c];
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
}

#[allow(clippy::too_many_arguments)]
fn run<E: Element>(
    a: &AttnDims,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    dout: &[E],
) -> Run<E> {
    let z = E::from_acc(<E::Acc as fastattn_kernels::element::Acc>::ZERO);
    let zacc = <E::Acc as fastattn_kernels::element::Acc>::ZERO;
    let mut r = Run {
        out: vec![z; dout.len()],
        lse: vec![zacc; a.batch * a.q_len * a.q_heads],
        dq: vec![z; q.len()],
        dk: vec![z; k.len()],
        dv: vec![z; v.len()],
    };
    forward(a, scale, causal, q, k, v, &mut r.out, &mut r.lse).unwrap();
    backward(
        a, scale, causal, q, k, v, &r.out, dout, &r.lse, &mut r.dq, &mut r.dk, &mut r.dv,
    )
    .unwrap();
    r
}

fn max_err(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
    let mut e = 0.0f64;
    let mut n = 0;
    for (g, &w) in got.zip(want) {
        n += 1;
        let d = if g == w { 0.0 } else { (g - w).abs() };
        e = e.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    assert_eq!(n, want.len());
    e
}

fn lse_err(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
    max_err(
        got.map(|x| if x == f64::NEG_INFINITY { -1e300 } else { x }),
        &want
            .iter()
            .map(|&x| if x == f64::NEG_INFINITY { -1e300 } else { x })
            .collect::<Vec<_>>(),
    )
}

/// (batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim)
const SHAPES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 1, 7, 7),
    (1, 1, 65, 2, 1, 16, 16),
    (2, 3, 17, 4, 2, 40, 24),
    (1, 17, 3, 4, 1, 8, 8),
    (1, 9, 4, 2, 1, 8, 8),
    (3, 2, 300, 8, 2, 64, 64),
    (2, 4, 3, 2, 2, 24, 40),
    (1, 2, 600, 2, 1, 64, 64),
    (1, 65, 130, 2, 2, 64, 64),
    (1, 130, 65, 4, 2, 64, 32),
    (2, 64, 64, 4, 4, 7, 33),
    (1, 257, 257, 2, 1, 128, 128),
    (1, 129, 200, 4, 2, 64, 64),
    // Long enough for the forward's tall query tiles.
    (1, 4100, 70, 2, 1, 8, 12),
];

fn inputs(seed: u64, a: &AttnDims) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let q = rng.vec(a.batch * a.q_len * a.q_heads * a.head_dim);
    let k = rng.vec(a.batch * a.kv_len * a.kv_heads * a.head_dim);
    let v = rng.vec(a.batch * a.kv_len * a.kv_heads * a.v_head_dim);
    let dout = rng.vec(a.batch * a.q_len * a.q_heads * a.v_head_dim);
    (q, k, v, dout)
}

fn sweep(check: impl Fn(Level, &AttnDims, bool, f64, (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>))) {
    let _g = lock();
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        for (n, &(b, tq, tk, hq, hkv, d, dv)) in SHAPES.iter().enumerate() {
            for causal in [false, true] {
                let a = dims(b, tq, tk, hq, hkv, d, dv);
                let scale = 1.0 / (d as f64).sqrt();
                check(
                    level,
                    &a,
                    causal,
                    scale,
                    inputs(n as u64 * 2 + causal as u64, &a),
                );
            }
        }
    }
    simd::force(None).unwrap();
}

#[test]
fn f32_matches_reference() {
    sweep(|level, a, causal, scale, (q, k, v, dout)| {
        let r = reference(a, scale, causal, &q, &k, &v, &dout);
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let got = run::<f32>(a, scale, causal, &f(&q), &f(&k), &f(&v), &f(&dout));
        let up = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<_>>().into_iter();
        let ctx = format!("{level:?} {a:?} causal={causal}");
        assert!(
            max_err(up(&got.out), &r.out) <= 1e-4,
            "out {ctx}: {}",
            max_err(up(&got.out), &r.out)
        );
        assert!(lse_err(up(&got.lse), &r.lse) <= 1e-4, "lse {ctx}");
        assert!(
            max_err(up(&got.dq), &r.dq) <= 2e-4,
            "dq {ctx}: {}",
            max_err(up(&got.dq), &r.dq)
        );
        assert!(
            max_err(up(&got.dk), &r.dk) <= 2e-4,
            "dk {ctx}: {}",
            max_err(up(&got.dk), &r.dk)
        );
        assert!(
            max_err(up(&got.dv), &r.dv) <= 2e-4,
            "dv {ctx}: {}",
            max_err(up(&got.dv), &r.dv)
        );
    });
}

#[test]
fn f64_matches_reference() {
    sweep(|level, a, causal, scale, (q, k, v, dout)| {
        let r = reference(a, scale, causal, &q, &k, &v, &dout);
        let got = run::<f64>(a, scale, causal, &q, &k, &v, &dout);
        let ctx = format!("{level:?} {a:?} causal={causal}");
        fn it(x: &[f64]) -> impl Iterator<Item = f64> + '_ {
            x.iter().copied()
        }
        assert!(max_err(it(&got.out), &r.out) <= 1e-10, "out {ctx}");
        assert!(lse_err(it(&got.lse), &r.lse) <= 1e-10, "lse {ctx}");
        assert!(max_err(it(&got.dq), &r.dq) <= 1e-10, "dq {ctx}");
        assert!(max_err(it(&got.dk), &r.dk) <= 1e-10, "dk {ctx}");
        assert!(max_err(it(&got.dv), &r.dv) <= 1e-10, "dv {ctx}");
    });
}

fn half_check<H: Element<Acc = f32>>(to: fn(f64) -> H, from: fn(H) -> f32) {
    sweep(|level, a, causal, scale, (q, k, v, dout)| {
        let h = |x: &[f64]| x.iter().map(|&y| to(y)).collect::<Vec<H>>();
        let (qh, kh, vh, dh) = (h(&q), h(&k), h(&v), h(&dout));
        let got = run::<H>(a, scale, causal, &qh, &kh, &vh, &dh);
        let f = |x: &[H]| x.iter().map(|&y| from(y)).collect::<Vec<f32>>();
        let want = run::<f32>(a, scale, causal, &f(&qh), &f(&kh), &f(&vh), &f(&dh));
        let ctx = format!("{level:?} {a:?} causal={causal}");
        let cmp = |g: &[H], w: &[f32], name: &str| {
            let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            let e = max_err(g.iter().map(|&x| from(x) as f64), &w64);
            assert!(e <= 1e-2, "{name} {ctx}: {e}");
        };
        cmp(&got.out, &want.out, "out");
        cmp(&got.dq, &want.dq, "dq");
        cmp(&got.dk, &want.dk, "dk");
        cmp(&got.dv, &want.dv, "dv");
        // Few-query f32 calls take a different (unpacked) path than half types, so the
        // lse agrees to rounding rather than bit for bit.
        let lw: Vec<f64> = want.lse.iter().map(|&x| x as f64).collect();
        assert!(
            lse_err(got.lse.iter().map(|&x| x as f64), &lw) <= 1e-4,
            "lse {ctx}"
        );
    });
}

#[test]
fn bf16_matches_f32() {
    half_check::<bf16>(bf16::from_f64, |x| x.to_f32());
}

#[test]
fn f16_matches_f32() {
    half_check::<f16>(f16::from_f64, |x| x.to_f32());
}

#[test]
fn empty_rows_are_zero_with_neg_inf_lse() {
    let _g = lock();
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        // Causal with Tq > Tk: the first Tq - Tk queries see nothing.
        let a = dims(1, 9, 4, 2, 2, 8, 8);
        let (q, k, v, dout) = inputs(7, &a);
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let r = run::<f32>(&a, 0.3, true, &f(&q), &f(&k), &f(&v), &f(&dout));
        for i in 0..5 {
            for h in 0..2 {
                assert_eq!(r.lse[i * 2 + h], f32::NEG_INFINITY);
                assert!(r.out[(i * 2 + h) * 8..][..8].iter().all(|&x| x == 0.0));
                assert!(r.dq[(i * 2 + h) * 8..][..8].iter().all(|&x| x == 0.0));
            }
        }
        // No keys at all.
        let a = dims(2, 3, 0, 2, 1, 4, 5);
        let (q, k, v, dout) = inputs(8, &a);
        let r = run::<f32>(&a, 0.5, false, &f(&q), &f(&k), &f(&v), &f(&dout));
        assert!(r.out.iter().all(|&x| x == 0.0) && r.dq.iter().all(|&x| x == 0.0));
        assert!(r.lse.iter().all(|&x| x == f32::NEG_INFINITY));
    }
    simd::force(None).unwrap();
}

#[test]
fn degenerate_dims_do_not_panic() {
    let _g = lock();
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        for a in [
            dims(0, 4, 4, 2, 1, 8, 8),
            dims(1, 0, 4, 2, 1, 8, 8),
            dims(1, 4, 4, 0, 0, 8, 8),
            dims(1, 4, 4, 2, 1, 0, 8),
            dims(1, 4, 4, 2, 1, 8, 0),
            dims(1, 4, 4, 2, 1, 0, 0),
            dims(1, 4, 0, 2, 1, 0, 0),
        ] {
            for causal in [false, true] {
                let (q, k, v, dout) = inputs(3, &a);
                let r = run::<f64>(&a, 1.0, causal, &q, &k, &v, &dout);
                let want = reference(&a, 1.0, causal, &q, &k, &v, &dout);
                assert!(max_err(r.out.iter().cloned(), &want.out) <= 1e-12, "{a:?}");
                assert!(max_err(r.dk.iter().cloned(), &want.dk) <= 1e-12, "{a:?}");
                let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
                run::<f32>(&a, 1.0, causal, &f(&q), &f(&k), &f(&v), &f(&dout));
            }
        }
    }
    simd::force(None).unwrap();
}

#[test]
fn nan_propagates() {
    let _g = lock();
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        let a = dims(1, 5, 70, 1, 1, 16, 16);
        let (q, k, v, dout) = inputs(11, &a);
        let mut q: Vec<f32> = q.iter().map(|&x| x as f32).collect();
        q[2 * 16 + 3] = f32::NAN;
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let r = run::<f32>(&a, 0.25, false, &q, &f(&k), &f(&v), &f(&dout));
        assert!(
            r.out[2 * 16..3 * 16].iter().all(|x| x.is_nan()),
            "{level:?}"
        );
        assert!(r.out[..16].iter().all(|x| x.is_finite()), "{level:?}");
    }
    simd::force(None).unwrap();
}

#[test]
fn bad_lengths_are_errors() {
    let a = dims(1, 4, 5, 2, 1, 8, 6);
    let q = vec![0f32; 4 * 2 * 8];
    let k = vec![0f32; 5 * 8];
    let v = vec![0f32; 5 * 6];
    let mut out = vec![0f32; 4 * 2 * 6];
    let mut lse = vec![0f32; 8];
    assert!(forward(&a, 1.0, false, &q, &k, &v, &mut out, &mut lse).is_ok());
    assert!(matches!(
        forward(&a, 1.0, false, &q[1..], &k, &v, &mut out, &mut lse),
        Err(KernelError::Length { name: "q", .. })
    ));
    assert!(forward(&a, 1.0, false, &q, &k[1..], &v, &mut out, &mut lse).is_err());
    assert!(forward(&a, 1.0, false, &q, &k, &v[1..], &mut out, &mut lse).is_err());
    assert!(forward(&a, 1.0, false, &q, &k, &v, &mut out[1..], &mut lse).is_err());
    assert!(forward(&a, 1.0, false, &q, &k, &v, &mut out, &mut lse[1..]).is_err());
    let (mut dq, mut dk, mut dv) = (q.clone(), k.clone(), v.clone());
    let o = out.clone();
    assert!(backward(&a, 1.0, false, &q, &k, &v, &o, &o, &lse, &mut dq, &mut dk, &mut dv).is_ok());
    assert!(backward(
        &a,
        1.0,
        false,
        &q,
        &k,
        &v,
        &o,
        &o[1..],
        &lse,
        &mut dq,
        &mut dk,
        &mut dv
    )
    .is_err());
    assert!(backward(
        &a,
        1.0,
        false,
        &q,
        &k,
        &v,
        &o,
        &o,
        &lse,
        &mut dq[1..],
        &mut dk,
        &mut dv
    )
    .is_err());
    assert!(backward(
        &a,
        1.0,
        false,
        &q,
        &k,
        &v,
        &o,
        &o,
        &lse,
        &mut dq,
        &mut dk[1..],
        &mut dv
    )
    .is_err());
    assert!(backward(
        &a,
        1.0,
        false,
        &q,
        &k,
        &v,
        &o,
        &o,
        &lse[1..],
        &mut dq,
        &mut dk,
        &mut dv
    )
    .is_err());
    let bad = dims(1, 4, 5, 3, 2, 8, 6);
    assert!(matches!(
        forward(&bad, 1.0, false, &q, &k, &v, &mut out, &mut lse),
        Err(KernelError::Argument(_))
    ));
    let huge = dims(usize::MAX / 2, 4, 5, 2, 1, 8, 6);
    assert!(forward(&huge, 1.0, false, &q, &k, &v, &mut out, &mut lse).is_err());
}

/// The bindings run kernels inside their own sized pool; results must not depend on it.
#[test]
fn sized_pools_agree() {
    let _g = lock();
    simd::force(None).unwrap();
    let a = dims(1, 300, 260, 4, 2, 32, 16);
    let (q, k, v, dout) = inputs(21, &a);
    let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
    let (q, k, v, dout) = (f(&q), f(&k), f(&v), f(&dout));
    let base = run::<f32>(&a, 0.2, true, &q, &k, &v, &dout);
    for threads in [1, 3, 7] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let r = pool.install(|| run::<f32>(&a, 0.2, true, &q, &k, &v, &dout));
        assert_eq!(r.out, base.out, "{threads} threads");
        assert_eq!(r.lse, base.lse, "{threads} threads");
        for (x, y) in [(&r.dq, &base.dq), (&r.dk, &base.dk), (&r.dv, &base.dv)] {
            let e = x
                .iter()
                .zip(y.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(e < 1e-5, "{threads} threads: {e}");
        }
    }
}

/// Embeds a contiguous heads-last operand (`rows` tokens of `w` values) in a wider buffer:
/// token `t` at `offset + t·stride`, everything else `fill`.
fn embed(
    x: &[f32],
    rows: usize,
    w: usize,
    offset: usize,
    stride: usize,
    len: usize,
    fill: f32,
) -> Vec<f32> {
    let mut out = vec![fill; len];
    for t in 0..rows {
        out[offset + t * stride..][..w].copy_from_slice(&x[t * w..][..w]);
    }
    out
}

fn extract(x: &[f32], rows: usize, w: usize, offset: usize, stride: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|t| x[offset + t * stride..][..w].to_vec())
        .collect()
}

/// Operands addressed by a layout (q inside a wider fused projection, K and V the two halves
/// of one buffer, dK/dV written into one joint buffer) give bit for bit the contiguous call's
/// results, on the tiled and the few-query paths, and leave every unaddressed element alone.
#[test]
fn strided_layout_matches_contiguous() {
    use fastattn_kernels::attention::{backward_with, forward_with, KvGrads, Layout, Rows};
    let _g = lock();
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        for &(b, tq, tk, hq, hkv, d, dv) in &[
            (2, 70, 45, 4, 2, 16, 8),
            (1, 3, 40, 4, 1, 8, 8),
            (1, 1, 30, 2, 1, 8, 8),
            (1, 20, 300, 2, 1, 8, 8),
            (2, 9, 49, 3, 3, 32, 32),
        ] {
            let a = dims(b, tq, tk, hq, hkv, d, dv);
            let (q, k, v, dout) = inputs(7, &a);
            let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
            let (q, k, v, dout) = (f(&q), f(&k), f(&v), f(&dout));
            let want = run::<f32>(&a, 0.3, true, &q, &k, &v, &dout);
            let (qw, kw, vw, ow) = (hq * d, hkv * d, hkv * dv, hq * dv);
            // q: 5 leading values and 3 trailing per token; K | V joint with a gap of 2.
            let (q_off, q_stride) = (5, qw + 8);
            let kv_stride = kw + vw + 2;
            let layout = Layout {
                q: Rows {
                    offset: q_off,
                    stride: q_stride,
                },
                k: Rows {
                    offset: 0,
                    stride: kv_stride,
                },
                v: Rows {
                    offset: kw + 2,
                    stride: kv_stride,
                },
                o: Rows {
                    offset: 1,
                    stride: ow + 1,
                },
            };
            let (nq, nk) = (b * tq, b * tk);
            let qb = embed(&q, nq, qw, q_off, q_stride, q_off + nq * q_stride, 9.0);
            let mut kvb = embed(&k, nk, kw, 0, kv_stride, nk * kv_stride, 9.0);
            let vpart = embed(&v, nk, vw, kw + 2, kv_stride, nk * kv_stride, 0.0);
            for t in 0..nk {
                kvb[t * kv_stride + kw + 2..][..vw]
                    .copy_from_slice(&vpart[t * kv_stride + kw + 2..][..vw]);
            }
            let olen = 1 + nq * (ow + 1);
            let mut out = vec![f32::NAN; olen];
            let mut lse = vec![0f32; b * tq * hq];
            forward_with(&a, &layout, 0.3, true, &qb, &kvb, &kvb, &mut out, &mut lse).unwrap();
            assert_eq!(extract(&out, nq, ow, 1, ow + 1), want.out, "{level:?} out");
            assert_eq!(lse, want.lse, "{level:?} lse");
            let doutb = embed(&dout, nq, ow, 1, ow + 1, olen, 0.0);
            let mut dq = vec![f32::NAN; qb.len()];
            let mut dkv = vec![f32::NAN; kvb.len()];
            backward_with(
                &a,
                &layout,
                0.3,
                true,
                &qb,
                &kvb,
                &kvb,
                &out,
                &doutb,
                &lse,
                &mut dq,
                KvGrads::Joint(&mut dkv),
            )
            .unwrap();
            assert_eq!(
                extract(&dq, nq, qw, q_off, q_stride),
                want.dq,
                "{level:?} dq"
            );
            assert_eq!(extract(&dkv, nk, kw, 0, kv_stride), want.dk, "{level:?} dk");
            assert_eq!(
                extract(&dkv, nk, vw, kw + 2, kv_stride),
                want.dv,
                "{level:?} dv"
            );
            // the gaps were never written
            assert!(dq[..q_off].iter().all(|x| x.is_nan()));
            for t in 0..nq {
                assert!(dq[q_off + t * q_stride + qw..][..q_stride - qw]
                    .iter()
                    .all(|x| x.is_nan()));
                assert!(out[1 + t * (ow + 1) + ow].is_nan());
            }
            assert!((0..nk).all(|t| dkv[t * kv_stride + kw..][..2].iter().all(|x| x.is_nan())));
            assert!(out[0].is_nan());
        }
    }
    simd::force(None).unwrap();
}

/// A joint dK/dV buffer whose key and value rows overlap is refused, not written.
#[test]
fn overlapping_joint_kv_grads_are_an_error() {
    use fastattn_kernels::attention::{backward_with, KvGrads, Layout, Rows};
    let a = dims(1, 4, 5, 2, 1, 8, 8);
    let layout = Layout {
        q: Rows::dense(2, 8),
        k: Rows {
            offset: 0,
            stride: 12,
        },
        v: Rows {
            offset: 4,
            stride: 12,
        },
        o: Rows::dense(2, 8),
    };
    let (q, kv, o, lse) = (
        vec![0f32; 64],
        vec![0f32; 60],
        vec![0f32; 64],
        vec![0f32; 8],
    );
    let (mut dq, mut dkv) = (vec![0f32; 64], vec![0f32; 60]);
    let r = backward_with(
        &a,
        &layout,
        1.0,
        false,
        &q,
        &kv,
        &kv,
        &o,
        &o,
        &lse,
        &mut dq,
        KvGrads::Joint(&mut dkv),
    );
    assert!(matches!(r, Err(KernelError::Argument(_))), "{r:?}");
}
