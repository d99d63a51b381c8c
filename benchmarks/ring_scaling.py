"""Ring scaling: per-GPU efficiency against one GPU, bytes sent and peak memory per rank.

    python benchmarks/ring_scaling.py --json ring-scaling.json        # CUDA, NCCL: P = 1, 2, 4
    python benchmarks/ring_scaling.py --device cpu --tokens-per-gpu 2048 --strong-n 8192 \\
        --dense-max-n 8192 --reps 1                                      # gloo smoke run

In one run, each P in a fresh process group of P processes: weak scaling at each
``--tokens-per-gpu`` (n = P x tokens) and strong scaling at ``--strong-n``; the scaling schedule
(w = 2K, 8K, 32K, 128K, 512K, 1M with r = 1 .. 32, clipped to n: the long branches span every
rank) and the fixed LongNet schedule (w = 2K .. 32K); non-causal (contiguous layout) and
causal (zigzag); forward and forward+backward; bytes sent and peak extra memory per rank.
Beside them at n <= ``--dense-max-n``: a dense ring (ours, one r = 1 branch over all n) and
PyTorch's context parallelism over SDPA (CUDA only). bf16 on CUDA, fp32 on CPU; b = 1,
h = 12, d = 64.

Efficiency = per-GPU useful TFLOP/s at P / useful TFLOP/s of one GPU in the same run (weak: one
GPU at n = tokens; strong: one GPU at the same n). Memory ratio = a rank's peak extra memory in
forward+backward / one GPU's for the same local rows (the weak-scaling P = 1 row). Prints a
table; writes JSON.
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import RingDilatedAttention  # noqa: E402
from dilated_attention.plan import useful_flops  # noqa: E402

SCHEDULES = {
    "scaling": ([2048, 8192, 32768, 131072, 524288, 1048576], [1, 2, 4, 8, 16, 32]),
    "longnet": ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]),
}
HEADS, HEAD_DIM = 12, 64


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _ms(fn, reps, device):
    """Median milliseconds of fn() over reps after a warm-up, every rank in step."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak(fn, device):
    """Peak extra memory (bytes) of one fn() call on this rank (CUDA), or None."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _ours(n, world, segs, rates, causal, cfg):
    """Time one ring configuration on this rank: fwd, fwd+bwd, bytes sent, peak memory."""
    device, dtype = cfg["device"], cfg["dtype"]
    attn = RingDilatedAttention(segs, rates, layout="zigzag" if causal else "contiguous")
    local = [torch.randn(1, n // world, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
             for _ in range(3)]
    dout = torch.randn_like(local[0])

    def step():
        torch.autograd.grad(attn(*local, is_causal=causal), local, dout)

    with torch.no_grad():
        fwd = _ms(lambda: attn(*local, is_causal=causal), cfg["reps"], device)
    sent_fwd = attn.comm_bytes["forward"]
    fwdbwd = _ms(step, cfg["reps"], device)
    return dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd, sent_fwd_MiB=sent_fwd / 2**20,
                sent_bwd_MiB=attn.comm_bytes["backward"] / 2**20, peak_extra_bytes=_peak(step, device))


def _context_parallel(n, world, causal, cfg):
    """PyTorch's context parallelism over SDPA at the same n (CUDA): fwd, fwd+bwd ms."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cuda", (world,))
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=cfg["dtype"]) for _ in range(3))
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):  # shards q, k, v in place
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        dout = torch.randn_like(ins[0])

        def attend():
            return torch.nn.functional.scaled_dot_product_attention(*ins, is_causal=causal)

        with torch.no_grad():
            fwd = _ms(attend, cfg["reps"], "cuda")
        fwdbwd = _ms(lambda: torch.autograd.grad(attend(), ins, dout), cfg["reps"], "cuda")
    return dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd)


def _cases(world, cfg):
    """(kind, n, schedule name, causal) of every row this P measures."""
    for kind, n in [("weak", t * world) for t in cfg["tokens_per_gpu"]] + [("strong", cfg["strong_n"])]:
        for name in SCHEDULES:
            for causal in (False, True):
                yield kind, n, name, causal


