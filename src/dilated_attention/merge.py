"""Merging partial attention results through their log-sum-exp.

Eq. 10 of LongNet weights each branch by its softmax denominator, which is one softmax
over the multiset union of the branches' keys. Partial results ``(out_a, lse_a)`` and
``(out_b, lse_b)`` over disjoint parts of that multiset combine exactly as

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

which is how branches, and ring steps, are merged. A row with no key has lse = -inf and
output 0; the guards below keep such rows at 0 instead of NaN.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_partial(b: int, n: int, h: int, d: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge's identity: out (b, n, h, d) zeros and lse (b, n, h) -inf, in acc_dtype(dtype)."""
    acc = acc_dtype(dtype)
    out = torch.zeros((b, n, h, d), dtype=acc, device=device)
    return out, torch.full((b, n, h), float("-inf"), dtype=acc, device=device)


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge ``(out_b, lse_b)`` into the accumulators ``(out, lse)`` in place.

    out: (..., d) float32/64 accumulator (any strided view); lse: (...) same dtype.
    out_b: (..., d) any float dtype; lse_b: (...) float.
    The weights are taken relative to the larger lse, so they sum to 1 to rounding however
    large the lse (``logaddexp`` rounded to the lse's ulp would not); NaN propagates.
    """
    lse_b = lse_b.to(lse.dtype)
    top = torch.maximum(lse, lse_b)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # rows with no key yet: weights 0
    w_a, w_b = torch.exp(lse - top), torch.exp(lse_b - top)
    total = w_a + w_b
    inv = 1.0 / torch.where(total == 0, torch.ones_like(total), total)
    out.mul_((w_a * inv).unsqueeze(-1))
    out.add_(out_b.to(out.dtype) * (w_b * inv).unsqueeze(-1))
    lse.copy_(top + torch.log(total))
