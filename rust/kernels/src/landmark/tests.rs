use super::*;
use crate::element::Acc;
use half::{bf16, f16};

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn rand(n: usize, seed: &mut u64) -> Vec<f64> {
    (0..n).map(|_| lcg(seed)).collect()
}

/// The weights of docs/landmark.md for query position `p` over keys `0..=p`, written out:
/// the grouped softmax materialised for one row.
fn weights(s: &[f64], p: usize, bs: usize) -> Vec<f64> {
    let qb = p / bs;
    let is_landmark = |j: usize| j % bs == bs - 1;
    let mut items = Vec::new(); // (logit, key or block)
    for j in qb * bs..=p {
        if !is_landmark(j) {
            items.push(s[j]);
        }
    }
    for g in 0..qb {
        items.push(s[g * bs + bs - 1]);
    }
    let m = items.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = items.iter().map(|x| (x - m).exp()).sum();
    let mut w = vec![0.0; p + 1];
    for j in qb * bs..=p {
        if !is_landmark(j) {
            w[j] = (s[j] - m).exp() / z;
        }
    }
    for g in 0..qb {
        let gate = (s[g * bs + bs - 1] - m).exp() / z;
        let regs: Vec<usize> = (g * bs..g * bs + bs - 1).collect();
        let mi = regs.iter().map(|&j| s[j]).fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = regs.iter().map(|&j| (s[j] - mi).exp()).sum();
        for &j in &regs {
            w[j] = gate * (s[j] - mi).exp() / l;
        }
    }
    w
}

struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn inputs(d: &LandmarkDims, seed: u64) -> Inputs {
    let mut s = seed;
    Inputs {
        q: rand(d.batch * d.q_len * d.q_heads * d.head_dim, &mut s),
        k: rand(d.batch * d.kv_len * d.kv_heads * d.head_dim, &mut s),
        v: rand(d.batch * d.kv_len * d.kv_heads * d.v_head_dim, &mut s),
    }
}

/// `(out, lse)` in float64, quadratic and direct.
fn naive(d: &LandmarkDims, scale: f64, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let (h, hd, hv) = (d.q_heads, d.head_dim, d.v_head_dim);
    let group = h / d.kv_heads;
    let mut out = vec![0.0; d.batch * d.q_len * h * hv];
    let mut lse = vec![0.0; d.batch * d.q_len * h];
    for b in 0..d.batch {
        for hh in 0..h {
            let kvh = hh / group;
            for i in 0..d.q_len {
                let p = d.kv_len - d.q_len + i;
                let at = (b * d.q_len + i) * h + hh;
                let s: Vec<f64> = (0..=p)
                    .map(|j| {
                        let kr = ((b * d.kv_len + j) * d.kv_heads + kvh) * hd;
                        scale * (0..hd).map(|c| x.q[at * hd + c] * x.k[kr + c]).sum::<f64>()
                    })
                    .collect();
                let w = weights(&s, p, d.block);
                for (j, wj) in w.iter().enumerate() {
                    let vr = ((b * d.kv_len + j) * d.kv_heads + kvh) * hv;
                    for c in 0..hv {
                        out[at * hv + c] += wj * x.v[vr + c];
                    }
                }
                let qb = p / d.block;
                let mut items: Vec<f64> = (qb * d.block..=p)
                    .filter(|j| j % d.block != d.block - 1)
                    .map(|j| s[j])
                    .collect();
                items.extend((0..qb).map(|g| s[g * d.block + d.block - 1]));
                lse[at] = items.iter().map(|x| x.exp()).sum::<f64>().ln();
            }
        }
    }
    (out, lse)
}

fn dims(
    batch: usize,
    tq: usize,
    tk: usize,
    h: usize,
    hkv: usize,
    hd: usize,
    hv: usize,
    bs: usize,
) -> LandmarkDims {
    LandmarkDims {
        batch,
        q_len: tq,
        kv_len: tk,
        q_heads: h,
        kv_heads: hkv,
        head_dim: hd,
        v_head_dim: hv,
        block: bs,
    }
}

fn cases() -> Vec<LandmarkDims> {
    vec![
        dims(1, 1, 1, 1, 1, 4, 4, 2),      // T = 1
        dims(2, 11, 11, 2, 1, 5, 3, 4),    // GQA, Dv != D, T not a multiple of the block
        dims(1, 7, 7, 3, 3, 8, 8, 16),     // T below one block
        dims(1, 20, 20, 2, 2, 6, 6, 5),    // block not a power of two, complete blocks
        dims(1, 6, 23, 4, 2, 7, 9, 3),     // Tq < Tk: queries at the end of the keys
        dims(1, 70, 70, 1, 1, 16, 16, 65), // block 65: one complete block and a tail
        dims(1, 18, 18, 2, 1, 3, 2, 2),    // block 2: one regular token per block
    ]
}

