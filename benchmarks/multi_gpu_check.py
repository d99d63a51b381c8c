"""Ring dilated attention on several GPUs (NCCL): each rank's bf16 output and gradients against
single-GPU DilatedAttention, with the single-GPU fp32 result as the yardstick.

    python benchmarks/multi_gpu_check.py --world 2      # one process per GPU, spawned here

Pass: the ring's bf16 error is at most twice the single-GPU bf16 error (plus 1e-3 of noise floor).
"""

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import RingDilatedAttention, dilated_attention  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def worker(rank, world, port, n):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", rank))
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, n, 12, 64, generator=g).cuda() for _ in range(4)]  # q, k, v, dout
    ok = True
    for mode in ("paper", "head_groups"):
        for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
            ring = RingDilatedAttention(SEGS, RATES, mode=mode, layout=layout)
            results = {}
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                ins = [t.to(dtype).requires_grad_() for t in full[:3]]
                o = dilated_attention(*ins, SEGS, RATES, is_causal=causal, mode=mode)
                grads = torch.autograd.grad(o, ins, full[3].to(dtype))
                results[name] = [ring.shard(t.detach()) for t in (o, *grads)]
            local = [ring.shard(t).to(torch.bfloat16).requires_grad_() for t in full[:3]]
            o = ring(*local, is_causal=causal)
            grads = torch.autograd.grad(o, local, ring.shard(full[3]).to(torch.bfloat16))
            for i, name in enumerate(["out", "dq", "dk", "dv"]):
                ring_err = rel((o, *grads)[i], results["fp32"][i])
                single_err = rel(results["bf16"][i], results["fp32"][i])
                passed = ring_err <= 2 * single_err + 1e-3
                ok &= passed
                print(f"rank {rank} {mode:>11} causal={causal!s:>5} {layout:>10} {name}: ring bf16 {ring_err:.2e} "
                      f"single-GPU bf16 {single_err:.2e} {'ok' if passed else 'FAIL'}  "
                      f"sent fwd {ring.comm_bytes['forward'] / 2**20:.1f} MiB", flush=True)
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=torch.cuda.device_count())
    p.add_argument("--seq-len", type=int, default=32768)  # segments of 32K span the ranks: NCCL traffic
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args.seq_len), nprocs=args.world, join=True)
    print(f"multi-GPU check passed on {args.world} GPUs")


if __name__ == "__main__":
    main()
