"""The ring on whole-branch launches, for schedules whose segments align with the chunks.

Every local chunk first runs its own plan (``forward_plan``: the fused kernels where they
apply), then merges in every other chunk it shares a long segment with, one launch per linking
branch: its rank's other chunk (zigzag; ``attend_plan_``), then each visiting rank's chunks,
one ring distance per round, the next round posted before this one is computed. A visiting
chunk's rows arrive packed (``ChunkSend``: per residue modulo lcm(r) and k/v head, only those
some branch reads); each branch gathers its keys from them into its class layout (b, L/r, h, d)
(``Backend.attend_classes_``), so no chunk-sized buffer is made. Backward runs the same launches
and sends the visiting rows' dK/dV home, packed the same way. Accumulators are the backend's
``accumulator_dtype`` (the Triton kernels merge in float32 registers into tensors of the
inputs' dtype).
"""

from __future__ import annotations

import functools

import torch

from .merge import acc_dtype
from .ring_comm import Exchange, pack, unpack
from .ring_plan import ChunkSend


def _rows(t: torch.Tensor | None, pos: int, length: int) -> torch.Tensor | None:
    """Local chunk ``pos`` of a (b, m, ...) tensor: a view of its ``length`` rows."""
    return None if t is None else t[:, pos * length : (pos + 1) * length]


