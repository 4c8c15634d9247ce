//! Single-thread rate of the packed small GEMM at each SIMD level, on attention-sized
//! tiles (`cargo run --release -p fastattn-kernels --example bench_gemm`).

use fastattn_kernels::gemm::{gemm, GemmDims, NR};
use fastattn_kernels::simd;
use std::time::Instant;

fn main() {
    for level in simd::available() {
        for &(m, n, k, csa) in &[
            (64, 64, 64, 1),
            (64, 128, 64, 1),
            (96, 128, 64, 1),
            (64, 64, 128, 1),
            (64, 64, 64, 64),
        ] {
            let a = vec![0.5f32; m * k.max(csa * k)];
            let b = vec![0.25f32; n * k];
            let mut c = vec![0f32; m * n];
            let rsa = if csa == 1 { k } else { 1 };
            let d = GemmDims {
                m,
                npanels: n / NR,
                k,
                rsa,
                csa,
                bps: k * NR,
                ldc: n,
                accumulate: true,
            };
            let iters = 20000;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..iters {
                    gemm(level, &d, &a, &b, &mut c);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gf = 2.0 * (m * n * k * iters) as f64 / best / 1e9;
            println!(
                "{:>7} m={m:>3} n={n:>3} k={k:>3} csa={csa:>2}: {gf:6.1} GFLOP/s",
                level.name()
            );
        }
    }
}
