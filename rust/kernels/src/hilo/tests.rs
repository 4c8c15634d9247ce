//! HiLo against a float64 transcription of docs/hilo.md at every SIMD level, and its backward
//! against central differences of that transcription.

use super::*;
use crate::element::Acc;
use crate::simd::Level;

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

struct Inputs {
    hi: Vec<f64>,
    pad: Option<Vec<f64>>,
    lq: Vec<f64>,
    lkv: Vec<f64>,
}

fn inputs(d: &HiloDims, r: &HiloRows, pad: bool, seed: u64) -> Inputs {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
    let n = d.batch * d.height * d.width;
    Inputs {
        hi: rng.vec(n * r.hi),
        pad: pad.then(|| rng.vec(2 * d.hi_heads * d.head_dim)),
        lq: rng.vec(n * r.lo_q),
        lkv: rng.vec(d.batch * d.pooled() * r.lo_kv),
    }
}

fn softmax_attend(scale: f64, q: &[f64], keys: &[Vec<f64>], vals: &[Vec<f64>]) -> Vec<f64> {
    let s: Vec<f64> = keys
        .iter()
        .map(|k| scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>())
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut o = vec![0.0; q.len()];
    for (w, v) in e.iter().zip(vals) {
        for (oc, vc) in o.iter_mut().zip(v) {
            *oc += w / z * vc;
        }
    }
    o
}

/// The two branches' outputs, token by token from the definitions.
fn naive(d: &HiloDims, r: &HiloRows, scale: f64, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let (hd, ws) = (d.head_dim, d.window);
    let (hdim, ldim) = (d.hi_heads * hd, d.lo_heads * hd);
    let tok = |b: usize, y: usize, xx: usize| (b * d.height + y) * d.width + xx;
    let mut hi = vec![0.0; d.batch * d.height * d.width * hdim];
    let mut lo = vec![0.0; d.batch * d.height * d.width * ldim];
    for b in 0..d.batch {
        for y in 0..d.height {
            for xx in 0..d.width {
                let t = tok(b, y, xx);
                for h in 0..d.hi_heads {
                    let (mut keys, mut vals) = (vec![], vec![]);
                    for dy in 0..ws {
                        for dx in 0..ws {
                            let (yy, xw) = (y / ws * ws + dy, xx / ws * ws + dx);
                            if yy < d.height && xw < d.width {
                                let base = tok(b, yy, xw) * r.hi + h * hd;
                                keys.push(x.hi[base + hdim..][..hd].to_vec());
                                vals.push(x.hi[base + 2 * hdim..][..hd].to_vec());
                            } else {
                                let zero = vec![0.0; 2 * hdim];
                                let p = x.pad.as_ref().unwrap_or(&zero);
                                keys.push(p[h * hd..][..hd].to_vec());
                                vals.push(p[hdim + h * hd..][..hd].to_vec());
                            }
                        }
                    }
                    let q = &x.hi[t * r.hi + h * hd..][..hd];
                    hi[t * hdim + h * hd..][..hd]
                        .copy_from_slice(&softmax_attend(scale, q, &keys, &vals));
                }
                for h in 0..d.lo_heads {
                    let keys: Vec<Vec<f64>> = (0..d.pooled())
                        .map(|j| x.lkv[(b * d.pooled() + j) * r.lo_kv + h * hd..][..hd].to_vec())
                        .collect();
                    let vals: Vec<Vec<f64>> = (0..d.pooled())
                        .map(|j| {
                            x.lkv[(b * d.pooled() + j) * r.lo_kv + ldim + h * hd..][..hd].to_vec()
                        })
                        .collect();
                    let q = &x.lq[t * r.lo_q + h * hd..][..hd];
                    lo[t * ldim + h * hd..][..hd]
                        .copy_from_slice(&softmax_attend(scale, q, &keys, &vals));
                }
            }
        }
    }
    (hi, lo)
}