fn to<E: Element>(x: &[f64]) -> Vec<E> {
    x.iter()
        .map(|&v| E::from_acc(E::Acc::from_f64(v)))
        .collect()
}

/// The inputs rounded to `E` (half inputs are compared with the rounded inputs' answer).
fn rounded<E: Element>(x: &Inputs) -> Inputs {
    let r = |a: &[f64]| to::<E>(a).iter().map(|v| v.to_acc().to_f64()).collect();
    Inputs {
        q: r(&x.q),
        k: r(&x.k),
        v: r(&x.v),
    }
}

fn run_fwd<E: Element>(d: &LandmarkDims, scale: f64, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let (q, k, v) = (to::<E>(&x.q), to::<E>(&x.k), to::<E>(&x.v));
    let mut out = vec![E::from_acc(E::Acc::ZERO); d.batch * d.q_len * d.q_heads * d.v_head_dim];
    let mut lse = vec![E::Acc::ZERO; d.batch * d.q_len * d.q_heads];
    forward(d, scale, &q, &k, &v, &mut out, &mut lse).unwrap();
    (
        out.iter().map(|&o| o.to_acc().to_f64()).collect(),
        lse.iter().map(|&l| l.to_f64()).collect(),
    )
}

fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn forward_matches_naive_every_level_and_dtype() {
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        // several query tiles, split into chunks, at the end of longer keys
        let mut all = cases();
        all.push(dims(1, 150, 181, 3, 1, 8, 5, 7));
        all.push(dims(2, 97, 97, 1, 1, 33, 40, 64));
        for (n, d) in all.iter().enumerate() {
            let x = inputs(d, 7 + n as u64);
            let scale = 0.7 / (d.head_dim as f64).sqrt();
            let (want, want_lse) = naive(d, scale, &x);
            let what = format!("{d:?} at {level:?}");
            let (o, l) = run_fwd::<f64>(d, scale, &x);
            close(&o, &want, 1e-12, &format!("f64 out {what}"));
            close(&l, &want_lse, 1e-12, &format!("f64 lse {what}"));
            let (o, l) = run_fwd::<f32>(d, scale, &x);
            close(&o, &want, 2e-5, &format!("f32 out {what}"));
            close(&l, &want_lse, 2e-5, &format!("f32 lse {what}"));
            // half inputs are rounded first: compare with the rounded inputs' answer
            let xb = rounded::<bf16>(&x);
            let (wb, _) = naive(d, scale, &xb);
            close(
                &run_fwd::<bf16>(d, scale, &xb).0,
                &wb,
                1e-2,
                &format!("bf16 out {what}"),
            );
            let xh = rounded::<f16>(&x);
            let (wh, _) = naive(d, scale, &xh);
            close(
                &run_fwd::<f16>(d, scale, &xh).0,
                &wh,
                2e-3,
                &format!("f16 out {what}"),
            );
        }
    }
    crate::simd::force(None).unwrap();
}

/// `Σ g ⊙ out` for fixed upstream gradients `g`: its derivatives are the backward's outputs.
fn loss(d: &LandmarkDims, scale: f64, x: &Inputs, g: &[f64]) -> f64 {
    naive(d, scale, x).0.iter().zip(g).map(|(o, w)| o * w).sum()
}

#[test]
fn backward_matches_central_differences_every_level() {
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        for (n, d) in cases().iter().enumerate() {
            let x = inputs(d, 100 + n as u64);
            let scale = 0.9 / (d.head_dim as f64).sqrt();
            let mut sd = 900 + n as u64;
            let g = rand(d.batch * d.q_len * d.q_heads * d.v_head_dim, &mut sd);
            let mut out = vec![0.0; g.len()];
            let mut lse = vec![0.0; d.batch * d.q_len * d.q_heads];
            forward(d, scale, &x.q, &x.k, &x.v, &mut out, &mut lse).unwrap();
            let (mut dq, mut dk, mut dv) = (
                vec![0.0; x.q.len()],
                vec![0.0; x.k.len()],
                vec![0.0; x.v.len()],
            );
            backward(
                d, scale, &x.q, &x.k, &x.v, &out, &g, &lse, &mut dq, &mut dk, &mut dv,
            )
            .unwrap();
            for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
                for idx in 0..grad.len() {
                    let eps = 1e-6;
                    let mut xp = Inputs {
                        q: x.q.clone(),
                        k: x.k.clone(),
                        v: x.v.clone(),
                    };
                    let mut xm = Inputs {
                        q: x.q.clone(),
                        k: x.k.clone(),
                        v: x.v.clone(),
                    };
                    let (p, m) = match which {
                        0 => (&mut xp.q, &mut xm.q),
                        1 => (&mut xp.k, &mut xm.k),
                        _ => (&mut xp.v, &mut xm.v),
                    };
                    p[idx] += eps;
                    m[idx] -= eps;
                    let fd = (loss(d, scale, &xp, &g) - loss(d, scale, &xm, &g)) / (2.0 * eps);
                    assert!(
                        (grad[idx] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                        "{d:?} at {level:?}: d{}[{idx}] = {}, central difference {fd}",
                        ["q", "k", "v"][which],
                        grad[idx]
                    );
                }
            }
        }
    }
    crate::simd::force(None).unwrap();
}

