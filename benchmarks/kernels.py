"""Paper mode on one GPU: the fused all-branch kernels against the per-branch launches and dense SDPA.

    python benchmarks/kernels.py [--seq-lens 131072 1048576] [--head-dim 64] [--dtype bfloat16] [--sweep]

In one run, on one device, in three interleaved rounds (medians): per-branch launches (the
fused path switched off in-process), the fused kernels (causal plans made to take them), and
dense SDPA on b = n / 2048 sequences of 2048 (every LongNet branch
is 2048 x 2048 attention per segment), forward and forward+backward, causal and not. Useful
TFLOP/s count linked pairs only (``plan.useful_flops``; forward+backward 3.5x, causal half).
``--sweep`` also times the fused kernels' block configs (``triton_fused.fwd_configs`` /
``bwd_configs``); ``--variants`` times each forward candidate and the one picked at run time. Also the host time of one
call at n = 64 against SDPA's. Prints tables; writes $OUT/kernels.json (default
bench-results/).
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402
from dilated_attention.backends import triton as triton_backend  # noqa: E402
from dilated_attention.backends import triton_fused  # noqa: E402
from dilated_attention.plan import useful_flops  # noqa: E402
from host_time import host_us  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
TILING = triton_fused.tiling
FUSED_CAUSAL = triton_backend.fused_causal
ROUNDS = 3


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=100, rep=1000, return_mode="median")


def timed(fn, backward):
    if not backward:
        return bench(fn)
    out = fn()
    do = torch.randn_like(out)
    ins = [t for t in fn.inputs]
    return bench(lambda: torch.autograd.grad(fn(), ins, do))


def variants(n, heads, d, dtype):
    """Fused against per-branch at n, forward and forward+backward, non-causal: plain, GQA h/4, a key
    padding mask (10% masked), each fused forward config in ``SWEEP``."""
    rows = []
    for name in ("plain", "gqa", "mask"):
        for backward in (False, True):
            h_kv = heads // 4 if name == "gqa" else heads
            q = torch.randn(1, n, heads, d, device="cuda", dtype=dtype, requires_grad=backward)
            k, v = (torch.randn(1, n, h_kv, d, device="cuda", dtype=dtype, requires_grad=backward)
                    for _ in range(2))
            mask = (torch.rand(1, n, device="cuda") < 0.1) if name == "mask" else None

            def f():
                return dilated_attention(q, k, v, SEGS, RATES, key_padding_mask=mask)
            f.inputs = (q, k, v)
            triton_fused.tiling = lambda *args: 0
            ms = {"per_branch": timed(f, backward)}
            triton_fused.tiling = TILING
            default = triton_fused.fwd_configs
            for cfg in SWEEP[dtype, d > 64][0]:
                triton_fused.fwd_configs = lambda *_, cfg=cfg: (cfg,)
                ms[f"fused {cfg}"] = timed(f, backward)
            triton_fused.fwd_configs = default
            ms["fused, picked"] = timed(f, backward)
            rows.append(dict(n=n, variant=name, backward=backward, ms=ms))
            print(f"{name:5} {'fwd+bwd' if backward else 'fwd':7} " + " | ".join(f"{m} {t:.2f} ms" for m, t in ms.items()),
                  flush=True)
    return rows


SWEEP = {  # (dtype, d > 64): fused forward configs, fused backward (dK/dV, dQ) configs (--sweep, --variants)
    (torch.bfloat16, False): (
        [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2),
         (128, 128, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3)],
        [((64, 64, 4, 3), (128, 32, 8, 3)), ((64, 64, 4, 3), (64, 32, 4, 3)), ((64, 64, 4, 3), (64, 64, 4, 3)),
         ((64, 64, 4, 4), (64, 64, 4, 4)), ((128, 32, 4, 4), (64, 32, 4, 4)), ((64, 32, 4, 3), (64, 64, 4, 3)),
         ((64, 64, 8, 3), (128, 64, 8, 3)), ((128, 64, 8, 3), (128, 64, 8, 3)), ((64, 32, 4, 3), (64, 32, 4, 3)),
         ((64, 64, 8, 3), (64, 64, 8, 3)), ((64, 64, 4, 2), (64, 64, 4, 2)), ((32, 64, 4, 3), (64, 32, 4, 3))]),
    (torch.float32, False): (
        [(128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)],
        [((32, 64, 4, 2), (64, 32, 4, 2)), ((32, 64, 4, 2), (32, 64, 4, 2)), ((32, 32, 4, 2), (32, 32, 4, 2)),
         ((32, 64, 4, 1), (64, 32, 4, 1)), ((32, 32, 4, 2), (64, 32, 4, 2)), ((32, 64, 4, 2), (64, 64, 4, 2))]),
    (torch.float32, True): (
        [(64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2)],
        [((32, 64, 4, 1), (64, 32, 4, 1)), ((16, 32, 4, 1), (32, 32, 4, 1)), ((32, 32, 4, 1), (32, 64, 4, 1)),
         ((32, 64, 4, 1), (32, 32, 4, 1)), ((16, 64, 4, 2), (16, 64, 4, 2))]),
}
SWEEP[torch.bfloat16, True] = SWEEP[torch.bfloat16, False]
SWEEP[torch.float16, False] = SWEEP[torch.float16, True] = SWEEP[torch.bfloat16, False]


def call(q, k, v, causal, dense=False):
    if dense:
        def f():
            b = q.shape[1] // 2048
            qs, ks, vs = (t.view(b, 2048, *t.shape[2:]).transpose(1, 2) for t in (q, k, v))
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    else:
        def f():
            return dilated_attention(q, k, v, SEGS, RATES, is_causal=causal)
    f.inputs = (q, k, v)
    return f


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--variants", action="store_true", help="GQA and key-mask rows at the largest n")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    out_dir = os.environ.get("OUT", "bench-results")
    os.makedirs(out_dir, exist_ok=True)
    rows, sweep = [], []
    print(torch.cuda.get_device_name(), torch.__version__)
    for n in a.seq_lens:
        for backward in (False, True):
            for causal in (False, True):
                q, k, v = (torch.randn(1, n, a.heads, a.head_dim, device="cuda", dtype=dtype,
                                       requires_grad=backward) for _ in range(3))
                flops = useful_flops(n, a.heads, a.head_dim, SEGS, RATES) * (3.5 if backward else 1) / (2 if causal else 1)
                dense_flops = 4 * n * 2048 * a.head_dim * a.heads * (3.5 if backward else 1) / (2 if causal else 1)
                times = {"per_branch": [], "fused": [], "sdpa": []}
                for _ in range(ROUNDS):  # interleaved rounds: clock and thermal drift hit every method alike
                    for method in times:
                        triton_fused.tiling = (lambda *args: 0) if method == "per_branch" else TILING
                        triton_backend.fused_causal = (lambda *args: True) if method == "fused" else FUSED_CAUSAL
                        times[method].append(timed(call(q, k, v, causal, dense=method == "sdpa"), backward))
                triton_fused.tiling, triton_backend.fused_causal = TILING, FUSED_CAUSAL
                ms = {m: statistics.median(t) for m, t in times.items()}
                row = dict(n=n, backward=backward, causal=causal, ms=ms,
                           tflops={m: (dense_flops if m == "sdpa" else flops) / t / 1e9 for m, t in ms.items()})
                rows.append(row)
                t = row["tflops"]
                print(f"n={n:>8} {'fwd+bwd' if backward else 'fwd':>7} causal={causal!s:5} | per-branch "
                      f"{ms['per_branch']:8.2f} ms {t['per_branch']:5.0f} | fused {ms['fused']:8.2f} ms {t['fused']:5.0f}"
                      f" | sdpa {t['sdpa']:5.0f} TFLOP/s | fused/sdpa {t['fused'] / t['sdpa']:.2f}", flush=True)
                if a.sweep and not causal:  # fused configs
                    configs = SWEEP[dtype, a.head_dim > 64][backward]
                    name = "bwd_configs" if backward else "fwd_configs"
                    default = getattr(triton_fused, name)
                    for cfg in configs:
                        setattr(triton_fused, name, lambda *_, cfg=cfg, one=not backward: (cfg,) if one else cfg)
                        try:
                            t_ms = timed(call(q, k, v, causal), backward)
                        except Exception as e:  # a config can exceed shared memory
                            print(f"  config {cfg}: {type(e).__name__}")
                            continue
                        sweep.append(dict(n=n, backward=backward, config=cfg, ms=t_ms, tflops=flops / t_ms / 1e9))
                        print(f"  config {cfg}: {t_ms:.2f} ms {flops / t_ms / 1e9:.0f} TFLOP/s", flush=True)
                    setattr(triton_fused, name, default)
                del q, k, v
    variant_rows = variants(max(a.seq_lens), a.heads, a.head_dim, dtype) if a.variants else []
    tiny = [torch.randn(1, 64, a.heads, a.head_dim, device="cuda", dtype=dtype) for _ in range(3)]
    host = {"ours": host_us(call(*tiny, False)),
            "sdpa": host_us(lambda: torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in tiny)))}
    print(f"host time per call at n = 64: ours {host['ours']:.0f} us, sdpa {host['sdpa']:.0f} us")
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), dtype=a.dtype, rows=rows, sweep=sweep, variants=variant_rows,
                       host_us=host), f, indent=1)


if __name__ == "__main__":
    main()
