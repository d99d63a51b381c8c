"""Short sequences on one GPU: host time per call, and the op against dense SDPA where calls are short.

    python benchmarks/host_time.py [--json results.json] [--profile] [--sweep]

1. Host time per call at n = 64 (b = 1, h = 12, d = 64, bf16, LongNet schedule clipped to n):
   wall time of back-to-back calls with no sync inside (best of 5 rounds of 300), ours (forward
   without and with autograd, causal, forward+backward; also with every kernel launched through
   Triton's own ``kernel[grid]`` path instead of ``triton_launch``'s) against SDPA's same calls;
   and a causal forward at n = 1024 (the first branch alone, weighted: one launch).
   ``--profile`` prints where our forward's and forward+backward's host time goes (cProfile, by
   own time).
2. b x n = 8 x 1K, 8 x 2K, 4 x 8K, bf16 and fp32, forward and forward+backward, causal and not
   (``triton.testing.do_bench`` medians): ours against dense SDPA on the same (b, n), as the
   ratio ours / (useful FLOPs / dense FLOPs x SDPA's time) (1.0: our useful work at SDPA's rate).
3. ``--sweep``: bf16 at those sizes, the fused kernels at each block config of kernels.py's sweep.
Prints tables; writes JSON.
"""

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402
from dilated_attention.backends import triton_fused, triton_launch  # noqa: E402
from dilated_attention.plan import useful_flops  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
H, D = 12, 64


def host_us(fn, reps=300, rounds=5):
    """Wall time per call of back-to-back calls on a tiny input (the GPU keeps up: host-bound), the
    best of ``rounds`` rounds (other processes on the host only ever add time)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, time.perf_counter() - t0)
        torch.cuda.synchronize()
    return best / reps * 1e6


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                            is_causal=causal).transpose(1, 2)


def ours(q, k, v, causal):
    return dilated_attention(q, k, v, SEGS, RATES, is_causal=causal)


def fwd_bwd(fn, q, k, v, causal):
    out = fn(q, k, v, causal)
    out.backward(out)


def host_rows(profile: bool):
    inputs = [torch.randn(1, 64, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    grads = [t.clone().requires_grad_() for t in inputs]
    rows, direct = [], triton_launch._DIRECT
    longer = [torch.randn(1, 1024, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for name, args, call in (("forward", inputs, None), ("forward, causal", inputs, None),
                             ("forward, inputs require grad", grads, None), ("forward+backward", grads, fwd_bwd),
                             ("forward, causal, n = 1024", longer, None)):
        causal = "causal" in name
        times = {}
        for method, fn in (("ours", ours), ("ours via triton", ours), ("sdpa", sdpa)):
            triton_launch._DIRECT = direct and method == "ours"
            times[method] = host_us((lambda fn=fn: call(fn, *args, causal)) if call else
                                    (lambda fn=fn: fn(*args, causal)))
        triton_launch._DIRECT = direct
        rows.append(dict(call=name, us=times))
        label = name if "n = " in name else f"n = 64, {name}"
        print(f"host time, {label:44} ours {times['ours']:6.1f} us (through Triton's launch path "
              f"{times['ours via triton']:6.1f}) | sdpa {times['sdpa']:6.1f} us", flush=True)
    if profile:
        for name, fn in (("forward", lambda: ours(*inputs, False)),
                         ("forward+backward", lambda: fwd_bwd(ours, *grads, False))):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(500):
                fn()
            prof.disable()
            print(f"where our {name}'s host time goes (500 calls, cProfile):")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return rows


def short_rows():
    rows = []
    for b, n in ((8, 1024), (8, 2048), (4, 8192)):
        for dtype in (torch.bfloat16, torch.float32):
            for backward in (False, True):
                for causal in (False, True):
                    q, k, v = (torch.randn(b, n, H, D, device="cuda", dtype=dtype, requires_grad=backward)
                               for _ in range(3))
                    ms = {}
                    for method, fn in (("ours", ours), ("sdpa", sdpa)):
                        if backward:
                            out = fn(q, k, v, causal)
                            do = torch.randn_like(out)
                            ms[method] = do_bench(lambda fn=fn: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do),
                                                  return_mode="median")
                        else:
                            ms[method] = do_bench(lambda fn=fn: fn(q, k, v, causal), return_mode="median")
                    share = useful_flops(n, H, D, SEGS, RATES) / (4 * n * n * D * H)  # ours / dense, same causality
                    ratio = ms["ours"] / (share * ms["sdpa"])
                    rows.append(dict(b=b, n=n, dtype=str(dtype).split(".")[-1], backward=backward, causal=causal,
                                     ms=ms, useful_over_dense=share, ratio=ratio))
                    print(f"b={b} n={n:5} {rows[-1]['dtype']:8} {'fwd+bwd' if backward else 'fwd':7} causal={causal!s:5}"
                          f" | ours {ms['ours']:7.3f} ms | sdpa {ms['sdpa']:7.3f} ms | useful/dense {share:.2f}"
                          f" | ours / (share x sdpa) {ratio:.2f}", flush=True)
    return rows


def sweep_rows():
    """bf16, non-causal, at the short sizes: the fused forward at each block config of kernels.py's
    sweep (BLOCK_N, warps, stages; the tile's rows follow the plan), and forward+backward at each
    backward config, against dense SDPA's forward."""
    from kernels import SWEEP

    rows = []
    fwd_configs, bwd_configs = triton_fused.fwd_configs, triton_fused.bwd_configs
    for b, n in ((8, 1024), (8, 2048), (4, 8192)):
        q, k, v = (torch.randn(b, n, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        with torch.no_grad():
            ms = {"sdpa": do_bench(lambda: sdpa(q, k, v, False), return_mode="median")}
            for cfg in SWEEP[torch.bfloat16, False][0]:
                triton_fused.fwd_configs = lambda *_, cfg=cfg: (cfg,)
                ms[str(cfg)] = do_bench(lambda: ours(q, k, v, False), return_mode="median")
            triton_fused.fwd_configs = fwd_configs
        rows.append(dict(b=b, n=n, kind="fwd", ms=ms))
        ms = {}
        for cfg in SWEEP[torch.bfloat16, False][1]:
            triton_fused.bwd_configs = lambda *_, cfg=cfg: cfg
            ms[str(cfg)] = do_bench(lambda: torch.autograd.grad(ours(q, k, v, False), (q, k, v), do),
                                    return_mode="median")
        triton_fused.bwd_configs = bwd_configs
        rows.append(dict(b=b, n=n, kind="fwd+bwd", ms=ms))
        for row in rows[-2:]:
            print(f"b={b} n={n} {row['kind']:7} " + " | ".join(f"{c} {t:.3f}" for c, t in row["ms"].items()), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--host-only", action="store_true")
    p.add_argument("--sweep", action="store_true", help="block configs of the fused kernels at the short sizes")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    result = dict(device=torch.cuda.get_device_name(), host=host_rows(a.profile),
                  short=[] if a.host_only else short_rows(), sweep=sweep_rows() if a.sweep else [])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
