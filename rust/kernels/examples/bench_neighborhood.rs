//! fp32 neighborhood-attention timings for the benchmark table's shapes and a few more.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p fastattn-kernels --example bench_neighborhood`
//! Prints the best of several runs. Useful FLOPs of a forward: `4·B·H·N·prod(k)·D`; the
//! forward+backward figure counts 3.5× that (2 GEMMs forward, 5 backward).

#[global_allocator]
static ALLOC: fastattn_kernels::alloc::CacheLineAligned = fastattn_kernels::alloc::CacheLineAligned;

use fastattn_kernels::neighborhood::{backward, forward, NaDims, NaParams};
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

#[allow(clippy::type_complexity)]
fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    println!(
        "threads={} simd={:?}",
        rayon::current_num_threads(),
        fastattn_kernels::simd::active()
    );
    // (name, batch, spatial, heads, d, kernel, dilation)
    let shapes: &[(&str, usize, &[usize], usize, usize, usize, usize)] = &[
        ("na1d L=4096 k=63 D=64", 1, &[4096], 4, 64, 63, 1),
        ("na2d 64x64 k=13 D=64", 1, &[64, 64], 4, 64, 13, 1),
        ("na2d 56x56 k=7 D=32", 1, &[56, 56], 4, 32, 7, 1),
        ("na2d 128x128 k=7 d=2 D=32 B=2", 2, &[128, 128], 4, 32, 7, 2),
        ("na3d 8x16x16 k=3 D=64", 1, &[8, 16, 16], 4, 64, 3, 1),
        ("na1d L=4096 k=13 D=64", 1, &[4096], 4, 64, 13, 1),
        ("na2d 32x32 k=5 D=64", 1, &[32, 32], 4, 64, 5, 1),
        ("na2d 48x48 k=11 D=32", 1, &[48, 48], 4, 32, 11, 1),
        ("na2d 48x48 k=9 D=32", 1, &[48, 48], 4, 32, 9, 1),
        ("na2d 64x64 k=3 D=32", 1, &[64, 64], 4, 32, 3, 1),
        ("na3d 16x16x16 k=3 D=32", 1, &[16, 16, 16], 4, 32, 3, 1),
        ("na3d 12x24x24 k=3 d=2 D=32", 1, &[12, 24, 24], 4, 32, 3, 2),
        ("na3d 8x32x32 k=4 D=32", 1, &[8, 32, 32], 4, 32, 4, 1),
        ("na3d 8x20x20 k=3 D=128", 1, &[8, 20, 20], 2, 128, 3, 1),
    ];
    // BENCH_EXTRA="8x32x32:3:64:4:1" (spatial : kernel : head dim : heads : dilation) times
    // that shape alone instead (for trying shapes not listed).
    let extra = std::env::var("BENCH_EXTRA").ok().map(|e| {
        let f: Vec<&str> = e.split(':').collect();
        let sp: Vec<usize> = f[0].split('x').map(|x| x.parse().unwrap()).collect();
        let num = |i: usize| f[i].parse::<usize>().unwrap();
        (sp, num(1), num(2), num(3), num(4))
    });
    let extra_shape = extra
        .as_ref()
        .map(|(sp, k, d, h, dil)| ("extra", 1, sp.as_slice(), *h, *d, *k, *dil));
    let shapes = match &extra_shape {
        Some(x) => std::slice::from_ref(x),
        None => shapes,
    };
    println!(
        "{:<32} {:>9} {:>9} {:>11} {:>9}",
        "shape", "fwd ms", "GFLOP/s", "fwd+bwd ms", "GFLOP/s"
    );
    // BENCH_ONLY=substring restricts the run to matching shapes (for profiling one case).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    for &(name, b, sp, h, d, k, dil) in shapes {
        if !name.contains(only.as_str()) {
            continue;
        }
        let r = sp.len();
        let dims = NaDims::new(b, sp, h, h, d, d, 0);
        let params = NaParams::new(
            &vec![k; r],
            &vec![1; r],
            &vec![dil; r],
            &vec![false; r],
            1.0 / (d as f64).sqrt(),
        );
        let n: usize = sp.iter().product();
        let len = b * n * h * d;
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let (q, kk, v, dout) = (x.clone(), x.clone(), x.clone(), x.clone());
        let mut out = vec![0f32; len];
        let mut lse = vec![0f32; b * n * h];
        let (mut dq, mut dk, mut dv) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        let flops = 4.0 * (b * h * n * k.pow(r as u32) * d) as f64;
        let fwd = |out: &mut [f32], lse: &mut [f32]| {
            forward(&dims, &params, &q, &kk, &v, &[], &[], out, lse).unwrap()
        };
        let bwd = |out: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]| {
            backward(
                &dims,
                &params,
                &q,
                &kk,
                &v,
                &[],
                &[],
                out,
                &dout,
                lse,
                dq,
                dk,
                dv,
                &mut [],
                &mut [],
            )
            .unwrap()
        };
        // BENCH_BWD_ONLY=1 times the backward alone, BENCH_FWD_ONLY=1 the forward alone
        // (for profiling one of them).
        let bwd_only = std::env::var_os("BENCH_BWD_ONLY").is_some();
        let fwd_only = std::env::var_os("BENCH_FWD_ONLY").is_some();
        let f_ms = best_ms(if bwd_only { 0 } else { reps }, || fwd(&mut out, &mut lse));
        if bwd_only {
            let b_ms = best_ms(reps, || bwd(&out, &lse, &mut dq, &mut dk, &mut dv));
            println!(
                "{name:<32} bwd {b_ms:9.2} ms {:9.1} GFLOP/s",
                2.5 * flops / b_ms / 1e6
            );
            continue;
        }
        let fb_ms = best_ms(if fwd_only { 0 } else { reps }, || {
            if !fwd_only {
                fwd(&mut out, &mut lse);
                bwd(&out, &lse, &mut dq, &mut dk, &mut dv);
            }
        });
        println!(
            "{:<32} {:>9.2} {:>9.1} {:>11.2} {:>9.1}",
            name,
            f_ms,
            flops / f_ms / 1e6,
            fb_ms,
            3.5 * flops / fb_ms / 1e6
        );
    }
}
