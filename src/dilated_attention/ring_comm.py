"""All communication: agreement checks, packed P2P exchanges (ring), all-to-all between
sequence and head shards (head parallelism), parameter broadcast."""

from __future__ import annotations

import zlib
from typing import Sequence

import torch
import torch.distributed as dist


class RingCommError(RuntimeError):
    """Communication inside the process group failed: a rank died, timed out, or disagreed."""


def fingerprint(value) -> int:
    """A stable 31-bit integer for any value with a deterministic repr."""
    return zlib.crc32(repr(value).encode()) & 0x7FFFFFFF


_ROUNDS: dict[tuple[int, ...], tuple[int, int]] = {}  # per group (its global ranks): rounds so far (alike on every
# member) and this rank's last row's fingerprint


def _gather_on_host(group, values: list[int]) -> list[list[int]] | None:
    """Every member's ``values`` in group-rank order, or None when all equal this rank's.

    Runs on the process group's key-value store (host only: it never waits for queued GPU work,
    so a call does not stall the launch queue). Cost in round trips: four when all agree; a
    rank that is missing makes every other one fail at the store's timeout instead of hanging.
    """
    ranks = tuple(dist.get_process_group_ranks(group))
    count, last = _ROUNDS.get(ranks, (0, 0))
    count += 1
    store = dist.distributed_c10d._get_default_store()
    key = f"dilated_attention/agree/{','.join(map(str, ranks))}/{{}}/".format
    row = ",".join(map(str, values))
    same = fingerprint(row)
    _ROUNDS[ranks] = (count, same)
    mine, me = key(count), dist.get_rank()
    try:
        store.set(f"{mine}row/{me}", row)
        store.add(f"{mine}same/{same}", 1)
        if store.add(f"{mine}arrived", 1) == len(ranks):
            store.set(f"{mine}complete", "1")
        store.wait([f"{mine}complete"])
        agree = store.add(f"{mine}same/{same}", 0) == len(ranks)
        rows = None if agree else [[int(x) for x in store.get(f"{mine}row/{r}").decode().split(",")] for r in ranks]
        if count > 1:  # every member has set this round's keys, so none still reads the last round's
            before = key(count - 1)
            store.delete_key(f"{before}row/{me}")
            if store.add(f"{mine}cleaner", 1) == 1:
                for name in ("arrived", "complete", "cleaner", f"same/{last}"):
                    store.delete_key(before + name)
    except Exception as e:  # the store's timeout (a rank died or never came) or a broken connection
        raise RingCommError(f"dilated attention: the agreement exchange failed (a rank died or timed out): {e}") from e
    return rows


def agreement_problem(group, fields: dict[str, int], local_error: Exception | None = None) -> str | None:
    """Exchange ``fields`` and whether this rank's local checks failed; say what is wrong, or None.

    Every rank of the group gets the same answer (a rank whose own checks failed learns of it
    too, and should raise its own error). Host only (``_gather_on_host``).
    """
    names = ["local_error", *fields]
    values = [int(local_error is not None), *fields.values()]
    rows = _gather_on_host(group, values)
    if rows is None:
        return None
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        return f"rank(s) {failed} of the group failed their input checks (their own error says why); no rank attends"
    bad = [names[j] for j in range(1, len(names)) if len({row[j] for row in rows}) > 1]
    detail = "; ".join(f"{name}: {[row[names.index(name)] for row in rows]}" for name in bad)
    return f"ranks disagree on {', '.join(bad)} (per rank: {detail})"


def check_agreement(group, fields: dict[str, int], local_error: Exception | None = None) -> None:
    """``agreement_problem``, raised on every rank at once: a rank whose checks failed re-raises
    its own error, the others a ValueError naming it."""
    problem = agreement_problem(group, fields, local_error)
    if local_error is not None:
        raise local_error
    if problem:
        raise ValueError(f"dilated attention: {problem}")


