"""Sequence and head parallelism on a DeviceMesh: ``RingDistributedDilatedAttention``.

A 1-D or 2-D ``torch.distributed.device_mesh.DeviceMesh`` with dimensions named
``"ring"`` (sequence parallel: the ring of ``ring.py``) and/or ``"heads"`` (head parallel).
Each of the mesh's P = R x H ranks holds ``(b, n/P, h, d)``: ring rank rho's shard of the
ring layout, cut into H consecutive pieces, piece eta for heads rank eta. Forward:

1. all-to-all inside the heads group: ``(b, n/P, h, d)`` -> ``(b, n/R, h/H, d)``, the ring
   shard of rho with the heads ``[eta h/H, (eta+1) h/H)``;
2. ring dilated attention over the ring group on those heads (``head_start`` keeps each
   head's global offset and group), or the local op when there is no ring dimension;
3. all-to-all back. Backward runs the inverse all-to-alls and the ring's backward.

Data parallelism stays DDP's or FSDP's: wrap the model over all the ranks (the loss a
mean over each rank's own tokens), and the gradients are the whole batch's.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import backends
from .checks import check_dropout, check_key_padding_mask, check_qkv, check_same_length, refuse_dropout
from .functional import dilated_attention
from .modules import MultiheadDilatedAttention, UsesPatternCache
from .plan import check_schedule
from .ring import RingDilatedAttention, SyncsParameters
from .ring_comm import AllToAll, agreement_problem, fingerprint, gather_rows
from .ring_plan import LAYOUTS, chunk_length, shard_rows

MESH_DIMS = ("ring", "heads")


def _mesh_groups(device_mesh) -> tuple:
    """(ring group or None, heads group or None) of a mesh whose dims are named "ring" and/or "heads"."""
    names = getattr(device_mesh, "mesh_dim_names", None)
    if not names or len(names) > 2 or len(set(names)) != len(names) or not set(names) <= set(MESH_DIMS):
        raise ValueError(
            f"device_mesh must be a 1-D or 2-D DeviceMesh with dimensions named 'ring' and/or 'heads', got "
            f"dimension names {names}; slice a larger mesh first, e.g. mesh['ring', 'heads']"
        )
    return tuple(device_mesh.get_group(name) if name in names else None for name in MESH_DIMS)


def _rank_size(group) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


class RingDistributedDilatedAttention(UsesPatternCache, nn.Module):
    """Dilated attention over a sequence sharded across a ("ring" x "heads") DeviceMesh.

    ``forward(q_local, k_local, v_local, is_causal=False)`` takes this rank's shard
    (b, n/P, h, d) (``shard`` cuts it from a full tensor) and returns its shard of
    ``dilated_attention`` on the whole sequence. ``layout`` is the ring's ("contiguous" or
    "zigzag"); ``comm_bytes`` the bytes this rank sent in the last forward and backward.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        device_mesh,
        mode: str = "paper",
        layout: str = "contiguous",
        scale: float | None = None,
        dropout: float = 0.0,
        use_pattern_cache: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_schedule(segment_lengths, dilation_rates, mode)
        backends.check_name(backend)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.ring_group, self.heads_group = _mesh_groups(device_mesh)
        self.device_mesh = device_mesh
        self.segment_lengths, self.dilation_rates = tuple(segment_lengths), tuple(dilation_rates)
        self.mode, self.layout, self.scale, self.backend = mode, layout, scale, backend
        self.dropout = check_dropout(dropout)
        self._init_pattern_cache(use_pattern_cache)
        self.ring = None
        if self.ring_group is not None:
            self.ring = RingDilatedAttention(segment_lengths, dilation_rates, process_group=self.ring_group, mode=mode,
                                             scale=scale, dropout=dropout, use_pattern_cache=use_pattern_cache,
                                             layout=layout, backend=backend)
        self._heads_bytes: dict[str, int] = {}

    @property
    def comm_bytes(self) -> dict[str, int]:
        ring = self.ring.comm_bytes if self.ring is not None else {}
        return {p: ring.get(p, 0) + self._heads_bytes.get(p, 0) for p in ("forward", "backward")}

    def _sizes(self) -> tuple[int, int, int, int]:
        """(ring rank, ring size, heads rank, heads size)."""
        return (*_rank_size(self.ring_group), *_rank_size(self.heads_group))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, *,
                key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: this rank's shard (b, n/P, h, d) (k, v: h_kv heads); key_padding_mask: its
        shard (b, n/P) of the mask (True = ignore the key); cu_seqlens: the global document
        boundaries, the same on every rank -> this rank's shard of the output."""
        ring_rank, ring_size, heads_rank, heads_size = self._sizes()
        self._heads_bytes = {"forward": 0, "backward": 0}
        if self.heads_group is None:
            return self.ring(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
        try:  # local checks, then agreement inside the heads group (the ring checks its own group)
            refuse_dropout(self)
            check_qkv(q, k, v)
            check_same_length(q, k)
            check_key_padding_mask(key_padding_mask, k)
            for name, t in (("q", q), ("k", k)):
                if t.shape[2] % heads_size:
                    raise ValueError(f"the {t.shape[2]} heads of {name} must divide evenly over the mesh's 'heads' "
                                     f"dimension of {heads_size} ranks")
            error = None
        except (TypeError, ValueError, NotImplementedError) as e:
            error = e
        shape = (*q.shape, k.shape[2]) if error is None else (0,)
        problem = agreement_problem(self.heads_group, {
            "shape": fingerprint(shape), "dtype": fingerprint(q.dtype) if error is None else 0,
            "is_causal": int(bool(is_causal)), "masked": int(key_padding_mask is not None),
            "schedule": fingerprint((self.segment_lengths, self.dilation_rates, self.mode, self.layout, self.scale)),
        }, error)
        if self.ring_group is not None:  # every heads group's verdict reaches every rank of the mesh
            elsewhere = agreement_problem(self.ring_group, {"heads_group_problem": int(problem is not None)})
            problem = problem or (elsewhere and "another heads group of the mesh failed its checks or disagreed")
        if error is not None:
            raise error
        if problem:
            raise ValueError(f"dilated attention: {problem}")
        h = q.shape[2]
        heads = h // heads_size
        q, k, v = (AllToAll.apply(t, self.heads_group, self._heads_bytes, True) for t in (q, k, v))
        if key_padding_mask is not None:  # the ring shard's mask: every heads rank's rows
            key_padding_mask = gather_rows(key_padding_mask.to(torch.uint8), self.heads_group).bool()
        kwargs = dict(head_start=heads_rank * heads, total_heads=h, key_padding_mask=key_padding_mask,
                      cu_seqlens=cu_seqlens)
        if self.ring is not None:
            out = self.ring(q, k, v, is_causal=is_causal, **kwargs)
        else:
            out = dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal,
                                    scale=self.scale, mode=self.mode, backend=self.backend,
                                    pattern_cache=self.pattern_cache, **kwargs)
        return AllToAll.apply(out, self.heads_group, self._heads_bytes, False)

    def _rows(self, n: int) -> list[tuple[int, int]]:
        """Global row intervals this rank holds, in local order."""
        ring_rank, ring_size, heads_rank, heads_size = self._sizes()
        chunk = chunk_length(n, ring_size, self.layout)  # checks the ring's divisibility
        ring_rows = shard_rows(n, ring_size, ring_rank, self.layout)
        local = n // ring_size
        if local % heads_size:
            multiple = ring_size * heads_size * (n // chunk // ring_size)
            raise ValueError(f"sequence length {n} must be divisible by {multiple} ({ring_size} ring x {heads_size} "
                             f"heads ranks, {self.layout} layout): pad the sequence to a multiple of {multiple}")
        piece = local // heads_size
        lo, hi = heads_rank * piece, (heads_rank + 1) * piece  # in the ring shard's local order
        rows, offset = [], 0
        for a, b in ring_rows:
            s, e = max(lo, offset), min(hi, offset + b - a)
            if e > s:
                rows.append((a + s - offset, a + e - offset))
            offset += b - a
        return rows

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows (b, n/P, ...) of a full (b, n, ...) tensor."""
        parts = [x[:, a:b] for a, b in self._rows(x.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def unshard(self, x_local: torch.Tensor) -> torch.Tensor:
        """All-gather every rank's shard back into the full (b, n, ...) on every rank."""
        x = x_local.contiguous()
        if self.heads_group is not None:
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.heads_group))]
            dist.all_gather(parts, x, group=self.heads_group)
            x = torch.cat(parts, dim=1)  # the ring shard, in its local order
        if self.ring is not None:
            x = self.ring.unshard(x)
        return x

    def extra_repr(self) -> str:
        dims = ", ".join(f"{name}={size}" for name, size in zip(self.device_mesh.mesh_dim_names, self.device_mesh.shape))
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, mode={self.mode!r}, "
                f"layout={self.layout!r}, mesh=({dims})")