fn cases() -> Vec<(HiloDims, HiloRows, bool)> {
    let mk = |batch, height, width, window, head_dim, hi_heads, lo_heads, extra: usize, pad| {
        let d = HiloDims {
            batch,
            height,
            width,
            window,
            head_dim,
            hi_heads,
            lo_heads,
        };
        let r = HiloRows {
            hi: 3 * hi_heads * head_dim + extra,
            lo_q: lo_heads * head_dim + extra,
            lo_kv: 2 * lo_heads * head_dim + extra,
        };
        (d, r, pad)
    };
    vec![
        mk(2, 4, 6, 2, 8, 1, 3, 0, false),   // divisible map
        mk(1, 5, 7, 2, 5, 2, 2, 3, true),    // padded bottom and right, strided rows
        mk(1, 7, 5, 3, 4, 1, 1, 0, true),    // ws 3, both sides padded
        mk(2, 6, 9, 4, 16, 2, 1, 1, false),  // ws 4, pad tokens with zero k/v
        mk(1, 4, 4, 1, 8, 0, 4, 0, false),   // ws 1: plain attention, no Hi-Fi
        mk(1, 3, 5, 2, 8, 3, 0, 2, true),    // Hi-Fi only
        mk(1, 2, 3, 4, 6, 1, 2, 0, true),    // window larger than the map
        mk(1, 9, 8, 2, 33, 1, 1, 0, false),  // head dim past two vectors
        mk(1, 5, 6, 2, 32, 1, 2, 1, true),   // whole-panel heads: fp32 Lo-Fi writes in place
        mk(1, 12, 11, 2, 4, 1, 1, 0, true),  // one head: three query chunks, the last partial
        mk(1, 66, 65, 2, 4, 0, 1, 0, false), // 33·33 pooled keys: the dense kernel's path
    ]
}

fn to<E: Element>(x: &[f64]) -> Vec<E> {
    x.iter()
        .map(|&v| E::from_acc(E::Acc::from_f64(v)))
        .collect()
}

fn run_forward<E: Element>(
    d: &HiloDims,
    r: &HiloRows,
    scale: f64,
    x: &Inputs,
) -> (Vec<E>, Vec<E>, Vec<E::Acc>) {
    let n = d.batch * d.height * d.width;
    let z = E::from_acc(E::Acc::ZERO);
    let mut hi = vec![z; n * d.hi_heads * d.head_dim];
    let mut lo = vec![z; n * d.lo_heads * d.head_dim];
    let mut lse = vec![E::Acc::ZERO; n * d.lo_heads];
    let pad = x.pad.as_ref().map(|p| to::<E>(p));
    forward(
        d,
        r,
        scale,
        &to::<E>(&x.hi),
        pad.as_deref(),
        &to::<E>(&x.lq),
        &to::<E>(&x.lkv),
        &mut hi,
        &mut lo,
        &mut lse,
    )
    .unwrap();
    (hi, lo, lse)
}

fn close(got: impl Iterator<Item = f64>, want: &[f64], tol: f64, what: &str) {
    let mut n = 0;
    for (i, (g, &w)) in got.zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
        n += 1;
    }
    assert_eq!(n, want.len(), "{what}: length");
}

#[test]
fn forward_matches_naive_every_level() {
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        for (i, (d, r, pad)) in cases().into_iter().enumerate() {
            let x = inputs(&d, &r, pad, i as u64);
            let scale = 0.7 / (d.head_dim as f64).sqrt();
            let (hi_w, lo_w) = naive(&d, &r, scale, &x);
            let (hi, lo, _) = run_forward::<f64>(&d, &r, scale, &x);
            close(
                hi.iter().copied(),
                &hi_w,
                1e-12,
                &format!("{level:?} case {i} hi f64"),
            );
            close(
                lo.iter().copied(),
                &lo_w,
                1e-12,
                &format!("{level:?} case {i} lo f64"),
            );
            let (hi, lo, _) = run_forward::<f32>(&d, &r, scale, &x);
            close(
                hi.iter().map(|&v| v as f64),
                &hi_w,
                2e-5,
                &format!("{level:?} case {i} hi f32"),
            );
            close(
                lo.iter().map(|&v| v as f64),
                &lo_w,
                2e-5,
                &format!("{level:?} case {i} lo f32"),
            );
        }
    }
    simd::force(None).unwrap();
}

