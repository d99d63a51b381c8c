"""Ring dilated attention: sequence parallelism over ``torch.distributed``.

Each rank holds its shard of q, k, v (``(b, n/P, h, d)``, chunks given by ``layout``) and
returns exactly its shard of ``dilated_attention`` on the whole sequence. Segments inside
a chunk never communicate; a segment spanning several chunks exchanges only the
sparsified K/V rows of its pieces (see ``ring_plan``), by packed P2P sends, one round per
ring distance, the next round posted before the current one is computed. Backward sends
the same rows again and returns their dK/dV to their owners. All partial results merge
through their log-sum-exp, so forward and gradients are exact.

When the segments align with the chunks (LongNet's schedules do), the ring runs on whole
branches (``ring_chunks``); otherwise on per-piece blocks (here), which fit any geometry:
ragged segments, ``w % r != 0`` across chunks, packed documents. Pieces merge in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import backends, ring_chunks
from .backends import Backend, block_grad_inputs
from .checks import (check_cu_seqlens, check_dropout, check_key_padding_mask, check_qkv, check_same_length,
                     output_factor, refuse_dropout, resolve_scale)
from .functional import dilated_attention
from .merge import acc_dtype, empty_partial
from .modules import MultiheadDilatedAttention, UsesPatternCache
from .plan import WorkItem, cached_plan, check_head_slice, check_heads, check_schedule, plan_items
from .ring_comm import Exchange, broadcast_from_first, check_agreement, fingerprint, pack, unpack
from .ring_plan import LAYOUTS, ChunkSchedule, FullSegments, Pair, Piece, RingSchedule, build_schedule, shard_rows


@dataclass
class _RingCall:
    plan: tuple[WorkItem, ...]  # the plan's work items, as a RingSchedule indexes them
    schedule: RingSchedule | ChunkSchedule
    group: object
    rank: int
    scale: float
    causal: bool
    stats: dict
    impl: Backend  # the backend every block runs on
    out_scale: float  # the output's factor (head_groups: 1/m)


def _full_view(t: torch.Tensor, item: WorkItem, fs: FullSegments, heads: slice) -> torch.Tensor:
    """(b, m, h, *rest) -> (b, count, c, hs, *rest): the batched full segments."""
    rows = t[:, fs.local_start : fs.local_start + fs.count * item.segment]
    return rows.unflatten(1, (fs.count, item.segment))[:, :, item.offset :: item.rate, heads]


def _piece_view(t: torch.Tensor, piece: Piece, heads: slice) -> torch.Tensor:
    """(b, m, h, *rest) -> (b, 1, c, hs, *rest)."""
    return t[:, piece.rows, heads].unsqueeze(1)


def _unique_keys(pairs: Sequence[Pair]) -> list[tuple[int, Piece]]:
    """The distinct (item, key piece) of a peer's pairs, in schedule order."""
    return list(dict.fromkeys((p.item, p.k) for p in pairs))


def _recv_shapes(call: _RingCall, keys, b: int, d: int) -> list[tuple[int, ...]]:
    shapes = []
    for i, piece in keys:
        item = call.plan[i]
        shapes.append((b, 1, len(piece), len(range(item.kv_start, item.kv_stop, item.kv_step)), d))
    return shapes


def _key_shapes(call: _RingCall, keys, b: int, d: int, masked: bool) -> list[tuple[int, ...]]:
    """Shapes of the packed (k, v[, key mask]) of each key piece, in order."""
    shapes = []
    for kv in _recv_shapes(call, keys, b, d):
        shapes += [kv, kv] + ([kv[:3]] if masked else [])
    return shapes


def _post_kv(call: _RingCall, k: torch.Tensor, v: torch.Tensor, mask, distance: int, phase: str) -> Exchange:
    """Send my key pieces (k, v, and their key mask rows if any) to rank+distance; receive
    rank-distance's into packed buffers."""
    world, rank = call.schedule.world, call.rank
    dst, src = (rank + distance) % world, (rank - distance) % world
    sends = _unique_keys(call.schedule.pairs[rank][dst])
    recvs = _unique_keys(call.schedule.pairs[src][rank])
    parts = []
    for i, p in sends:
        parts += [_piece_view(k, p, call.plan[i].kv_heads), _piece_view(v, p, call.plan[i].kv_heads)]
        if mask is not None:
            parts.append(mask[:, p.rows].unsqueeze(1))
    send_buf = pack(parts, k.dtype, k.device)
    shapes = _key_shapes(call, recvs, k.shape[0], k.shape[-1], mask is not None)
    recv_buf = torch.empty(sum(torch.Size(s).numel() for s in shapes), dtype=k.dtype, device=k.device)
    return Exchange(call.group, {dst: send_buf} if sends else {}, {src: recv_buf} if recvs else {}, call.stats, phase)


