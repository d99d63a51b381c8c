"""Benchmark: dilated attention against dense SDPA at the same n, time and peak memory.

    python -m dilated_attention.bench                                   # CPU, small sizes
    python -m dilated_attention.bench --device cuda --seq-lens 32768 131072 524288 1048576

Prints a table and writes JSON. Times are medians: ``triton.testing.do_bench`` on CUDA,
wall-clock repetitions on CPU. Useful TFLOP/s count only linked query-key pairs
(4 * pairs * d per head; dense: 4 n^2 d h, halved when causal); forward+backward counts
3.5x the forward. Peak memory is the extra over the inputs: device allocator peak on CUDA,
process peak RSS of a fresh child process on CPU; peak/io divides inputs + extra by the
bytes of q, k, v, out (and dout, dq, dk, dv when timing backward).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

import torch

from .functional import dilated_attention
from .plan import useful_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Other implementations to time beside ours: name -> (mode whose FLOPs they do, fn(q, k, v, cfg) -> out)
EXTERNAL: dict = {}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, min_reps: int = 3, budget_s: float = 2.0) -> float:
    """Median seconds of ``fn()``. CUDA: ``triton.testing.do_bench`` (CUDA events, back-to-back calls,
    L2 flushed), as ANCHORS.md measured. CPU: after one warm-up, at least ``min_reps`` runs, more
    while under budget."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=100, rep=int(budget_s * 1000), return_mode="median") / 1e3
    fn()
    _sync(device)
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_call(method: str, cfg: dict, n: int):
    """Build inputs and the closure to time. method: 'dense', or 'MODE' / 'MODE:BACKEND' for ours."""
    device, dtype = cfg["device"], DTYPES[cfg["dtype"]]
    shape = (1, n, cfg["heads"], cfg["head_dim"])
    grad = cfg["backward"]
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    if method == "dense":
        def attend():
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cfg["causal"]
            )
            return o.transpose(1, 2)
    elif method in EXTERNAL:
        def attend():
            return EXTERNAL[method][1](q, k, v, cfg)
    else:
        mode, _, backend = method.partition(":")

        def attend():
            return dilated_attention(q, k, v, cfg["segment_lengths"], cfg["dilation_rates"],
                                     is_causal=cfg["causal"], mode=mode, backend=backend or None)
    if grad:
        dout = torch.randn(shape, device=device, dtype=dtype)

        def call():
            torch.autograd.grad(attend(), (q, k, v), dout)
    else:
        def call():
            with torch.no_grad():
                attend()
    return call


def measure(method: str, cfg: dict, n: int) -> dict:
    """Time and peak memory of one method at one n; a CUDA out-of-memory gives a row saying so."""
    try:
        return _measure(method, cfg, n)
    except torch.cuda.OutOfMemoryError:
        return {"method": method, "n": n, "oom": True}


