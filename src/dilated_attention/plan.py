"""The dilation schedule as branches, the work items derived from them, and their strided views.

A *branch* ``(w, r)`` with effective segment ``w' = min(w, n)`` links query ``i`` and key
``t`` when they share a segment and both in-segment positions are ``== o (mod r)``. The
plan keeps one ``Branch`` per entry of the schedule, never merged with another (a
repeated ``(w, r)``, or two branches clipped to the same ``w' = n``, count twice, as Eq. 10
says). Heads that share an offset ``o`` see the same positions, so each branch yields one
``WorkItem`` per offset: dense attention over the strided view
``x[:, :full].unflatten(1, (S, w'))[:, :, o::r, heads]`` plus, when ``n % w' != 0``, the
ragged last segment ``x[:, full:][:, o::r, heads]``. No gather, no index list, no padding.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass
from typing import Sequence

import torch

MODES = ("paper", "head_groups")
PER_HEAD = -1  # Branch.offset: head j uses offset j % r (paper mode)


@dataclass(frozen=True)
class WorkItem:
    """Dense attention over one ``(branch, offset)`` for the query heads ``head_start:head_stop:head_step``
    against the k/v heads ``kv_start:kv_stop:kv_step`` (the same heads, or one head shared by all: GQA)."""

    segment: int  # effective segment length w' = min(w, n)
    rate: int
    offset: int
    head_start: int
    head_stop: int
    head_step: int
    kv_start: int
    kv_stop: int
    kv_step: int
    row_start: int = 0  # the document (cu_seqlens) the item covers: rows [row_start, row_stop)
    row_stop: int = -1  # -1: to the end of the sequence

    @property
    def rows(self) -> slice:
        return slice(self.row_start, None if self.row_stop < 0 else self.row_stop)

    @property
    def heads(self) -> slice:
        return slice(self.head_start, self.head_stop, self.head_step)

    @property
    def kv_heads(self) -> slice:
        return slice(self.kv_start, self.kv_stop, self.kv_step)


@dataclass(frozen=True)
class Branch:
    """One ``(w, r)`` of the schedule over the local heads ``[head_start, head_stop)``.

    ``offset``: ``PER_HEAD`` (paper mode: local head j uses ``(head_base + j) % r``, where
    ``head_base`` is the global index of local head 0) or one offset for every head
    (head_groups mode: group g uses g % r).
    """

    segment: int  # effective segment length w' = min(w, n)
    rate: int
    offset: int
    head_start: int
    head_stop: int
    head_base: int = 0
    kv_group: int = 1  # query heads per k/v head (GQA): local head j reads k/v head j // kv_group
    row_start: int = 0  # packed documents: this branch covers one document, rows [row_start, row_stop)
    row_stop: int = -1  # -1: to the end of the sequence

    def __hash__(self) -> int:  # plans key many caches on the hot path: hash each branch once
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(astuple(self))

    @property
    def rows(self) -> slice:
        return slice(self.row_start, None if self.row_stop < 0 else self.row_stop)

    def items(self) -> tuple[WorkItem, ...]:
        """The branch's work items: one per offset (and, with GQA, per k/v head) that selects anything."""
        if self.offset != PER_HEAD:
            if self.offset >= self.segment:
                return ()
            classes = [(self.offset, self.head_start, self.head_stop, 1)]
        else:
            classes = []
            for o in range(min(self.rate, self.segment)):
                first = self.head_start + (o - self.head_base - self.head_start) % self.rate  # first local head at o
                if first < self.head_stop:
                    classes.append((o, first, self.head_stop, self.rate))
        g = self.kv_group
        docs = (self.row_start, self.row_stop)
        if g == 1:
            return tuple(WorkItem(self.segment, self.rate, o, a, b, step, a, b, step, *docs) for o, a, b, step in classes)
        items = []  # one item per (offset, k/v head): its query heads share that one k/v head
        for o, a, b, step in classes:
            for c in range(a // g, (b - 1) // g + 1):
                lo = a + -(-(c * g - a) // step) * step if c * g > a else a
                hi = min(b, (c + 1) * g)
                if lo < hi:
                    items.append(WorkItem(self.segment, self.rate, o, lo, hi, step, c, c + 1, 1, *docs))
        return tuple(items)


Plan = tuple  # tuple[Branch, ...]: one entry per (w, r) of the schedule, in order


def check_schedule(segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str) -> None:
    """Raise a ValueError/TypeError naming the argument when the schedule is malformed."""
    if (not torch.compiler.is_compiling() and type(mode) is str and type(segment_lengths) in (list, tuple)
            and type(dilation_rates) in (list, tuple) and all(type(x) is int for x in (*segment_lengths, *dilation_rates))):
        return _check_ints(tuple(segment_lengths), tuple(dilation_rates), mode)  # the checks, once per schedule
    _check_schedule(segment_lengths, dilation_rates, mode)


@functools.lru_cache(maxsize=256)
def _check_ints(segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], mode) -> None:
    _check_schedule(segment_lengths, dilation_rates, mode)


def _check_schedule(segment_lengths, dilation_rates, mode) -> None:
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list or tuple of positive ints, got {type(values).__name__}")
        if len(values) == 0:
            raise ValueError(f"{name} must not be empty")
        for x in values:
            if isinstance(x, bool) or not isinstance(x, int):
                raise TypeError(f"{name} must hold ints, got {x!r} ({type(x).__name__})")
            if x <= 0:
                raise ValueError(f"{name} must be positive, got {list(values)}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} and {len(dilation_rates)}"
        )
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        if r > w:
            raise ValueError(
                f"dilation_rates[{i}] = {r} exceeds segment_lengths[{i}] = {w}: a branch keeps every r-th row of "
                f"segments of w rows, so r <= w. The arguments are (segment_lengths, dilation_rates); were they "
                f"passed in the other order (dilation_rates first, as some other implementations take them)?"
            )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_heads(num_heads: int, num_branches: int, mode: str) -> None:
    if mode == "head_groups" and num_heads < num_branches:
        raise ValueError(
            f"mode='head_groups' needs at least one head per branch: got {num_heads} heads for {num_branches} branches"
        )


def head_groups(num_heads: int, num_branches: int) -> list[tuple[int, int]]:
    """``[start, stop)`` heads of each group: ``h // m`` each, the first ``h % m`` one more."""
    base, extra = divmod(num_heads, num_branches)
    bounds, start = [], 0
    for g in range(num_branches):
        stop = start + base + (1 if g < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def build_plan(
    seq_len: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    head_start: int = 0,
    total_heads: int | None = None,
    kv_heads: int | None = None,
    cu_seqlens: tuple[int, ...] | None = None,
) -> Plan:
    """The branches of the schedule at this ``(n, h)``, in order.

    ``head_start``: global index of the first of the ``num_heads`` local heads, out of
    ``total_heads`` (default ``head_start + num_heads``): the plan computes exactly those
    heads of the whole-head result. head_groups branches without a local head are left out.
    ``kv_heads``: local k/v heads (GQA; default ``num_heads``), dividing ``num_heads``.
    ``cu_seqlens``: document boundaries (0, ..., n); every document is segmented from its own
    first row (w' = min(w, its length)) and sees no other: one set of branches per document.
    """
    schedule = list(zip(segment_lengths, dilation_rates))
    total = head_start + num_heads if total_heads is None else total_heads
    group = num_heads // (kv_heads or num_heads)
    docs = [(0, -1, seq_len)] if cu_seqlens is None else [
        (a, b, b - a) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]) if b > a]
    if mode == "paper":
        return tuple(Branch(min(w, length), r, PER_HEAD, 0, num_heads, head_start, group, a, b)
                     for a, b, length in docs for w, r in schedule)
    check_heads(total, len(schedule), mode)
    branches = []
    for a, b, length in docs:
        for g, ((w, r), (start, stop)) in enumerate(zip(schedule, head_groups(total, len(schedule)))):
            lo, hi = max(start, head_start) - head_start, min(stop, head_start + num_heads) - head_start
            if hi > lo:
                branches.append(Branch(min(w, length), r, g % r, lo, hi, 0, group, a, b))
    return tuple(branches)