/// The in-place forward against the forward with outputs apart, at every level and for
/// f64, f32 and bf16: the outputs equal bit for bit (the same kernels, the queries only read
/// from another place), the k / v channels and spare row elements of `hi_qkv` untouched.
fn in_place_case<E: Element + PartialEq + std::fmt::Debug>(
    d: &HiloDims,
    r: &HiloRows,
    scale: f64,
    x: &Inputs,
    what: &str,
) where
    E::Acc: PartialEq + std::fmt::Debug,
{
    let n = d.batch * d.height * d.width;
    let (hd, ld) = (d.hi_heads * d.head_dim, d.lo_heads * d.head_dim);
    let (hi, lo, lse) = run_forward::<E>(d, r, scale, x);
    let pad = x.pad.as_ref().map(|p| to::<E>(p));
    let hi_in = to::<E>(&x.hi);
    let mut hi_buf = hi_in.clone();
    let mut lq: Vec<E> = (0..n)
        .flat_map(|t| to::<E>(&x.lq[t * r.lo_q..][..ld]))
        .collect();
    let mut lse2 = vec![E::Acc::ZERO; n * d.lo_heads];
    let dense = HiloRows { lo_q: ld, ..*r };
    if r.lo_q != ld && d.lo_heads > 0 {
        let mut strided = to::<E>(&x.lq);
        let err = forward_in_place(
            d,
            r,
            scale,
            &mut hi_buf.clone(),
            pad.as_deref(),
            &mut strided,
            &to::<E>(&x.lkv),
            &mut lse2,
        );
        assert!(err.is_err(), "{what}: strided in-place queries accepted");
    }
    forward_in_place(
        d,
        &dense,
        scale,
        &mut hi_buf,
        pad.as_deref(),
        &mut lq,
        &to::<E>(&x.lkv),
        &mut lse2,
    )
    .unwrap();
    for t in 0..n {
        let row = &hi_buf[t * r.hi..][..r.hi];
        assert_eq!(&row[..hd], &hi[t * hd..][..hd], "{what}: hi token {t}");
        assert_eq!(
            &row[hd..],
            &hi_in[t * r.hi + hd..][..r.hi - hd],
            "{what}: hi k/v {t}"
        );
    }
    assert_eq!(lq, lo, "{what}: lo");
    assert_eq!(lse2, lse, "{what}: lse");
}

#[test]
fn forward_in_place_equals_forward_every_level() {
    for level in simd::available() {
        simd::force(Some(level)).unwrap();
        for (i, (d, r, pad)) in cases().into_iter().enumerate() {
            let x = inputs(&d, &r, pad, 100 + i as u64);
            let scale = 0.7 / (d.head_dim as f64).sqrt();
            let what = format!("{level:?} case {i}");
            in_place_case::<f64>(&d, &r, scale, &x, &format!("{what} f64"));
            in_place_case::<f32>(&d, &r, scale, &x, &format!("{what} f32"));
            in_place_case::<half::bf16>(&d, &r, scale, &x, &format!("{what} bf16"));
        }
    }
    simd::force(None).unwrap();
}

/// `Σ outputs ⊙ (g_hi, g_lo)`: the scalar whose gradient the backward computes.
fn loss(d: &HiloDims, r: &HiloRows, scale: f64, x: &Inputs, g_hi: &[f64], g_lo: &[f64]) -> f64 {
    let (hi, lo) = naive(d, r, scale, x);
    hi.iter().zip(g_hi).map(|(a, b)| a * b).sum::<f64>()
        + lo.iter().zip(g_lo).map(|(a, b)| a * b).sum::<f64>()
}