#[test]
fn backward_in_f32_and_bf16_follows_f64() {
    let d = dims(1, 13, 13, 2, 1, 8, 4, 4);
    let x = inputs(&d, 5);
    let scale = 0.35;
    let mut sd = 6;
    let g = rand(d.batch * d.q_len * d.q_heads * d.v_head_dim, &mut sd);
    let grads = |x: &Inputs| {
        let mut out = vec![0.0; g.len()];
        let mut lse = vec![0.0; 26];
        forward(&d, scale, &x.q, &x.k, &x.v, &mut out, &mut lse).unwrap();
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; x.q.len()],
            vec![0.0; x.k.len()],
            vec![0.0; x.v.len()],
        );
        backward(
            &d, scale, &x.q, &x.k, &x.v, &out, &g, &lse, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();
        [dq, dk, dv]
    };
    let want = grads(&x);
    fn low<E: Element>(d: &LandmarkDims, scale: f64, x: &Inputs, g: &[f64]) -> [Vec<f64>; 3] {
        let (q, k, v, gg) = (to::<E>(&x.q), to::<E>(&x.k), to::<E>(&x.v), to::<E>(g));
        let z = E::from_acc(E::Acc::ZERO);
        let mut out = vec![z; g.len()];
        let mut lse = vec![E::Acc::ZERO; d.q_len * d.q_heads];
        forward(d, scale, &q, &k, &v, &mut out, &mut lse).unwrap();
        let (mut dq, mut dk, mut dv) = (vec![z; q.len()], vec![z; k.len()], vec![z; v.len()]);
        backward(
            d, scale, &q, &k, &v, &out, &gg, &lse, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();
        [dq, dk, dv].map(|t| t.iter().map(|e| e.to_acc().to_f64()).collect())
    }
    for (got, w) in low::<f32>(&d, scale, &x, &g).iter().zip(&want) {
        close(got, w, 1e-5, "f32 grad");
    }
    for (got, w) in low::<bf16>(&d, scale, &x, &g).iter().zip(&want) {
        close(got, w, 6e-2, "bf16 grad");
    }
}

