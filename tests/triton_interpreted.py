"""Run with TRITON_INTERPRET=1: the Triton kernels on CPU tensors against the float64 reference."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from reference import reference, torch_low_precision  # noqa: E402

from dilated_attention import dilated_attention  # noqa: E402

CASES = [  # (b, n, h, d, segment_lengths, dilation_rates)
    (2, 37, 5, 16, [8, 16, 40], [1, 3, 4]),  # odd n, ragged, w % r != 0, w > n
    (1, 64, 6, 16, [16, 32, 64], [1, 2, 4]),
    (2, 50, 3, 32, [7, 20], [2, 5]),  # no r = 1: rows no branch links
    (1, 29, 4, 16, [6, 12, 24], [6, 12, 5]),  # r > h, r >= w
    (2, 37, 4, 16, [8, 40, 80], [1, 2, 2]),  # repeated rate, two branches clipped to w' = n
    (1, 40, 3, 16, [64, 128, 16, 16], [1, 1, 2, 2]),  # duplicated branches
    (2, 37, 5, 16, [16], [3]),  # one branch, r > 1: its launch also stores the rows outside each head's class
]


FP16_TOL = 2e-3  # fp16 kernels against float64: the descriptor cases err up to 5.4e-4 (unit roundoff 4.9e-4)


def _rel(a, r):
    return ((a.double() - r).norm() / r.norm()).item()


def _mismatches(label, ours, refs, rows=slice(None), tol=2e-6):
    """A failure line for each of out, dq, dk, dv (``ours``, restricted to ``rows``) whose error against
    its float64 reference is not below tol (the largest magnitude where the reference is all zeros).
    float32's 2e-6: the kernels' backward takes delta = rowsum(dO * O) apart from dP = dO V^T (flash
    attention's form), and the two round differently where a row sees one key (p = 1: the reference's dS
    is exactly 0); in 150 fresh draws of CASES' n = 29 head_groups causal case dk erred 5.1e-7 at the
    median and 2.1e-6 at most (PyTorch's float32 math: 1.4e-7 / 5.0e-7). ``main`` seeds every check, so
    its inputs, and any failure, repeat."""
    lines = []
    for name, a, r in zip(["out", "dq", "dk", "dv"], ours, refs):
        a = a[:, rows]
        err = _rel(a, r) if r.norm() > 0 else a.abs().max().item()
        if not err < tol:
            lines.append(f"{label} {name}: {err:.2e}")
    return lines


def _half_precision_failures():
    """fp16 (the interpreter has no bf16): the output merged in fp16 errs at most 2x torch's fp16 math."""
    failures = []
    b, n, h, d, segs, rates = 2, 77, 6, 32, [16, 32, 64], [1, 3, 4]
    for mode in ("paper", "head_groups"):
        for causal in (False, True):
            q, k, v, do = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(4))
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = reference(*ref_in, segs, rates, causal, None, mode)
            ref_grads = torch.autograd.grad(ref, ref_in, do)
            errors = []
            for run in ("ours", "torch"):
                ins = [t.half().requires_grad_() for t in (q, k, v)]
                if run == "ours":
                    out = dilated_attention(*ins, segs, rates, is_causal=causal, mode=mode, backend="triton")
                else:
                    out = torch_low_precision(*ins, segs, rates, causal, None, mode)
                grads = torch.autograd.grad(out, ins, do.half())
                errors.append([_rel(a, r) for a, r in zip((out, *grads), (ref, *ref_grads))])
            for name, ours, theirs in zip(["out", "dq", "dk", "dv"], *errors):
                if not ours <= 2 * theirs + 2e-5:
                    failures.append(f"fp16 {name} {mode} causal={causal}: {ours:.2e} vs torch {theirs:.2e}")
    return failures


