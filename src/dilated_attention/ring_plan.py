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
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import WorkItem

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
