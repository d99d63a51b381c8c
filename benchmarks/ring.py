"""Ring dilated attention benchmark: time, bytes sent per rank, memory per rank, causal balance.

    python benchmarks/ring.py                                  # CPU, gloo, P = 1, 2, 4
    python benchmarks/ring.py --device cuda --worlds 1         # one GPU (NCCL, P = 1)

For each P: forward+backward time (median), bytes this library sends per rank (forward,
backward) beside (a) a dense ring (K and V shards to every other rank; dK/dV back) and
(b) LongNet's all-gather of sparsified K/V over the group, peak memory per rank, and the
causal work balance (max/mean useful FLOPs per rank) of the contiguous and zigzag layouts.
Prints a table, writes JSON.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import RingDilatedAttention  # noqa: E402
from dilated_attention.plan import build_plan  # noqa: E402
from dilated_attention.ring_plan import build_ring_schedule  # noqa: E402


def rank_flops(n, world, layout, plan, h, d, causal):
    """Useful forward FLOPs each rank computes (causal diagonal blocks count half)."""
    sched = build_ring_schedule(n, world, layout, plan, causal)
    per_rank = []
    for rank in range(world):
        total = 0
        for i, fs in sched.full[rank]:
            item = plan[i]
            rows = len(range(item.offset, item.segment, item.rate))
            heads = len(range(item.head_start, item.head_stop, item.head_step))
            total += fs.count * rows * rows * heads // (2 if causal else 1)
        for src in range(world):
            for pair in sched.pairs[src][rank]:
                item = plan[pair.item]
                heads = len(range(item.head_start, item.head_stop, item.head_step))
                total += len(pair.q) * len(pair.k) * heads // (2 if pair.causal_diagonal else 1)
        per_rank.append(4 * d * total)
    return per_rank


def reference_bytes(n, world, plan, h, d, elem):
    m = n // world
    dense = (world - 1) * 2 * m * h * d * elem
    gather = 0
    for item in plan:
        if item.segment > m:
            heads = len(range(item.head_start, item.head_stop, item.head_step))
            gather += (world - 1) * 2 * -(-m // item.rate) * heads * d * elem
    return {"dense_ring_fwd": dense, "dense_ring_bwd": 2 * dense,
            "allgather_sparse_fwd": gather, "allgather_sparse_bwd": gather}


def worker(rank, world, init, cfg, results):
    torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    n, h, d = cfg["n"], cfg["heads"], cfg["head_dim"]
    dtype = getattr(torch, cfg["dtype"])
    device = f"cuda:{rank}" if cuda else "cpu"
    ring = RingDilatedAttention(cfg["segment_lengths"], cfg["dilation_rates"], layout=cfg["layout"])
    q, k, v, dout = (torch.randn(1, n // world, h, d, device=device, dtype=dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        out = ring(q, k, v, is_causal=cfg["causal"])
        torch.autograd.grad(out, (q, k, v), dout)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    times = []
    for _ in range(cfg["reps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    results[rank] = {"ms": statistics.median(times) * 1e3, "extra_peak_mib": peak / 2**20, **ring.comm_bytes}
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = {"device": args.device, "n": args.seq_len, "heads": args.heads, "head_dim": args.head_dim,
           "segment_lengths": args.segment_lengths, "dilation_rates": args.dilation_rates,
           "layout": args.layout, "causal": args.causal, "reps": args.reps,
           "dtype": "bfloat16" if args.device == "cuda" else "float32"}
    elem = 2 if args.device == "cuda" else 4
    print(f"ring dilated attention fwd+bwd, {args.device}, n={args.seq_len} h={args.heads} d={args.head_dim} "
          f"{cfg['dtype']} causal={args.causal} layout={args.layout}, w={args.segment_lengths} r={args.dilation_rates}")
    print(f"{'P':>3} {'ms':>9} {'fwd MiB':>9} {'bwd MiB':>9} {'dense fwd':>10} {'dense bwd':>10} {'gather fwd':>10} "
          f"{'peak MiB/rank':>14} {'balance contig':>15} {'balance zigzag':>15}")
    rows = []
    for world in args.worlds:
        cfg["threads"] = max(1, (os.cpu_count() or 2) // world) if args.device == "cpu" else 4
        manager = mp.Manager()
        results = manager.dict()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(world, os.path.join(tmp, "store"), cfg, results), nprocs=world, join=True)
        per_rank = [results[r] for r in range(world)]
        plan = build_plan(args.seq_len, args.heads, args.segment_lengths, args.dilation_rates, "paper")
        refs = reference_bytes(args.seq_len, world, plan, args.heads, args.head_dim, elem)
        balance = {}
        for layout in ("contiguous", "zigzag"):
            flops = rank_flops(args.seq_len, world, layout, plan, args.heads, args.head_dim, True)
            balance[layout] = max(flops) / (sum(flops) / world)
        row = {"world": world, "ms": max(r["ms"] for r in per_rank),
               "fwd_bytes_max": max(r["forward"] for r in per_rank), "bwd_bytes_max": max(r["backward"] for r in per_rank),
               "extra_peak_mib_max": max(r["extra_peak_mib"] for r in per_rank), **refs,
               "causal_balance_contiguous": balance["contiguous"], "causal_balance_zigzag": balance["zigzag"],
               "per_rank": per_rank}
        rows.append(row)
        mib = 2**20
        print(f"{world:>3} {row['ms']:>9.1f} {row['fwd_bytes_max'] / mib:>9.2f} {row['bwd_bytes_max'] / mib:>9.2f} "
              f"{refs['dense_ring_fwd'] / mib:>10.2f} {refs['dense_ring_bwd'] / mib:>10.2f} "
              f"{refs['allgather_sparse_fwd'] / mib:>10.2f} {row['extra_peak_mib_max']:>14.1f} "
              f"{balance['contiguous']:>15.3f} {balance['zigzag']:>15.3f}", flush=True)
    path = args.json or os.path.join("bench-results", f"ring-{args.device}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"config": cfg, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
