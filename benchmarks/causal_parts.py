"""Where paper mode's causal forward time goes, on one GPU, against the plain forward in the same run.

    python benchmarks/causal_parts.py [--seq-len 131072] [--head-dim 64] [--batches 1 4] [--json causal-parts.json]

Causal forward as it runs (LongNet's plan is a union plan: its first branch apart, weighted, the rest fused
from branch 1); its first branch's launch alone (storing; the rest skipped: the result is wrong), weighted as
it runs and unweighted (what the pair weights cost); one branch w = 2048, r = 1 (the same pairs as SDPA on
2048-row blocks: our dense kernel against SDPA's); and branch by branch: as it runs, with tensor-descriptor
(TMA) loads off, with every launch storing its (out, lse) instead of merging into the earlier branches' (a
bound on what the merge costs: the result is wrong), both. At each batch size (a launch's last wave is a
smaller share at larger b). The plain forward fused (one launch), branch by branch and with one branch.
The fused launch from branch 1 alone, causal (the call's other part) and plain (twice its pairs: the two
give that launch's cost a pair and its fixed cost), and the same launch with no branch to run (what its
programs cost to load q and store out and lse); the call's two parts on two streams of different priorities,
outputs apart (not merged: a bound on what interleaving their programs in one launch would give).
Medians of ``triton.testing.do_bench``, best of two rounds, ms per batch; the ratio column is plain fused /
(2 x causal): the causal forward's useful rate against the plain fused kernel's (1.0: the same rate; the one
branch against its own plain call; JSON key ``causal_rate_over_plain_fused``).
Beside them, SDPA on the shape of every branch's work (n / 2048 blocks of 2048 rows, each attended alone),
causal and plain: the same ratio for PyTorch's own kernels at this segment length.
Prints a table; writes JSON.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402
from dilated_attention.backends import triton as triton_backend  # noqa: E402
from dilated_attention.backends import triton_fused, triton_launch  # noqa: E402
from dilated_attention.plan import build_plan  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
FORWARD_LAUNCH, TMA_MIN_ROWS, TILING = triton_backend._forward_launch, triton_fused.TMA_MIN_ROWS, triton_fused.tiling
FIRST_APART, LINKS = triton_fused.first_apart, triton_fused.links


def storing(d, dtype, launch, scale, causal, first, *rest):
    """``_forward_launch`` with every launch storing (FIRST) instead of merging."""
    return FORWARD_LAUNCH(d, dtype, launch, scale, causal, True, *rest)


def variant(tma: bool = True, merge: bool = True, fused: bool = True, first_only: bool = False,
            weighted: bool = True) -> None:
    """Set the library's switches for one variant (fused False: every plan branch by branch; first_only: a union
    plan's first branch alone, weighted or not); the prepared launches are made again."""
    triton_fused.TMA_MIN_ROWS = TMA_MIN_ROWS if tma else 1 << 62
    triton_backend._forward_launch = FORWARD_LAUNCH if merge else storing
    triton_fused.tiling = TILING if fused else (lambda *_: 0)
    triton_fused.first_apart = (lambda plan, n: (FIRST_APART(plan, n)[0], False)) if first_only else FIRST_APART
    triton_fused.links = LINKS if weighted else (lambda plan, device: None)
    triton_launch._PREPARED.clear()