def _measure(method: str, cfg: dict, n: int) -> dict:
    device = cfg["device"]
    call = make_call(method, cfg, n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    seconds = time_call(call, device, budget_s=cfg["budget_s"])
    h, d = cfg["heads"], cfg["head_dim"]
    if method == "dense":
        flops = 4 * n * n * d * h // (2 if cfg["causal"] else 1)
    else:
        mode = EXTERNAL[method][0] if method in EXTERNAL else method.partition(":")[0]
        flops = useful_flops(n, h, d, cfg["segment_lengths"], cfg["dilation_rates"], mode)
        if cfg["causal"]:
            flops //= 2
    flops = flops * 7 // 2 if cfg["backward"] else flops
    # q, k, v, out (and dout, dq, dk, dv): the least any implementation must hold
    io_bytes = (8 if cfg["backward"] else 4) * n * h * d * DTYPES[cfg["dtype"]].itemsize
    inputs = (4 if cfg["backward"] else 3) * n * h * d * DTYPES[cfg["dtype"]].itemsize
    return {"method": method, "n": n, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
            "tokens_per_s": n / seconds, "extra_peak_gib": extra / 2**30, "peak_over_io": (inputs + extra) / io_bytes}


def _measure_in_child(args):
    torch.set_num_threads(args[1]["threads"])
    return measure(*args)


def run(cfg: dict) -> list[dict]:
    results = []
    jobs = [(m, cfg, n) for n in cfg["seq_lens"] for m in cfg["modes"] + ["dense"]
            if m != "dense" or n <= cfg["dense_max_n"]]
    for job in jobs:
        if cfg["device"] == "cpu" and job[0] not in EXTERNAL:  # a fresh process: peak RSS is this job's alone
            with mp.get_context("spawn").Pool(1) as pool:
                results.append(pool.apply(_measure_in_child, (job,)))
        else:
            results.append(measure(*job))
            if cfg["device"].startswith("cuda"):
                torch.cuda.empty_cache()
        print_row(results[-1])
    return results


def print_row(r: dict) -> None:
    if r.get("oom"):
        print(f"{r['method']:>18} {r['n']:>9} {'out of memory':>11}", flush=True)
        return
    print(f"{r['method']:>18} {r['n']:>9} {r['ms']:>11.2f} {r['tflops']:>9.2f} {r['tokens_per_s']:>13,.0f} "
          f"{r['extra_peak_gib']:>10.3f} {r['peak_over_io']:>8.2f}", flush=True)


def plot(results: list[dict], path: str, title: str) -> bool:
    """Time and extra peak memory against n, one line per method (log-log); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method and not r.get("oom")]
        left.plot([r["n"] for r in rows], [r["ms"] for r in rows], "-o", label=method)
        right.plot([r["n"] for r in rows], [r["extra_peak_gib"] for r in rows], "-o", label=method)
    for ax, label, key in ((left, "time (ms)", "ms"), (right, "extra peak memory (GiB)", "extra_peak_gib")):
        ax.set_xscale("log", base=2)
        if all(r[key] > 0 for r in results if not r.get("oom")):  # a log axis shows no zeros
            ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    left.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="sequence lengths (default: 4K, 16K, 64K on CPU; 32K to 1M on CUDA)")
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768],
                   help="one segment length w per branch")
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="one dilation rate r per branch (r <= w)")
    p.add_argument("--modes", nargs="+", default=["paper"],
                   help="paper, head_groups, or MODE:BACKEND (e.g. paper:sdpa) to force a backend")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--dense-max-n", type=int, default=None, help="skip dense SDPA above this n")
    p.add_argument("--budget-s", type=float, default=2.0, help="timing budget per measurement")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--json", default=None, help="output path (default bench-results/bench-DEVICE.json)")
    p.add_argument("--plot", default=None, help="PNG of time and memory against n (default: beside the JSON)")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    cfg = {
        "device": args.device,
        "seq_lens": args.seq_lens or ([32768, 131072, 524288, 1048576] if on_cuda else [4096, 16384, 65536]),
        "heads": args.heads, "head_dim": args.head_dim,
        "dtype": args.dtype or ("bfloat16" if on_cuda else "float32"),
        "segment_lengths": args.segment_lengths, "dilation_rates": args.dilation_rates,
        "modes": args.modes, "causal": args.causal, "backward": args.backward,
        "dense_max_n": args.dense_max_n or (1 << 20 if on_cuda else 16384),
        "budget_s": args.budget_s, "threads": args.threads,
    }
    name = torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}; b=1 h={cfg['heads']} d={cfg['head_dim']} {cfg['dtype']} "
          f"causal={cfg['causal']} {'fwd+bwd' if cfg['backward'] else 'fwd'}")
    print(f"schedule w={cfg['segment_lengths']} r={cfg['dilation_rates']}")
    print(f"{'method':>18} {'n':>9} {'ms':>11} {'TFLOP/s':>9} {'tokens/s':>13} {'extra GiB':>10} {'peak/io':>8}")
    results = run(cfg)
    path = args.json or os.path.join("bench-results", f"bench-{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "config": cfg, "results": results}, f, indent=1)
    print(f"wrote {path}")
    png = args.plot or os.path.splitext(path)[0] + ".png"
    if plot(results, png, f"{name}, {cfg['dtype']}, h={cfg['heads']} d={cfg['head_dim']}, "
                          f"{'fwd+bwd' if cfg['backward'] else 'fwd'}{', causal' if cfg['causal'] else ''}"):
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
