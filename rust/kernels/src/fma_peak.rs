//! This machine's fp32 arithmetic limit, measured: every thread of the current pool runs
//! independent chains of vector FMAs (`acc = acc·a + b`) at a SIMD level, and the rate is
//! FLOPs done over wall time. Benchmarks report kernels as a share of it, next to the share
//! of torch's matmul rate, which on some CPUs sits far below the hardware (see `docs/`).
//!
//! What keeps the figure honest:
//! * more chains than FMA latency × FMA ports (4 × 2 on current x86 cores), so the loop is
//!   throughput-bound, not latency-bound;
//! * each chain starts from a different value read through `black_box`, so the compiler
//!   cannot prove two chains equal and merge them (which would count FLOPs never executed);
//! * `a` and `b` also come through `black_box`, and the chains converge to `b / (1 − a)`,
//!   so values stay normal (no denormal slow path, no overflow) however long the loop runs.
//!
//! The scalar level has no FMA in the baseline target: it measures separate vector
//! multiplies and adds (SSE2 on x86-64), two FLOPs per lane per pair.

use crate::simd::{self, Level};
use crate::KernelError;
use std::hint::black_box;
use std::time::Instant;

/// Independent accumulator chains per thread, by level (registers permitting: 16 zmm or
/// NEON registers of 32; 12 ymm or xmm of 16, with `a` and `b` in two more).
pub fn chains(level: Level) -> usize {
    match level {
        Level::Avx2 | Level::Scalar => 12,
        _ => 16,
    }
}

/// f32 lanes of one chain's vector.
pub fn lanes(level: Level) -> usize {
    match level {
        Level::Avx512 => 16,
        Level::Avx2 => 8,
        Level::Neon | Level::Scalar => 4,
    }
}

/// FLOPs of one [`burst`] of `iters` rounds at `level`.
pub fn burst_flops(level: Level, iters: u64) -> f64 {
    2.0 * (chains(level) * lanes(level)) as f64 * iters as f64
}