def _large_lse_failures():
    """A duplicated branch is the branch alone (the in-kernel merge's weights sum to 1 at any lse)."""
    failures = []
    q, k, v = (torch.randn(2, 40, 4, 16) for _ in range(3))
    for scale in (1e4, 1e7):
        once = dilated_attention(q, k, v, [16], [2], scale=scale, backend="triton")
        twice = dilated_attention(q, k, v, [16, 16], [2, 2], scale=scale, backend="triton")
        err = (twice - once).abs().max().item()
        if not err < 1e-5:
            failures.append(f"duplicated branch at scale={scale}: max error {err:.2e}")
    return failures


def _scale_failures():
    """Negative and zero scales on the fused and the per-branch kernels, causal or not. At scale -6
    the scores span hundreds (in log2 units): a running max taken on the wrong side overflows.
    float32 scores that large err ~1e-5 against float64."""
    failures = []
    for n, segs, rates in ((256, [64, 128, 256], [1, 2, 4]), (37, [8, 16, 40], [1, 3, 4]),  # fused; per-branch
                           (300, [100, 300], [1, 3]),  # per-branch with key blocks every row sees in full
                           (160, [128, 256], [1, 2])):  # fused, each pair once (weighted)
        for scale, causal in ((-6.0, False), (-6.0, True), (0.0, False)):
            q, k, v, do = (torch.randn(1, n, 4, 16, dtype=torch.float64) for _ in range(4))
            ours = [t.float().requires_grad_() for t in (q, k, v)]
            out = dilated_attention(*ours, segs, rates, is_causal=causal, scale=scale, backend="triton")
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = reference(*ref_in, segs, rates, causal, scale)
            failures += _mismatches(f"scale={scale} n={n} causal={causal}",
                                    (out, *torch.autograd.grad(out, ours, do.float())),
                                    (ref, *torch.autograd.grad(ref, ref_in, do)), tol=1e-4 if scale < 0 else 2e-6)
    return failures


def _head_slice_failures():
    """head_start / total_heads: a slice of heads is exactly that slice of the whole-head result."""
    failures = []
    q, k, v = (torch.randn(1, 37, 7, 16) for _ in range(3))
    for mode, segs, rates, causal in (("paper", [8, 16, 40], [1, 3, 4], False),
                                      ("head_groups", [8, 16, 40], [1, 3, 4], False),
                                      # fused, each pair once (weighted); causal: the first branch apart, its
                                      # pairs weighted relative to each head's global index
                                      ("paper", [128, 256], [1, 2], False), ("paper", [128, 256], [1, 2], True)):
        full = dilated_attention(q, k, v, segs, rates, mode=mode, backend="triton", is_causal=causal)
        for start, stop in ((3, 7), (2, 3)):
            part = dilated_attention(*(t[:, :, start:stop] for t in (q, k, v)), segs, rates, mode=mode,
                                     backend="triton", head_start=start, total_heads=7, is_causal=causal)
            err = (part - full[:, :, start:stop]).abs().max().item()
            if not err < 1e-6:
                failures.append(f"heads [{start}, {stop}) {mode} {segs} {rates} causal={causal}: max error "
                                f"{err:.2e}")
    return failures


def _gqa_failures():
    """k, v with h_kv heads (GQA, MQA): out, dq, dk, dv against the float64 reference on repeated heads."""
    failures = []
    segs, rates = [8, 16, 40], [1, 3, 4]
    for h_kv in (1, 2, 3):
        for mode in ("paper", "head_groups"):
            for causal in (False, True):
                q, do = torch.randn(2, 37, 6, 16, dtype=torch.float64), torch.randn(2, 37, 6, 16, dtype=torch.float64)
                k, v = (torch.randn(2, 37, h_kv, 16, dtype=torch.float64) for _ in range(2))
                ours = [t.float().requires_grad_() for t in (q, k, v)]
                out = dilated_attention(*ours, segs, rates, is_causal=causal, mode=mode, backend="triton")
                grads = torch.autograd.grad(out, ours, do.float())
                ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
                g = 6 // h_kv
                ref = reference(ref_in[0], ref_in[1].repeat_interleave(g, 2), ref_in[2].repeat_interleave(g, 2),
                                segs, rates, causal, None, mode)
                ref_grads = torch.autograd.grad(ref, ref_in, do)
                failures += _mismatches(f"GQA h_kv={h_kv} {mode} causal={causal}", (out, *grads), (ref, *ref_grads))
    return failures


