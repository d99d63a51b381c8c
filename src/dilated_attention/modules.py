"""``nn.Module`` wrappers over the functional core."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import backends
from .checks import check_dropout, refuse_dropout
from .decoding import DilatedKVCache
from .functional import dilated_attention
from .pattern_cache import PatternCache, get_global_pattern_cache
from .plan import check_schedule


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of x (b, n, h, d) at the global positions (n,) of its rows (halves rotated)."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) / (d // 2))
    angles = positions.to(device=x.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = (f(angles)[None, :, None, :].to(x.dtype) for f in (torch.cos, torch.sin))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class UsesPatternCache:
    """``use_pattern_cache=True``: the process-wide cache; False: a cache of this instance alone."""

    def _init_pattern_cache(self, use_pattern_cache: bool) -> None:
        self.use_pattern_cache = bool(use_pattern_cache)
        self._own_cache = None if self.use_pattern_cache else PatternCache()

    @property
    def pattern_cache(self) -> PatternCache:
        return get_global_pattern_cache() if self._own_cache is None else self._own_cache


class DilatedAttention(UsesPatternCache, nn.Module):
    """Dilated attention over (batch, seq, heads, head_dim) inputs; no parameters.

    ``forward(q, k, v, is_causal=False)`` returns (batch, seq, heads, head_dim).
    ``backend``: as in ``dilated_attention`` (None picks the fastest).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mode: str = "paper",
        scale: float | None = None,
        dropout: float = 0.0,
        use_pattern_cache: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_schedule(segment_lengths, dilation_rates, mode)
        backends.check_name(backend)
        self.segment_lengths = tuple(segment_lengths)
        self.dilation_rates = tuple(dilation_rates)
        self.mode = mode
        self.scale = scale
        self.backend = backend
        self.dropout = check_dropout(dropout)
        self._init_pattern_cache(use_pattern_cache)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, *,
                key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        refuse_dropout(self)
        return dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal, scale=self.scale, mode=self.mode,
            backend=self.backend, pattern_cache=self.pattern_cache, key_padding_mask=key_padding_mask,
            cu_seqlens=cu_seqlens,
        )

    def extra_repr(self) -> str:
        return f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, mode={self.mode!r}"


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention as in LongNet's MAGNETO block, batch-first.

    q/k/v projections, dilated attention, an optional LayerNorm, then ``out_proj``.
    ``num_kv_heads`` (default ``num_heads``): k/v heads, a divisor of ``num_heads`` (GQA / MQA).
    ``rotary_base``: rotary position embeddings on q and k with this base (e.g. 10000), or none;
    positions are global (the ring and mesh layers know which rows a rank holds).
    ``forward(query, key=None, value=None, *, is_causal=False, need_weights=False, key_padding_mask=None)``
    takes (batch, seq, embed_dim) (and a (batch, seq) bool mask, True = ignore the key) and
    returns ``(out (batch, seq, embed_dim), None)``. With ``kv_cache`` (a ``DilatedKVCache``),
    the keys and values of these tokens are appended to it and the queries attend to every
    cached position (incremental decoding; the mask then covers the cached keys).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mode: str = "paper",
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        use_pattern_cache: bool = True,
        num_kv_heads: int | None = None,
        rotary_base: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must be a positive divisor of num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.attention = self._make_attention(segment_lengths, dilation_rates, mode, dropout, use_pattern_cache)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, device=device, dtype=dtype) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.gamma_init = gamma_init
        self.rotary_base = rotary_base
        self._reset_parameters()

    def _make_attention(self, segment_lengths, dilation_rates, mode, dropout, use_pattern_cache) -> nn.Module:
        return DilatedAttention(
            segment_lengths, dilation_rates, mode=mode, dropout=dropout, use_pattern_cache=use_pattern_cache
        )

    def _positions(self, m: int, start: int) -> torch.Tensor:
        """Global positions (m,) of these rows: start, start + 1, ... (sharded layers override)."""
        return torch.arange(start, start + m)

    def _reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.q_proj.weight)
        nn.init.xavier_normal_(self.k_proj.weight)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        need_weights: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        kv_cache: DilatedKVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("need_weights=True is not supported: dilated attention never forms the weight matrix")
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must have shape (batch, seq, {self.embed_dim}), got {tuple(t.shape)}")
        if kv_cache is None and (key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]):
            raise ValueError(
                f"query, key and value must share (batch, seq): got {tuple(query.shape)}, "
                f"{tuple(key.shape)}, {tuple(value.shape)}"
            )
        q = self.q_proj(query).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(key).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(value).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rotary_base is not None:  # positions continue after what the cache already holds
            start = 0 if kv_cache is None else len(kv_cache)
            positions = self._positions(q.shape[1], start)
            q, k = (rotary(t, positions, self.rotary_base) for t in (q, k))
        if kv_cache is not None:  # decoding: these tokens are the latest; attend to every cached one
            k, v = kv_cache.append(k, v)
        x = self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask,
                           cu_seqlens=cu_seqlens).flatten(-2)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x), None
