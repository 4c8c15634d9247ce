use super::*;

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn rand(n: usize, seed: &mut u64) -> Vec<f64> {
    (0..n).map(|_| lcg(seed)).collect()
}

/// Naive recurrent float64 reference: returns (out, final kv, final z).
#[allow(clippy::too_many_arguments)]
fn naive(
    d: &LinearDims,
    o: &LinearOpts,
    cu: Option<&[i64]>,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s0: Option<&[f64]>,
    z0: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (h, kd, vd) = (d.heads, d.head_dim, d.v_head_dim);
    let seqs = sequences(d.batch, d.seq_len, cu).unwrap();
    let mut out = vec![0.0; d.batch * d.seq_len * h * vd];
    let mut fkv = vec![0.0; seqs.len() * h * kd * vd];
    let mut fz = vec![0.0; seqs.len() * h * kd];
    let fm = o.feature_map;
    for (si, &(row0, len)) in seqs.iter().enumerate() {
        for hh in 0..h {
            let task = si * h + hh;
            let qf = |t: usize, c: usize| fm.apply(q[((row0 + t) * h + hh) * kd + c]) * o.scale;
            let kf = |t: usize, c: usize| fm.apply(k[((row0 + t) * h + hh) * kd + c]);
            let vv = |t: usize, c: usize| v[((row0 + t) * h + hh) * vd + c];
            let mut s: Vec<f64> = s0.map_or(vec![0.0; kd * vd], |s| {
                s[task * kd * vd..(task + 1) * kd * vd].to_vec()
            });
            let mut z: Vec<f64> =
                z0.map_or(vec![0.0; kd], |z| z[task * kd..(task + 1) * kd].to_vec());
            if !o.causal {
                for j in 0..len {
                    for a in 0..kd {
                        z[a] += kf(j, a);
                        for b in 0..vd {
                            s[a * vd + b] += kf(j, a) * vv(j, b);
                        }
                    }
                }
            }
            for t in 0..len {
                if o.causal {
                    for a in 0..kd {
                        z[a] += kf(t, a);
                        for b in 0..vd {
                            s[a * vd + b] += kf(t, a) * vv(t, b);
                        }
                    }
                }
                let den: f64 = (0..kd).map(|a| qf(t, a) * z[a]).sum::<f64>() + 1e-10;
                for b in 0..vd {
                    let mut x: f64 = (0..kd).map(|a| qf(t, a) * s[a * vd + b]).sum();
                    if o.normalize {
                        x /= den;
                    }
                    out[((row0 + t) * h + hh) * vd + b] = x;
                }
            }
            fkv[task * kd * vd..(task + 1) * kd * vd].copy_from_slice(&s);
            fz[task * kd..(task + 1) * kd].copy_from_slice(&z);
        }
    }
    (out, fkv, fz)
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

struct Case {
    d: LinearDims,
    o: LinearOpts,
    cu: Option<Vec<i64>>,
    init: bool,
}

fn cases() -> Vec<Case> {
    let mut out = vec![];
    for &(b, t, h, kd, vd) in &[
        (1, 1, 1, 3, 2),
        (2, 5, 2, 4, 3),
        (1, 70, 1, 5, 33),
        (1, 130, 2, 33, 7),
    ] {
        for causal in [true, false] {
            for normalize in [true, false] {
                for fm in [FeatureMap::Identity, FeatureMap::Elu1, FeatureMap::Relu] {
                    let d = LinearDims {
                        batch: b,
                        seq_len: t,
                        heads: h,
                        head_dim: kd,
                        v_head_dim: vd,
                    };
                    let o = LinearOpts {
                        scale: 0.7,
                        causal,
                        normalize,
                        feature_map: fm,
                    };
                    out.push(Case {
                        d,
                        o,
                        cu: None,
                        init: causal,
                    });
                    if b == 1 && t > 10 && causal {
                        out.push(Case {
                            d,
                            o,
                            cu: Some(vec![0, 3, 3, t as i64 - 4, t as i64]),
                            init: true,
                        });
                    }
                }
            }
        }
    }
    out
}

#[test]
fn forward_matches_naive_every_level() {
    let mut seed = 3u64;
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        for c in cases() {
            check_forward(&c, &mut seed);
        }
    }
    crate::simd::force(None).unwrap();
}

