"""Block-size sweep of the Triton kernels and the largest n that fits, on one GPU.

    python benchmarks/triton_tuning.py     # prints tables, writes JSON (see NOTES.md)
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402
from dilated_attention.backends import triton as tk  # noqa: E402
from dilated_attention.plan import useful_flops  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
FWD = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 3)],
       128: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3)]}
BWD = [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 1), (64, 64, 8, 3)]


def bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def main():
    out, results = os.environ.get("OUT", "bench-results"), {"fwd": [], "bwd": [], "fits": []}
    n, h = 1 << 20, 12
    for d, configs in FWD.items():
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = useful_flops(n, h, d, SEGS, RATES)
        for cfg in configs:
            tk._config = lambda _d, cfg=cfg: cfg
            try:
                ms = bench(lambda: dilated_attention(q, k, v, SEGS, RATES))
            except Exception as e:  # a config can exceed shared memory
                print(f"fwd d={d} {cfg}: {type(e).__name__}")
                continue
            results["fwd"].append({"d": d, "config": cfg, "ms": ms, "tflops": flops / ms / 1e9})
            print(f"fwd d={d} {cfg}: {ms:.2f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    tk._config = lambda d: (128, 64, 4, 3) if d <= 64 else (128, 64, 8, 2)
    d = 64
    q, k, v, do = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(4))
    o = dilated_attention(q, k, v, SEGS, RATES)
    flops = useful_flops(n, h, d, SEGS, RATES) * 5 // 2
    for cfg in BWD:
        tk._bwd_config = lambda _d, cfg=cfg: cfg
        try:
            ms = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
        except Exception as e:
            print(f"bwd {cfg}: {type(e).__name__}")
            continue
        results["bwd"].append({"d": d, "config": cfg, "ms": ms, "tflops": flops / ms / 1e9})
        print(f"bwd d={d} {cfg}: {ms:.2f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    q = k = v = do = o = None  # free before the size probes
    for backward, sizes in ((False, [4 << 20, 6 << 20, 8 << 20]), (True, [2 << 20, 3 << 20, 4 << 20])):
        for n in sizes:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                q, k, v = (torch.randn(1, n, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                           for _ in range(3))
                o = dilated_attention(q, k, v, SEGS, RATES)
                if backward:
                    torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
                torch.cuda.synchronize()
                ok = True
            except torch.OutOfMemoryError:
                ok = False
            peak = torch.cuda.max_memory_allocated() / 2**30
            results["fits"].append({"n": n, "backward": backward, "fits": ok, "peak_gib": peak})
            print(f"{'fwd+bwd' if backward else 'fwd'} n={n}: {'fits' if ok else 'OOM'}, peak {peak:.1f} GiB", flush=True)
            q = k = v = o = None
    with open(os.path.join(out, "triton-tuning.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