class Exchange:
    """One packed P2P round: send flat buffers to peers and receive into others, asynchronously."""

    def __init__(self, group, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], stats: dict, phase: str):
        ops = []
        for peer, buf in sends.items():
            ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group, peer), group))
            stats[phase] = stats.get(phase, 0) + buf.numel() * buf.element_size()
        for peer, buf in recvs.items():
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
        self.recvs = recvs
        self._keep = sends  # buffers must live until the sends complete
        try:
            self._requests = dist.batch_isend_irecv(ops) if ops else []
        except Exception as e:
            raise RingCommError(f"ring dilated attention: posting P2P exchange failed: {e}") from e

    def wait(self) -> dict[int, torch.Tensor]:
        try:
            for req in self._requests:
                req.wait()
        except Exception as e:
            raise RingCommError(
                f"ring dilated attention: P2P exchange failed (a rank died or timed out): {e}"
            ) from e
        return self.recvs


def pack(tensors: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """Concatenate flattened tensors into one contiguous buffer of ``dtype``."""
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def unpack(buf: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Split a flat buffer into views of the given shapes."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [part.view(s) for part, s in zip(buf.split(sizes), shapes)]


def _all_to_all(send: torch.Tensor, group, stats: dict | None, phase: str) -> torch.Tensor:
    """send (P, ...) contiguous: piece j goes to rank j; returns (P, ...) with piece j from rank j."""
    recv = torch.empty_like(send)
    try:
        dist.all_to_all_single(recv, send, group=group)
    except Exception as e:
        raise RingCommError(f"dilated attention: all-to-all failed (a rank died or timed out): {e}") from e
    if stats is not None:
        stats[phase] = stats.get(phase, 0) + send.numel() // send.shape[0] * (send.shape[0] - 1) * send.element_size()
    return recv


def _seq_to_heads(x: torch.Tensor, group, stats, phase) -> torch.Tensor:
    """(b, m, h, d) sequence shard with every head -> (b, P*m, h/P, d): the group's rows, my heads."""
    world = dist.get_world_size(group)
    send = x.unflatten(2, (world, x.shape[2] // world)).permute(2, 0, 1, 3, 4).contiguous()
    return _all_to_all(send, group, stats, phase).permute(1, 0, 2, 3, 4).flatten(1, 2)


def _heads_to_seq(y: torch.Tensor, group, stats, phase) -> torch.Tensor:
    """Inverse of ``_seq_to_heads``: (b, P*m, h/P, d) -> (b, m, h, d)."""
    world = dist.get_world_size(group)
    send = y.unflatten(1, (world, y.shape[1] // world)).permute(1, 0, 2, 3, 4).contiguous()
    return _all_to_all(send, group, stats, phase).permute(1, 2, 0, 3, 4).flatten(2, 3)


class AllToAll(torch.autograd.Function):
    """Sequence shards (b, m, h, d) <-> head shards (b, P*m, h/P, d) over a group; backward the inverse.

    ``AllToAll.apply(x, group, stats, True)``: to head shards; ``False``: back to sequence shards."""

    @staticmethod
    def forward(ctx, x, group, stats, to_heads: bool):
        ctx.group, ctx.stats, ctx.to_heads = group, stats, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, stats, "forward")

    @staticmethod
    def backward(ctx, grad):
        inverse = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return inverse(grad.contiguous(), ctx.group, ctx.stats, "backward"), None, None, None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """(b, m, ...) on every rank of the group -> (b, P*m, ...): the ranks' rows in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, x.contiguous(), group=group)
    except Exception as e:
        raise RingCommError(f"dilated attention: all_gather failed (a rank died or timed out): {e}") from e
    return torch.cat(parts, dim=1)


def broadcast_from_first(tensors, groups) -> None:
    """Make ``tensors`` equal across the ranks of every group in turn, from each group's first rank.

    Over the groups of a mesh's dimensions, every rank ends with the values of the mesh's first rank."""
    with torch.no_grad():
        for group in groups:
            src = dist.get_global_rank(group, 0)
            for t in tensors:
                dist.broadcast(t.data, src=src, group=group)