def fused_parts(q, k, v, bench) -> dict:
    """ms per batch of the fused launch from branch 1 alone (causal, plain), of that launch with no branch to
    run, and of the causal call's two parts on two streams: the first branch's launch (storing) on a stream of
    low priority, the fused launch from branch 1 on one of high priority, so the block scheduler places the
    second grid's programs as the first one's free their slots."""
    b, n, h, d = q.shape
    plan = build_plan(n, h, SEGS, RATES, "paper")
    block = triton_fused.fwd_tile(plan, n, h, d, q.dtype)

    def fused(causal, start):
        return triton_fused.forward(q, k, v, plan, d ** -0.5, causal, None, block, from_branch=start)

    low, high = torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1)

    def two_streams():
        main = torch.cuda.current_stream()
        for stream in (low, high):
            stream.wait_stream(main)
        with torch.cuda.stream(low):
            dilated_attention(q, k, v, SEGS, RATES, is_causal=True)  # the first branch alone (``variant``)
        with torch.cuda.stream(high):
            fused(True, 1)
        for stream in (low, high):
            main.wait_stream(stream)

    calls = {"causal, fused from branch 1 alone": lambda: fused(True, 1),
             "plain, fused from branch 1 alone": lambda: fused(False, 1),
             "fused, no branch to run": lambda: fused(False, len(SEGS)),
             "causal, two parts on two streams (bound)": two_streams}
    variant(first_only=True)
    with torch.no_grad():
        ms = {name: bench(fn) / b for name, fn in calls.items()}
    variant()
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from triton.testing import do_bench

    by_branch, one = dict(fused=False), dict(schedule=([2048], [1]))
    fused, single = "plain fused", "plain, one branch w 2048 r 1"
    # name: (causal, switches, the plain row whose useful rate the causal row is set against, or None)
    variants = {"causal": (True, {}, fused),
                "causal, first branch alone": (True, dict(first_only=True), None),
                "causal, first branch alone, unweighted": (True, dict(first_only=True, weighted=False), None),
                "causal, one branch w 2048 r 1": (True, one, single),
                "causal by branch": (True, by_branch, fused),
                "causal by branch, TMA off": (True, dict(by_branch, tma=False), fused),
                "causal by branch, no merge (bound)": (True, dict(by_branch, merge=False), fused),
                "causal by branch, TMA off, no merge": (True, dict(by_branch, tma=False, merge=False), fused),
                fused: (False, {}, None), "plain branch by branch": (False, by_branch, None),
                single: (False, one, None)}
    against = {name: base for name, (_, _, base) in variants.items() if base}
    against["SDPA causal, 2048-row blocks"] = "SDPA plain, 2048-row blocks"  # PyTorch's own kernels
    against["causal, fused from branch 1 alone"] = "plain, fused from branch 1 alone"
    against["causal, two parts on two streams (bound)"] = fused
    rows = []
    print(torch.cuda.get_device_name(), torch.__version__)
    for b in a.batches:
        q, k, v = (torch.randn(b, a.seq_len, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ms = {}
        for _ in range(2):
            for name, (causal, switches, _) in variants.items():
                switches = dict(switches)
                segs, rates = switches.pop("schedule", (SEGS, RATES))
                variant(**switches)
                with torch.no_grad():
                    t = do_bench(lambda: dilated_attention(q, k, v, segs, rates, is_causal=causal),
                                 return_mode="median") / b
                ms[name] = min(ms.get(name, float("inf")), t)
        variant()
        for _ in range(2):
            for name, t in fused_parts(q, k, v, lambda fn: do_bench(fn, return_mode="median")).items():
                ms[name] = min(ms.get(name, float("inf")), t)
        blocks = [t.reshape(-1, 2048, a.heads, a.head_dim).transpose(1, 2) for t in (q, k, v)]
        sdpa = {}
        for _ in range(2):
            for causal in (False, True):
                t = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(*blocks, is_causal=causal),
                             return_mode="median") / b
                sdpa[causal] = min(sdpa.get(causal, float("inf")), t)
        ms["SDPA plain, 2048-row blocks"], ms["SDPA causal, 2048-row blocks"] = sdpa[False], sdpa[True]
        ratio = {name: ms[base] / (2 * ms[name]) for name, base in against.items()}
        rows.append(dict(b=b, n=a.seq_len, d=a.head_dim, ms=ms, causal_rate_over_plain_fused=ratio))
        for name, t in ms.items():
            extra = f" | {against[name]} / (2 x this) {ratio[name]:.3f}" if name in ratio else ""
            print(f"b={b} n={a.seq_len} d={a.head_dim} {name:40} {t:8.3f} ms{extra}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