def _padding_failures():
    """key_padding_mask (with GQA too): every masked key ignored; rows left with no key give zeros."""
    failures = []
    segs, rates = [8, 16, 40], [1, 3, 4]
    for h_kv in (6, 2):
        for mode in ("paper", "head_groups"):
            for causal in (False, True):
                g = torch.Generator().manual_seed(h_kv)
                q, do = (torch.randn(2, 37, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))
                k, v = (torch.randn(2, 37, h_kv, 16, generator=g, dtype=torch.float64) for _ in range(2))
                mask = torch.rand(2, 37, generator=g) < 0.4
                mask[1] = True  # a sequence with no visible key
                mask[0, :8] = True
                ours = [t.float().requires_grad_() for t in (q, k, v)]
                out = dilated_attention(*ours, segs, rates, is_causal=causal, mode=mode, backend="triton",
                                        key_padding_mask=mask)
                grads = torch.autograd.grad(out, ours, do.float())
                ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
                rep = 6 // h_kv
                ref = reference(ref_in[0], ref_in[1].repeat_interleave(rep, 2), ref_in[2].repeat_interleave(rep, 2),
                                segs, rates, causal, None, mode, key_padding_mask=mask)
                ref_grads = torch.autograd.grad(ref, ref_in, do)
                failures += _mismatches(f"padding h_kv={h_kv} {mode} causal={causal}", (out, *grads),
                                        (ref, *ref_grads))
    return failures


