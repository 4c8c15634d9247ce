"""torch reference timings for examples/bench_attention.rs (fp32, 2 threads, best of N).

.venv/bin/python rust/kernels/examples/torch_sdpa_times.py [T ...]
"""
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def best_ms(reps, f):
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ts = [int(a) for a in sys.argv[1:]] or [512, 2048, 8192]
    b, h, d = 1, 8, 64
    n = 2048
    a = torch.randn(n, n)
    c = torch.randn(n, n)
    mm = best_ms(5, lambda: a @ c)
    print(f"threads={torch.get_num_threads()} matmul {n}^3: {mm:.2f} ms, {2 * n**3 / mm / 1e6:.1f} GFLOP/s")
    print(f"{'T':>6} {'causal':>6} {'fwd ms':>10} {'GFLOP/s':>9} {'bwd ms':>10} {'GFLOP/s':>9}")
    for t in ts:
        for causal in (False, True):
            q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
            dout = torch.randn(b, h, t, d)
            reps = 3 if t >= 8192 else 5 if t >= 2048 else 20

            def fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def fwd_bwd():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                torch.autograd.grad(o, (q, k, v), dout)

            f_ms = best_ms(reps, fwd)
            fb_ms = best_ms(reps, fwd_bwd)
            b_ms = fb_ms - f_ms
            flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
            print(f"{t:>6} {str(causal):>6} {f_ms:>10.2f} {flops / f_ms / 1e6:>9.1f} {b_ms:>10.2f} {2.5 * flops / b_ms / 1e6:>9.1f}")


if __name__ == "__main__":
    main()
