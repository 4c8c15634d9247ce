//! fp32 causal linear-attention timings (fla defaults: normalize, scale D^-0.5; B=1, H=8,
//! D=64), forward and backward.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p fastattn-kernels --example bench_linear [T...]`
//! Prints the best of several runs; GFLOP/s counts `T·(4·D·Dv + 64·2·D)` per head as the
//! table does (backward: 2.5× that).

#[global_allocator]
static ALLOC: fastattn_kernels::alloc::CacheLineAligned = fastattn_kernels::alloc::CacheLineAligned;

use fastattn_kernels::linear::{backward, forward, FeatureMap, LinearDims, LinearOpts};
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

/// `len` values of `buf` from a 64-byte boundary, as torch aligns its tensors.
fn aligned(buf: &mut [f32], len: usize) -> &mut [f32] {
    let a = (16 - (buf.as_ptr() as usize % 64) / 4) % 16;
    &mut buf[a..a + len]
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
    let (h, d) = (8, 64);
    let opts = LinearOpts {
        scale: 0.125,
        causal: true,
        normalize: true,
        feature_map: FeatureMap::Identity,
    };
    println!("threads={}", rayon::current_num_threads());
    for &t in &ts {
        let dims = LinearDims {
            batch: 1,
            seq_len: t,
            heads: h,
            head_dim: d,
            v_head_dim: d,
        };
        let len = t * h * d;
        // distinct q/k/v, as a real call reads three tensors, not one
        let input = |seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + seed) % 1000) as f32 / 1000.0)
                .collect()
        };
        let (q, k, v) = (input(0), input(1), input(2));
        let x = &q;
        let fresh = std::env::var_os("BENCH_FRESH_OUT").is_some();
        let mut out = vec![0f32; len + 16];
        let (mut dq, mut dk, mut dv) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        let fwd = best_ms(5, || {
            // BENCH_FRESH_OUT: a new output per call, as the Python bindings allocate one
            // (a fresh mapping whose pages fault on first write)
            let mut fresh_out = if fresh {
                vec![0f32; len + 16]
            } else {
                Vec::new()
            };
            let out = aligned(if fresh { &mut fresh_out } else { &mut out }, len);
            forward(
                &dims,
                &opts,
                None,
                &q,
                &k,
                &v,
                None,
                None,
                out,
                &mut [],
                &mut [],
            )
            .unwrap()
        });
        let bwd = best_ms(3, || {
            // BENCH_FRESH_OUT: fresh gradients too, as autograd allocates them
            // (not `vec![vec![..]; 3]`: its clones would write every page before the call)
            let mut fresh_g: Vec<Vec<f32>> = (0..if fresh { 3 } else { 0 })
                .map(|_| vec![0f32; len])
                .collect();
            let (dq, dk, dv) = match &mut fresh_g[..] {
                [a, b, c] => (a, b, c),
                _ => (&mut dq, &mut dk, &mut dv),
            };
            backward(
                &dims,
                &opts,
                None,
                &q,
                &k,
                &v,
                None,
                None,
                x,
                None,
                None,
                dq,
                dk,
                dv,
                &mut [],
                &mut [],
            )
            .unwrap()
        });
        let gf = (h * t * (4 * d * d + 64 * 2 * d)) as f64 / 1e9;
        println!(
            "T={t:<6} fwd {fwd:8.2} ms {:6.1} GFLOP/s   bwd {bwd:8.2} ms {:6.1} GFLOP/s",
            gf / fwd * 1e3,
            2.5 * gf / bwd * 1e3
        );
    }
}
