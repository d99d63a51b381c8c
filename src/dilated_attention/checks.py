"""Input checks and the small rules every entry point shares (functional op, modules, ring)."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def check_qkv(q, k, v) -> None:
    """Raise a TypeError/ValueError naming the argument when q, k, v do not fit together.

    q: (b, m, h, d); k, v: (b, n, h_kv, d) with h_kv dividing h (h_kv = h: plain attention) and
    m <= n (the queries are the last m positions)."""
    try:  # the common case in one expression (host time per call); any doubt goes through the checks below
        qs, ks = q.shape, k.shape
        if (len(qs) == len(ks) == 4 and v.shape == ks and ks[0] == qs[0] and ks[3] == qs[3] and qs[2] % ks[2] == 0
                and 0 < qs[1] <= ks[1] and 0 not in qs and q.dtype == k.dtype == v.dtype and q.is_floating_point()
                and q.device == k.device == v.device and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
                and isinstance(v, torch.Tensor)):
            return
    except (AttributeError, TypeError, ZeroDivisionError):
        pass
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != q.shape[0] or t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} must have q's batch and head_dim {tuple(q.shape)}, got {tuple(t.shape)}")
        if q.shape[2] % t.shape[2]:
            raise ValueError(f"{name} has {t.shape[2]} heads, which must divide q's {q.shape[2]} heads (GQA: query head "
                             f"j reads k/v head j // (h / h_kv))")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q has more rows ({q.shape[1]}) than k and v ({k.shape[1]}): the queries are the last "
                         "q.shape[1] positions of the keys' sequence (bottom-right aligned), so m <= n")


def check_key_padding_mask(mask, k) -> None:
    """A key padding mask is None or a (batch, keys) bool tensor on k's device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore the key), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(k.shape[:2]):
        raise ValueError(f"key_padding_mask must have shape (batch, seq) = {tuple(k.shape[:2])}, got {tuple(mask.shape)}")
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask must be on the keys' device ({k.device}), got {mask.device}")


def check_cu_seqlens(cu_seqlens, n: int, queries: int) -> tuple[int, ...] | None:
    """Packed documents' boundaries over n rows as a tuple of ints (0, ..., n), or None; raises naming
    what is wrong (``queries``: q's rows, which must be n)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 tensor of document boundaries, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    bounds = tuple(cu_seqlens.tolist())
    if cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n:
        raise ValueError(f"cu_seqlens must have shape (docs + 1,), start at 0 and end at the sequence length {n}, "
                         f"got {bounds if len(bounds) <= 8 else bounds[:4] + ('...',) + bounds[-2:]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError("cu_seqlens must be non-decreasing (document lengths are its differences)")
    if queries != n:
        raise ValueError("cu_seqlens takes q, k, v of one length (packed documents, not decoding)")
    return bounds


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (None gives head_dim ** -0.5), got {scale}")
    return float(scale)


def output_factor(mode: str, segment_lengths: Sequence[int]) -> float:
    """The output's factor: 1/m in head_groups mode (the mean over the m groups), else 1."""
    return 1.0 / len(segment_lengths) if mode == "head_groups" else 1.0


def check_dropout(dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def refuse_dropout(module) -> None:
    """Attention dropout is not implemented: refuse it in training rather than ignore it."""
    if module.training and module.dropout > 0.0:
        raise NotImplementedError(
            f"{type(module).__name__}: attention dropout (dropout={module.dropout}) is not implemented; "
            "construct it with dropout=0.0, or call .eval()"
        )


def check_same_length(q, k) -> None:
    """Sequence parallel layers take q, k, v shards of one length (shorter queries: one device)."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"the ring takes q, k, v shards of the same length, got {q.shape[1]} and {k.shape[1]} rows; "
                         "queries shorter than keys (decoding) run on one device (DilatedAttention, DilatedKVCache)")
