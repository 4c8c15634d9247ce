//! fp32 dense attention timings (forward, backward) for the benchmark table's shapes.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p fastattn-kernels --example bench_attention [T...]
//! [fwd|bwd] [bf16|f16]` (default: fp32, both passes, T = 512 2048 8192).
//! Prints the best of several runs (the machine is shared, so the minimum is the signal).
//! Compare with `examples/torch_sdpa_times.py`.

#[global_allocator]
static ALLOC: fastattn_kernels::alloc::CacheLineAligned = fastattn_kernels::alloc::CacheLineAligned;

use fastattn_kernels::attention::{backward, forward, AttnDims};
use fastattn_kernels::Element;
use half::{bf16, f16};
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "bf16") {
        run::<bf16>(&args, "bf16")
    } else if args.iter().any(|a| a == "f16") {
        run::<f16>(&args, "f16")
    } else {
        run::<f32>(&args, "f32")
    }
}

fn run<E: Element<Acc = f32>>(args: &[String], dtype: &str) {
    let ts: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    // `fwd` / `bwd` restrict the run (for profiling one pass).
    let (do_fwd, do_bwd) = match (
        args.iter().any(|a| a == "fwd"),
        args.iter().any(|a| a == "bwd"),
    ) {
        (true, false) => (true, false),
        (false, true) => (false, true),
        _ => (true, true),
    };
    let ts = if ts.is_empty() {
        vec![512, 2048, 8192]
    } else {
        ts
    };
    let (b, h, d) = (1usize, 8usize, 64usize);
    println!(
        "dtype={dtype} threads={} simd={:?}",
        rayon::current_num_threads(),
        fastattn_kernels::simd::active()
    );
    println!(
        "{:>6} {:>6} {:>10} {:>9} {:>10} {:>9}",
        "T", "causal", "fwd ms", "GFLOP/s", "bwd ms", "GFLOP/s"
    );
    for &t in &ts {
        for causal in [false, true] {
            let dims = AttnDims {
                batch: b,
                q_len: t,
                kv_len: t,
                q_heads: h,
                kv_heads: h,
                head_dim: d,
                v_head_dim: d,
            };
            let n = b * t * h * d;
            let mut s = 0x1234_5678u32;
            let mut rnd = || {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                E::from_acc(s as f32 / u32::MAX as f32 * 2.0 - 1.0)
            };
            let q: Vec<E> = (0..n).map(|_| rnd()).collect();
            let k: Vec<E> = (0..n).map(|_| rnd()).collect();
            let v: Vec<E> = (0..n).map(|_| rnd()).collect();
            let dout: Vec<E> = (0..n).map(|_| rnd()).collect();
            let zero = E::from_acc(0.0);
            let mut out = vec![zero; n];
            let mut lse = vec![0f32; b * t * h];
            let (mut dq, mut dk, mut dv) = (vec![zero; n], vec![zero; n], vec![zero; n]);
            let scale = 1.0 / (d as f64).sqrt();
            let reps = if t >= 8192 {
                3
            } else if t >= 2048 {
                5
            } else {
                20
            };
            let fwd = best_ms(if do_fwd { reps } else { 0 }, || {
                forward(&dims, scale, causal, &q, &k, &v, &mut out, &mut lse).unwrap()
            });
            let fwd = if do_fwd { fwd } else { f64::NAN };
            let bwd = if do_bwd {
                best_ms(reps, || {
                    backward(
                        &dims, scale, causal, &q, &k, &v, &out, &dout, &lse, &mut dq, &mut dk,
                        &mut dv,
                    )
                    .unwrap()
                })
            } else {
                f64::NAN
            };
            let flops = 4.0 * (b * h * t * t * d) as f64 * if causal { 0.5 } else { 1.0 };
            println!(
                "{:>6} {:>6} {:>10.2} {:>9.1} {:>10.2} {:>9.1}",
                t,
                causal,
                fwd,
                flops / fwd / 1e6,
                bwd,
                2.5 * flops / bwd / 1e6
            );
        }
    }
}
