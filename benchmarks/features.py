"""Model features beside the plain op on one GPU: GQA and key padding masks, forward and forward+backward,
packed documents (cu_seqlens, documents of 64K and 8K tokens), and one decoding step (a single
query against the cache).

    python benchmarks/features.py --json OUT.json      # CUDA; bf16, h = 12, d = 64, LongNet schedule

Every row is timed in the same run as the plain op (``triton.testing.do_bench`` median) and
reported as a ratio to it: GQA with h_kv = h/4 (3 k/v heads) should be at least as fast as the
plain op (it reads a quarter of the k/v bytes), a key padding mask close to it (one byte per key
per tile).
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import dilated_attention  # noqa: E402

SEGS, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]


def timed(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=500, return_mode="median")


def case(n, h_kv, masked, causal, backward, h=12, d=64, doc_len=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=backward)
    k, v = (torch.randn(1, n, h_kv, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=backward)
            for _ in range(2))
    mask = (torch.rand(1, n, device="cuda", generator=g) < 0.1) if masked else None
    docs = None if doc_len is None else torch.arange(0, n + 1, doc_len, dtype=torch.int32, device="cuda")

    def fwd():
        return dilated_attention(q, k, v, SEGS, RATES, is_causal=causal, key_padding_mask=mask, cu_seqlens=docs)

    if not backward:
        return timed(fwd)
    dout = torch.randn_like(q)
    return timed(lambda: torch.autograd.grad(fwd(), (q, k, v), dout))


def decode_step_ms(cache_len, h=12, h_kv=12, d=64):
    """One decoding step: a single query against a cache of ``cache_len`` keys (causal)."""
    q = torch.randn(1, 1, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, cache_len, h_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return timed(lambda: dilated_attention(q, k, v, SEGS, RATES, is_causal=True))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1 << 20])
    p.add_argument("--json", default=None)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds per row (medians)")
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd", "causal fwd", "causal fwd+bwd"],
                   help="which rows to time")
    args = p.parse_args()
    rows = []
    print(f"{'n':>8} {'causal':>6} {'pass':>8} {'plain ms':>9} {'GQA h/4':>9} {'ratio':>6} {'padding':>9} {'ratio':>6} "
          f"{'docs 64K':>9} {'ratio':>6} {'docs 8K':>9} {'ratio':>6}")
    for n in args.seq_lens:
        for causal in (False, True):
            for backward in (False, True):
                if ("causal " if causal else "") + ("fwd+bwd" if backward else "fwd") not in args.passes:
                    continue
                case(n, 12, False, causal, backward)  # warm-up: the first timing on a fresh GPU runs slow
                times = [[case(n, 12, False, causal, backward), case(n, 3, False, causal, backward),
                          case(n, 12, True, causal, backward), case(n, 12, False, causal, backward, doc_len=1 << 16),
                          case(n, 12, False, causal, backward, doc_len=1 << 13)] for _ in range(args.rounds)]
                plain, gqa, padded, docs64k, docs8k = (statistics.median(t) for t in zip(*times))
                row = dict(n=n, causal=causal, backward=backward, plain_ms=plain, gqa_ms=gqa, padding_ms=padded,
                           docs_64k_ms=docs64k, docs_8k_ms=docs8k)
                rows.append(row)
                print(f"{n:>8} {causal!s:>6} {'fwd+bwd' if backward else 'fwd':>8} {plain:>9.2f} {gqa:>9.2f} "
                      f"{gqa / plain:>6.2f} {padded:>9.2f} {padded / plain:>6.2f} {docs64k:>9.2f} {docs64k / plain:>6.2f} "
                      f"{docs8k:>9.2f} {docs8k / plain:>6.2f}", flush=True)
    decode = {n: decode_step_ms(n) for n in args.seq_lens}
    decode_gqa = {n: decode_step_ms(n, h_kv=3) for n in args.seq_lens}
    for n in args.seq_lens:
        print(f"decoding step at a {n}-token cache: {decode[n]:.3f} ms (GQA h_kv = 3: {decode_gqa[n]:.3f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                           decode_step_ms=decode, decode_step_gqa_ms=decode_gqa), f, indent=1)


if __name__ == "__main__":
    main()
