"""Where paper mode's fused backward time goes, on one GPU, against its forward and SDPA's in the same run.

    python benchmarks/backward_parts.py [--sizes 8x1024 8x2048 4x8192 1x131072] [--json backward-parts.json]

bf16, h = 12, d = 64, LongNet schedule, non-causal (the fused kernels). Each launch of our backward timed
alone on prepared inputs: the row dot (delta = rowsum(dO * O)), the dK/dV launch, the dQ launch (chaining
off, so each runs alone); our forward; SDPA's forward and forward+backward on the same (b, n). The
backward / forward columns compare the two libraries' backward-to-forward cost: ours recomputes the scores
in both of its launches (seven matmuls a key block, against five where dQ accumulates through atomics).
Medians of ``triton.testing.do_bench``, best of two rounds, ms. Prints a table; writes JSON.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402
from dilated_attention.backends import triton as triton_backend, triton_launch  # noqa: E402
from dilated_attention.plan import build_plan  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
H, D = 12, 64


def best(fn, rounds: int = 2) -> float:
    from triton.testing import do_bench

    return min(do_bench(fn) for _ in range(rounds))


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def row(b: int, n: int) -> dict:
    q, k, v, dout = (torch.randn(b, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    triton_launch._PREPARED.clear()
    out = dilated_attention(*ins, SEGS, RATES)
    out.backward(dout)  # prepares the backward's launches for this geometry
    (key, ((kv_tables, kv_launch), (q_tables, q_launch))), = (
        (key, value) for key, value in triton_launch._PREPARED.items() if key[0] == "fused backward")
    out, lse = triton_backend.Triton().forward_plan(q, k, v, build_plan(n, H, SEGS, RATES, "paper"), D**-0.5, False,
                                                    1.0)
    delta = triton_backend._row_dot(dout, out, lse)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    km = q
    times = {
        "row dot": best(lambda: triton_backend._row_dot(dout, out, lse)),
        "dK/dV": best(lambda: kv_launch((q, k, v, dout, lse, delta, km, dk, dv, *kv_tables))),
        "dQ": best(lambda: q_launch((q, k, v, dout, lse, delta, km, dq, *q_tables))),
        "forward": best(lambda: dilated_attention(q, k, v, SEGS, RATES)),
        "sdpa forward": best(lambda: sdpa(q, k, v)),
    }
    grads = [t.clone().requires_grad_() for t in (q, k, v)]

    def sdpa_step():
        sdpa(*grads).backward(dout)

    times["sdpa forward+backward"] = best(sdpa_step)
    backward = times["row dot"] + times["dK/dV"] + times["dQ"]
    sdpa_backward = times["sdpa forward+backward"] - times["sdpa forward"]
    return dict(b=b, n=n, chained=key[-1], ms=times, backward_over_forward=backward / times["forward"],
                sdpa_backward_over_forward=sdpa_backward / times["sdpa forward"],
                dq_share=times["dQ"] / backward)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["8x1024", "8x2048", "4x8192", "1x131072"])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    triton_backend._CHAINS = False  # each launch timed alone
    rows = []
    print(f"{'b x n':>10} | {'row dot':>8} {'dK/dV':>8} {'dQ':>8} {'dQ share':>8} | {'fwd':>8} {'bwd/fwd':>8} | "
          f"{'sdpa fwd':>8} {'sdpa bwd/fwd':>12}")
    for size in a.sizes:
        b, n = map(int, size.split("x"))
        r = row(b, n)
        rows.append(r)
        t = r["ms"]
        print(f"{size:>10} | {t['row dot']:8.3f} {t['dK/dV']:8.3f} {t['dQ']:8.3f} {r['dq_share']:8.2f} | "
              f"{t['forward']:8.3f} {r['backward_over_forward']:8.2f} | {t['sdpa forward']:8.3f} "
              f"{r['sdpa_backward_over_forward']:12.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