/// Long causal sequences stream through several segments of head groups: lengths that are
/// no multiple of a chunk, groups of 6, 3, 2 and 1 of the 6 heads (by thread count and
/// sequence count), packed sequences (one empty, one of a single row), initial states.
#[test]
fn long_causal_forward_matches_naive() {
    let mut seed = 11u64;
    let mut long = vec![];
    for &(b, t, ref cu) in &[
        (2, 2 * SEGMENT + 70, None),
        (1, 1500, Some(vec![0, 5, 1030, 1030, 1031, 1500])),
    ] {
        for (normalize, fm) in [(true, FeatureMap::Elu1), (false, FeatureMap::Identity)] {
            long.push(Case {
                d: LinearDims {
                    batch: b,
                    seq_len: t,
                    heads: 6,
                    head_dim: 17,
                    v_head_dim: 20,
                },
                o: LinearOpts {
                    scale: 0.3,
                    causal: true,
                    normalize,
                    feature_map: fm,
                },
                cu: cu.clone(),
                init: normalize,
            });
        }
    }
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for c in &long {
                check_forward(c, &mut seed);
            }
        });
    }
}

/// A case's random inputs: row and sequence counts, q, k, v and initial states.
struct Inputs {
    rows: usize,
    n: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    s0: Vec<f64>,
    z0: Vec<f64>,
}

fn inputs(c: &Case, seed: &mut u64) -> Inputs {
    let (h, kd, vd) = (c.d.heads, c.d.head_dim, c.d.v_head_dim);
    let rows = c.d.batch * c.d.seq_len;
    let n = sequences(c.d.batch, c.d.seq_len, c.cu.as_deref())
        .unwrap()
        .len();
    // Positive feature values keep the normaliser away from zero.
    let shift = if c.o.normalize { 1.5 } else { 0.0 };
    let mut shifted = |len| -> Vec<f64> { rand(len, seed).iter().map(|x| x + shift).collect() };
    let (q, k) = (shifted(rows * h * kd), shifted(rows * h * kd));
    let v = rand(rows * h * vd, seed);
    let s0 = rand(n * h * kd * vd, seed);
    let z0 = rand(n * h * kd, seed).iter().map(|x| x.abs()).collect();
    Inputs {
        rows,
        n,
        q,
        k,
        v,
        s0,
        z0,
    }
}

/// One forward case against the naive reference, in f64 and f32 at the active level.
fn check_forward(c: &Case, seed: &mut u64) {
    let (h, kd, vd) = (c.d.heads, c.d.head_dim, c.d.v_head_dim);
    let Inputs {
        rows,
        n,
        q,
        k,
        v,
        s0,
        z0,
    } = inputs(c, seed);
    let (s0, z0) = if c.init {
        (Some(&s0[..]), Some(&z0[..]))
    } else {
        (None, None)
    };
    let want = naive(&c.d, &c.o, c.cu.as_deref(), &q, &k, &v, s0, z0);
    let mut out = vec![0.0; rows * h * vd];
    let mut fkv = vec![0.0; n * h * kd * vd];
    let mut fz = vec![0.0; n * h * kd];
    forward(
        &c.d,
        &c.o,
        c.cu.as_deref(),
        &q,
        &k,
        &v,
        s0,
        z0,
        &mut out,
        &mut fkv,
        &mut fz,
    )
    .unwrap();
    close(&out, &want.0, 1e-9, "out");
    close(&fkv, &want.1, 1e-9, "final_kv");
    close(&fz, &want.2, 1e-9, "final_z");
    // f32 path.
    let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
    let (s0f, z0f) = (s0.map(f), z0.map(f));
    let mut out32 = vec![0f32; rows * h * vd];
    forward(
        &c.d,
        &c.o,
        c.cu.as_deref(),
        &f(&q),
        &f(&k),
        &f(&v),
        s0f.as_deref(),
        z0f.as_deref(),
        &mut out32,
        &mut [],
        &mut [],
    )
    .unwrap();
    let out32: Vec<f64> = out32.iter().map(|&x| x as f64).collect();
    close(&out32, &want.0, 2e-4, "out f32");
}