class RingDistributedMultiheadDilatedAttention(SyncsParameters, MultiheadDilatedAttention):
    """``MultiheadDilatedAttention`` over this rank's shard (b, n/P, embed_dim), on a DeviceMesh.

    The first forward broadcasts parameters and buffers from the mesh's first rank. Reduce
    parameter gradients over every rank (DDP or FSDP over the ranks of the mesh).
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, device_mesh, layout: str = "contiguous", **kwargs) -> None:
        self._mesh_options = dict(device_mesh=device_mesh, layout=layout)
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)

    def _make_attention(self, segment_lengths, dilation_rates, mode, dropout, use_pattern_cache) -> nn.Module:
        return RingDistributedDilatedAttention(segment_lengths, dilation_rates, mode=mode, dropout=dropout,
                                               use_pattern_cache=use_pattern_cache, **self._mesh_options)

    def _sync_groups(self) -> list:
        return [g for g in (self.attention.ring_group, self.attention.heads_group) if g is not None]

    def _positions(self, m: int, start: int) -> torch.Tensor:
        """The global positions of this rank's rows."""
        ring, heads = (dist.get_world_size(g) if g is not None else 1
                       for g in (self.attention.ring_group, self.attention.heads_group))
        return torch.cat([torch.arange(a, b) for a, b in self.attention._rows(m * ring * heads)])
