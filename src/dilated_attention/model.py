"""LongNet: a decoder-only language model on dilated attention (MAGNETO blocks, rotary positions).

``LongNetLM(vocab_size, embed_dim, num_layers, num_heads, segment_lengths, dilation_rates)``
maps tokens (b, n) to logits (b, n, vocab_size); ``generate`` decodes with a
``DilatedKVCache`` per layer, each step reading only the cached rows its token links to.
With ``device_mesh`` (dimensions "ring" and/or "heads"), every attention layer is sequence
(and head) parallel: each rank passes its shard of the tokens (``shard``) and gets its logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .decoding import DilatedKVCache
from .mesh import RingDistributedMultiheadDilatedAttention
from .modules import MultiheadDilatedAttention


class LongNetDecoderLayer(nn.Module):
    """Pre-LN residual block with MAGNETO's sub-LayerNorms: x + attn(LN(x)), then x + FFN(LN(x)).

    The attention normalises before its output projection (``layer_norm=True``), the feed-forward
    before its second linear; ``dropout`` applies inside the feed-forward (after the activation)
    and to both residual branches."""

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 *, num_kv_heads: int | None = None, mode: str = "paper", ffn_dim: int | None = None,
                 dropout: float = 0.0, rotary_base: float = 10000.0, gamma_init: float = 1.0, device_mesh=None,
                 layout: str = "contiguous") -> None:
        super().__init__()
        ffn_dim = ffn_dim or 4 * embed_dim
        self.attn_norm = nn.LayerNorm(embed_dim)
        kw = dict(mode=mode, num_kv_heads=num_kv_heads, rotary_base=rotary_base, gamma_init=gamma_init)
        if device_mesh is None:
            self.attn = MultiheadDilatedAttention(embed_dim, num_heads, segment_lengths, dilation_rates, **kw)
        else:  # sequence (and head) parallel: this rank's shard of the sequence
            self.attn = RingDistributedMultiheadDilatedAttention(embed_dim, num_heads, segment_lengths, dilation_rates,
                                                                 device_mesh=device_mesh, layout=layout, **kw)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(ffn_dim),
                                 nn.Linear(ffn_dim, embed_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: DilatedKVCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, n, embed_dim) -> (b, n, embed_dim); causal."""
        h, _ = self.attn(self.attn_norm(x), is_causal=True, kv_cache=kv_cache, key_padding_mask=key_padding_mask)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class LongNetLM(nn.Module):
    """Decoder-only LongNet language model: tokens (b, n) -> logits (b, n, vocab_size)."""

    def __init__(self, vocab_size: int, embed_dim: int, num_layers: int, num_heads: int,
                 segment_lengths: Sequence[int], dilation_rates: Sequence[int], *, num_kv_heads: int | None = None,
                 mode: str = "paper", ffn_dim: int | None = None, dropout: float = 0.0,
                 rotary_base: float = 10000.0, device_mesh=None, layout: str = "contiguous") -> None:
        super().__init__()
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
                           segment_lengths=list(segment_lengths), dilation_rates=list(dilation_rates),
                           num_kv_heads=num_kv_heads, mode=mode, ffn_dim=ffn_dim, dropout=dropout,
                           rotary_base=rotary_base)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        gamma = (2 * num_layers) ** -0.5  # MAGNETO's initialisation scale for deep stacks
        self.layers = nn.ModuleList(
            LongNetDecoderLayer(embed_dim, num_heads, segment_lengths, dilation_rates, num_kv_heads=num_kv_heads,
                                mode=mode, ffn_dim=ffn_dim, dropout=dropout, rotary_base=rotary_base,
                                gamma_init=gamma, device_mesh=device_mesh, layout=layout)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, kv_caches: list[DilatedKVCache] | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (b, n) int -> logits (b, n, vocab_size). With ``kv_caches`` (one per layer), the
        tokens continue the cached ones."""
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if kv_caches is None else kv_caches[i], key_padding_mask)
        return self.head(self.norm(x))

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows (b, n/P, ...) of a full (b, n, ...) tensor (tokens, targets) with ``device_mesh``."""
        attention = self.layers[0].attn.attention
        return attention.shard(x) if hasattr(attention, "shard") else x

    def new_caches(self, batch: int, max_len: int) -> list[DilatedKVCache]:
        """One empty ``DilatedKVCache`` per layer, on the model's device and dtype."""
        attn = self.layers[0].attn
        p = self.head.weight
        return [DilatedKVCache(batch, max_len, attn.num_kv_heads, attn.head_dim, device=p.device, dtype=p.dtype)
                for _ in self.layers]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """prompt (b, n) -> (b, n + max_new_tokens): the prompt, then sampled tokens (greedy at temperature 0)."""
        caches = self.new_caches(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = self(prompt, caches)[:, -1]
        out = [prompt]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(token)
            logits = self(token, caches)[:, -1]
        return torch.cat(out, dim=1)