def _short_query_failures():
    """q shorter than k (the last m positions): the last m rows of the full result, and gradients."""
    failures = []
    segs, rates = [8, 16, 40], [1, 3, 4]
    for m in (1, 5, 20):
        for causal in (False, True):
            g = torch.Generator().manual_seed(m)
            q, do = torch.randn(2, 37, 6, 16, generator=g), torch.randn(2, m, 6, 16, generator=g)
            k, v = (torch.randn(2, 37, 2, 16, generator=g) for _ in range(2))
            mask = torch.rand(2, 37, generator=g) < 0.2
            ours = [q[:, 37 - m :].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
            out = dilated_attention(*ours, segs, rates, is_causal=causal, backend="triton", key_padding_mask=mask)
            grads = torch.autograd.grad(out, ours, do)
            ref_in = [t.double().requires_grad_() for t in (q, k, v)]
            ref = reference(ref_in[0], *(t.repeat_interleave(3, 2) for t in ref_in[1:]), segs, rates, causal,
                            key_padding_mask=mask)[:, 37 - m :]
            ref_grads = torch.autograd.grad(ref, ref_in, do.double())
            ref_grads = (ref_grads[0][:, 37 - m :], *ref_grads[1:])
            failures += _mismatches(f"short queries m={m} causal={causal}", (out, *grads), (ref, *ref_grads))
    return failures


def _packed_failures():
    """cu_seqlens: every document equals the document alone (an empty and a one-row document too)."""
    failures = []
    segs, rates = [8, 16, 40], [1, 3, 4]
    bounds = torch.tensor([0, 13, 14, 14, 44, 51], dtype=torch.int32)
    for mode in ("paper", "head_groups"):
        for causal in (False, True):
            g = torch.Generator().manual_seed(7)
            q, do = (torch.randn(1, 51, 6, 16, generator=g) for _ in range(2))
            k, v = (torch.randn(1, 51, 2, 16, generator=g) for _ in range(2))
            ours = [t.clone().requires_grad_() for t in (q, k, v)]
            out = dilated_attention(*ours, segs, rates, is_causal=causal, mode=mode, backend="triton", cu_seqlens=bounds)
            grads = torch.autograd.grad(out, ours, do)
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                if b == a:
                    continue
                part = [t[:, a:b].double().requires_grad_() for t in (q, k, v)]
                ref = reference(part[0], *(t.repeat_interleave(3, 2) for t in part[1:]), segs, rates, causal, None, mode)
                ref_grads = torch.autograd.grad(ref, part, do[:, a:b].double())
                failures += _mismatches(f"packed [{a}, {b}) {mode} causal={causal}", (out, *grads),
                                        (ref, *ref_grads), slice(a, b))
    return failures


def _nan_failures():
    """test_core's NaN check on the kernels, with plans whose key blocks are full (the forward's
    unmasked blocks take the row maxima of the raw scores), per-branch and fused."""
    from test_core import _check_nan_rows, _nan_cases

    cases = _nan_cases() + [(1, 200, 3, 16, [128, 200], [1, 2]), (1, 256, 4, 16, [64, 128, 256], [1, 2, 4])]
    try:
        _check_nan_rows("triton", torch.float32, "cpu", head_dim=16, cases=cases)
    except AssertionError as e:
        return [f"NaN rows: {e}"]
    return []


def _fused_failures():
    """Plans the fused all-branch kernels take (segments multiples of the tile span, or one segment),
    counting each (row, key) pair once per branch or once weighted: with GQA, a key mask, rates without
    r = 1, a ragged last segment and packed documents, against the float64 reference (each document
    against the document alone), causal or not (off CUDA a causal plan counted per branch runs fused,
    ``triton.fused_causal``; a causal weighted one runs its first branch apart, weighted per pair, and
    the rest fused, or the first branch alone where it covers every document: ``first_apart``)."""
    from dilated_attention.backends import triton_fused
    from dilated_attention.plan import build_plan

    failures = []
    for b, n, h, h_kv, segs, rates, masked, bounds, causal, union in (
            (2, 200, 5, 5, [64, 128, 256], [1, 2, 4], False, None, False, False),
            (1, 293, 4, 2, [64, 128], [1, 4], True, None, False, False),
            (1, 160, 6, 3, [32, 64], [2, 2], False, None, False, False),
            (1, 300, 4, 2, [32, 64], [1, 2], True, (0, 64, 192, 300), False, False),
            (2, 300, 5, 5, [64, 128, 256], [1, 2, 4], False, None, True, False),  # ragged last segment
            (1, 293, 4, 2, [32, 256, 512], [1, 2, 2], True, None, True, False),  # w' = n
            (1, 320, 6, 3, [32, 128, 256], [1, 2, 2], False, None, True, False),  # repeated rate
            (1, 576, 4, 2, [32, 256], [1, 2], True, (0, 256, 576), True, False),  # documents
            # each pair once, weighted (``triton_fused.union``): ragged, GQA, key mask, causal; documents, one
            # shorter than every segment; a duplicated branch and every branch clipped to w' = n
            (1, 416, 4, 2, [128, 256, 512], [1, 2, 4], True, None, True, True),
            (1, 356, 4, 2, [128, 256], [1, 2], True, (0, 100, 356), False, True),
            (2, 100, 3, 3, [128, 128, 256], [1, 1, 2], False, None, False, True),
            (1, 356, 4, 2, [128, 256], [1, 2], False, (0, 100, 356), True, True),
            (2, 100, 3, 3, [128, 128, 256], [1, 1, 2], False, None, True, True),  # the first branch alone
            # the same first branch and call geometry, other rates: the launches made for the case above (its
            # links) must not be taken again
            (2, 100, 3, 3, [128, 256], [1, 2], False, None, True, True),
            (1, 300, 4, 4, [256, 512], [2, 4], False, None, True, True),  # no r = 1: rows no branch links
            (2, 100, 3, 3, [128, 256], [2, 4], True, None, True, True)):  # the same, the first branch alone
        docs = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
        plan = build_plan(n, h, segs, rates, "paper", kv_heads=h_kv, cu_seqlens=bounds)
        tiled = (triton_fused.fwd_tile(plan, n, h, 16, torch.float32),
                 triton_fused.bwd_tiles(plan, n, h, 16, torch.float32, causal, masked))
        if not all(tiled) or triton_fused.union(plan, n) != union:
            failures.append(f"fused kernels do not take {segs}, {rates} at n={n}, documents {bounds} (union {union})")
        g = torch.Generator().manual_seed(n)
        q, do = (torch.randn(b, n, h, 16, dtype=torch.float64, generator=g) for _ in range(2))
        k, v = (torch.randn(b, n, h_kv, 16, dtype=torch.float64, generator=g) for _ in range(2))
        mask = (torch.rand(b, n, generator=g) < 0.3) if masked else None
        ours = [t.float().requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*ours, segs, rates, is_causal=causal, backend="triton", key_padding_mask=mask,
                                cu_seqlens=docs)
        grads = torch.autograd.grad(out, ours, do.float())
        rep = h // h_kv
        for lo, hi in zip(bounds or (0,), (bounds or (0, n))[1:]):
            ref_in = [t[:, lo:hi].clone().requires_grad_() for t in (q, k, v)]
            ref = reference(ref_in[0], *(t.repeat_interleave(rep, 2) for t in ref_in[1:]), segs, rates, causal, None,
                            "paper", key_padding_mask=None if mask is None else mask[:, lo:hi])
            ref_grads = torch.autograd.grad(ref, ref_in, do[:, lo:hi])
            failures += _mismatches(f"fused {segs} {rates} n={n} h_kv={h_kv} causal={causal} rows [{lo}, {hi})",
                                    (out, *grads), (ref, *ref_grads), slice(lo, hi))
    return failures


def _tma_failures():
    """Keys and values through tensor descriptors (TMA: sm_90's forward, causal dQ) give exactly the
    pointer loads' outputs and gradients: fused and per-branch plans, GQA, key masks, head_groups,
    documents (fp16; a descriptor off by one row changes every case). Causal calls load every kind of key
    block a plain call does (full, masked, a class's ragged last one) and run dQ on descriptors too; the
    union plan also runs plain (its all-branch weighted launch runs only then)."""
    import triton

    from dilated_attention.backends import triton_fused

    failures = []
    pointer_loads = triton_fused.tma_loads
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
    causal_only = (True,)
    for n, h, h_kv, segs, rates, mode, masked, bounds, causals in (
            (200, 5, 5, [64, 128, 256], [1, 2, 4], "paper", False, None, causal_only),  # fused
            (293, 4, 2, [64, 128], [1, 4], "paper", True, None, causal_only),  # fused, GQA, key mask
            (300, 4, 2, [32, 64], [1, 2], "paper", False, (0, 64, 192, 300), causal_only),  # fused documents
            # fused, each pair once (weighted), key mask
            (288, 4, 2, [128, 256], [1, 2], "paper", True, None, (False, True)),
            (37, 5, 5, [8, 16, 40], [1, 3, 4], "paper", False, None, causal_only),  # per-branch
            (37, 6, 2, [8, 16, 40], [1, 3, 4], "head_groups", True, None, causal_only),  # per-branch, GQA, key mask
            (51, 6, 3, [8, 16, 40], [1, 3, 4], "paper", False, (0, 13, 44, 51), causal_only)):  # per-branch documents
        g = torch.Generator().manual_seed(n)
        q, do = (torch.randn(1, n, h, 16, generator=g).half() for _ in range(2))
        k, v = (torch.randn(1, n, h_kv, 16, generator=g).half() for _ in range(2))
        mask = (torch.rand(1, n, generator=g) < 0.3) if masked else None
        docs = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
        for causal in causals:
            results = []
            for tma in (False, True):
                triton_fused.tma_loads = (lambda k, v: True) if tma else pointer_loads
                ins = [t.clone().requires_grad_() for t in (q, k, v)]
                out = dilated_attention(*ins, segs, rates, is_causal=causal, mode=mode, backend="triton",
                                        key_padding_mask=mask, cu_seqlens=docs)
                results.append((out, *torch.autograd.grad(out, ins, do)))
            triton_fused.tma_loads = pointer_loads
            label = f"TMA {segs} {rates} n={n} h_kv={h_kv} {mode} causal={causal}"
            for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
                if not torch.equal(a, b):
                    failures.append(f"{label} {name}: max difference {(a - b).abs().max().item():.2e}")
            for lo, hi in zip(bounds or (0,), (bounds or (0, n))[1:]):  # each document against float64 alone
                ref_in = [t[:, lo:hi].double().requires_grad_() for t in (q, k, v)]
                ref = reference(ref_in[0], *(t.repeat_interleave(h // h_kv, 2) for t in ref_in[1:]), segs, rates,
                                causal, None, mode, key_padding_mask=None if mask is None else mask[:, lo:hi])
                ref_grads = torch.autograd.grad(ref, ref_in, do[:, lo:hi].double())
                failures += _mismatches(f"{label} rows [{lo}, {hi})", results[1], (ref, *ref_grads), slice(lo, hi),
                                        tol=FP16_TOL)
    return failures


def _reference_failures():
    """Every CASES schedule in both modes, causal and not, forward and all gradients against float64."""
    failures = []
    for b, n, h, d, segs, rates in CASES:
        for mode in ("paper", "head_groups"):
            if mode == "head_groups" and h < len(segs):
                continue
            for causal in (False, True):
                q, k, v, do = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(4))
                ours = [t.float().requires_grad_() for t in (q, k, v)]
                out = dilated_attention(*ours, segs, rates, is_causal=causal, mode=mode, backend="triton")
                grads = torch.autograd.grad(out, ours, do.float())
                ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
                ref = reference(*ref_in, segs, rates, causal, None, mode)
                ref_grads = torch.autograd.grad(ref, ref_in, do)
                failures += _mismatches(f"n={n} w={segs} r={rates} {mode} causal={causal}", (out, *grads),
                                        (ref, *ref_grads))
    return failures


CHECKS = (_reference_failures, _half_precision_failures, _large_lse_failures, _scale_failures, _head_slice_failures,
          _gqa_failures, _padding_failures, _short_query_failures, _packed_failures, _fused_failures, _nan_failures,
          _tma_failures)


# The two processes test_triton.py runs side by side, balanced on one core each of the 2-core host
# (seconds per check there: fused 192, tma 135, reference 128, gqa 109, padding 78, scale 76, half precision
# 45, nan 42, short query 36, packed 29, head slice 10, large lse 7; the parts read 431 / 468 s with packed
# in the second).
PARTS = ((_tma_failures, _reference_failures, _gqa_failures, _large_lse_failures, _head_slice_failures,
          _short_query_failures, _packed_failures),
         (_fused_failures, _padding_failures, _scale_failures, _nan_failures, _half_precision_failures))
assert sorted(c.__name__ for part in PARTS for c in part) == sorted(c.__name__ for c in CHECKS)  # each check once


def main(part: int | None = None):
    """The checks of ``PARTS[part]`` (all of CHECKS when None), each on random inputs from its own seed (its
    place in CHECKS): its inputs, and any failure, repeat however the checks are split."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.use_deterministic_algorithms(True)  # torch.empty fills with NaN: rows no kernel writes show
    failures = []
    for check in CHECKS if part is None else PARTS[part]:
        torch.manual_seed(CHECKS.index(check))
        failures += check()
    if failures:
        raise SystemExit("\n".join(failures))
    print("triton kernels under the interpreter: all cases match")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
