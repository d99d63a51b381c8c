"""A bounded, thread-safe, two-tier cache of the patterns dilated and ring attention reuse.

What is cached (see docs/caching.md for the costs):
- ``("plan", n, h, segment_lengths, dilation_rates, mode)``: the work items of a schedule;
- ``("ring_schedule", n, P, layout, plan, causal)``: who sends which rows to whom.
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
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable

import torch

_HOST = "host"
_REGISTRY: "weakref.WeakValueDictionary[int, PatternCache]" = weakref.WeakValueDictionary()
_NEXT_ID = [1]


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
    """Patterns by key, on the host and per device, within ``max_bytes`` in all."""

    def __init__(self, max_bytes: int = 256 << 20, pin_memory: bool | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._lock = threading.RLock()
        self._entries: "OrderedDict[tuple[Hashable, Any], _Entry]" = OrderedDict()  # (key, tier) in LRU order
        self._bytes = {_HOST: 0}
        self._stats = _Stats()
        self._streams: dict = {}
        with self._lock:
            self.cache_id = _NEXT_ID[0]
            _NEXT_ID[0] += 1
        _REGISTRY[self.cache_id] = self

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

    def _insert(self, key, tier, entry: _Entry) -> None:
        old = self._entries.pop((key, tier), None)
        if old is not None:
            self._bytes[tier] -= old.nbytes
            entry.pinned = entry.pinned or old.pinned
        self._entries[(key, tier)] = entry
        self._bytes[tier] = self._bytes.get(tier, 0) + entry.nbytes
        self._evict()

    def _evict(self) -> None:
        total = sum(self._bytes.values())
        for slot in list(self._entries):
            if total <= self.max_bytes:
                break
            entry = self._entries[slot]
            if entry.pinned:
                continue
            del self._entries[slot]
            self._bytes[slot[1]] -= entry.nbytes
            total -= entry.nbytes
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
        slot = (key, tier)
        with self._lock:
            try:
                entry = self._entries.get(slot)
            except TypeError:
                self._check_key(key)
                raise
            if entry is not None:  # the steady-state path: no copy, no allocation
                self._entries.move_to_end(slot)
                self._stats.hits += 1
                return entry.value if entry.ready is None else self._ready(entry, tier)
            host = self._entries.get((key, _HOST))
            if host is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end((key, _HOST))
            self._stats.hits += 1
            if not _tensors(host.value):
                raise TypeError(f"pattern {key!r} is a Python object and lives on the host only; get it without a device")
            value = self._copy_to(host.value, tier)
            self._insert(key, tier, _Entry(value, host.nbytes))
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
        """Build the pattern, store it (host tier, and ``device``'s for tensors), and return it."""
        self._check_key(key)
        built = builder()
        with self._lock:
            self._stats.builds += 1
            tensors = _tensors(built)
            tier = self._tier(device)
            self._insert(key, _HOST, _Entry(self._to_host(built), _nbytes(built)))
            if tensors and tier != _HOST:
                on_device = built if tensors[0].device == tier else self._copy_to(built, tier)
                self._insert(key, tier, _Entry(on_device, _nbytes(built)))
                return on_device
            return self._entries[(key, _HOST)].value

    def get_batch(self, keys: Iterable[Hashable], target_device) -> list:
        """Patterns for many keys on one device; the ones missing there arrive in one copy per dtype."""
        keys = list(keys)
        tier = self._tier(target_device)
        with self._lock:
            if tier == _HOST:
                return [self.get(k) for k in keys]
            missing = [k for k in dict.fromkeys(keys) if (k, tier) not in self._entries and (k, _HOST) in self._entries]
            by_dtype: dict[torch.dtype, list[tuple[Hashable, int, torch.Tensor]]] = {}
            for k in missing:
                for j, t in enumerate(_tensors(self._entries[(k, _HOST)].value)):
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
            for k in missing:
                host = self._entries[(k, _HOST)]
                tensors = [parts[k][j] for j in range(len(_tensors(host.value)))]
                value = tensors[0] if isinstance(host.value, torch.Tensor) else tuple(tensors)
                self._insert(k, tier, _Entry(value, host.nbytes))
            return [self.get(k, tier) for k in keys]

    def prefetch(self, keys: Iterable[Hashable], device) -> None:
        """Start copying host patterns to ``device`` on a side stream; readers wait on its event."""
        tier = self._tier(device)
        if tier == _HOST or tier.type != "cuda":
            raise ValueError(f"prefetch needs a CUDA device, got {device}")
        with self._lock:
            todo = [k for k in dict.fromkeys(keys) if (k, tier) not in self._entries and (k, _HOST) in self._entries]
            if not todo:
                return
            stream = self._side_stream(tier)
            stream.wait_stream(torch.cuda.current_stream(tier))
            with torch.cuda.stream(stream):
                for k in todo:
                    host = self._entries[(k, _HOST)]
                    value = self._copy_to(host.value, tier)
                    event = torch.cuda.Event()
                    event.record(stream)
                    self._insert(k, tier, _Entry(value, host.nbytes, ready=event))

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
            if self.get(key, tier) is None:
                raise KeyError(f"no pattern for {key!r} to pin")
            self._entries[(key, tier)].pinned = True

    def unpin_pattern(self, key: Hashable, device=None) -> None:
        """Let ``key`` be evicted again (on ``device``, or on every tier when None)."""
        with self._lock:
            for (k, tier), entry in self._entries.items():
                if k == key and (device is None or tier == self._tier(device)):
                    entry.pinned = False
            self._evict()

    def clear(self) -> None:
        """Drop every entry, pinned ones too; counters restart."""
        with self._lock:
            self._entries.clear()
            self._bytes = {_HOST: 0}
            self._stats = _Stats()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key) -> bool:
        with self._lock:
            return any(k == key for k, _ in self._entries)

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
                "entries": len(self._entries),
                "pinned": sum(e.pinned for e in self._entries.values()),
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


def cache_by_id(cache_id: int) -> PatternCache:
    """The live cache with this id (ids travel through custom ops, which take no objects)."""
    cache = _REGISTRY.get(cache_id)
    if cache is None:
        raise RuntimeError(f"pattern cache {cache_id} no longer exists")
    return cache