def _received_kv(call: _RingCall, exchange: Exchange, src: int, b: int, d: int, masked: bool) -> dict:
    """{(item, key piece): (k, v, key mask or None)} from a finished exchange."""
    buffers = exchange.wait()  # also completes this round's sends
    keys = _unique_keys(call.schedule.pairs[src][call.rank])
    if not keys:
        return {}
    parts = iter(unpack(buffers[src], _key_shapes(call, keys, b, d, masked)))
    return {key: (next(parts), next(parts), next(parts) != 0 if masked else None) for key in keys}


def _local_blocks(call: _RingCall):
    """Yield view functions over the query side, the key side and the key mask, and causal, for local work."""
    for i, fs in call.schedule.full[call.rank]:
        item = call.plan[i]
        yield (lambda t, item=item, fs=fs: _full_view(t, item, fs, item.heads),
               lambda t, item=item, fs=fs: _full_view(t, item, fs, item.kv_heads),
               lambda m, item=item, fs=fs: None if m is None else _full_view(m.unsqueeze(-1), item, fs, slice(None))[..., 0],
               call.causal)
    for pair in call.schedule.pairs[call.rank][call.rank]:
        item = call.plan[pair.item]
        yield (lambda t, item=item, p=pair.q: _piece_view(t, p, item.heads),
               lambda t, item=item, p=pair.k: _piece_view(t, p, item.kv_heads),
               lambda m, p=pair.k: None if m is None else m[:, p.rows].unsqueeze(1), pair.causal_diagonal)


def ring_forward(call: _RingCall, q, k, v, mask=None):
    """Local shards q (b, m, h, d), k, v (b, m, h_kv, d), key mask (b, m) or None
    -> local output (b, m, h, d) in q.dtype, lse (b, m, h) fp32/64."""
    impl = call.impl
    b, m, h, d = q.shape
    out, lse = empty_partial(b, m, h, d, q.dtype, q.device)
    world = call.schedule.world
    masked = mask is not None
    pending = _post_kv(call, k, v, mask, 1, "forward") if world > 1 else None
    for qview, kview, mview, causal in _local_blocks(call):
        impl.attend_(qview(out), qview(lse), qview(q), kview(k), kview(v), call.scale, causal, mview(mask))
    for distance in range(1, world):
        src = (call.rank - distance) % world
        received = _received_kv(call, pending, src, b, d, masked)
        pending = _post_kv(call, k, v, mask, distance + 1, "forward") if distance + 1 < world else None
        for pair in call.schedule.pairs[src][call.rank]:
            item = call.plan[pair.item]
            kb, vb, mb = received[(pair.item, pair.k)]
            qv = lambda t: _piece_view(t, pair.q, item.heads)  # noqa: E731
            impl.attend_(qv(out), qv(lse), qv(q), kb, vb, call.scale, False, mb)
    return out.mul_(call.out_scale).to(q.dtype), lse


def ring_backward(call: _RingCall, dout, q, k, v, out, lse, mask=None):
    """Gradients of the local shards; dK/dV of sent rows come home from the ranks that used them."""
    impl = call.impl
    acc = acc_dtype(q.dtype)
    b, m, h, d = q.shape
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
    dout, out = block_grad_inputs(dout.to(q.dtype), out, call.out_scale)
    dout = dout.contiguous()
    world, rank = call.schedule.world, call.rank
    masked = mask is not None
    pending = _post_kv(call, k, v, mask, 1, "backward") if world > 1 else None
    for qview, kview, mview, causal in _local_blocks(call):
        impl.attend_backward_(qview(dq), kview(dk), kview(dv), qview(dout), qview(q), kview(k), kview(v),
                              qview(out), qview(lse), call.scale, causal, mview(mask))
    returning = None  # at most one dK/dV return in flight: memory stays O(n/P)
    for distance in range(1, world):
        src, dst = (rank - distance) % world, (rank + distance) % world
        received = _received_kv(call, pending, src, b, d, masked)
        pending = _post_kv(call, k, v, mask, distance + 1, "backward") if distance + 1 < world else None
        grads = {key: (torch.zeros(kb.shape, dtype=acc, device=q.device), torch.zeros(vb.shape, dtype=acc, device=q.device))
                 for key, (kb, vb, _) in received.items()}
        for pair in call.schedule.pairs[src][rank]:
            item = call.plan[pair.item]
            kb, vb, mb = received[(pair.item, pair.k)]
            qv = lambda t: _piece_view(t, pair.q, item.heads)  # noqa: E731
            gk, gv = grads[(pair.item, pair.k)]
            impl.attend_backward_(qv(dq), gk, gv, qv(dout), qv(q), kb, vb, qv(out), qv(lse), call.scale, False, mb)
        # send dK/dV home to src; receive those of my rows from dst
        mine = _unique_keys(call.schedule.pairs[rank][dst])
        shapes = _recv_shapes(call, mine, b, d)
        back = torch.empty(2 * sum(torch.Size(s).numel() for s in shapes), dtype=acc, device=q.device)
        send = pack([g for key in grads for g in grads[key]], acc, q.device)
        posted = (dst, mine, shapes, Exchange(
            call.group, {src: send} if grads else {}, {dst: back} if mine else {}, call.stats, "backward"))
        if returning is not None:
            _add_returned(call, returning, dk, dv)
        returning = posted
    if returning is not None:
        _add_returned(call, returning, dk, dv)
    return tuple(g.to(q.dtype) for g in (dq, dk, dv))