/// Backward against central finite differences of a random projection of all outputs.
#[test]
fn backward_matches_finite_differences() {
    let small = cases()
        .into_iter()
        .filter(|c| c.d.seq_len <= 70 && c.d.head_dim <= 5)
        .collect::<Vec<_>>();
    check_backward(&small, 7, 5);
}

/// Causal sequences longer than a segment run backward segment by segment, handing state
/// gradients from one segment to the one before (uneven lengths, packed sequences, initial
/// states, both normalisations).
#[test]
fn long_causal_backward_matches_finite_differences() {
    let mut long = vec![];
    for &(b, t, ref cu) in &[
        (1, 1100, None),
        (2, SEGMENT + 3, None),
        (1, 1500, Some(vec![0, 5, 1030, 1500])),
    ] {
        for normalize in [true, false] {
            long.push(Case {
                d: LinearDims {
                    batch: b,
                    seq_len: t,
                    heads: 2,
                    head_dim: 3,
                    v_head_dim: 2,
                },
                o: LinearOpts {
                    scale: 0.7,
                    causal: true,
                    normalize,
                    feature_map: FeatureMap::Elu1,
                },
                cu: cu.clone(),
                init: true,
            });
        }
    }
    check_backward(&long, 97, 6);
}

fn check_backward(cases: &[Case], stride: usize, seed: u64) {
    let mut seed = seed;
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        for c in cases {
            let (h, kd, vd) = (c.d.heads, c.d.head_dim, c.d.v_head_dim);
            let Inputs {
                rows,
                n,
                q,
                k,
                v,
                s0,
                z0,
            } = inputs(c, &mut seed);
            let go = rand(rows * h * vd, &mut seed);
            let gs = rand(n * h * kd * vd, &mut seed);
            let gz = rand(n * h * kd, &mut seed);
            let init = c.init;
            let loss = |q: &[f64], k: &[f64], v: &[f64], s0: &[f64], z0: &[f64]| -> f64 {
                let (s0, z0) = if init {
                    (Some(s0), Some(z0))
                } else {
                    (None, None)
                };
                let (o, s, z) = naive(&c.d, &c.o, c.cu.as_deref(), q, k, v, s0, z0);
                let mut l: f64 = o.iter().zip(&go).map(|(a, b)| a * b).sum();
                if init {
                    l += s.iter().zip(&gs).map(|(a, b)| a * b).sum::<f64>();
                    l += z.iter().zip(&gz).map(|(a, b)| a * b).sum::<f64>();
                }
                l
            };
            let mut dq = vec![0.0; q.len()];
            let mut dk = vec![0.0; k.len()];
            let mut dv = vec![0.0; v.len()];
            let mut ds0 = vec![0.0; if init { s0.len() } else { 0 }];
            let mut dz0 = vec![0.0; if init { z0.len() } else { 0 }];
            let (s0o, z0o, gso, gzo) = if init {
                (Some(&s0[..]), Some(&z0[..]), Some(&gs[..]), Some(&gz[..]))
            } else {
                (None, None, None, None)
            };
            backward(
                &c.d,
                &c.o,
                c.cu.as_deref(),
                &q,
                &k,
                &v,
                s0o,
                z0o,
                &go,
                gso,
                gzo,
                &mut dq,
                &mut dk,
                &mut dv,
                &mut ds0,
                &mut dz0,
            )
            .unwrap();
            let eps = 1e-6;
            let mut args = [q.clone(), k.clone(), v.clone(), s0.clone(), z0.clone()];
            let grads = [&dq, &dk, &dv, &ds0, &dz0];
            for which in 0..5 {
                if which >= 3 && !init {
                    continue;
                }
                for i in (0..args[which].len()).step_by(stride) {
                    let x = args[which][i];
                    args[which][i] = x + eps;
                    let lp = loss(&args[0], &args[1], &args[2], &args[3], &args[4]);
                    args[which][i] = x - eps;
                    let lm = loss(&args[0], &args[1], &args[2], &args[3], &args[4]);
                    args[which][i] = x;
                    let fd = (lp - lm) / (2.0 * eps);
                    let got = grads[which][i];
                    assert!(
                        (got - fd).abs() <= 1e-5 * (1.0 + fd.abs()),
                        "{level:?} arg {which}[{i}] causal={} norm={} fm={:?} cu={:?}: {got} vs {fd}",
                        c.o.causal,
                        c.o.normalize,
                        c.o.feature_map,
                        c.cu
                    );
                }
            }
        }
    }
    crate::simd::force(None).unwrap();
}