@functools.lru_cache(maxsize=256)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _slots(t: torch.Tensor, send: ChunkSend) -> torch.Tensor:
    """A (b, L, h_kv, d) chunk as (b, L / period, period * h_kv, d): ``send.slots`` index dim 2."""
    b, length, heads, d = t.shape
    return t.view(b, length // send.period, send.period * heads, d)  # a view: index_add_ lands in t


def _residues(mask: torch.Tensor, send: ChunkSend) -> torch.Tensor:
    """A (b, L) key-mask chunk as (b, L / period, period): ``send.residues`` index dim 2."""
    return mask.view(mask.shape[0], -1, send.period)


def _shapes(sends, b: int, length: int, heads: int, d: int, masked: bool) -> list[tuple[int, ...]]:
    """Shapes of the packed parts of ``sends``: k and v rows (and the key mask's) of each chunk."""
    shapes = []
    for s in sends:
        rows = (b, length // s.period, len(s.slots), d)
        shapes += [rows, rows] + ([(b, length // s.period, len(s.residues))] if masked else [])
    return shapes


def _post(call, k, v, mask, distance: int, phase: str) -> Exchange:
    """Send my key chunks' rows that rank+distance reads; receive rank-distance's into one buffer."""
    schedule, rank = call.schedule, call.rank
    world, length = schedule.world, schedule.chunk_len
    dst, src = (rank + distance) % world, (rank - distance) % world
    parts = []
    for s in schedule.sends[rank][dst]:
        slots = _index(s.slots, k.device)
        parts += [_slots(_rows(t, s.k, length), s).index_select(2, slots) for t in (k, v)]
        if mask is not None:
            parts.append(_residues(_rows(mask, s.k, length), s).index_select(2, _index(s.residues, k.device)))
    incoming = schedule.sends[src][rank]
    size = sum(torch.Size(x).numel() for x in _shapes(incoming, k.shape[0], length, k.shape[2], k.shape[3],
                                                     mask is not None))
    recv = torch.empty(size, dtype=k.dtype, device=k.device)
    return Exchange(call.group, {dst: pack(parts, k.dtype, k.device)} if parts else {}, {src: recv} if incoming else {},
                    call.stats, phase)


def _received(call, exchange: Exchange, src: int, k: torch.Tensor, masked: bool) -> dict:
    """{key chunk position: packed (k, v, key mask or None)} of src's chunks (``_shapes``)."""
    buffers = exchange.wait()  # also completes this round's sends
    incoming = call.schedule.sends[src][call.rank]
    if not incoming:
        return {}
    b, _, heads, d = k.shape
    parts = iter(unpack(buffers[src], _shapes(incoming, b, call.schedule.chunk_len, heads, d, masked)))
    return {s.k: (next(parts), next(parts), next(parts) != 0 if masked else None) for s in incoming}


def _visiting(pair, packed):
    """Per branch of a visiting pair: (branch, its index into the packed chunk, and its keys, values and
    key mask in the class layout of ``Backend.attend_classes_``)."""
    kp, vp, mp = packed
    for branch, keys, rows in zip(pair.plan, pair.keys, pair.mask_rows):
        index = _index(keys, kp.device)
        heads = branch.head_stop - branch.head_start
        kc, vc = (t.index_select(2, index).view(t.shape[0], -1, heads, t.shape[3]) for t in (kp, vp))
        mc = None if mp is None else mp.index_select(2, _index(rows, kp.device)).view(mp.shape[0], -1, heads)
        yield branch, index, kc, vc, mc


def forward(call, q, k, v, mask=None):
    """Local shards q (b, m, h, d), k, v (b, m, h_kv, d), key mask (b, m) or None
    -> local output (b, m, h, d) in q.dtype, lse (b, m, h) fp32/64."""
    schedule, impl, rank = call.schedule, call.impl, call.rank
    world, length = schedule.world, schedule.chunk_len
    acc = impl.accumulator_dtype(q.dtype)
    pending = _post(call, k, v, mask, 1, "forward") if world > 1 else None
    if len(schedule.chunks[rank]) == 1 and acc == q.dtype:  # one chunk: its plan as one call (fused where it fits)
        out, lse = impl.forward_plan(q, k, v, schedule.diagonal, call.scale, call.causal, 1.0, mask)
    else:  # chunks accumulate into one tensor: no copies
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        for pos in range(len(schedule.chunks[rank])):
            impl.attend_plan_(*(_rows(t, pos, length) for t in (out, lse, q, k, v)), schedule.diagonal, call.scale,
                              call.causal, _rows(mask, pos, length))

    for pair in schedule.pairs[rank][rank]:  # my other chunk (zigzag)
        impl.attend_plan_(*(_rows(t, pair.q, length) for t in (out, lse, q)), _rows(k, pair.k, length),
                          _rows(v, pair.k, length), pair.plan, call.scale, False, _rows(mask, pair.k, length))
    for distance in range(1, world):
        src = (rank - distance) % world
        received = _received(call, pending, src, k, mask is not None)
        pending = _post(call, k, v, mask, distance + 1, "forward") if distance + 1 < world else None
        for pair in schedule.pairs[src][rank]:
            for branch, _, kc, vc, mc in _visiting(pair, received[pair.k]):
                impl.attend_classes_(*(_rows(t, pair.q, length) for t in (out, lse, q)), kc, vc, branch, call.scale, mc)
        del received  # before the next round's chunks arrive
    if call.out_scale != 1.0:
        out = out.mul_(call.out_scale)
    return out.to(q.dtype), lse


def backward(call, dout, q, k, v, out, lse, mask=None):
    """Gradients of the local shards; dK/dV of sent rows come home from the ranks that used them."""
    schedule, impl, rank = call.schedule, call.impl, call.rank
    world, length = schedule.world, schedule.chunk_len
    acc = impl.accumulator_dtype(q.dtype)
    dout = dout.to(q.dtype).contiguous()
    pending = _post(call, k, v, mask, 1, "backward") if world > 1 else None
    if len(schedule.chunks[rank]) == 1 and acc == q.dtype:
        dq, dk, dv = impl.backward_plan(dout, q, k, v, out, lse, schedule.diagonal, call.scale, call.causal,
                                        call.out_scale, mask)
    else:
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
        for pos in range(len(schedule.chunks[rank])):
            impl.attend_plan_backward_(*(_rows(t, pos, length) for t in (dq, dk, dv, dout, q, k, v, out, lse)),
                                       schedule.diagonal, call.scale, call.causal, call.out_scale,
                                       _rows(mask, pos, length))

    for pair in schedule.pairs[rank][rank]:  # my other chunk (zigzag)
        qs = [_rows(t, pair.q, length) for t in (dq, dout, q, out, lse)]
        ks = [_rows(t, pair.k, length) for t in (dk, dv, k, v)]
        impl.attend_plan_backward_(qs[0], *ks[:2], *qs[1:3], *ks[2:], *qs[3:], pair.plan, call.scale, False,
                                   call.out_scale, _rows(mask, pair.k, length))
    returning = None  # at most one dK/dV return in flight: memory stays O(n/P)
    for distance in range(1, world):
        src, dst = (rank - distance) % world, (rank + distance) % world
        received = _received(call, pending, src, k, mask is not None)
        pending = _post(call, k, v, mask, distance + 1, "backward") if distance + 1 < world else None
        grads = {pos: tuple(torch.zeros(t.shape, dtype=acc, device=q.device) for t in packed[:2])
                 for pos, packed in received.items()}  # packed like the rows that came
        for pair in schedule.pairs[src][rank]:
            qs = [_rows(t, pair.q, length) for t in (dq, dout, q, out, lse)]
            for branch, index, kc, vc, mc in _visiting(pair, received[pair.k]):
                dkc, dvc = (torch.zeros(kc.shape, dtype=acc, device=q.device) for _ in range(2))
                impl.attend_classes_backward_(qs[0], dkc, dvc, *qs[1:3], kc, vc, *qs[3:], branch, call.scale,
                                              call.out_scale, mc)
                for g, gc in zip(grads[pair.k], (dkc, dvc)):
                    g.index_add_(2, index, gc.view(g.shape[0], g.shape[1], -1, g.shape[3]))
        # dK/dV of src's rows go home to src; those of my rows come back from dst
        incoming, mine = schedule.sends[src][rank], schedule.sends[rank][dst]
        send = pack([g for s in incoming for g in grads[s.k]], acc, q.device)
        size = sum(torch.Size(x).numel() for x in _shapes(mine, k.shape[0], length, k.shape[2], k.shape[3], False))
        back = torch.empty(size, dtype=acc, device=q.device)
        posted = (dst, mine, Exchange(call.group, {src: send} if incoming else {}, {dst: back} if mine else {},
                                      call.stats, "backward"))
        if returning is not None:
            _add_returned(returning, dk, dv, length)
        returning = posted
        del received, grads  # before the next round's chunks arrive
    if returning is not None:
        _add_returned(returning, dk, dv, length)
    return tuple(g.to(q.dtype) for g in (dq, dk, dv))


def _add_returned(returning, dk, dv, length: int) -> None:
    """Wait for one dK/dV return round and add what came home into this rank's dk, dv (b, m, h_kv, d)."""
    dst, mine, exchange = returning
    buffers = exchange.wait()
    if not mine:
        return
    b, _, heads, d = dk.shape
    parts = iter(unpack(buffers[dst], _shapes(mine, b, length, heads, d, False)))
    for s in mine:
        slots = _index(s.slots, dk.device)
        for g in (dk, dv):
            _slots(_rows(g, s.k, length), s).index_add_(2, slots, next(parts))