def check_head_slice(num_heads: int, head_start: int, total_heads: int | None, kv_heads: int | None = None) -> int:
    """Validate a slice of heads; returns the total head count."""
    for name, x in (("head_start", head_start), ("total_heads", total_heads)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
            raise TypeError(f"{name} must be a non-negative int, got {x!r}")
    total = head_start + num_heads if total_heads is None else total_heads
    if head_start + num_heads > total:
        raise ValueError(
            f"heads [head_start, head_start + h) = [{head_start}, {head_start + num_heads}) must lie inside "
            f"total_heads = {total}"
        )
    group = num_heads // (kv_heads or num_heads)
    if head_start % group:
        raise ValueError(f"head_start = {head_start} must be a multiple of the {group} query heads per k/v head, so "
                         "that the slice holds whole k/v heads")
    return total


def documents(plan: Plan, n: int) -> dict[tuple[int, int], list[Branch]]:
    """The plan's branches by document (cu_seqlens; else the whole sequence): (first row, length)
    -> its branches, in order. Every document holds one branch per schedule entry."""
    docs: dict[tuple[int, int], list[Branch]] = {}
    for b in plan:
        stop = n if b.row_stop < 0 else b.row_stop
        docs.setdefault((b.row_start, stop - b.row_start), []).append(b)
    return docs


@functools.lru_cache(maxsize=256)
def plan_items(plan: Plan) -> tuple[WorkItem, ...]:
    """Every ``(branch, offset, heads)`` work item of the plan, branch by branch (derived once per plan)."""
    return tuple(item for branch in plan for item in branch.items())


def encode_plan(plan: Plan) -> list[int]:
    """The plan as a flat list of ints (what a custom op can take): 9 per branch."""
    return [x for b in plan for x in (b.segment, b.rate, b.offset, b.head_start, b.head_stop, b.head_base, b.kv_group,
                                      b.row_start, b.row_stop)]


@functools.lru_cache(maxsize=1024)
def decode_plan(code: tuple[int, ...]) -> Plan:
    """Inverse of ``encode_plan``."""
    return tuple(Branch(*code[i : i + 9]) for i in range(0, len(code), 9))


def segment_views(x: torch.Tensor, item: WorkItem, heads: slice | None = None) -> list[torch.Tensor]:
    """Views of ``x`` (b, n, h, *rest) as (b, S, c, hs, *rest): full segments, then the ragged one.

    heads: which heads (default the item's query heads; ``item.kv_heads`` for k and v)."""
    heads = item.heads if heads is None else heads
    n = x.shape[1]
    full = n // item.segment * item.segment
    views = []
    if full:
        views.append(x[:, :full].unflatten(1, (n // item.segment, item.segment))[:, :, item.offset :: item.rate, heads])
    if item.offset < n - full:
        views.append(x[:, full:].unsqueeze(1)[:, :, item.offset :: item.rate, heads])
    return views


def block_views(item: WorkItem, q_side, k_side, key_mask=None) -> list[tuple[list, list, object, int]]:
    """The blocks of one work item: (q-side views, k-side views, key-mask view or None, q_offset).

    q_side: tensors (b, m, h, ...) of the m queries, the last m of the n positions (bottom-right
    alignment, m <= n); k_side: tensors (b, n, h_kv, ...); key_mask: (b, n) or None. Views are
    (b, S, c, hs, ...) as in ``segment_views``. q_offset: query row i of a block is key row
    i + q_offset of its segment's class (for causal masking); nonzero only in the one segment
    the queries enter part-way.
    """
    if item.row_start or item.row_stop >= 0:  # one packed document (queries and keys of equal length)
        q_side = [t[:, item.rows] for t in q_side]
        k_side = [t[:, item.rows] for t in k_side]
        key_mask = None if key_mask is None else key_mask[:, item.rows]
    m, n = q_side[0].shape[1], k_side[0].shape[1]
    if m == 1 and (n - 1) % item.segment % item.rate != item.offset:
        return []  # one query (a decoding step) lies in one residue class per branch
    masks = [] if key_mask is None else [key_mask.unsqueeze(-1)]

    def split(q_views, k_views):
        kv = k_views[: len(k_side)]
        return q_views, kv, k_views[len(k_side)][..., 0] if masks else None

    first = n - m  # the first query's position
    aligned = -(-first // item.segment) * item.segment  # the first segment boundary at or after it
    blocks = []
    if aligned > first:  # the queries enter a segment part-way: its query rows are a suffix of its class
        seg_start, seg_stop = aligned - item.segment, min(aligned, n)
        q0 = seg_start + item.offset + max(0, -(-(first - seg_start - item.offset) // item.rate)) * item.rate
        if q0 < seg_stop:
            keys = slice(seg_start + item.offset, seg_stop, item.rate)
            q_views = [t[:, q0 - first : seg_stop - first : item.rate, item.heads].unsqueeze(1) for t in q_side]
            k_views = [t[:, keys, item.kv_heads].unsqueeze(1) for t in k_side] + [t[:, keys].unsqueeze(1) for t in masks]
            offset = len(range(keys.start, keys.stop, keys.step)) - len(range(q0, seg_stop, item.rate))
            blocks.append((*split(q_views, k_views), offset))
    if aligned < n:
        q_views = [segment_views(t[:, aligned - first :], item) for t in q_side]
        k_views = [segment_views(t[:, aligned:], item, item.kv_heads) for t in k_side]
        k_views += [segment_views(t[:, aligned:], item, slice(None)) for t in masks]
        for views in zip(*q_views, *k_views):
            blocks.append((*split(list(views[: len(q_side)]), list(views[len(q_side) :])), 0))
    return blocks


def useful_flops(
    seq_len: int,
    num_heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "paper",
    batch: int = 1,
) -> int:
    """Forward FLOPs of the linked query-key pairs (4 per pair per head-dim element), causal not halved."""
    n = seq_len
    total = 0
    for item in plan_items(build_plan(n, num_heads, segment_lengths, dilation_rates, mode)):
        heads = len(range(item.head_start, item.head_stop, item.head_step))
        full = n // item.segment * item.segment
        rows_full = len(range(item.offset, item.segment, item.rate))
        rows_tail = len(range(item.offset, n - full, item.rate))
        total += heads * ((n // item.segment) * rows_full**2 + rows_tail**2)
    return 4 * batch * head_dim * total


def cached_plan(cache, seq_len, num_heads, segment_lengths, dilation_rates, mode, head_start=0, total_heads=None,
                kv_heads=None, cu_seqlens=None) -> Plan:
    """``build_plan`` through a ``PatternCache``: built once per configuration (and packing).

    Under ``torch.compile`` the plan is built while tracing and the graph keeps it."""
    args = (seq_len, num_heads, segment_lengths, dilation_rates, mode, head_start, total_heads, kv_heads, cu_seqlens)
    if torch.compiler.is_compiling():
        return build_plan(*args)
    key = ("plan", seq_len, num_heads, tuple(segment_lengths), tuple(dilation_rates), mode, head_start, total_heads,
           kv_heads) + ((cu_seqlens,) if cu_seqlens is not None else ())
    plan = cache.get(key)
    if plan is None:
        plan = cache.create(key, lambda: build_plan(*args))
    return plan
