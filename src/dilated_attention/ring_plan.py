"""Who computes what, and who sends which rows to whom, in ring dilated attention.

The sequence of n rows is cut into chunks; each rank owns some chunks (``layout``):
``"contiguous"`` gives rank p the chunk ``[p*n/P, (p+1)*n/P)``; ``"zigzag"`` cuts 2P
chunks and gives rank p chunks p and 2P-1-p (balances causal work when segments span
many ranks). A rank's local tensor is its chunks concatenated in that order.

For each work item ``(w', r, o, heads)`` (see ``plan``):
- a full-length segment inside one chunk is attended locally, batched as a strided view;
- every other part of a segment inside a chunk is a *piece*: the rows ``t`` of the chunk
  in that segment with ``(t - segment_start) % r == o``, itself a strided slice;
- two pieces of one segment in different chunks attend to each other; when their chunks
  belong to different ranks, only the key piece's sparsified K/V rows travel (and their
  gradients travel home in backward). Causal: only pieces of earlier chunks are sent.

Two different chunks share at most one segment, so each (item, chunk pair) needs at most
one piece exchange. Every rank derives the same schedule from ``(n, P, layout, plan)``.
With packed documents, an item's segmentation starts at its document's first row and stops
at its last (``WorkItem.row_start``, ``row_stop``).

When every branch's segments align with the chunks (``w'`` divides the chunk length ``L``, or
``L`` divides ``w'`` and the rate divides ``L``; no packed documents), the ring runs on whole
branches instead (``ChunkSchedule``): a chunk's own work is the plan over the chunk as a sequence
of ``L`` rows (segments clipped to ``L``), and two chunks of one long segment attend to each other
as branches of one ``L``-row segment, a residue class of rows of one chunk against the same class
of the other. What travels is, per k/v head, the rows of the classes some branch uses.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from .plan import PER_HEAD, Plan, WorkItem, plan_items

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Piece:
    """Rows ``first, first + step, ... < stop`` of one chunk, as a slice of the local tensor."""

    local_start: int
    local_stop: int
    step: int

    @property
    def rows(self) -> slice:
        return slice(self.local_start, self.local_stop, self.step)

    def __len__(self) -> int:
        return len(range(self.local_start, self.local_stop, self.step))


@dataclass(frozen=True)
class FullSegments:
    """``count`` full-length segments starting at local row ``local_start`` (batched view)."""

    local_start: int
    count: int


@dataclass(frozen=True)
class Pair:
    """Queries of ``q`` (on the receiving rank) attend to keys of ``k`` (on the sending rank)."""

    item: int  # index into the plan
    q: Piece
    k: Piece
    causal_diagonal: bool  # q and k are the same rows: causal masking inside the block


@dataclass(frozen=True)
class RingSchedule:
    """The whole static schedule of one configuration.

    full[rank]: (item, FullSegments) attended locally.
    pairs[src][dst]: pieces of src's keys that dst's queries attend to (src == dst: local).
    """

    world: int
    chunk_len: int
    chunks: tuple[tuple[int, ...], ...]  # chunks[rank] = global chunk indices, local order
    full: tuple[tuple[tuple[int, FullSegments], ...], ...]
    pairs: tuple[tuple[tuple[Pair, ...], ...], ...]


def rank_chunks(world: int, layout: str) -> tuple[tuple[int, ...], ...]:
    if layout == "contiguous":
        return tuple((p,) for p in range(world))
    if layout == "zigzag":
        return tuple((p, 2 * world - 1 - p) for p in range(world))
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _piece(item: WorkItem, seg_start: int, seg_stop: int, a: int, b: int, base: int) -> Piece | None:
    """Residue rows of [a, b) inside the segment [seg_start, seg_stop), local rows offset by ``base - a0``."""
    a, b = max(a, seg_start), min(b, seg_stop)
    first = seg_start + item.offset
    if first < a:
        first += -(-(a - first) // item.rate) * item.rate
    if first >= b:
        return None
    return Piece(base + first, base + b, item.rate)


def build_ring_schedule(n: int, world: int, layout: str, plan: tuple[WorkItem, ...], causal: bool) -> RingSchedule:
    chunks = rank_chunks(world, layout)
    length = chunk_length(n, world, layout)

    def document(item):
        """The rows [start, stop) the item's segmentation starts from (a packed document, or all n)."""
        return item.row_start, n if item.row_stop < 0 else item.row_stop

    def segments_of(item, chunk):
        """(seg_start, seg_stop) of every segment overlapping the chunk that is not a full one inside it."""
        ca, cb = chunk * length, (chunk + 1) * length
        ds, de = document(item)
        a, b = max(ca, ds), min(cb, de)
        w = item.segment
        out = []
        if a < b:
            for s in sorted({(a - ds) // w, (b - 1 - ds) // w}):
                start, stop = ds + s * w, min(ds + (s + 1) * w, de)
                if not (ca <= start and stop <= cb and stop - start == w):
                    out.append((start, stop))
        return out

    full = []
    for rank in range(world):
        entries = []
        for i, item in enumerate(plan):
            w = item.segment
            ds, de = document(item)
            for pos, chunk in enumerate(chunks[rank]):
                a, b = chunk * length, (chunk + 1) * length
                f0 = ds + -(-max(a - ds, 0) // w) * w
                f1 = ds + max(min(b, de) - ds, 0) // w * w
                if f1 > f0:
                    entries.append((i, FullSegments(pos * length + f0 - a, (f1 - f0) // w)))
        full.append(tuple(entries))

    pairs = [[[] for _ in range(world)] for _ in range(world)]
    for i, item in enumerate(plan):
        pieces = {}  # chunk -> list of (seg_start, Piece)
        for rank in range(world):
            for pos, chunk in enumerate(chunks[rank]):
                a, b = chunk * length, (chunk + 1) * length
                for start, stop in segments_of(item, chunk):
                    piece = _piece(item, start, stop, a, b, pos * length - a)
                    if piece is not None:
                        pieces.setdefault(chunk, []).append((rank, start, piece))
        for kc, kpieces in pieces.items():
            for qc, qpieces in pieces.items():
                if causal and kc > qc:
                    continue
                for src, kstart, kp in kpieces:
                    for dst, qstart, qp in qpieces:
                        if kstart == qstart:
                            pairs[src][dst].append(Pair(i, qp, kp, causal and kc == qc))
    return RingSchedule(
        world, length, chunks, tuple(full), tuple(tuple(tuple(p) for p in row) for row in pairs)
    )


def chunk_length(n: int, world: int, layout: str) -> int:
    """Rows per chunk; n must split into the layout's chunks exactly (no row is ever dropped)."""
    num_chunks = sum(len(c) for c in rank_chunks(world, layout))
    if n % num_chunks:
        raise ValueError(
            f"sequence length {n} must be divisible by {num_chunks} ({layout} layout over {world} ranks): "
            f"pad the sequence to a multiple of {num_chunks} (e.g. {-(-n // num_chunks) * num_chunks} rows)"
        )
    return n // num_chunks


def shard_rows(n: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Global row intervals held by ``rank``, in local order."""
    chunks = rank_chunks(world, layout)
    length = chunk_length(n, world, layout)
    return [(c * length, (c + 1) * length) for c in chunks[rank]]


@dataclass(frozen=True)
class ChunkPair:
    """Query chunk ``q`` (a position in the receiving rank's local tensor) attends to key chunk ``k``
    (a position in the sending rank's) through the branches of ``plan``, over ``L``-row sequences;
    never causal (under causal only earlier key chunks pair with a query chunk).

    A visiting chunk arrives packed (``ChunkSend``: (b, L / period, slots, d)); branch ``i``'s keys
    in their class layout (``Backend.attend_classes_``: (b, L / r, heads, d)) are
    ``packed.index_select(2, keys[i])`` viewed so, and its key mask likewise through ``mask_rows[i]``."""

    q: int
    k: int
    plan: Plan
    keys: tuple[tuple[int, ...], ...] = ()  # per branch: where its class layout's rows sit in the packed chunk
    mask_rows: tuple[tuple[int, ...], ...] = ()  # per branch: the same for the key mask


@dataclass(frozen=True)
class ChunkSend:
    """The rows of key chunk ``k`` (a position in the sender's local tensor) that travel: with the
    chunk seen as (L / period, period, h_kv) rows, the (residue, k/v head) pairs ``slots`` (as
    ``residue * h_kv + head``) of k and v, and the residues ``residues`` of the key mask."""

    k: int
    period: int
    slots: tuple[int, ...]
    residues: tuple[int, ...]


@dataclass(frozen=True)
class ChunkSchedule:
    """The ring on whole branches. ``diagonal``: every chunk's own plan (causal when the call is);
    ``pairs[src][dst]``: dst's query chunks against src's key chunks (src == dst: one rank's two
    chunks, zigzag); ``sends[src][dst]``: what src sends dst, in order."""

    world: int
    chunk_len: int
    chunks: tuple[tuple[int, ...], ...]
    diagonal: Plan
    pairs: tuple[tuple[tuple[ChunkPair, ...], ...], ...]
    sends: tuple[tuple[tuple[ChunkSend, ...], ...], ...]


def build_schedule(n: int, world: int, layout: str, plan: Plan, kv_heads: int,
                   causal: bool) -> RingSchedule | ChunkSchedule:
    """The whole-branch schedule where the segments align with the chunks, else the per-piece one."""
    if chunks_align(plan, chunk_length(n, world, layout)):
        return build_chunk_schedule(n, world, layout, plan, kv_heads, causal)
    return build_ring_schedule(n, world, layout, plan_items(plan), causal)


def chunks_align(plan: Plan, length: int) -> bool:
    """Whether every branch's segments align with chunks of ``length`` rows (``ChunkSchedule`` applies)."""
    return all(b.row_start == 0 and b.row_stop < 0 and (
        length % b.segment == 0 or (b.segment % length == 0 and length % b.rate == 0)) for b in plan)


def build_chunk_schedule(n: int, world: int, layout: str, plan: Plan, kv_heads: int, causal: bool) -> ChunkSchedule:
    chunks = rank_chunks(world, layout)
    length = chunk_length(n, world, layout)
    diagonal = tuple(replace(b, segment=min(b.segment, length)) for b in plan)

    def linking(qc: int, kc: int) -> Plan:
        """The branches whose segments hold both chunks, over one L-row segment."""
        if qc == kc or (causal and kc > qc):
            return ()
        return tuple(replace(b, segment=length) for b in plan
                     if b.segment > length and qc * length // b.segment == kc * length // b.segment)

    pairs = [[() for _ in range(world)] for _ in range(world)]
    sends = [[() for _ in range(world)] for _ in range(world)]
    for src in range(world):
        for dst in range(world):
            found = tuple(ChunkPair(qp, kp, p) for qp, qc in enumerate(chunks[dst])
                          for kp, kc in enumerate(chunks[src]) if (p := linking(qc, kc)))
            if src != dst:
                sends[src][dst] = tuple(_send(kp, [p for p in found if p.k == kp], kv_heads)
                                        for kp in sorted({p.k for p in found}))
                by_chunk = {s.k: s for s in sends[src][dst]}
                found = tuple(_class_layout(p, by_chunk[p.k], kv_heads) for p in found)
            pairs[src][dst] = found
    return ChunkSchedule(world, length, chunks, diagonal, tuple(map(tuple, pairs)), tuple(map(tuple, sends)))


def _send(kp: int, pairs: list[ChunkPair], kv_heads: int) -> ChunkSend:
    """The (residue, k/v head) rows of key chunk kp that the pairs' branches read."""
    items = [item for pair in pairs for branch in pair.plan for item in branch.items()]
    period = functools.reduce(math.lcm, (item.rate for item in items))
    slots, residues = set(), set()
    for item in items:
        for res in range(item.offset, period, item.rate):
            residues.add(res)
            slots.update(res * kv_heads + c for c in range(item.kv_start, item.kv_stop, item.kv_step))
    return ChunkSend(kp, period, tuple(sorted(slots)), tuple(sorted(residues)))


def _class_layout(pair: ChunkPair, send: ChunkSend, kv_heads: int) -> ChunkPair:
    """The pair with, per branch, the packed positions of its class layout's rows: for m < period / r
    and head j, residue o_j + m r of k/v head j // kv_group (``ChunkPair``)."""
    slot_at = {slot: i for i, slot in enumerate(send.slots)}
    residue_at = {res: i for i, res in enumerate(send.residues)}
    keys, rows = [], []
    for b in pair.plan:
        classes = [(b.head_base + j) % b.rate if b.offset == PER_HEAD else b.offset
                   for j in range(b.head_start, b.head_stop)]
        residues = [(o + m * b.rate, j) for m in range(send.period // b.rate)
                    for j, o in zip(range(b.head_start, b.head_stop), classes)]
        keys.append(tuple(slot_at[res * kv_heads + j // b.kv_group] for res, j in residues))
        rows.append(tuple(residue_at[res] for res, _ in residues))
    return replace(pair, keys=tuple(keys), mask_rows=tuple(rows))
