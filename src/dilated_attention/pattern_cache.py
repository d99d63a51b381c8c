"""A bounded, thread-safe, two-tier cache of the patterns dilated and ring attention reuse.

What is cached (see docs/caching.md for the costs):
- ``("plan", n, h, segment_lengths, dilation_rates, mode, head_start, total_heads, kv_heads[, cu_seqlens])``:
  the branches of a schedule;
- ``("ring_schedule", n, P, layout, plan, kv_heads, causal)``: who computes what and sends which
  rows to whom (whole-branch or per-piece, ``ring_plan.build_schedule``).
Every backend reads q, k, v through strided views (ragged segments and ``w % r != 0``
included), so no branch needs an index tensor; the tensor tiers serve patterns that are
tensors (a user's, or a future kernel's tables) with the same guarantees.

Tiers: the host tier holds every entry once (tensors in pinned memory when CUDA is
present, so copies can be asynchronous); the device tier holds tensor copies per device,
so a steady-state hit on a GPU makes no host-to-device copy. One byte bound covers both
tiers, least recently used first; pinned entries are never evicted.

Keys are hashable structured values (tuples, frozen dataclasses) naming everything that
changes a pattern; plain strings are refused.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable

import torch

_HOST = "host"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple) and value and all(isinstance(t, torch.Tensor) for t in value):
        return list(value)
    return []


def _nbytes(value) -> int:
    tensors = _tensors(value)
    if tensors:
        return sum(t.numel() * t.element_size() for t in tensors)
    return _object_bytes(value)


def _object_bytes(obj, seen=None) -> int:
    """Rough deep size of an immutable Python pattern (tuples, dataclasses, ints)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (tuple, list, frozenset)):
        size += sum(_object_bytes(x, seen) for x in obj)
    elif hasattr(obj, "__dataclass_fields__"):
        size += sum(_object_bytes(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return size


def _map(value, fn):
    tensors = [fn(t) for t in _tensors(value)]
    return tensors[0] if isinstance(value, torch.Tensor) else tuple(tensors)


@dataclass
class _Entry:
    value: Any
    nbytes: int
    ready: Any = None  # CUDA event a reader must wait for (prefetch), else None
    pinned: bool = False


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    h2d_transfers: int = 0
    builds: int = 0


class PatternCache:
    """Patterns by key, on the host and per device, within ``max_bytes`` in all (keys counted too).

    A pattern that cannot fit (larger than the bound, or the bound full of pinned entries)
    is returned to its caller uncached. Eviction pops the least recently used unpinned
    entry: O(1) per entry evicted, whatever the number of entries.
    """

    def __init__(self, max_bytes: int = 256 << 20, pin_memory: bool | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._lock = threading.RLock()
        self._lru: "OrderedDict[tuple[Hashable, Any], _Entry]" = OrderedDict()  # unpinned (key, tier), LRU first
        self._pinned: dict[tuple[Hashable, Any], _Entry] = {}
        self._bytes = {_HOST: 0}
        self._total = 0
        self._pinned_bytes = 0
        self._stats = _Stats()
        self._streams: dict = {}

    # -- keys and tiers -------------------------------------------------------------
    @staticmethod
    def _check_key(key) -> None:
        if isinstance(key, (str, bytes)):
            raise TypeError(f"pattern keys must be structured (a tuple or frozen dataclass), not a string: {key!r}")
        try:
            hash(key)
        except TypeError as e:
            raise TypeError(f"pattern keys must be hashable, got {type(key).__name__}") from e

    @staticmethod
    def _tier(device) -> Any:
        if device is None or device == _HOST:
            return _HOST
        device = torch.device(device)
        if device.type == "cpu":
            return _HOST
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _lookup(self, slot) -> _Entry | None:
        entry = self._lru.get(slot)
        if entry is not None:
            self._lru.move_to_end(slot)
            return entry
        return self._pinned.get(slot)

    def _account(self, slot, entry: _Entry, sign: int) -> None:
        self._bytes[slot[1]] = self._bytes.get(slot[1], 0) + sign * entry.nbytes
        self._total += sign * entry.nbytes
        if entry.pinned:
            self._pinned_bytes += sign * entry.nbytes

    def _remove(self, slot) -> _Entry | None:
        entry = self._lru.pop(slot, None) or self._pinned.pop(slot, None)
        if entry is not None:
            self._account(slot, entry, -1)
        return entry

    def _insert(self, key, tier, entry: _Entry) -> bool:
        """Store the entry (its key's bytes counted); False when it cannot fit and is not stored."""
        slot = (key, tier)
        entry.nbytes += _object_bytes(key)
        old = self._remove(slot)
        entry.pinned = entry.pinned or (old is not None and old.pinned)
        if not entry.pinned and self._pinned_bytes + entry.nbytes > self.max_bytes:
            return False
        (self._pinned if entry.pinned else self._lru)[slot] = entry
        self._account(slot, entry, +1)
        self._evict()
        return True

    def _evict(self) -> None:
        while self._total > self.max_bytes and self._lru:
            slot, entry = self._lru.popitem(last=False)
            self._account(slot, entry, -1)
            self._stats.evictions += 1

    def _to_host(self, value):
        if not _tensors(value):
            return value
        pin = self.pin_memory and torch.cuda.is_available()
        return _map(value, lambda t: t.detach().to("cpu").pin_memory() if pin else t.detach().to("cpu"))

    def _copy_to(self, value, device):
        self._stats.h2d_transfers += 1
        return _map(value, lambda t: t.to(device, non_blocking=t.is_pinned()))

    @staticmethod
    def _ready(entry: _Entry, tier):
        """The entry's value, once the reader's stream has waited for its prefetch copy."""
        if entry.ready is not None:
            stream = torch.cuda.current_stream(tier)
            stream.wait_event(entry.ready)
            for t in _tensors(entry.value):
                t.record_stream(stream)
        return entry.value

    # -- public API ---------------------------------------------------------------
    def get(self, key: Hashable, target_device=None):
        """The pattern for ``key`` on ``target_device`` (None or CPU: host tier), or None on a miss."""
        tier = _HOST if target_device is None else self._tier(target_device)
        with self._lock:
            try:
                entry = self._lookup((key, tier))
            except TypeError:
                self._check_key(key)
                raise
            if entry is not None:  # the steady-state path: no copy, no allocation
                self._stats.hits += 1
                return entry.value if entry.ready is None else self._ready(entry, tier)
            host = self._lookup((key, _HOST))
            if host is None:
                self._stats.misses += 1
                return None
            self._stats.hits += 1
            if not _tensors(host.value):
                raise TypeError(f"pattern {key!r} is a Python object and lives on the host only; get it without a device")
            value = self._copy_to(host.value, tier)
            self._insert(key, tier, _Entry(value, _nbytes(value)))
            return value

    def put(self, key: Hashable, value, move_to_cpu: bool = True) -> None:
        """Store ``value`` (a tensor, a tuple of tensors, or an immutable Python pattern).

        ``move_to_cpu=True`` keeps it in the host tier (pinned if CUDA is present);
        ``False`` keeps device tensors in their device's tier without a host copy.
        """
        self._check_key(key)
        tensors = _tensors(value)
        with self._lock:
            if tensors and not move_to_cpu and tensors[0].device.type != "cpu":
                self._insert(key, self._tier(tensors[0].device), _Entry(value, _nbytes(value)))
            else:
                self._insert(key, _HOST, _Entry(self._to_host(value), _nbytes(value)))

    def get_or_create(self, key: Hashable, builder: Callable[[], Any], device=None):
        """``get(key, device)``, or build it once, store it, and return it on ``device``."""
        value = self.get(key, device)
        return value if value is not None else self.create(key, builder, device)

    def create(self, key: Hashable, builder: Callable[[], Any], device=None):
        """Build the pattern, store it (host tier, and ``device``'s for tensors), and return it.

        A pattern too large for the bound is returned uncached."""
        self._check_key(key)
        built = builder()
        with self._lock:
            self._stats.builds += 1
            tensors = _tensors(built)
            tier = self._tier(device)
            host = self._to_host(built)
            self._insert(key, _HOST, _Entry(host, _nbytes(built)))
            if tensors and tier != _HOST:
                on_device = built if tensors[0].device == tier else self._copy_to(built, tier)
                self._insert(key, tier, _Entry(on_device, _nbytes(built)))
                return on_device
            return host

    def get_batch(self, keys: Iterable[Hashable], target_device) -> list:
        """Patterns for many keys on one device; the ones missing there arrive in one copy per dtype."""
        keys = list(keys)
        tier = self._tier(target_device)
        with self._lock:
            if tier == _HOST:
                return [self.get(k) for k in keys]
            hosts = {k: self._lookup((k, _HOST)) for k in dict.fromkeys(keys) if self._lookup((k, tier)) is None}
            hosts = {k: e for k, e in hosts.items() if e is not None}
            by_dtype: dict[torch.dtype, list[tuple[Hashable, int, torch.Tensor]]] = {}
            for k, host in hosts.items():
                for j, t in enumerate(_tensors(host.value)):
                    by_dtype.setdefault(t.dtype, []).append((k, j, t))
            parts: dict[Hashable, dict[int, torch.Tensor]] = {}
            for dtype, items in by_dtype.items():
                flat = torch.cat([t.reshape(-1) for _, _, t in items])
                if self.pin_memory:
                    flat = flat.pin_memory()
                self._stats.h2d_transfers += 1
                on_device = flat.to(tier, non_blocking=flat.is_pinned())
                for (k, j, t), chunk in zip(items, on_device.split([t.numel() for _, _, t in items])):
                    parts.setdefault(k, {})[j] = chunk.view(t.shape)
            copied = {}
            for k, host in hosts.items():
                tensors = [parts[k][j] for j in range(len(_tensors(host.value)))]
                copied[k] = tensors[0] if isinstance(host.value, torch.Tensor) else tuple(tensors)
                self._insert(k, tier, _Entry(copied[k], _nbytes(copied[k])))
                self._stats.hits += 1
            return [copied.pop(k) if k in copied else self.get(k, tier) for k in keys]

    def prefetch(self, keys: Iterable[Hashable], device) -> None:
        """Start copying host patterns to ``device`` on a side stream; readers wait on its event."""
        tier = self._tier(device)
        if tier == _HOST or tier.type != "cuda":
            raise ValueError(f"prefetch needs a CUDA device, got {device}")
        with self._lock:
            todo = {k: self._lookup((k, _HOST)) for k in dict.fromkeys(keys) if self._lookup((k, tier)) is None}
            todo = {k: host for k, host in todo.items() if host is not None and _tensors(host.value)}
            if not todo:
                return
            stream = self._side_stream(tier)
            stream.wait_stream(torch.cuda.current_stream(tier))
            with torch.cuda.stream(stream):
                for k, host in todo.items():
                    value = self._copy_to(host.value, tier)
                    event = torch.cuda.Event()
                    event.record(stream)
                    self._insert(k, tier, _Entry(value, _nbytes(value), ready=event))

    def _side_stream(self, device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def __getstate__(self):  # a copied module gets an empty cache of the same size
        return {"max_bytes": self.max_bytes, "pin_memory": self.pin_memory}

    def __setstate__(self, state):
        self.__init__(**state)

    def pin_pattern(self, key: Hashable, device) -> None:
        """Keep ``key`` resident on ``device`` (copied there if needed) and never evict it."""
        tier = self._tier(device)
        with self._lock:
            value = self.get(key, tier)
            if value is None:
                raise KeyError(f"no pattern for {key!r} to pin")
            entry = self._remove((key, tier))
            if entry is None:  # too large to be cached unpinned: pinning keeps it all the same
                entry = _Entry(value, _nbytes(value))
            else:
                entry.nbytes -= _object_bytes(key)  # _insert counts the key again
            entry.pinned = True
            self._insert(key, tier, entry)

    def unpin_pattern(self, key: Hashable, device=None) -> None:
        """Let ``key`` be evicted again (on ``device``, or on every tier when None)."""
        with self._lock:
            for slot in [s for s in self._pinned if s[0] == key and (device is None or s[1] == self._tier(device))]:
                entry = self._remove(slot)
                entry.pinned = False
                self._lru[slot] = entry
                self._account(slot, entry, +1)
            self._evict()

    def clear(self) -> None:
        """Drop every entry, pinned ones too; counters restart."""
        with self._lock:
            self._lru.clear()
            self._pinned.clear()
            self._bytes = {_HOST: 0}
            self._total = self._pinned_bytes = 0
            self._stats = _Stats()

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru) + len(self._pinned)

    def __contains__(self, key) -> bool:
        with self._lock:
            return any((key, tier) in self._lru or (key, tier) in self._pinned for tier in self._bytes)

    def stats(self) -> dict:
        with self._lock:
            s = self._stats
            lookups = s.hits + s.misses
            return {
                "hits": s.hits,
                "misses": s.misses,
                "evictions": s.evictions,
                "hit_rate": s.hits / lookups if lookups else 0.0,
                "builds": s.builds,
                "entries": len(self._lru) + len(self._pinned),
                "pinned": len(self._pinned),
                "host_bytes": self._bytes[_HOST],
                "device_bytes": sum(b for t, b in self._bytes.items() if t != _HOST),
                "h2d_transfers": s.h2d_transfers,
                "max_bytes": self.max_bytes,
            }


_GLOBAL = PatternCache()


def get_global_pattern_cache() -> PatternCache:
    """The process-wide cache every module with ``use_pattern_cache=True`` shares."""
    return _GLOBAL


def clear_global_pattern_cache() -> None:
    """Empty the process-wide cache."""
    get_global_pattern_cache().clear()
