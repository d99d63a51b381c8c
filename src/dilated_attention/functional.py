"""The functional core: ``dilated_attention`` and its exact autograd.

Forward runs every branch of the schedule (see ``plan``) as dense attention over strided
views and merges them through their log-sum-exp into one accumulator (float32, float64
for float64 inputs; the Triton kernels merge in float32 registers into the output
itself): out(i) is one softmax over the multiset of linked keys (Eq. 10). Backward runs
each branch's attention backward against the merged (out, lse) and sums the
contributions: the exact gradient, with no detached merge weights.

Under ``torch.compile`` both passes are ``torch.library.custom_op`` s with fake
implementations, so the graph holds one opaque node per pass; the plan travels into the ops
as a list of ints, so autograd holds everything backward needs (no cache that could be
gone). Eager calls run the same two functions through an ``autograd.Function``, which skips
the custom ops' dispatch (most of a small call's host time), or, when nothing needs a gradient,
the forward alone.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import backends
from .checks import check_cu_seqlens, check_key_padding_mask, check_qkv, output_factor, resolve_scale
from .merge import acc_dtype
from .pattern_cache import PatternCache, get_global_pattern_cache
from .plan import cached_plan, check_head_slice, check_heads, check_schedule, decode_plan, encode_plan


@torch.library.custom_op("dilated_attention::forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    plan_code: Sequence[int],
    is_causal: bool,
    scale: float,
    out_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (b, m, h, d), the last m <= n positions; k, v: (b, n, h_kv, d); key_mask: (b, n) bool or None
    -> out_scale * output (b, m, h, d) in q.dtype, merged lse (b, m, h) float32/64.

    plan_code: ``encode_plan`` of the plan (the op holds everything backward needs).
    """
    impl = backends.select(q, backend, masked=key_mask is not None)
    return impl.forward_plan(q, k, v, decode_plan(tuple(plan_code)), scale, is_causal, out_scale, key_mask)


@_forward_op.register_fake
def _(q, k, v, key_mask, plan_code, is_causal, scale, out_scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@torch.library.custom_op("dilated_attention::backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    plan_code: Sequence[int],
    is_causal: bool,
    scale: float,
    out_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout, q, k, v, out: (b, n, h, d); lse: (b, n, h) -> dq, dk, dv (b, n, h, d) in q.dtype.

    out: the forward's output; with its factor s (head_groups), each block sees dO = s dout
    and the merged attention out / s.
    """
    impl = backends.select(q, backend, masked=key_mask is not None)
    return impl.backward_plan(dout, q, k, v, out, lse, decode_plan(tuple(plan_code)), scale, is_causal, out_scale,
                              key_mask)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_mask, plan_code, is_causal, scale, out_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # dk, dv: h_kv heads


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, *config = inputs
    ctx.save_for_backward(q, k, v, *output, key_mask)
    ctx.config = config


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_mask = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, key_mask, *ctx.config)
    return dq, dk, dv, None, *([None] * len(ctx.config))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """The eager path: the backend's forward_plan / backward_plan, as the custom ops run them."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, plan, is_causal, scale, out_scale, impl):
        out, lse = impl.forward_plan(q, k, v, plan, scale, is_causal, out_scale, key_mask)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.config = (plan, is_causal, scale, out_scale, impl)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        plan, is_causal, scale, out_scale, impl = ctx.config
        dq, dk, dv = impl.backward_plan(dout, q, k, v, out, lse, plan, scale, is_causal, out_scale, key_mask)
        return dq, dk, dv, None, None, None, None, None, None


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
    head_start: int = 0,
    total_heads: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dilated attention of LongNet (arXiv 2307.02486).

    q, k, v: (batch, seq, heads, head_dim), one dtype and device; k and v may have fewer heads
    h_kv dividing h (GQA / MQA: query head j reads k/v head j // (h / h_kv)), and q fewer rows
    m <= n: the queries are the last m of the n positions (bottom-right alignment, as
    flash-attn's causal mode); a decoding step is q with one row against the cache.
    segment_lengths, dilation_rates: one ``(w, r)`` per branch.
    mode: ``"paper"`` (Eq. 10: every head in every branch, merged through softmax
    denominators) or ``"head_groups"`` (heads split into one group per branch, output / m).
    backend: ``None`` picks the fastest; ``"triton"``, ``"sdpa"`` or ``"math"`` forces one.
    pattern_cache: where the schedule's plan is kept (default: the process-wide cache).
    head_start, total_heads: q, k, v hold heads ``[head_start, head_start + heads)`` of
    ``total_heads`` (default: all of them); the result is exactly those heads of the
    whole-head result (head or tensor parallelism: offsets and head groups follow the
    global head index).
    key_padding_mask: (batch, seq) bool, True where a key is ignored (``nn.MultiheadAttention``'s
    convention); positions keep their place in the segmentation, and query rows left with no
    visible key give zeros.
    cu_seqlens: packed documents (flash-attn's convention): int32 (docs + 1,) from 0 to n; each
    document is segmented from its own first row and sees no other (equal to running each
    alone). Every batch row is packed alike (flash-attn packs into batch 1).
    Returns (batch, m, heads, head_dim) in q's dtype.
    """
    check_qkv(q, k, v)
    check_schedule(segment_lengths, dilation_rates, mode)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    check_key_padding_mask(key_padding_mask, k)
    impl = backends.select(q, backend, masked=key_padding_mask is not None)  # refuses a backend that cannot, at once
    cache = pattern_cache if pattern_cache is not None else get_global_pattern_cache()
    total = check_head_slice(q.shape[2], head_start, total_heads, k.shape[2])
    check_heads(total, len(segment_lengths), mode)
    kv_heads = k.shape[2] if k.shape[2] != q.shape[2] else None
    docs = check_cu_seqlens(cu_seqlens, k.shape[1], q.shape[1])
    plan = cached_plan(cache, k.shape[1], q.shape[2], segment_lengths, dilation_rates, mode, head_start, total_heads,
                       kv_heads, docs)
    scale, out_scale = resolve_scale(scale, q.shape[-1]), output_factor(mode, segment_lengths)
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, key_padding_mask, encode_plan(plan), is_causal, scale, out_scale, backend or "")[0]
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return impl.forward_plan(q, k, v, plan, scale, is_causal, out_scale, key_padding_mask)[0]  # no autograd node
    return _Attention.apply(q, k, v, key_padding_mask, plan, is_causal, scale, out_scale, impl)
