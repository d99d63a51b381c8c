"""RingDistributedDilatedAttention on one host's GPUs (NCCL): correctness and time per mesh shape.

    python benchmarks/mesh.py --json OUT.json          # spawns one process per GPU (4 GPUs: 3 meshes)

For each mesh, (ring P), (heads P) and (ring 2 x heads P/2): every rank's bf16 output and
gradients against the single-GPU fp32 result, within twice the single-GPU bf16 error
(+1e-3); then forward and forward+backward time at each n (bf16, b=1, h=12, d=64),
bytes sent per rank, peak memory per rank, and useful TFLOP/s per GPU beside one GPU
running the whole sequence in the same run (where it fits).
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import RingDistributedDilatedAttention, dilated_attention  # noqa: E402
from dilated_attention.plan import useful_flops  # noqa: E402

CHECK = ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])  # LongNet's schedule, at 32K: spans every rank
SCALING = ([2048, 8192, 32768, 131072, 524288, 1048576], [1, 2, 4, 8, 16, 32])  # segments grow with n


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def meshes(world):
    out = {f"ring{world}": ((world,), ("ring",)), f"heads{world}": ((world,), ("heads",))}
    if world >= 4:
        out[f"ring2xheads{world // 2}"] = ((2, world // 2), ("ring", "heads"))
    return out


def cuda_ms(fn, reps, in_step=True):
    """Median milliseconds over reps; ``in_step``: every rank starts each rep together (barrier)."""
    times = []
    for i in range(reps + 1):
        if in_step:
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(rank, attn, n, log):
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, n, 12, 64, generator=g).cuda() for _ in range(4)]
    ok = True
    for causal in (False, True):
        results = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ins = [t.to(dtype).requires_grad_() for t in full[:3]]
            o = dilated_attention(*ins, *CHECK, is_causal=causal, mode=attn.mode)
            grads = torch.autograd.grad(o, ins, full[3].to(dtype))
            results[name] = [attn.shard(t.detach()) for t in (o, *grads)]
        local = [attn.shard(t).to(torch.bfloat16).requires_grad_() for t in full[:3]]
        o = attn(*local, is_causal=causal)
        grads = torch.autograd.grad(o, local, attn.shard(full[3]).to(torch.bfloat16))
        for i, name in enumerate(["out", "dq", "dk", "dv"]):
            ours, single = rel((o, *grads)[i], results["fp32"][i]), rel(results["bf16"][i], results["fp32"][i])
            ok &= ours <= 2 * single + 1e-3
            log.append(dict(rank=rank, mode=attn.mode, causal=causal, tensor=name, mesh_bf16=ours, single_bf16=single))
    return ok


def timings(attn, n, world, causal, reps):
    local = [torch.randn(1, n // world, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
             for _ in range(3)]
    dout = torch.randn_like(local[0])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd = cuda_ms(lambda: attn(*local, is_causal=causal), reps)
    step = lambda: torch.autograd.grad(attn(*local, is_causal=causal), local, dout)  # noqa: E731
    fwdbwd = cuda_ms(step, reps)
    return dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd, sent_fwd_MiB=attn.comm_bytes["forward"] / 2**20,
                sent_bwd_MiB=attn.comm_bytes["backward"] / 2**20,
                peak_extra_GiB=(torch.cuda.max_memory_allocated() - base) / 2**30)


def single_gpu(n, causal, reps):
    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    f = lambda: dilated_attention(q, k, v, *SCALING, is_causal=causal)  # noqa: E731
    try:
        step = lambda: torch.autograd.grad(f(), (q, k, v), dout)  # noqa: E731
        return dict(fwd_ms=cuda_ms(f, reps, False), fwdbwd_ms=cuda_ms(step, reps, False))
    except torch.OutOfMemoryError:
        return None


def worker(rank, world, port, args):
    from torch.distributed.device_mesh import init_device_mesh

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300), device_id=torch.device("cuda", rank))
    log, rows, ok = [], [], True
    for name, (shape, dims) in meshes(world).items():
        mesh = init_device_mesh("cuda", shape, mesh_dim_names=dims)
        for mode in ("paper", "head_groups"):
            ok &= check(rank, RingDistributedDilatedAttention(*CHECK, device_mesh=mesh, mode=mode), args.check_len, log)
        attn = RingDistributedDilatedAttention(*SCALING, device_mesh=mesh)
        for n in args.seq_lens:
            for causal in (False, True):
                row = dict(mesh=name, n=n, causal=causal, **timings(attn, n, world, causal, args.reps))
                row["tflops_per_gpu_fwd"] = useful_flops(n, 12, 64, *SCALING) / row["fwd_ms"] / 1e9 / world
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
    worst = {}
    for e in log:
        key = (e["mode"], e["causal"], e["tensor"])
        worst[key] = max(worst.get(key, 0), e["mesh_bf16"] / max(e["single_bf16"], 1e-12))
    dist.barrier()
    if rank == 0:
        singles = {}
        for n in args.seq_lens:
            for causal in (False, True):
                singles[(n, causal)] = single_gpu(n, causal, args.reps)
        for row in rows:
            s = singles.get((row["n"], row["causal"]))
            if s:
                row["single_fwd_ms"], row["single_fwdbwd_ms"] = s["fwd_ms"], s["fwdbwd_ms"]
                row["eff_fwd"] = s["fwd_ms"] / (row["fwd_ms"] * world)
                row["eff_fwdbwd"] = s["fwdbwd_ms"] / (row["fwdbwd_ms"] * world)
        print(f"{'mesh':>14} {'n':>8} {'causal':>6} {'fwd ms':>8} {'fwd+bwd':>8} {'1-GPU fwd':>9} {'eff fwd':>7} "
              f"{'eff f+b':>7} {'sent MiB':>9} {'peak GiB':>8}")
        for r in rows:
            print(f"{r['mesh']:>14} {r['n']:>8} {r['causal']!s:>6} {r['fwd_ms']:>8.2f} {r['fwdbwd_ms']:>8.2f} "
                  f"{r.get('single_fwd_ms', float('nan')):>9.2f} {r.get('eff_fwd', float('nan')):>7.2f} "
                  f"{r.get('eff_fwdbwd', float('nan')):>7.2f} {r['sent_fwd_MiB'] + r['sent_bwd_MiB']:>9.1f} "
                  f"{r['peak_extra_GiB']:>8.2f}")
        print("worst (mesh bf16 error / single-GPU bf16 error) on rank 0:",
              {f"{m} causal={c} {t}": round(v, 2) for (m, c, t), v in worst.items()})
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), world=world, torch=torch.__version__,
                               rows=rows, check=log), f, indent=1)
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(f"rank {rank}: a mesh result erred more than twice the single-GPU bf16 error")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=torch.cuda.device_count())
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1 << 20, 1 << 22])
    p.add_argument("--check-len", type=int, default=32768)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args), nprocs=args.world, join=True)
    print(f"mesh check passed on {args.world} GPUs")


if __name__ == "__main__":
    main()