def worker(rank, world, port, cfg, out_path):
    device = cfg["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    extra = dict(device_id=torch.device("cuda", rank)) if device == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600), **extra)
    cfg = dict(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    rows = []
    for kind, n, name, causal in _cases(world, cfg):
        segs, rates = SCHEDULES[name]
        row = dict(P=world, kind=kind, n=n, schedule=name, causal=causal)
        try:
            row.update(_ours(n, world, segs, rates, causal, cfg))
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        if n <= cfg["dense_max_n"] and name == "longnet":  # the baselines once per (n, causal)
            try:
                dense = _ours(n, world, [n], [1], causal, dict(cfg, reps=max(1, cfg["reps"] // 2)))
                row["dense_ring_fwd_ms"], row["dense_ring_fwdbwd_ms"] = dense["fwd_ms"], dense["fwdbwd_ms"]
            except torch.OutOfMemoryError:
                row["dense_ring_fwd_ms"] = None
            if device == "cuda":
                try:
                    cp = _context_parallel(n, world, causal, cfg)
                    row["context_parallel_fwd_ms"], row["context_parallel_fwdbwd_ms"] = cp["fwd_ms"], cp["fwdbwd_ms"]
                except Exception as e:  # report why, keep measuring ours
                    row["context_parallel_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    peaks = [None] * world
    dist.all_gather_object(peaks, [r.get("peak_extra_bytes") for r in rows])
    if rank == 0:
        for i, r in enumerate(rows):
            ranks = [p[i] for p in peaks if p[i] is not None]
            r["peak_extra_GiB_max_rank"] = max(ranks) / 2**30 if ranks else None
            r.pop("peak_extra_bytes", None)
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _efficiencies(rows):
    """Add per-GPU useful TFLOP/s, efficiency against one GPU, and the memory ratio."""
    def flops(r):
        segs, rates = SCHEDULES[r["schedule"]]
        return useful_flops(r["n"], HEADS, HEAD_DIM, segs, rates) / (2 if r["causal"] else 1)

    one = {}
    for r in rows:
        if r["P"] == 1 and "error" not in r:
            one[(r["kind"], r["n"], r["schedule"], r["causal"])] = r
    for r in rows:
        if "error" in r:
            continue
        for phase, factor in (("fwd", 1), ("fwdbwd", 3.5)):
            r[f"tflops_per_gpu_{phase}"] = flops(r) * factor / r[f"{phase}_ms"] / 1e9 / r["P"]
        tokens = r["n"] // r["P"]
        base = one.get(("weak", tokens, r["schedule"], r["causal"])) if r["kind"] == "weak" else \
            one.get(("strong", r["n"], r["schedule"], r["causal"]))
        if base is None:
            continue
        for phase in ("fwd", "fwdbwd"):
            r[f"eff_{phase}"] = r[f"tflops_per_gpu_{phase}"] / base[f"tflops_per_gpu_{phase}"]
        same_rows = one.get(("weak", tokens, r["schedule"], r["causal"]))
        if same_rows and r.get("peak_extra_GiB_max_rank") and same_rows.get("peak_extra_GiB_max_rank"):
            r["memory_ratio"] = r["peak_extra_GiB_max_rank"] / same_rows["peak_extra_GiB_max_rank"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens-per-gpu", type=int, nargs="+", default=[262144, 1048576])
    p.add_argument("--strong-n", type=int, default=4194304)
    p.add_argument("--dense-max-n", type=int, default=1048576)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cfg = dict(device=a.device, tokens_per_gpu=a.tokens_per_gpu, strong_n=a.strong_n, dense_max_n=a.dense_max_n,
               reps=a.reps)
    rows = []
    for world in a.worlds:
        out_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ring-scaling-{os.getpid()}-{world}.json")
        mp.spawn(worker, args=(world, _free_port(), cfg, out_path), nprocs=world, join=True)
        with open(out_path) as f:
            rows += json.load(f)
        os.remove(out_path)
    _efficiencies(rows)
    header = (f"{'P':>2} {'kind':>6} {'n':>8} {'schedule':>8} {'causal':>6} {'fwd ms':>9} {'f+b ms':>9} "
              f"{'eff fwd':>7} {'eff f+b':>7} {'MiB fwd/bwd':>13} {'peak GiB':>8} {'mem x':>5} {'dense f+b':>9} "
              f"{'CP f+b':>8}")
    print(header)
    nan = float("nan")
    for r in rows:
        if "error" in r:
            print(f"{r['P']:>2} {r['kind']:>6} {r['n']:>8} {r['schedule']:>8} {r['causal']!s:>6} {r['error']}")
            continue
        print(f"{r['P']:>2} {r['kind']:>6} {r['n']:>8} {r['schedule']:>8} {r['causal']!s:>6} {r['fwd_ms']:>9.2f} "
              f"{r['fwdbwd_ms']:>9.2f} {r.get('eff_fwd', nan):>7.2f} {r.get('eff_fwdbwd', nan):>7.2f} "
              f"{r['sent_fwd_MiB']:>6.0f}/{r['sent_bwd_MiB']:<6.0f} {r.get('peak_extra_GiB_max_rank') or nan:>8.2f} "
              f"{r.get('memory_ratio', nan):>5.2f} {r.get('dense_ring_fwdbwd_ms') or nan:>9.1f} "
              f"{r.get('context_parallel_fwdbwd_ms') or nan:>8.1f}")
    if a.json:
        device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
        with open(a.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
