use super::*;

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn rand(n: usize, seed: &mut u64, amp: f64) -> Vec<f64> {
    (0..n).map(|_| amp * lcg(seed)).collect()
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[allow(clippy::needless_range_loop)]
/// Direct float64 transcription of docs/flow.md (quadratic where it is simplest).
fn naive(d: &FlowDims, causal: bool, eps: f64, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    let (h, dk, dv, n, m) = (d.heads, d.head_dim, d.v_head_dim, d.q_len, d.kv_len);
    let mut out = vec![0.0; d.batch * n * h * dv];
    for b in 0..d.batch {
        for hh in 0..h {
            let qs = |i: usize, c: usize| sig(q[((b * n + i) * h + hh) * dk + c]);
            let ks = |j: usize, c: usize| sig(k[((b * m + j) * h + hh) * dk + c]);
            let vv = |j: usize, c: usize| v[((b * m + j) * h + hh) * dv + c];
            // upper bound of the sums for row t (exclusive)
            let hi_k = |t: usize| if causal { t + 1 } else { m };
            let hi_q = |t: usize| if causal { t + 1 } else { n };
            let w = |t: usize| if causal { (t + 1) as f64 } else { 1.0 };
            let ii: Vec<f64> = (0..n)
                .map(|i| {
                    1.0 / (0..dk)
                        .map(|c| {
                            (qs(i, c) + eps) * ((0..hi_k(i)).map(|j| ks(j, c)).sum::<f64>() + eps)
                        })
                        .sum::<f64>()
                })
                .collect();
            let oo: Vec<f64> = (0..m)
                .map(|j| {
                    1.0 / (0..dk)
                        .map(|c| {
                            (ks(j, c) + eps) * ((0..hi_q(j)).map(|i| qs(i, c)).sum::<f64>() + eps)
                        })
                        .sum::<f64>()
                })
                .collect();
            let ih: Vec<f64> = (0..n)
                .map(|i| {
                    (0..dk)
                        .map(|c| {
                            (qs(i, c) + eps)
                                * ((0..hi_k(i)).map(|j| w(j) * oo[j] * ks(j, c)).sum::<f64>() + eps)
                        })
                        .sum::<f64>()
                        / w(i)
                })
                .collect();
            let oh: Vec<f64> = (0..m)
                .map(|j| {
                    ((0..dk)
                        .map(|c| {
                            (ks(j, c) + eps)
                                * ((0..hi_q(j)).map(|i| w(i) * ii[i] * qs(i, c)).sum::<f64>() + eps)
                        })
                        .sum::<f64>()
                        / w(j))
                    .clamp(-1.0, 1.0)
                })
                .collect();
            let a: Vec<f64> = (0..n)
                .map(|i| {
                    sig(if causal {
                        ih[i]
                    } else {
                        ih[i] * n as f64 / m as f64
                    })
                })
                .collect();
            let cc: Vec<f64> = (0..m)
                .map(|j| {
                    let z: f64 = (0..hi_k(j)).map(|l| oh[l].exp()).sum();
                    (if causal { (j + 1) as f64 } else { m as f64 }) * oh[j].exp() / z
                })
                .collect();
            for i in 0..n {
                for c in 0..dv {
                    let mut s = 0.0;
                    for j in 0..hi_k(i) {
                        let sc: f64 = (0..dk).map(|x| qs(i, x) * ks(j, x)).sum();
                        s += sc * cc[j] * vv(j, c);
                    }
                    out[((b * n + i) * h + hh) * dv + c] = a[i] * ii[i] * s;
                }
            }
        }
    }
    out
}

fn shapes() -> Vec<(FlowDims, bool)> {
    let mut out = vec![];
    for &(b, n, m, h, dk, dv) in &[
        (1, 1, 1, 1, 3, 2),
        (2, 5, 5, 2, 4, 3),
        (1, 7, 11, 1, 5, 6),
        (1, 70, 70, 1, 4, 33),
        (1, 130, 97, 2, 6, 5),
    ] {
        for causal in [false, true] {
            if causal && n != m {
                continue;
            }
            out.push((
                FlowDims {
                    batch: b,
                    q_len: n,
                    kv_len: m,
                    heads: h,
                    head_dim: dk,
                    v_head_dim: dv,
                },
                causal,
            ));
        }
    }
    out
}

#[test]
fn forward_matches_naive_every_level() {
    let mut seed = 11u64;
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        for (d, causal) in shapes() {
            let q = rand(d.batch * d.q_len * d.heads * d.head_dim, &mut seed, 2.0);
            let k = rand(d.batch * d.kv_len * d.heads * d.head_dim, &mut seed, 2.0);
            let v = rand(d.batch * d.kv_len * d.heads * d.v_head_dim, &mut seed, 1.0);
            let want = naive(&d, causal, 1e-6, &q, &k, &v);
            let mut out = vec![0.0; want.len()];
            forward(&d, causal, 1e-6, &q, &k, &v, &mut out).unwrap();
            for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (x - y).abs() < 1e-10 * (1.0 + y.abs()),
                    "{level:?} {d:?} {causal} [{i}] {x} vs {y}"
                );
            }
        }
    }
    crate::simd::force(None).unwrap();
}

