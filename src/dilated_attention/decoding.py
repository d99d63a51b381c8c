"""The key/value cache of incremental decoding.

A decoding step attends the new queries (the last positions) against every cached key:
``dilated_attention`` with q shorter than k reads, per branch, only the rows of the segment
the new positions fall in that share their residue, so a step's cost does not grow with the
cache (k and v are read through strided views of the cache, never copied).
"""

from __future__ import annotations

import torch


class DilatedKVCache:
    """Keys and values of past positions: buffers (batch, max_len, kv_heads, head_dim).

    ``MultiheadDilatedAttention(..., kv_cache=cache)`` appends the new tokens' keys and values
    and attends its queries against everything cached so far.
    """

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, *, device=None, dtype=None) -> None:
        if min(batch, max_len, kv_heads, head_dim) <= 0:
            raise ValueError(f"batch, max_len, kv_heads and head_dim must be positive, got "
                             f"{batch}, {max_len}, {kv_heads}, {head_dim}")
        shape = (batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (b, t, kv_heads, head_dim) new keys and values; return views of all cached rows."""
        if k.shape != v.shape or k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:]:
            raise ValueError(f"new keys and values must have shape (batch, t, kv_heads, head_dim) = "
                             f"({self.k.shape[0]}, t, {self.k.shape[2]}, {self.k.shape[3]}), got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        stop = self.length + k.shape[1]
        if stop > self.k.shape[1]:
            raise ValueError(f"the cache holds {self.length} of {self.k.shape[1]} rows; {k.shape[1]} more do not fit "
                             "(make it with a larger max_len, or reset() it)")
        self.k[:, self.length : stop] = k
        self.v[:, self.length : stop] = v
        self.length = stop
        return self.k[:, :stop], self.v[:, :stop]

    def reset(self) -> None:
        """Forget every cached row (the buffers are kept)."""
        self.length = 0
