"""A call's launches chained (programmatic dependent launch, sm_90) against stream-ordered ones.

    python benchmarks/chained_launches.py [--json chained-launches.json]

The per-branch path forced (causal plans, and plain ones with the fused kernels off), and the fused kernels
on plain plans (one forward launch; backward's dQ launch chained after dK/dV), LongNet schedule, h = 12,
d = 64, bf16: forward and forward+backward with ``triton._CHAINS`` on and off, ``triton.testing.do_bench``
medians, best of three rounds taking the two in turn; out, dq, dk, dv of both compared bit for bit.
Prints a table; writes JSON.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402
from dilated_attention.backends import triton as triton_backend, triton_fused, triton_launch  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
CASES = [(8, 1024, True, "branches"), (8, 2048, True, "branches"), (4, 8192, True, "branches"),
         (1, 131072, True, "branches"), (8, 2048, False, "branches"), (1, 131072, False, "branches"),
         (8, 1024, False, "fused"), (8, 2048, False, "fused"), (4, 8192, False, "fused"), (1, 131072, False, "fused")]
TILING, FUSED_CAUSAL = triton_fused.tiling, triton_backend.fused_causal


def variant(chain: bool, path: str) -> None:
    """Chains on or off; every plan branch by branch, or plain plans on the fused kernels (causal ones
    branch by branch); the prepared launches are made again."""
    triton_backend._CHAINS = chain
    triton_backend.fused_causal = lambda *_: False
    triton_fused.tiling = TILING if path == "fused" else (lambda *_: 0)
    triton_launch._PREPARED.clear()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from triton.testing import do_bench

    print(torch.cuda.get_device_name(), torch.__version__)
    rows = []
    for b, n, causal, path in CASES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)

        def forward():
            with torch.no_grad():
                dilated_attention(q, k, v, SEGS, RATES, is_causal=causal)

        def step():
            out = dilated_attention(q, k, v, SEGS, RATES, is_causal=causal)
            return out, *torch.autograd.grad(out, (q, k, v), do)

        results = []
        for chain in (False, True):
            variant(chain, path)
            results.append(step())
        equal = all(torch.equal(x, y) for x, y in zip(*results))
        ms = {}
        for _ in range(3):
            for chain in (False, True):
                variant(chain, path)
                for name, fn in (("forward", forward), ("forward+backward", step)):
                    ms[name, chain] = min(ms.get((name, chain), float("inf")), do_bench(fn, return_mode="median"))
        for name in ("forward", "forward+backward"):
            off, on = ms[name, False], ms[name, True]
            rows.append(dict(b=b, n=n, causal=causal, path=path, call=name, off_ms=off, on_ms=on, bit_equal=equal))
            print(f"b={b} n={n:6} {'causal' if causal else 'plain '} {path:8} {name:16} stream-ordered {off:8.4f} ms | "
                  f"chained {on:8.4f} ms | {on / off:.3f} | bit-equal {equal}", flush=True)
    triton_backend._CHAINS, triton_backend.fused_causal, triton_fused.tiling = True, FUSED_CAUSAL, TILING
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