#[test]
fn backward_matches_finite_differences() {
    let mut seed = 13u64;
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        for (d, causal) in shapes().into_iter().filter(|(d, _)| d.q_len <= 70) {
            // Large amplitudes push some conserved sources past the clamp.
            let q = rand(d.batch * d.q_len * d.heads * d.head_dim, &mut seed, 3.0);
            let k = rand(d.batch * d.kv_len * d.heads * d.head_dim, &mut seed, 3.0);
            let v = rand(d.batch * d.kv_len * d.heads * d.v_head_dim, &mut seed, 1.0);
            let go = rand(d.batch * d.q_len * d.heads * d.v_head_dim, &mut seed, 1.0);
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                let mut out = vec![0.0; go.len()];
                forward(&d, causal, 1e-6, q, k, v, &mut out).unwrap();
                out.iter().zip(&go).map(|(a, b)| a * b).sum()
            };
            let mut dq = vec![0.0; q.len()];
            let mut dk = vec![0.0; k.len()];
            let mut dv = vec![0.0; v.len()];
            backward(&d, causal, 1e-6, &q, &k, &v, &go, &mut dq, &mut dk, &mut dv).unwrap();
            let entries = [&q, &k, &v].map(|x| (0..x.len()).step_by(5).collect());
            let what = format!("{level:?} {d:?} causal={causal}");
            check_fd(&what, loss, [&q, &k, &v], [&dq, &dk, &dv], entries);
        }
    }
    crate::simd::force(None).unwrap();
}

/// Central differences of `loss` at the `entries` of each argument match `grads`.
fn check_fd(
    what: &str,
    loss: impl Fn(&[f64], &[f64], &[f64]) -> f64,
    x: [&Vec<f64>; 3],
    grads: [&Vec<f64>; 3],
    entries: [Vec<usize>; 3],
) {
    let mut args = x.map(|a| a.clone());
    let eps = 1e-6;
    for which in 0..3 {
        for &i in &entries[which] {
            let x = args[which][i];
            args[which][i] = x + eps;
            let lp = loss(&args[0], &args[1], &args[2]);
            args[which][i] = x - eps;
            let lm = loss(&args[0], &args[1], &args[2]);
            args[which][i] = x;
            let fd = (lp - lm) / (2.0 * eps);
            let got = grads[which][i];
            assert!(
                (got - fd).abs() <= 1e-5 * (1.0 + fd.abs()),
                "{what} arg {which}[{i}]: {got} vs {fd}"
            );
        }
    }
}

/// Long non-causal sequences with fewer heads than threads take the sequence-split path
/// (segments per thread, reductions between passes); uneven splits and Tq ≠ Tk included.
#[test]
fn forward_split_across_threads_matches_naive() {
    let mut seed = 5u64;
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for &(n, m) in &[(1537, 1601), (3 * 512 * 2 + 1, 1031 * 3)] {
            let d = FlowDims {
                batch: 1,
                q_len: n,
                kv_len: m,
                heads: 1,
                head_dim: 8,
                v_head_dim: 5,
            };
            let q = rand(n * 8, &mut seed, 2.0);
            let k = rand(m * 8, &mut seed, 2.0);
            let v = rand(m * 5, &mut seed, 1.0);
            let want = naive(&d, false, 1e-6, &q, &k, &v);
            let mut out = vec![0.0; want.len()];
            pool.install(|| forward(&d, false, 1e-6, &q, &k, &v, &mut out))
                .unwrap();
            for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (x - y).abs() < 1e-10 * (1.0 + y.abs()),
                    "{threads} {d:?} [{i}] {x} vs {y}"
                );
            }
        }
    }
}

/// The causal forward streams in segments of `SEGMENT` rows, carrying the running sums
/// and the state: lengths across several segments, one not a multiple of it.
#[test]
fn causal_forward_across_segments_matches_naive() {
    let mut seed = 9u64;
    for n in [crate::linear::SEGMENT + 1, 2 * crate::linear::SEGMENT + 77] {
        let d = FlowDims {
            batch: 2,
            q_len: n,
            kv_len: n,
            heads: 2,
            head_dim: 6,
            v_head_dim: 7,
        };
        let q = rand(2 * n * 2 * 6, &mut seed, 2.0);
        let k = rand(2 * n * 2 * 6, &mut seed, 2.0);
        let v = rand(2 * n * 2 * 7, &mut seed, 1.0);
        let want = naive(&d, true, 1e-6, &q, &k, &v);
        let mut out = vec![0.0; want.len()];
        forward(&d, true, 1e-6, &q, &k, &v, &mut out).unwrap();
        for (i, (x, y)) in out.iter().zip(&want).enumerate() {
            assert!(
                (x - y).abs() < 1e-10 * (1.0 + y.abs()),
                "{d:?} [{i}] {x} vs {y}"
            );
        }
    }
}

