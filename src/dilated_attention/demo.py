"""Paper-mode dilated attention over a long sequence, checked against an independent dense computation.

    python -m dilated_attention.demo                       # 64K tokens on the CPU
    python -m dilated_attention.demo --seq-len 1048576 --device cuda --dtype bfloat16
    torchrun --nproc-per-node 4 -m dilated_attention.demo  # ring over 4 processes (gloo on CPU, NCCL on GPUs)

Under torchrun every rank draws the same inputs from one seed on the host, keeps its
shard on its device, and runs RingDilatedAttention; rank 0 checks the gathered output.

Prints time, tokens/s, peak memory, and the largest error on a sample of query rows
recomputed in float64 straight from Eq. 10 (one softmax over the multiset of linked keys).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist

from .ring import RingDilatedAttention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dense_rows(q, k, v, rows, segment_lengths, dilation_rates, scale, causal, key_mask=None):
    """Eq. 10 in float64 for the query rows ``rows`` of batch 0: (len(rows), h, d).

    k, v may have fewer heads (GQA: query head j reads k/v head j // (h / h_kv)); key_mask: (n,)
    bool of batch 0, True = ignore the key."""
    n, h = q.shape[1], q.shape[2]
    group = h // k.shape[2]
    out = torch.zeros(len(rows), h, v.shape[-1], dtype=torch.float64)
    for a, i in enumerate(rows):
        for j in range(h):
            keys = []
            for w, r in zip(segment_lengths, dilation_rates):
                seg = min(w, n)
                start, o = i // seg * seg, j % r
                if (i - start) % r != o:
                    continue
                stop = i + 1 if causal else min(start + seg, n)
                keys.append(torch.arange(start + o, stop, r))
            t = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)
            if key_mask is not None:
                t = t[~key_mask[t]]
            if len(t) == 0:
                continue
            logits = (k[0, t, j // group].double() @ q[0, i, j].double()) * scale
            out[a, j] = torch.softmax(logits, 0) @ v[0, t, j // group].double()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=65536, help="tokens in the sequence (default 65536)")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                   help="one segment length w per branch")
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="one dilation rate r per branch (r <= w)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of q, k, v")
    p.add_argument("--device", default="cpu", help="torch device (under torchrun: each rank's GPU)")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--check-rows", type=int, default=16, help="query rows recomputed in float64 for the check")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{torch.cuda.current_device()}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    shape = (1, args.seq_len, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=DTYPES[args.dtype]) for _ in range(3))
    ring = RingDilatedAttention(args.segment_lengths, args.dilation_rates)
    q_local, k_local, v_local = (ring.shard(t).to(args.device) for t in (q, k, v))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = lambda: ring(q_local, k_local, v_local, is_causal=args.causal)  # noqa: E731
    with torch.no_grad():
        run()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out = ring.unshard(out)
    if rank != 0:
        dist.destroy_process_group()
        return

    rows = torch.randperm(args.seq_len)[: args.check_rows].tolist()
    expected = dense_rows(q, k, v, rows, args.segment_lengths, args.dilation_rates,
                          args.head_dim**-0.5, args.causal)
    error = (out[0, rows].cpu().double() - expected).abs().max().item()
    if args.device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (device, allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"
    io = 4 * q.numel() * q.element_size() / 2**30
    print(f"dilated attention, paper mode: n={args.seq_len} h={args.heads} d={args.head_dim} {args.dtype} "
          f"{args.device} causal={args.causal}, {world} process(es)")
    print(f"schedule w={args.segment_lengths} r={args.dilation_rates}")
    print(f"time {seconds:.3f} s, {args.seq_len / seconds:,.0f} tokens/s")
    print(f"peak memory {peak}; q, k, v, out take {io:.2f} GiB on one device, {io / world:.2f} GiB per rank")
    tol = 1e-4 if DTYPES[args.dtype] in (torch.float32, torch.float64) else 3e-2
    print(f"max |error| on {len(rows)} rows x {args.heads} heads vs dense float64 Eq. 10: {error:.2e} (tolerance {tol:g})")
    if world > 1:
        print(f"ring: {ring.comm_bytes['forward'] / 2**20:.2f} MiB sent by rank 0 in the forward")
        dist.destroy_process_group()
    if not error <= tol:
        raise SystemExit("check FAILED")
    print("check passed")


if __name__ == "__main__":
    main()