def _add_returned(call: _RingCall, returning, dk, dv) -> None:
    """Wait for one dK/dV return round and add what came home into this rank's dk, dv."""
    dst, mine, shapes, exchange = returning
    buffers = exchange.wait()
    if not mine:
        return
    parts = unpack(buffers[dst], [s for s in shapes for _ in range(2)])
    for j, (i, piece) in enumerate(mine):
        heads = call.plan[i].kv_heads
        _piece_view(dk, piece, heads).add_(parts[2 * j])
        _piece_view(dv, piece, heads).add_(parts[2 * j + 1])


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, call: _RingCall):
        out, lse = (ring_chunks.forward if isinstance(call.schedule, ChunkSchedule) else ring_forward)(call, q, k, v, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        run = ring_chunks.backward if isinstance(ctx.call.schedule, ChunkSchedule) else ring_backward
        return (*run(ctx.call, dout, q, k, v, out, lse, mask), None, None)


class RingDilatedAttention(UsesPatternCache, nn.Module):
    """Dilated attention over a sequence sharded across the ranks of ``process_group``.

    ``forward(q_local, k_local, v_local, is_causal=False)`` takes this rank's shard
    (b, n/P, h, d) and returns its shard of the output. ``layout="contiguous"`` (default)
    means rank p holds rows ``[p n/P, (p+1) n/P)``; ``"zigzag"`` holds chunks p and 2P-1-p of
    2P (use ``shard``/``unshard``). ``comm_bytes`` holds the bytes this rank sent in the
    last forward and backward. ``backend``: as in ``dilated_attention``; each ring step runs
    on it (the Triton kernels on CUDA fp16/bf16/fp32).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        process_group=None,
        mode: str = "paper",
        scale: float | None = None,
        dropout: float = 0.0,
        use_pattern_cache: bool = True,
        layout: str = "contiguous",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_schedule(segment_lengths, dilation_rates, mode)
        backends.check_name(backend)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.segment_lengths = tuple(segment_lengths)
        self.dilation_rates = tuple(dilation_rates)
        self.process_group = process_group
        self.mode, self.scale, self.layout, self.backend = mode, scale, layout, backend
        self.dropout = check_dropout(dropout)
        self._init_pattern_cache(use_pattern_cache)
        self.comm_bytes: dict[str, int] = {}

    def _group(self):
        if self.process_group is not None and not dist.is_initialized():
            raise RuntimeError("RingDilatedAttention: a process_group was given but torch.distributed is not initialized")
        if not dist.is_initialized():
            return None, 0, 1
        group = self.process_group or dist.group.WORLD
        return group, dist.get_rank(group), dist.get_world_size(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, *,
                key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                head_start: int = 0, total_heads: int | None = None) -> torch.Tensor:
        """q, k, v: this rank's shard (b, n/P, h, d) (k, v: h_kv heads) -> its shard of the output.

        key_padding_mask: this rank's shard (b, n/P) of the mask (True = ignore the key).
        cu_seqlens: the global document boundaries (0, ..., n), the same on every rank.
        head_start, total_heads: as in ``dilated_attention`` (these h heads are a slice of more).
        """
        group, rank, world = self._group()
        self.comm_bytes = {"forward": 0, "backward": 0}
        if world == 1:
            refuse_dropout(self)
            return dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal,
                                     scale=self.scale, mode=self.mode, backend=self.backend,
                                     pattern_cache=self.pattern_cache, head_start=head_start, total_heads=total_heads,
                                     key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
        try:  # local checks first, but every rank learns of a failure in the agreement below
            refuse_dropout(self)
            check_qkv(q, k, v)
            check_same_length(q, k)
            if not isinstance(is_causal, bool):
                raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
            total = check_head_slice(q.shape[2], head_start, total_heads, k.shape[2])
            check_heads(total, len(self.segment_lengths), self.mode)
            check_key_padding_mask(key_padding_mask, k)
            docs = check_cu_seqlens(cu_seqlens, k.shape[1] * world, q.shape[1] * world)
            impl = backends.select(q, self.backend, masked=key_padding_mask is not None)  # refuses one that cannot
            scale = resolve_scale(self.scale, q.shape[-1])
            error = None
        except (TypeError, ValueError, NotImplementedError) as e:
            error = e
        b, m, h, d = q.shape if error is None else (0, 0, 0, 0)
        h_kv = k.shape[2] if error is None else 0
        grad = error is None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        check_agreement(group, {
            "batch": b, "local_seq_len": m, "heads": h, "kv_heads": h_kv, "head_dim": d,
            "dtype": fingerprint(q.dtype) if error is None else 0, "is_causal": int(bool(is_causal)),
            "requires_grad": int(grad), "masked": int(key_padding_mask is not None),
            "documents": fingerprint(docs) if error is None else 0,
            "schedule": fingerprint((self.segment_lengths, self.dilation_rates, self.mode, self.layout, self.scale,
                                     head_start, total_heads)),
        }, error)
        n = m * world
        branches = cached_plan(self.pattern_cache, n, h, self.segment_lengths, self.dilation_rates, self.mode,
                               head_start, total_heads, h_kv if h_kv != h else None, docs)
        schedule = self.pattern_cache.get_or_create(  # whole-branch launches where the chunks align
            ("ring_schedule", n, world, self.layout, branches, h_kv, is_causal),
            lambda: build_schedule(n, world, self.layout, branches, h_kv, is_causal))
        call = _RingCall(plan_items(branches), schedule, group, rank, scale, is_causal, self.comm_bytes, impl,
                         output_factor(self.mode, self.segment_lengths))
        return _RingFunction.apply(*(t.contiguous() for t in (q, k, v)), key_padding_mask, call)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (b, n, ...) tensor, in this module's layout."""
        group, rank, world = self._group()
        parts = [x[:, a:b] for a, b in shard_rows(x.shape[1], world, rank, self.layout)]  # checks divisibility
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # a view when contiguous

    def unshard(self, x_local: torch.Tensor) -> torch.Tensor:
        """All-gather the ranks' shards (b, n/P, ...) back into the full (b, n, ...) in global order."""
        group, rank, world = self._group()
        if world == 1:
            return x_local
        parts = [torch.empty_like(x_local) for _ in range(world)]
        dist.all_gather(parts, x_local.contiguous(), group=group)
        n = x_local.shape[1] * world
        out = torch.empty((x_local.shape[0], n, *x_local.shape[2:]), dtype=x_local.dtype, device=x_local.device)
        for r, part in enumerate(parts):
            offset = 0
            for a, b in shard_rows(n, world, r, self.layout):
                out[:, a:b] = part[:, offset : offset + b - a]
                offset += b - a
        return out

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"mode={self.mode!r}, layout={self.layout!r}")