/// The non-causal backward split across threads (heads < threads, long sequences) gives
/// the one-thread result (whose path the finite-difference test checks), Tq ≠ Tk included.
#[test]
fn backward_split_across_threads_matches_one_thread() {
    let mut seed = 21u64;
    let (n, m) = (1601, 1537);
    let d = FlowDims {
        batch: 1,
        q_len: n,
        kv_len: m,
        heads: 1,
        head_dim: 8,
        v_head_dim: 5,
    };
    // Large amplitudes push some conserved sources past the clamp.
    let q = rand(n * 8, &mut seed, 3.0);
    let k = rand(m * 8, &mut seed, 3.0);
    let v = rand(m * 5, &mut seed, 1.0);
    let go = rand(n * 5, &mut seed, 1.0);
    let grads = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        pool.install(|| backward(&d, false, 1e-6, &q, &k, &v, &go, &mut dq, &mut dk, &mut dv))
            .unwrap();
        [dq, dk, dv]
    };
    let want = grads(1);
    for threads in [2, 3] {
        for (which, (g, w)) in grads(threads).iter().zip(&want).enumerate() {
            let scale = w.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
            for (i, (x, y)) in g.iter().zip(w).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-10 * scale,
                    "{threads} threads, grad {which}[{i}]: {x} vs {y}"
                );
            }
        }
    }
}

/// The causal backward over several of the forward's segments (the core's chunked state
/// passes, the chain rule's reverse sums over the whole sequence): finite differences on
/// entries on both sides of every segment boundary, a length that is not a multiple of
/// the segment.
#[test]
fn causal_backward_across_segments_matches_finite_differences() {
    let mut seed = 31u64;
    let seg = crate::linear::SEGMENT;
    let n = 2 * seg + 77;
    let d = FlowDims {
        batch: 1,
        q_len: n,
        kv_len: n,
        heads: 2,
        head_dim: 4,
        v_head_dim: 3,
    };
    // Large amplitudes push some conserved sources past the clamp.
    let q = rand(n * 2 * 4, &mut seed, 3.0);
    let k = rand(n * 2 * 4, &mut seed, 3.0);
    let v = rand(n * 2 * 3, &mut seed, 1.0);
    let go = rand(n * 2 * 3, &mut seed, 1.0);
    let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
        let mut out = vec![0.0; go.len()];
        forward(&d, true, 1e-6, q, k, v, &mut out).unwrap();
        out.iter().zip(&go).map(|(a, b)| a * b).sum()
    };
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    backward(&d, true, 1e-6, &q, &k, &v, &go, &mut dq, &mut dk, &mut dv).unwrap();
    // Every head and column of rows on both sides of each segment boundary.
    let rows = [0, 5, seg - 1, seg, seg + 1, 2 * seg - 1, 2 * seg, n - 1];
    let entries = [4, 4, 3].map(|w| {
        rows.iter()
            .flat_map(|&t| (0..2 * w).map(move |j| t * 2 * w + j))
            .collect()
    });
    check_fd("causal", loss, [&q, &k, &v], [&dq, &dk, &dv], entries);
}

/// A zero-width head is an argument error in both directions, never a panic (the chunked
/// core assumes a column).
#[test]
fn zero_width_heads_are_rejected() {
    for (dk, dv) in [(0, 4), (4, 0)] {
        let d = FlowDims {
            batch: 1,
            q_len: 5,
            kv_len: 5,
            heads: 2,
            head_dim: dk,
            v_head_dim: dv,
        };
        let (q, v) = (vec![0.5f32; 5 * 2 * dk], vec![0.5f32; 5 * 2 * dv]);
        for causal in [false, true] {
            let mut out = vec![0f32; 5 * 2 * dv];
            let err = forward(&d, causal, 1e-6, &q, &q, &v, &mut out).unwrap_err();
            assert!(matches!(err, crate::KernelError::Argument(_)), "{err}");
            let (mut dq, mut dk_, mut dv_) = (q.clone(), q.clone(), v.clone());
            let err = backward(
                &d, causal, 1e-6, &q, &q, &v, &out, &mut dq, &mut dk_, &mut dv_,
            )
            .unwrap_err();
            assert!(matches!(err, crate::KernelError::Argument(_)), "{err}");
        }
    }
}
