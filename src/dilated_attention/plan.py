"""The dilation schedule as a list of work items, and the strided views they read.

A *branch* ``(w, r)`` with effective segment ``w' = min(w, n)`` links query ``i`` and key
``t`` when they share a segment and both in-segment positions are ``== o (mod r)``.
Heads that share an offset ``o`` see the same positions, so one work item covers one
``(branch, offset)`` and a slice of heads. Every item is dense attention over the strided
view ``x[:, :full].unflatten(1, (S, w'))[:, :, o::r, heads]`` plus, when ``n % w' != 0``,
the ragged last segment ``x[:, full:][:, o::r, heads]``: no gather, no index list, no
padding, for any ``w % r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MODES = ("paper", "head_groups")


@dataclass(frozen=True)
class WorkItem:
    """Dense attention over one ``(branch, offset)`` for the heads ``head_start:head_stop:head_step``."""

    segment: int  # effective segment length w' = min(w, n)
    rate: int
    offset: int
    head_start: int
    head_stop: int
    head_step: int

    @property
    def heads(self) -> slice:
        return slice(self.head_start, self.head_stop, self.head_step)


def check_schedule(segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str) -> None:
    """Raise a ValueError/TypeError naming the argument when the schedule is malformed."""
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
) -> tuple[WorkItem, ...]:
    """Every ``(branch, offset, heads)`` item of the schedule at this ``(n, h)``; empty ones dropped."""
    items = []
    if mode == "paper":
        for w, r in zip(segment_lengths, dilation_rates):
            seg = min(w, seq_len)
            for o in range(min(r, seg, num_heads)):
                items.append(WorkItem(seg, r, o, o, num_heads, r))
    else:
        check_heads(num_heads, len(segment_lengths), mode)
        for g, ((w, r), (start, stop)) in enumerate(
            zip(zip(segment_lengths, dilation_rates), head_groups(num_heads, len(segment_lengths)))
        ):
            seg = min(w, seq_len)
            if g % r < seg:
                items.append(WorkItem(seg, r, g % r, start, stop, 1))
    return tuple(items)


def segment_views(x: torch.Tensor, item: WorkItem) -> list[torch.Tensor]:
    """Views of ``x`` (b, n, h, *rest) as (b, S, c, hs, *rest): full segments, then the ragged one."""
    n = x.shape[1]
    full = n // item.segment * item.segment
    views = []
    if full:
        views.append(x[:, :full].unflatten(1, (n // item.segment, item.segment))[:, :, item.offset :: item.rate, item.heads])
    if item.offset < n - full:
        views.append(x[:, full:].unsqueeze(1)[:, :, item.offset :: item.rate, item.heads])
    return views


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
    for item in build_plan(n, num_heads, segment_lengths, dilation_rates, mode):
        heads = len(range(item.head_start, item.head_stop, item.head_step))
        full = n // item.segment * item.segment
        rows_full = len(range(item.offset, item.segment, item.rate))
        rows_tail = len(range(item.offset, n - full, item.rate))
        total += heads * ((n // item.segment) * rows_full**2 + rows_tail**2)
    return 4 * batch * head_dim * total


def cached_plan(cache, seq_len, num_heads, segment_lengths, dilation_rates, mode) -> tuple[WorkItem, ...]:
    """``build_plan`` through a ``PatternCache``: built once per configuration."""
    key = ("plan", seq_len, num_heads, tuple(segment_lengths), tuple(dilation_rates), mode)
    plan = cache.get(key)
    if plan is None:
        plan = cache.create(key, lambda: build_plan(seq_len, num_heads, segment_lengths, dilation_rates, mode))
    return plan