#[test]
fn bad_arguments_are_errors() {
    let ok = dims(1, 4, 4, 2, 1, 4, 4, 2);
    let (q, k, v) = (vec![0f32; 32], vec![0f32; 16], vec![0f32; 16]);
    let (mut o, mut l) = (vec![0f32; 32], vec![0f32; 8]);
    assert!(forward(&ok, 1.0, &q, &k, &v, &mut o, &mut l).is_ok());
    for bad in [
        LandmarkDims { block: 1, ..ok },
        LandmarkDims { q_len: 5, ..ok },
        LandmarkDims { kv_heads: 0, ..ok },
        LandmarkDims {
            q_heads: 3,
            kv_heads: 2,
            ..ok
        },
        LandmarkDims { head_dim: 0, ..ok },
    ] {
        assert!(
            matches!(
                forward(&bad, 1.0, &q, &k, &v, &mut o, &mut l),
                Err(KernelError::Argument(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        forward(&ok, 1.0, &q[1..], &k, &v, &mut o, &mut l),
        Err(KernelError::Length { .. })
    ));
    let (mut dq, mut dk, mut dv) = (vec![0f32; 32], vec![0f32; 16], vec![0f32; 15]);
    assert!(matches!(
        backward(&ok, 1.0, &q, &k, &v, &o, &o, &l, &mut dq, &mut dk, &mut dv),
        Err(KernelError::Length { .. })
    ));
}

/// Retrieval written query by query from docs/landmark.md: `(out, kept)` in float64.
fn naive_retrieval(
    d: &LandmarkDims,
    scale: f64,
    top_k: usize,
    sel: Selection,
    x: &Inputs,
) -> (Vec<f64>, Vec<i64>) {
    let (h, hd, hv, bs) = (d.q_heads, d.head_dim, d.v_head_dim, d.block);
    let group = h / d.kv_heads;
    let score = |b: usize, i: usize, hh: usize, j: usize| {
        let at = ((b * d.q_len + i) * h + hh) * hd;
        let kr = ((b * d.kv_len + j) * d.kv_heads + hh / group) * hd;
        scale * (0..hd).map(|c| x.q[at + c] * x.k[kr + c]).sum::<f64>()
    };
    let pos = |i: usize| d.kv_len - d.q_len + i;
    // candidates' softmax probabilities, per (b, hh, i)
    let probs = |b: usize, hh: usize, i: usize| -> Vec<f64> {
        let ls: Vec<f64> = (0..pos(i) / bs)
            .map(|g| score(b, i, hh, g * bs + bs - 1))
            .collect();
        let m = ls.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = ls.iter().map(|x| (x - m).exp()).sum();
        ls.iter().map(|x| (x - m).exp() / z).collect()
    };
    let mut out = vec![0.0; d.batch * d.q_len * h * hv];
    let mut kept = vec![-1i64; d.batch * h * d.q_len * top_k];
    for b in 0..d.batch {
        for hh in 0..h {
            for i in 0..d.q_len {
                let p = pos(i);
                let mine = probs(b, hh, i);
                let rank = |g: usize| match sel {
                    Selection::PerTokenAndHead => mine[g],
                    Selection::MaxOverHeads => (0..h)
                        .map(|x| probs(b, x, i)[g])
                        .fold(f64::NEG_INFINITY, f64::max),
                    Selection::MaxOverTokens => (0..d.q_len)
                        .filter(|&j| g < pos(j) / bs)
                        .map(|j| probs(b, hh, j)[g])
                        .fold(f64::NEG_INFINITY, f64::max),
                };
                let mut chosen: Vec<usize> = (0..p / bs).collect();
                chosen.sort_by(|&a, &c| rank(c).partial_cmp(&rank(a)).unwrap().then(a.cmp(&c)));
                chosen.truncate(top_k);
                let at = (b * h + hh) * d.q_len + i;
                for (s, &g) in chosen.iter().enumerate() {
                    kept[at * top_k + s] = g as i64;
                }
                // items: (logit, value row)
                let vrow = |j: usize| {
                    let r = ((b * d.kv_len + j) * d.kv_heads + hh / group) * hv;
                    x.v[r..r + hv].to_vec()
                };
                let mut items: Vec<(f64, Vec<f64>)> = (p / bs * bs..=p)
                    .filter(|j| j % bs != bs - 1)
                    .map(|j| (score(b, i, hh, j), vrow(j)))
                    .collect();
                for &g in &chosen {
                    let s: Vec<f64> = (g * bs..g * bs + bs - 1)
                        .map(|j| score(b, i, hh, j))
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    let mut avg = vec![0.0; hv];
                    for (t, sj) in s.iter().enumerate() {
                        for (a, vv) in avg.iter_mut().zip(vrow(g * bs + t)) {
                            *a += (sj - m).exp() / l * vv;
                        }
                    }
                    items.push((score(b, i, hh, g * bs + bs - 1), avg));
                }
                let m = items.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = items.iter().map(|x| (x.0 - m).exp()).sum();
                let o = ((b * d.q_len + i) * h + hh) * hv;
                for (logit, val) in &items {
                    for c in 0..hv {
                        out[o + c] += (logit - m).exp() / z * val[c];
                    }
                }
            }
        }
    }
    (out, kept)
}

fn run_retrieval<E: Element>(
    d: &LandmarkDims,
    scale: f64,
    top_k: usize,
    sel: Selection,
    x: &Inputs,
) -> (Vec<f64>, Vec<i64>) {
    let (q, k, v) = (to::<E>(&x.q), to::<E>(&x.k), to::<E>(&x.v));
    let mut out = vec![E::from_acc(E::Acc::ZERO); d.batch * d.q_len * d.q_heads * d.v_head_dim];
    let mut kept = vec![7i64; d.batch * d.q_heads * d.q_len * top_k];
    retrieval(d, scale, top_k, sel, &q, &k, &v, &mut out, &mut kept).unwrap();
    (out.iter().map(|&o| o.to_acc().to_f64()).collect(), kept)
}

const SELECTIONS: [Selection; 3] = [
    Selection::PerTokenAndHead,
    Selection::MaxOverHeads,
    Selection::MaxOverTokens,
];

#[test]
fn retrieval_matches_naive_every_level_selection_and_dtype() {
    let shapes = [
        dims(1, 1, 41, 4, 2, 8, 6, 4),   // decode, GQA, a tail of 1
        dims(2, 6, 50, 3, 1, 8, 8, 6),   // queries crossing a block boundary, MQA
        dims(1, 9, 27, 2, 2, 4, 5, 3),   // many small blocks, no tail
        dims(1, 2, 5, 2, 1, 4, 4, 8),    // no complete block yet
        dims(1, 3, 70, 2, 2, 33, 20, 2), // block 2, head dims past a vector
    ];
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        for (n, d) in shapes.iter().enumerate() {
            let x = inputs(d, 31 + n as u64);
            let scale = 0.8 / (d.head_dim as f64).sqrt();
            for sel in SELECTIONS {
                for top_k in [0, 1, 2, 5, 100] {
                    let what = format!("{d:?} {sel:?} top_k {top_k} at {level:?}");
                    let (want, kept) = naive_retrieval(d, scale, top_k, sel, &x);
                    let (o, k) = run_retrieval::<f64>(d, scale, top_k, sel, &x);
                    close(&o, &want, 1e-12, &format!("f64 {what}"));
                    assert_eq!(k, kept, "f64 kept {what}");
                    let (o, _) = run_retrieval::<f32>(d, scale, top_k, sel, &x);
                    close(&o, &want, 2e-5, &format!("f32 {what}"));
                    let xb = rounded::<bf16>(&x);
                    let (wb, kb) = naive_retrieval(d, scale, top_k, sel, &xb);
                    let (o, k) = run_retrieval::<bf16>(d, scale, top_k, sel, &xb);
                    close(&o, &wb, 1e-2, &format!("bf16 {what}"));
                    assert_eq!(k, kb, "bf16 kept {what}");
                }
            }
        }
    }
    crate::simd::force(None).unwrap();
}

#[test]
fn retrieval_keeping_every_block_is_the_training_form() {
    for level in crate::simd::available() {
        crate::simd::force(Some(level)).unwrap();
        for (n, d) in cases().iter().enumerate() {
            let x = inputs(d, 61 + n as u64);
            let scale = 0.9 / (d.head_dim as f64).sqrt();
            let (want, _) = naive(d, scale, &x);
            for sel in SELECTIONS {
                let top_k = d.kv_len / d.block + 1;
                let (o, _) = run_retrieval::<f64>(d, scale, top_k, sel, &x);
                close(&o, &want, 1e-12, &format!("{d:?} {sel:?} at {level:?}"));
            }
        }
    }
    crate::simd::force(None).unwrap();
}

#[test]
fn retrieval_ties_go_to_the_earlier_block() {
    // one head, block 4: blocks 0 and 2 share a landmark key, block 1's ranks lower
    let d = dims(1, 1, 17, 1, 1, 4, 4, 4);
    let mut x = inputs(&d, 5);
    for c in 0..4 {
        x.k[3 * 4 + c] = x.k[11 * 4 + c];
        x.k[7 * 4 + c] = x.k[11 * 4 + c] - 3.0 * x.q[c];
    }
    for sel in SELECTIONS {
        assert_eq!(
            run_retrieval::<f64>(&d, 0.5, 1, sel, &x).1,
            vec![0],
            "{sel:?}"
        );
        assert_eq!(
            run_retrieval::<f64>(&d, 0.5, 2, sel, &x).1,
            vec![0, 2],
            "{sel:?}"
        );
        assert_eq!(
            run_retrieval::<f32>(&d, 0.5, 2, sel, &x).1,
            vec![0, 2],
            "{sel:?}"
        );
    }
}

#[test]
fn retrieval_bad_arguments_are_errors() {
    let d = dims(1, 2, 9, 2, 1, 4, 4, 4);
    let x = inputs(&d, 3);
    let (q, k, v) = (to::<f32>(&x.q), to::<f32>(&x.k), to::<f32>(&x.v));
    let mut out = vec![0f32; 2 * 2 * 4];
    let mut kept = vec![0i64; 2 * 2 * 3];
    let sel = Selection::PerTokenAndHead;
    assert!(retrieval(&d, 1.0, 3, sel, &q, &k, &v, &mut out, &mut kept).is_ok());
    assert!(retrieval(&d, 1.0, 2, sel, &q, &k, &v, &mut out, &mut kept).is_err());
    assert!(retrieval(&d, 1.0, 3, sel, &q, &k[1..], &v, &mut out, &mut kept).is_err());
    let bad = LandmarkDims { block: 1, ..d };
    assert!(retrieval(&bad, 1.0, 3, sel, &q, &k, &v, &mut out, &mut kept).is_err());
}
