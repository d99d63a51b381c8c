"""Block-size sweep of the Triton kernels on one GPU, LongNet schedule, bf16, h = 12.

    python benchmarks/triton_tuning.py     # prints a table, writes $OUT/triton-tuning.json (see NOTES.md)

Forward configs at n = 128K and 1M (d = 64) and 1M (d = 128); backward configs at 1M.
The first config of each list is the one in use; the others are timed against it.
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
FWD = {64: [tk._config(64, torch.bfloat16), (128, 128, 8, 3), (128, 64, 4, 4), (128, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
       128: [tk._config(128, torch.bfloat16), (128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)]}
BWD = [tk._bwd_config(64, torch.bfloat16), (64, 64, 4, 2), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)]


def bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main():
    out, results = os.environ.get("OUT", "bench-results"), {"fwd": [], "bwd": []}
    default_fwd, default_bwd, h = tk._config, tk._bwd_config, 12
    for d, n in ((64, 1 << 17), (64, 1 << 20), (128, 1 << 20)):
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = useful_flops(n, h, d, SEGS, RATES)
        for cfg in FWD[d]:
            tk._config = lambda _d, _dtype, cfg=cfg: cfg
            try:
                ms = bench(lambda: dilated_attention(q, k, v, SEGS, RATES))
            except Exception as e:  # a config can exceed shared memory
                print(f"fwd d={d} n={n} {cfg}: {type(e).__name__}")
                continue
            results["fwd"].append({"d": d, "n": n, "config": cfg, "ms": ms, "tflops": flops / ms / 1e9})
            print(f"fwd d={d} n={n} {cfg}: {ms:.2f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
        tk._config = default_fwd
    d, n = 64, 1 << 20
    q, k, v, do = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(4))
    o = dilated_attention(q, k, v, SEGS, RATES)
    flops = useful_flops(n, h, d, SEGS, RATES) * 5 // 2
    for cfg in BWD:
        tk._bwd_config = lambda _d, _dtype, cfg=cfg: cfg
        try:
            ms = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
        except Exception as e:
            print(f"bwd {cfg}: {type(e).__name__}")
            continue
        results["bwd"].append({"d": d, "n": n, "config": cfg, "ms": ms, "tflops": flops / ms / 1e9})
        print(f"bwd d={d} n={n} {cfg}: {ms:.2f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    tk._bwd_config = default_bwd
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "triton-tuning.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
