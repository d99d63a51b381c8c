"""Portable backend: matmul attention on any device and dtype, chunked so memory stays bounded.

Blocks are laid out (b, S, c, h, d): ``S`` independent segments of ``c`` rows each.
Scores are built for a chunk of segments and query rows at a time, never more than
``SCORE_BUDGET`` elements, so the extra memory does not grow with n. Low precision inputs
are computed in float32; float64 stays float64.
"""

from __future__ import annotations

import torch

from ..merge import acc_dtype
from .base import BlockBackend

SCORE_BUDGET = 1 << 22  # score elements per chunk (16 MiB in float32)


def _chunks(b: int, segments: int, rows: int, keys: int, heads: int):
    """Yield (segment slice, query-row slice) covering the block within SCORE_BUDGET."""
    per_segment = b * heads * rows * keys
    if per_segment <= SCORE_BUDGET:
        step = max(1, SCORE_BUDGET // per_segment)
        for s0 in range(0, segments, step):
            yield slice(s0, min(s0 + step, segments)), slice(0, rows)
    else:
        step = max(1, SCORE_BUDGET // (b * heads * keys))
        for s0 in range(segments):
            for q0 in range(0, rows, step):
                yield slice(s0, s0 + 1), slice(q0, min(q0 + step, rows))


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, q0: int, key_mask=None) -> torch.Tensor:
    """(b, s, q, h, d) x (b, s, k, h, d) -> (b, s, h, q, k), causal rows starting at q0; key_mask (b, s, k)
    True where a key is ignored."""
    s = torch.einsum("bsqhd,bskhd->bshqk", q, k).mul_(scale)
    if causal:
        rows = torch.arange(q0, q0 + q.shape[2], device=q.device)
        cols = torch.arange(k.shape[2], device=q.device)
        s.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
    if key_mask is not None:
        s.masked_fill_(key_mask[:, :, None, None, :], float("-inf"))
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that see no key) as 0, so exp(s - lse) is 0 there instead of NaN."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def forward(q, k, v, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
    """q: (b, S, c, h, d); k, v: (b, S, ck, h, d); key_mask: (b, S, ck) bool or None
    -> out (b, S, c, h, d) in the accumulation dtype, lse (b, S, c, h). Causal: row i sees keys <= i + q_offset."""
    acc = acc_dtype(q.dtype)
    b, segments, rows, heads, d = q.shape
    out = torch.empty((b, segments, rows, heads, v.shape[-1]), dtype=acc, device=q.device)
    lse = torch.empty((b, segments, rows, heads), dtype=acc, device=q.device)
    for ss, qs in _chunks(b, segments, rows, k.shape[2], heads):
        kc, vc = k[:, ss].to(acc), v[:, ss].to(acc)
        mask = None if key_mask is None else key_mask[:, ss]
        s = _scores(q[:, ss, qs].to(acc), kc, scale, causal, qs.start + q_offset, mask)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(row_lse).unsqueeze(-1))
        out[:, ss, qs] = torch.einsum("bshqk,bskhd->bsqhd", p, vc)
        lse[:, ss, qs] = row_lse.transpose(-1, -2)
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
    """Gradients of one block against the merged (out, lse) of its rows.

    dout, q, out: (b, S, c, h, d); k, v: (b, S, ck, h, d); lse: (b, S, c, h); key_mask (b, S, ck) or None.
    Returns dq (b, S, c, h, d), dk, dv (b, S, ck, h, d) in the accumulation dtype.
    """
    acc = acc_dtype(q.dtype)
    b, segments, rows, heads, d = q.shape
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for ss, qs in _chunks(b, segments, rows, k.shape[2], heads):
        qc, kc, vc = q[:, ss, qs].to(acc), k[:, ss].to(acc), v[:, ss].to(acc)
        doc = dout[:, ss, qs].to(acc)
        delta = (doc * out[:, ss, qs].to(acc)).sum(-1).transpose(-1, -2)  # (b, s, h, q)
        mask = None if key_mask is None else key_mask[:, ss]
        row_lse = _finite(lse[:, ss, qs].to(acc)).transpose(-1, -2).unsqueeze(-1)
        p = torch.exp(_scores(qc, kc, scale, causal, qs.start + q_offset, mask) - row_lse)
        dv[:, ss] += torch.einsum("bshqk,bsqhd->bskhd", p, doc)
        ds = p * (torch.einsum("bsqhd,bskhd->bshqk", doc, vc) - delta.unsqueeze(-1))
        dq[:, ss, qs] = torch.einsum("bshqk,bskhd->bsqhd", ds, kc) * scale
        dk[:, ss] += torch.einsum("bshqk,bsqhd->bskhd", ds, qc) * scale
    return dq, dk, dv


class Math(BlockBackend):
    name = "math"

    def not_supported_reasons(self, q: torch.Tensor, masked: bool = False) -> list[str]:
        return []

    def block_forward(self, q, k, v, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
        return forward(q, k, v, scale, causal, key_mask, q_offset)

    def block_backward(self, dout, q, k, v, out, lse, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
        return backward(dout, q, k, v, out, lse, scale, causal, key_mask, q_offset)