class SyncsParameters:
    """A multihead layer over several ranks: its first forward makes every rank's parameters and
    buffers those of the first rank (of each group in ``_sync_groups()``, in turn). It takes no
    ``kv_cache``: decoding runs on one device."""

    _parameters_synced = False

    def _sync_groups(self) -> list:
        raise NotImplementedError

    def sync_parameters(self) -> None:
        """Broadcast parameters and buffers from the first rank to the others."""
        broadcast_from_first(list(chain(self.parameters(), self.buffers())), self._sync_groups())
        self._parameters_synced = True

    def forward(self, query, key=None, value=None, **kwargs):
        if kwargs.get("kv_cache") is not None:
            raise ValueError(f"{type(self).__name__} takes no kv_cache: decoding runs on one device")
        if not self._parameters_synced:
            self.sync_parameters()
        return super().forward(query, key, value, **kwargs)


class RingMultiheadDilatedAttention(SyncsParameters, MultiheadDilatedAttention):
    """``MultiheadDilatedAttention`` over this rank's shard (b, n/P, embed_dim) of the sequence.

    The ranks of the ring must hold the same parameters: the first forward broadcasts them
    (and the buffers) from the group's first rank, so ranks that initialised differently
    start identical. Gradients of the parameters are each rank's partial sums: reduce them
    over the group (DDP or FSDP over the ring's ranks does) to train.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], *, process_group=None, layout: str = "contiguous", **kwargs) -> None:
        self._ring_options = dict(process_group=process_group, layout=layout)
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)

    def _make_attention(self, segment_lengths, dilation_rates, mode, dropout, use_pattern_cache) -> nn.Module:
        return RingDilatedAttention(segment_lengths, dilation_rates, mode=mode, dropout=dropout,
                                    use_pattern_cache=use_pattern_cache, **self._ring_options)

    def _sync_groups(self) -> list:
        group, _, world = self.attention._group()
        return [group] if world > 1 else []

    def _positions(self, m: int, start: int) -> torch.Tensor:
        """The global positions of this rank's rows (its chunks of the layout)."""
        _, rank, world = self.attention._group()
        return torch.cat([torch.arange(a, b) for a, b in shard_rows(m * world, world, rank, self.attention.layout)])
