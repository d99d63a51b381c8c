"""Check this installation against an independent float64 computation of Eq. 10.

    python -m dilated_attention verify

CPU: float64 outputs of every CPU backend against Eq. 10 computed row by row (ragged segments,
w % r != 0, causal or not, GQA and a key padding mask), and exact gradients by finite
differences (both modes). GPU, when present: bf16 outputs and gradients of the default backend
within twice the error of the portable backend in bf16, against float64 on the device. Ring:
two gloo processes, each rank's shard against the single-process result. Says what passed;
exit status 0 only if everything did.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from .demo import dense_rows
from .functional import dilated_attention

SEGS, RATES = [6, 16, 40], [1, 3, 4]  # a ragged last segment, w % r != 0, w > n


def _cpu_forward() -> str:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 37, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 37, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    worst = 0.0
    for backend in ("math", "sdpa"):
        for causal in (False, True):
            out = dilated_attention(q, k, v, SEGS, RATES, is_causal=causal, backend=backend)
            expected = dense_rows(q, k, v, range(37), SEGS, RATES, 8**-0.5, causal)
            worst = max(worst, (out[0] - expected).abs().max().item())
    assert worst < 1e-10, f"max error {worst:.2e}"
    return f"max error {worst:.1e} (math and sdpa backends, causal and not)"


def _cpu_features() -> str:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 37, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 37, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(1, 37, generator=g) < 0.3
    out = dilated_attention(q, k, v, SEGS, RATES, is_causal=True, key_padding_mask=mask)
    expected = dense_rows(q, k, v, range(37), SEGS, RATES, 8**-0.5, True, key_mask=mask[0])
    worst = (out[0] - expected).abs().max().item()
    assert worst < 1e-10, f"max error {worst:.2e}"
    return f"GQA (4 query heads, 2 k/v heads) with a key padding mask: max error {worst:.1e}"


def _cpu_gradients() -> str:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 11, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for mode in ("paper", "head_groups"):
        for causal in (False, True):
            fn = lambda q, k, v: dilated_attention(q, k, v, [4, 8], [1, 3], is_causal=causal, mode=mode)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (q, k, v)), f"{mode} causal={causal}"
    return "dq, dk, dv match finite differences (both modes, causal and not)"


def _gpu() -> str:
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 300, 4, 32, generator=g) for _ in range(4))
    segs, rates = [64, 128, 256], [1, 2, 4]
    results = {}
    for name, dtype, backend in (("ref", torch.float64, "math"), ("default", torch.bfloat16, None),
                                 ("math", torch.bfloat16, "math")):
        ins = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*ins, segs, rates, is_causal=True, backend=backend)
        results[name] = [out, *torch.autograd.grad(out, ins, dout.to("cuda", dtype))]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        ref = results["ref"][i].double()
        err = lambda x: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(results["default"][i]) <= 2 * err(results["math"][i]) + 2e-4, name
    return f"{torch.cuda.get_device_name()}: bf16 out, dq, dk, dv within 2x the portable path's bf16 error"


def _ring_rank(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from .ring import RingDilatedAttention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(2, 48, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = dilated_attention(*full, [5, 12, 96], [1, 2, 3], is_causal=True)
    grads = torch.autograd.grad(expected, full, dout)
    ring = RingDilatedAttention([5, 12, 96], [1, 2, 3], layout="zigzag")
    local = [ring.shard(t).requires_grad_() for t in (q, k, v)]
    out = ring(*local, is_causal=True)
    local_grads = torch.autograd.grad(out, local, ring.shard(dout))
    torch.testing.assert_close(out, ring.shard(expected), rtol=1e-10, atol=1e-10)
    for a, e in zip(local_grads, grads):
        torch.testing.assert_close(a, ring.shard(e), rtol=1e-10, atol=1e-10)
    dist.barrier()
    dist.destroy_process_group()


def _ring() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ring_rank, args=(2, port), nprocs=2, join=True)
    return "2 gloo processes: each rank's out, dq, dk, dv equal its shard of the single-process result"


def run() -> bool:
    checks = [("CPU float64 forward against Eq. 10", _cpu_forward), ("CPU GQA and padding", _cpu_features),
              ("CPU exact gradients", _cpu_gradients)]
    checks.append(("GPU", _gpu) if torch.cuda.is_available() else ("GPU", None))
    checks.append(("ring over gloo", _ring))
    ok = True
    for name, check in checks:
        if check is None:
            print(f"SKIP  {name}: no CUDA device")
            continue
        try:
            print(f"PASS  {name}: {check()}", flush=True)
        except Exception as e:  # every failure is reported, then the exit status says it
            ok = False
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
    print("all checks passed" if ok else "some checks FAILED")
    return ok


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if run() else 1)
