"""The functional core: ``dilated_attention`` and its exact autograd.

Forward runs every work item of the schedule (see ``plan``) as dense attention over
strided views and merges the items through their log-sum-exp into one accumulator
(float32, float64 for float64 inputs; the Triton kernels merge in float32 registers into
the output itself): out(i) is one softmax over the multiset of linked keys (Eq. 10). Backward runs each item's attention backward against the merged (out, lse)
and sums the contributions: the exact gradient, with no detached merge weights.

Both passes are ``torch.library.custom_op`` s with fake implementations, so
``torch.compile`` sees one opaque node per pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import backends
from .merge import acc_dtype, empty_partial
from .pattern_cache import PatternCache, cache_by_id, get_global_pattern_cache
from .plan import cached_plan, check_heads, check_schedule, segment_views


@torch.library.custom_op("dilated_attention::forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool,
    scale: float,
    mode: str,
    backend: str,
    cache_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (b, n, h, d) -> output (b, n, h, d) in q.dtype, merged lse (b, n, h) float32/64.

    The output is the merged attention, divided by the number of branches in head_groups mode.
    """
    impl, plan, out_scale = _resolve(q, segment_lengths, dilation_rates, mode, backend, cache_id)
    b, n, h, d = q.shape
    if hasattr(impl, "forward_all"):
        return impl.forward_all(q, k, v, plan, scale, is_causal, out_scale)
    out, lse = empty_partial(b, n, h, v.shape[-1], q.dtype, q.device)
    for item in plan:
        for qv, kv, vv, ov, lv in zip(*(segment_views(t, item) for t in (q, k, v, out, lse))):
            backends.attend_(impl, ov, lv, qv, kv, vv, scale, is_causal)
    return out.mul_(out_scale).to(q.dtype), lse


def output_factor(mode: str, segment_lengths: Sequence[int]) -> float:
    """The output's factor: 1/m in head_groups mode (the mean over the m groups), else 1."""
    return 1.0 / len(segment_lengths) if mode == "head_groups" else 1.0


def block_grad_inputs(dout: torch.Tensor, out: torch.Tensor, factor: float):
    """(dO, O) each block's backward sees when the output is ``factor * O``: (factor dout, out / factor)."""
    return (dout, out) if factor == 1.0 else (dout * factor, out / factor)


def _resolve(q, segment_lengths, dilation_rates, mode, backend, cache_id):
    """The backend, the cached plan, and the output's factor of one call."""
    plan = cached_plan(cache_by_id(cache_id), q.shape[1], q.shape[2], segment_lengths, dilation_rates, mode)
    return backends.select(q, backend), plan, output_factor(mode, segment_lengths)


@_forward_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, is_causal, scale, mode, backend, cache_id):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@torch.library.custom_op("dilated_attention::backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool,
    scale: float,
    mode: str,
    backend: str,
    cache_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout, q, k, v, out: (b, n, h, d); lse: (b, n, h) -> dq, dk, dv (b, n, h, d) in q.dtype.

    out: the forward's output; with its factor s (head_groups), each block sees dO = s dout
    and the merged attention out / s.
    """
    impl, plan, out_scale = _resolve(q, segment_lengths, dilation_rates, mode, backend, cache_id)
    if hasattr(impl, "backward_all"):
        return impl.backward_all(dout, q, k, v, out, lse, plan, scale, is_causal, out_scale)
    acc = acc_dtype(q.dtype)
    grads = [torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v)]
    dout, out = block_grad_inputs(dout.to(q.dtype), out, out_scale)
    for item in plan:
        views = zip(*(segment_views(t, item) for t in (dout, q, k, v, out, lse, *grads)))
        for dov, qv, kv, vv, ov, lv, dqv, dkv, dvv in views:
            backends.attend_backward_(impl, dqv, dkv, dvv, dov, qv, kv, vv, ov, lv, scale, is_causal)
    return tuple(g.to(q.dtype) for g in grads)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, segment_lengths, dilation_rates, is_causal, scale, mode, backend, cache_id):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *config = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.config = config


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, *ctx.config)
    return dq, dk, dv, *([None] * len(ctx.config))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def check_qkv(q, k, v) -> None:
    """Raise a TypeError/ValueError naming the argument when q, k, v do not fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
    if 0 in q.shape:
        raise ValueError(f"q, k, v must not be empty, got shape {tuple(q.shape)}")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    mode: str = "paper",
    backend: str | None = None,
    pattern_cache: PatternCache | None = None,
) -> torch.Tensor:
    """Dilated attention of LongNet (arXiv 2307.02486).

    q, k, v: (batch, seq, heads, head_dim), one dtype and device.
    segment_lengths, dilation_rates: one ``(w, r)`` per branch.
    mode: ``"paper"`` (Eq. 10: every head in every branch, merged through softmax
    denominators) or ``"head_groups"`` (heads split into one group per branch, output / m).
    backend: ``None`` picks the fastest; ``"triton"``, ``"sdpa"`` or ``"math"`` forces one.
    pattern_cache: where the schedule's plan is kept (default: the process-wide cache).
    Returns (batch, seq, heads, head_dim) in q's dtype.
    """
    check_qkv(q, k, v)
    check_schedule(segment_lengths, dilation_rates, mode)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    backends.select(q, backend)  # validates the name before any work
    cache = pattern_cache if pattern_cache is not None else get_global_pattern_cache()
    check_heads(q.shape[2], len(segment_lengths), mode)
    out, _ = _forward_op(
        q, k, v, list(segment_lengths), list(dilation_rates), is_causal,
        resolve_scale(scale, q.shape[-1]), mode, backend or "", cache.cache_id,
    )
    return out
