"""Block-size sweep of the per-branch Triton kernels on one GPU (the fused path switched off), LongNet
schedule, h = 12; the configs the causal plans, head_groups mode and the ring run.

    python benchmarks/triton_tuning.py [--dtype bfloat16] [--n 1048576] [--head-dims 64 128]
        # prints a table, writes $OUT/triton-tuning.json (see NOTES.md)

Forward and backward configs at d = 64 and d = 128, causal. The first config
of each list is the one in use; the others are timed against it.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402
from dilated_attention.backends import triton as tk  # noqa: E402
from dilated_attention.backends import triton_fused  # noqa: E402
from dilated_attention.plan import useful_flops  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
CANDIDATES = {  # dtype: (forward configs by d, backward configs by d), besides the one in use
    torch.bfloat16: ({64: [(128, 128, 8, 3), (128, 64, 4, 4), (128, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
                      128: [(128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)]},
                     {64: [(64, 64, 4, 2), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
                      128: [(64, 64, 4, 3), (64, 32, 8, 3), (32, 64, 8, 3)]}),
    torch.float32: ({64: [(128, 64, 4, 2), (128, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3)],
                     128: [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)]},
                    {64: [(64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 4, 1), (64, 32, 4, 1)],
                     128: [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1), (16, 64, 4, 2), (16, 32, 4, 2)]}),
}


def bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    a = p.parse_args()
    dtype, n, h = getattr(torch, a.dtype), a.n, 12
    fwd_candidates, bwd_candidates = CANDIDATES[dtype]
    out, results = os.environ.get("OUT", "bench-results"), {"dtype": a.dtype, "fwd": [], "bwd": []}
    default_fwd, default_bwd, tiling = tk._config, tk._bwd_configs, triton_fused.tiling
    triton_fused.tiling = lambda *args: 0  # every plan branch by branch
    for d in a.head_dims:
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=dtype) for _ in range(3))
        flops = useful_flops(n, h, d, SEGS, RATES) / 2
        for cfg in [default_fwd(d, dtype, True, False)] + fwd_candidates[d]:
            tk._config = lambda *_, cfg=cfg: cfg
            try:
                ms = bench(lambda: dilated_attention(q, k, v, SEGS, RATES, is_causal=True))
            except Exception as e:  # a config can exceed shared memory
                print(f"fwd d={d} n={n} {cfg}: {type(e).__name__}")
                continue
            results["fwd"].append({"d": d, "n": n, "config": cfg, "ms": ms, "tflops": flops / ms / 1e9})
            print(f"fwd causal d={d} n={n} {cfg}: {ms:.2f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
        tk._config = default_fwd
    for d in a.head_dims:
        q, k, v, do = (torch.randn(1, n, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(4))
        o = dilated_attention(q, k, v, SEGS, RATES, is_causal=True)
        flops = useful_flops(n, h, d, SEGS, RATES) * 5 // 4
        for cfg in [default_bwd(d, dtype, True, False)] + [(c, c) for c in bwd_candidates[d]]:  # (dK/dV, dQ)
            tk._bwd_configs = lambda *_, cfg=cfg: cfg
            try:
                ms = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            except Exception as e:
                print(f"bwd {cfg}: {type(e).__name__}")
                continue
            results["bwd"].append({"d": d, "n": n, "config": cfg, "ms": ms, "tflops": flops / ms / 1e9})
            print(f"bwd causal d={d} n={n} {cfg}: {ms:.2f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    tk._bwd_configs, triton_fused.tiling = default_bwd, tiling
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "triton-tuning.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