#[test]
fn backward_matches_central_differences_every_level() {
    let levels: Vec<Level> = simd::available();
    // Central differences cost two naive passes per input: the large cases are checked
    // against autograd of the reference in the Python tests instead.
    let affordable = |(_, (d, r, _)): &(usize, (HiloDims, HiloRows, bool))| {
        let tokens = d.batch * d.height * d.width;
        tokens * (r.hi + r.lo_q) + d.batch * d.pooled() * r.lo_kv <= 13_000
    };
    for (i, (d, r, pad)) in cases().into_iter().enumerate().filter(affordable) {
        let x = inputs(&d, &r, pad, 100 + i as u64);
        let scale = 0.6 / (d.head_dim as f64).sqrt();
        let n = d.batch * d.height * d.width;
        let mut rng = Rng(7 + i as u64);
        let g_hi = rng.vec(n * d.hi_heads * d.head_dim);
        let g_lo = rng.vec(n * d.lo_heads * d.head_dim);
        let fd = |field: usize, idx: usize| {
            let h = 1e-6;
            let mut xp = Inputs {
                hi: x.hi.clone(),
                pad: x.pad.clone(),
                lq: x.lq.clone(),
                lkv: x.lkv.clone(),
            };
            fn slot(xs: &mut Inputs, field: usize, idx: usize) -> &mut f64 {
                match field {
                    0 => &mut xs.hi[idx],
                    1 => &mut xs.pad.as_mut().unwrap()[idx],
                    2 => &mut xs.lq[idx],
                    _ => &mut xs.lkv[idx],
                }
            }
            *slot(&mut xp, field, idx) += h;
            let up = loss(&d, &r, scale, &xp, &g_hi, &g_lo);
            *slot(&mut xp, field, idx) -= 2.0 * h;
            let down = loss(&d, &r, scale, &xp, &g_hi, &g_lo);
            (up - down) / (2.0 * h)
        };
        // Central differences once per case (the float64 naive loss), shared by every level.
        let fields = [
            (0usize, x.hi.len(), r.hi, 3 * d.hi_heads * d.head_dim),
            (2, x.lq.len(), r.lo_q, d.lo_heads * d.head_dim),
            (3, x.lkv.len(), r.lo_kv, 2 * d.lo_heads * d.head_dim),
        ];
        let want: Vec<Vec<Option<f64>>> = fields
            .iter()
            .map(|&(field, len, stride, width)| {
                (0..len)
                    .map(|idx| (width > 0 && idx % stride < width).then(|| fd(field, idx)))
                    .collect()
            })
            .collect();
        let want_pad: Vec<f64> = x
            .pad
            .as_ref()
            .map_or(vec![], |p| (0..p.len()).map(|i| fd(1, i)).collect());
        for &level in &levels {
            simd::force(Some(level)).unwrap();
            let (_, lo, lse) = run_forward::<f64>(&d, &r, scale, &x);
            let mut dhi = vec![f64::NAN; x.hi.len()];
            let mut dpad = vec![f64::NAN; x.pad.as_ref().map_or(0, |p| p.len())];
            let mut dlq = vec![f64::NAN; x.lq.len()];
            let mut dlkv = vec![f64::NAN; x.lkv.len()];
            backward(
                &d,
                &r,
                scale,
                &x.hi,
                x.pad.as_deref(),
                &x.lq,
                &x.lkv,
                &lo,
                &lse,
                &g_hi,
                &g_lo,
                &mut dhi,
                &mut dpad,
                &mut dlq,
                &mut dlkv,
            )
            .unwrap();
            // Channels the layout addresses get the gradient; the gaps stay untouched.
            for ((field, _, _, _), (grads, want)) in fields
                .iter()
                .zip([&dhi, &dlq, &dlkv].into_iter().zip(&want))
            {
                for (idx, (&g, w)) in grads.iter().zip(want).enumerate() {
                    match w {
                        Some(w) => assert!(
                            (g - w).abs() < 1e-6 * (1.0 + w.abs()),
                            "{level:?} case {i} field {field}[{idx}]: {g} vs {w}"
                        ),
                        None => assert!(
                            g.is_nan(),
                            "{level:?} case {i} field {field}[{idx}] written outside its channels"
                        ),
                    }
                }
            }
            for (idx, w) in want_pad.iter().enumerate() {
                assert!(
                    (dpad[idx] - w).abs() < 1e-6 * (1.0 + w.abs()),
                    "{level:?} case {i} pad[{idx}]"
                );
            }
        }
    }
    simd::force(None).unwrap();
}

#[test]
fn bad_arguments_are_errors() {
    let d = HiloDims {
        batch: 1,
        height: 4,
        width: 4,
        window: 2,
        head_dim: 4,
        hi_heads: 1,
        lo_heads: 1,
    };
    let r = HiloRows {
        hi: 12,
        lo_q: 4,
        lo_kv: 8,
    };
    let (hi, lq, lkv) = (vec![0f32; 16 * 12], vec![0f32; 16 * 4], vec![0f32; 4 * 8]);
    let (mut ho, mut lo, mut lse) = (vec![0f32; 64], vec![0f32; 64], vec![0f32; 16]);
    let mut call = |d: &HiloDims, r: &HiloRows, hi: &[f32], lkv: &[f32]| {
        forward(d, r, 0.5, hi, None, &lq, lkv, &mut ho, &mut lo, &mut lse)
    };
    assert!(call(&d, &r, &hi, &lkv).is_ok());
    assert!(matches!(
        call(&d, &r, &hi[1..], &lkv),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        call(&d, &r, &hi, &lkv[1..]),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        call(&HiloDims { window: 0, ..d }, &r, &hi, &lkv),
        Err(KernelError::Argument(_))
    ));
    assert!(matches!(
        call(&HiloDims { window: 9, ..d }, &r, &hi, &lkv),
        Err(KernelError::Argument(_))
    ));
    assert!(matches!(
        call(&d, &HiloRows { hi: 11, ..r }, &hi, &lkv),
        Err(KernelError::Argument(_))
    ));
    let huge = HiloDims {
        batch: usize::MAX / 4,
        ..d
    };
    assert!(call(&huge, &r, &hi, &lkv).is_err());
}