/// Runs `iters` rounds of every chain on this thread: lane `l` of chain `c` starts at
/// `seed + c + l / 64` and steps `x = x·a + b`. Returns the sum over every lane's final value
/// (so no chain is dead code, and tests can check the rounds ran).
pub fn burst(level: Level, iters: u64, seed: f32, a: f32, b: f32) -> Result<f32, KernelError> {
    if !simd::supported(level) {
        return Err(KernelError::Argument(format!(
            "SIMD level `{}` is not supported by this CPU",
            level.name()
        )));
    }
    let mut start = [0f32; 16 * 16];
    let (nc, nl) = (chains(level), lanes(level));
    for c in 0..nc {
        for l in 0..nl {
            start[c * nl + l] = seed + c as f32 + l as f32 / 64.0;
        }
    }
    let start = black_box(start);
    let (a, b) = (black_box(a), black_box(b));
    Ok(match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level's features were checked above.
        Level::Avx512 => unsafe { x86::avx512(iters, &start, a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { x86::avx2(iters, &start, a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Level::Neon => unsafe { arm::neon(iters, &start, a, b) },
        #[cfg(target_arch = "x86_64")]
        _ => x86::sse2(iters, &start, a, b),
        #[cfg(not(target_arch = "x86_64"))]
        _ => portable(iters, &start, a, b),
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn portable(iters: u64, start: &[f32; 256], a: f32, b: f32) -> f32 {
    let mut acc = [[0f32; 4]; 12];
    for (c, chain) in acc.iter_mut().enumerate() {
        chain.copy_from_slice(&start[c * 4..c * 4 + 4]);
    }
    for _ in 0..iters {
        for chain in acc.iter_mut() {
            for x in chain.iter_mut() {
                *x = *x * a + b;
            }
        }
    }
    acc.iter().flatten().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The baseline x86-64 level: SSE2 multiplies and adds, written out because the
    /// compiler's own vectorisation of the portable loop shuffled lanes through the stack.
    pub(super) fn sse2(iters: u64, start: &[f32; 256], a: f32, b: f32) -> f32 {
        // SAFETY: SSE2 is part of every x86-64 CPU; loads stay inside `start`.
        unsafe {
            let (va, vb) = (_mm_set1_ps(a), _mm_set1_ps(b));
            let mut acc = [_mm_setzero_ps(); 12];
            for (c, x) in acc.iter_mut().enumerate() {
                *x = _mm_loadu_ps(start.as_ptr().add(c * 4));
            }
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm_add_ps(_mm_mul_ps(*x, va), vb);
                }
            }
            let mut lanes = [0f32; 4];
            let mut total = 0.0;
            for x in acc {
                _mm_storeu_ps(lanes.as_mut_ptr(), x);
                total += lanes.iter().sum::<f32>();
            }
            total
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(iters: u64, start: &[f32; 256], a: f32, b: f32) -> f32 {
        let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
        let mut acc = [_mm512_setzero_ps(); 16];
        for (c, x) in acc.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(start.as_ptr().add(c * 16));
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, va, vb);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(iters: u64, start: &[f32; 256], a: f32, b: f32) -> f32 {
        let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let mut acc = [_mm256_setzero_ps(); 12];
        for (c, x) in acc.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(start.as_ptr().add(c * 8));
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, va, vb);
            }
        }
        let mut lanes = [0f32; 8];
        let mut total = 0.0;
        for x in acc {
            _mm256_storeu_ps(lanes.as_mut_ptr(), x);
            total += lanes.iter().sum::<f32>();
        }
        total
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn neon(iters: u64, start: &[f32; 256], a: f32, b: f32) -> f32 {
        let (va, vb) = (vdupq_n_f32(a), vdupq_n_f32(b));
        let mut acc = [vdupq_n_f32(0.0); 16];
        for (c, x) in acc.iter_mut().enumerate() {
            *x = vld1q_f32(start.as_ptr().add(c * 4));
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = vfmaq_f32(vb, *x, va);
            }
        }
        acc.iter().map(|&x| vaddvq_f32(x)).sum()
    }
}

/// A measured peak.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    /// FLOPs per second over all threads.
    pub flops_per_s: f64,
    pub level: Level,
    pub threads: usize,
}

/// Measures the peak at the active SIMD level on every thread of the current rayon pool:
/// `rounds` broadcasts (the best one counts), each sized to take about `seconds / rounds`.
pub fn measure(seconds: f64, rounds: usize) -> Result<Peak, KernelError> {
    let level = simd::active();
    let threads = rayon::current_num_threads().max(1);
    let run = |iters: u64| -> Result<f64, KernelError> {
        let t = Instant::now();
        let sums = rayon::broadcast(|ctx| burst(level, iters, ctx.index() as f32, 0.999_999, 1e-7));
        let elapsed = t.elapsed().as_secs_f64().max(1e-9);
        for s in sums {
            black_box(s?);
        }
        Ok(burst_flops(level, iters) * threads as f64 / elapsed)
    };
    // Calibrate on a short burst (which also wakes every thread), then size the rounds.
    let probe = 20_000;
    let rate = run(probe)?;
    let per_round = (seconds / rounds.max(1) as f64).max(1e-3);
    let iters =
        ((rate / threads as f64) * per_round / burst_flops(level, 1)).max(probe as f64) as u64;
    let mut best = 0f64;
    for _ in 0..rounds.max(1) {
        best = best.max(run(iters)?);
    }
    Ok(Peak {
        flops_per_s: best,
        level,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sum of every lane after `iters` rounds, computed one lane at a time in f64.
    fn expected(level: Level, iters: u64, seed: f32, a: f32, b: f32) -> f64 {
        let mut total = 0.0;
        for c in 0..chains(level) {
            for l in 0..lanes(level) {
                let mut x = (seed + c as f32 + l as f32 / 64.0) as f64;
                for _ in 0..iters {
                    x = x * a as f64 + b as f64;
                }
                total += x;
            }
        }
        total
    }

    /// Every level runs the rounds and chains it claims: with a = 1/2, b = 1/4 and a few
    /// rounds each step is exact, so the sum equals the lane-by-lane simulation (a skipped
    /// round, chain or lane changes it).
    #[test]
    fn bursts_run_every_chain_and_round() {
        for level in simd::available() {
            for iters in [0u64, 1, 3, 7] {
                let got = burst(level, iters, 1.5, 0.5, 0.25).unwrap() as f64;
                let want = expected(level, iters, 1.5, 0.5, 0.25);
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs(),
                    "{level:?} {iters}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn measure_reports_a_positive_rate_on_the_active_level() {
        let peak = measure(0.02, 2).unwrap();
        assert!(peak.flops_per_s.is_finite() && peak.flops_per_s > 0.0);
        assert_eq!(peak.level, simd::active());
    }
}
