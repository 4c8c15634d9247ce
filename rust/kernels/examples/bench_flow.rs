//! fp32 Flow-Attention timings (B=1, H=8, D=64), forward and backward, causal and not.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p fastattn-kernels --example bench_flow [T...]`
//! `BENCH_CAUSAL=0|1` keeps one form, `BENCH_FWD_ONLY=1` skips the backward.
//! Prints the best of several runs. GFLOP/s counts the 4·T·D·Dv of the two state GEMMs
//! (backward: 2.5× that).

#[global_allocator]
static ALLOC: fastattn_kernels::alloc::CacheLineAligned = fastattn_kernels::alloc::CacheLineAligned;

use fastattn_kernels::flow::{backward, forward, FlowDims};
use std::time::Instant;

fn best_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let ts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ts = if ts.is_empty() {
        vec![1024, 4096, 16384]
    } else {
        ts
    };
    let (b, h, d) = (1, 8, 64);
    println!("threads={}", rayon::current_num_threads());
    let fwd_only = std::env::var_os("BENCH_FWD_ONLY").is_some();
    let causals: Vec<bool> = match std::env::var("BENCH_CAUSAL").as_deref() {
        Ok("0") => vec![false],
        Ok("1") => vec![true],
        _ => vec![false, true],
    };
    for &t in &ts {
        for &causal in &causals {
            let dims = FlowDims {
                batch: b,
                q_len: t,
                kv_len: t,
                heads: h,
                head_dim: d,
                v_head_dim: d,
            };
            let len = b * t * h * d;
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut out = vec![0f32; len];
            let (mut dq, mut dk, mut dv) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
            let fwd = best_ms(5, || {
                forward(&dims, causal, 1e-6, &x, &x, &x, &mut out).unwrap()
            });
            let gf = 4.0 * (b * h * t * d * d) as f64 / 1e9;
            print!(
                "T={t:<6} causal={causal:<5} fwd {fwd:8.2} ms {:6.1} GFLOP/s",
                gf / fwd * 1e3
            );
            if !fwd_only {
                let bwd = best_ms(3, || {
                    backward(
                        &dims, causal, 1e-6, &x, &x, &x, &x, &mut dq, &mut dk, &mut dv,
                    )
                    .unwrap()
                });
                print!("   bwd {bwd:8.2} ms {:6.1} GFLOP/s", 2.5 * gf / bwd * 1e3);
            }
            println!();
        }
    }
}