#[test]
fn head_groups_share_work_evenly() {
    use super::forward::head_group;
    // (sequences, heads, threads) -> heads per task
    for (n, h, t, g) in [
        (1, 8, 2, 4),
        (1, 8, 1, 8),
        (3, 8, 2, 4),
        (2, 8, 16, 1),
        (1, 7, 2, 1),
        (5, 6, 2, 3),
        (0, 4, 2, 1),
    ] {
        assert_eq!(
            head_group(n, h, t),
            g,
            "{n} sequences, {h} heads, {t} threads"
        );
    }
}

/// A forward large enough to stream its output (f32, 64-byte aligned, ≥ 16 MiB) writes the
/// same values as into an unaligned buffer, which takes the cached path.
#[test]
fn streamed_forward_output_matches_cached() {
    let d = LinearDims {
        batch: 1,
        seq_len: 65536 + 70,
        heads: 4,
        head_dim: 3,
        v_head_dim: 16,
    };
    let o = LinearOpts {
        scale: 0.5,
        causal: true,
        normalize: true,
        feature_map: FeatureMap::Elu1,
    };
    let n = d.seq_len * d.heads;
    let mut seed = 5u64;
    let mk = |w: usize, seed: &mut u64| -> Vec<f32> {
        rand(n * w, seed).iter().map(|&x| x as f32).collect()
    };
    let (q, k, v) = (mk(3, &mut seed), mk(3, &mut seed), mk(16, &mut seed));
    let mut outs = vec![];
    for misalign in [1, 0] {
        let mut buf = vec![f32::NAN; n * 16 + 32];
        let a = (16 - (buf.as_ptr() as usize % 64) / 4) % 16 + misalign;
        let out = &mut buf[a..a + n * 16];
        forward(&d, &o, None, &q, &k, &v, None, None, out, &mut [], &mut []).unwrap();
        outs.push(out.to_vec());
    }
    assert!(outs[0].iter().all(|x| x.is_finite()));
    assert_eq!(outs[0], outs[1]);
}

/// A zero-width head is an argument error in both directions, never a panic.
#[test]
fn zero_width_heads_are_rejected() {
    for (kd, vd) in [(0, 4), (4, 0)] {
        let d = LinearDims {
            batch: 1,
            seq_len: 5,
            heads: 2,
            head_dim: kd,
            v_head_dim: vd,
        };
        for causal in [false, true] {
            let o = LinearOpts {
                scale: 0.5,
                causal,
                normalize: true,
                feature_map: FeatureMap::Identity,
            };
            let (q, v) = (vec![0.5f32; 5 * 2 * kd], vec![0.5f32; 5 * 2 * vd]);
            let mut out = vec![0f32; 5 * 2 * vd];
            let err = forward(
                &d,
                &o,
                None,
                &q,
                &q,
                &v,
                None,
                None,
                &mut out,
                &mut [],
                &mut [],
            )
            .unwrap_err();
            assert!(matches!(err, crate::KernelError::Argument(_)), "{err}");
            let (mut dq, mut dk, mut dv) = (q.clone(), q.clone(), v.clone());
            let err = backward(
                &d,
                &o,
                None,
                &q,
                &q,
                &v,
                None,
                None,
                &out,
                None,
                None,
                &mut dq,
                &mut dk,
                &mut dv,
                &mut [],
                &mut [],
            )
            .unwrap_err();
            assert!(matches!(err, crate::KernelError::Argument(_)), "{err}");
        }
    }
}
