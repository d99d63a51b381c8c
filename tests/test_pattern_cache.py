"""PatternCache: the contract of the pattern-cache issue, and its use by every module."""

import copy
import random
import threading

import pytest
import torch

from conftest import rand

from dilated_attention import (
    DilatedAttention,
    dilated_attention,
    MultiheadDilatedAttention,
    PatternCache,
    clear_global_pattern_cache,
    get_global_pattern_cache,
)
from dilated_attention.pattern_cache import _object_bytes
from dilated_attention.plan import build_plan, plan_items, segment_views

SEGS, RATES = [8, 16], [1, 2]


def _pattern(i, dtype=torch.float32):
    return torch.full((16,), float(i), dtype=dtype)


def test_module_uses_global_cache_and_second_instance_builds_nothing():
    clear_global_pattern_cache()
    cache = get_global_pattern_cache()
    x = rand((1, 40, 4, 8), grad=False)
    a, b = DilatedAttention(SEGS, RATES), DilatedAttention(SEGS, RATES)
    a(x, x, x)
    builds = cache.stats()["builds"]
    assert builds == 1 and ("plan", 40, 4, (8, 16), (1, 2), "paper", 0, None, None) in cache
    b(x, x, x)
    b(x, x, x)
    s = cache.stats()
    assert s["builds"] == builds and (s["hits"], s["misses"]) == (2, 1)


def test_disabled_cache_never_touches_global_and_gives_identical_output():
    clear_global_pattern_cache()
    x = rand((2, 37, 4, 8), grad=False)
    cached = DilatedAttention(SEGS, RATES)(x, x, x, is_causal=True)
    before = get_global_pattern_cache().stats()
    own = DilatedAttention(SEGS, RATES, use_pattern_cache=False)
    uncached = own(x, x, x, is_causal=True)
    assert get_global_pattern_cache().stats() == before
    assert own.pattern_cache is not get_global_pattern_cache() and own.pattern_cache.stats()["builds"] == 1
    assert torch.equal(cached, uncached)
    mha = MultiheadDilatedAttention(32, 4, SEGS, RATES, use_pattern_cache=False)
    mha(torch.randn(1, 20, 32))
    assert get_global_pattern_cache().stats() == before


def test_views_select_exactly_the_linked_positions():
    n, h = 37, 5
    pos = torch.arange(n).view(1, n, 1).expand(1, n, h).contiguous()
    for item in plan_items(build_plan(n, h, [8, 20], [3, 4], "paper")):
        selected = torch.cat([v.reshape(-1) for v in segment_views(pos[..., None], item)])
        heads = range(item.head_start, item.head_stop, item.head_step)
        expected = [i for i in range(n) if (i % item.segment) % item.rate == item.offset for _ in heads]
        assert sorted(selected.tolist()) == expected


def test_keys_must_be_structured():
    cache = PatternCache()
    with pytest.raises(TypeError, match="not a string"):
        cache.put("ring_dilated_s1024_r2_off0", _pattern(0))
    with pytest.raises(TypeError, match="hashable"):
        cache.put(["list"], _pattern(0))


def test_hits_misses_and_clear():
    cache = PatternCache()
    assert cache.get(("k", 1)) is None
    cache.put(("k", 1), _pattern(1))
    assert torch.equal(cache.get(("k", 1)), _pattern(1))
    s = cache.stats()
    assert (s["hits"], s["misses"], s["hit_rate"], s["host_bytes"]) == (1, 1, 0.5, 64 + _object_bytes(("k", 1)))
    cache.clear()
    assert len(cache) == 0 and cache.get(("k", 1)) is None and cache.stats()["host_bytes"] == 0


def test_byte_bound_holds_under_churn_and_pinned_entries_survive():
    entry = 64 + _object_bytes(("p", 0))  # a 64-byte pattern and its key
    cache = PatternCache(max_bytes=entry * 10)  # ten entries
    cache.put(("pinned",), _pattern(-1))
    cache.pin_pattern(("pinned",), "cpu")
    for i in range(200):
        cache.put(("p", i), _pattern(i))
        s = cache.stats()
        assert s["host_bytes"] + s["device_bytes"] <= cache.max_bytes
    s = cache.stats()
    assert s["evictions"] == 201 - s["entries"] and s["entries"] == 10
    assert torch.equal(cache.get(("pinned",)), _pattern(-1))
    assert torch.equal(cache.get(("p", 199)), _pattern(199)) and cache.get(("p", 0)) is None
    cache.unpin_pattern(("pinned",))
    for i in range(200, 220):
        cache.put(("p", i), _pattern(i))
    assert cache.get(("pinned",)) is None


def test_device_tier_copies_once_and_separates_devices_and_dtypes():
    """The 'meta' device stands in for a GPU: the tier logic is device-agnostic."""
    cache = PatternCache()
    cache.put(("mask", torch.float32), _pattern(1))
    cache.put(("mask", torch.float64), _pattern(1, torch.float64))
    on_meta = cache.get(("mask", torch.float32), "meta")
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32
    for _ in range(5):
        assert cache.get(("mask", torch.float32), "meta").device.type == "meta"
    assert cache.stats()["h2d_transfers"] == 1
    assert cache.get(("mask", torch.float64), "meta").dtype == torch.float64
    assert cache.get(("mask", torch.float32)).device.type == "cpu"
    key_bytes = _object_bytes(("mask", torch.float32))
    assert cache.stats()["device_bytes"] == 64 + 128 + 2 * key_bytes


def test_get_batch_makes_one_copy_per_dtype():
    cache = PatternCache()
    for i in range(6):
        cache.put(("b", i), (_pattern(i), torch.arange(i + 1)))
    out = cache.get_batch([("b", i) for i in range(6)], "meta")
    assert cache.stats()["h2d_transfers"] == 2  # float32 and int64
    assert all(a.device.type == "meta" and a.shape == (16,) and b.shape == (i + 1,) for i, (a, b) in enumerate(out))


def test_get_or_create_builds_once_and_python_patterns_stay_on_host():
    cache = PatternCache()
    calls = []
    for _ in range(3):
        plan = cache.get_or_create(("plan", 1), lambda: calls.append(1) or (1, 2, 3))
    assert plan == (1, 2, 3) and len(calls) == 1
    with pytest.raises(TypeError, match="host only"):
        cache.get(("plan", 1), "meta")


def test_many_threads_lose_and_corrupt_nothing():
    cache = PatternCache(max_bytes=(64 + _object_bytes(("t", 10))) * 40)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(400):
            i = rng.randrange(60)
            value = cache.get_or_create(("t", i), lambda i=i: _pattern(i))
            if not torch.equal(value, _pattern(i)):
                errors.append((i, value))
            s = cache.stats()
            if s["host_bytes"] + s["device_bytes"] > cache.max_bytes:
                errors.append(("bound", s))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = cache.stats()
    assert s["hits"] + s["misses"] == 8 * 400 and s["entries"] <= 40


def test_module_deepcopy_gets_its_own_empty_cache():
    attn = DilatedAttention(SEGS, RATES, use_pattern_cache=False)
    x = rand((1, 16, 2, 8), grad=False)
    attn(x, x, x)
    twin = copy.deepcopy(attn)
    assert twin.pattern_cache is not attn.pattern_cache and len(twin.pattern_cache) == 0
    torch.testing.assert_close(twin(x, x, x), attn(x, x, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_hits_copy_nothing_and_prefetch_orders_readers():
    cache = PatternCache()
    big = torch.randn(1 << 22)
    cache.put(("big",), big)
    cache.put(("small",), (torch.arange(10), torch.ones(3)))
    side = torch.cuda.Stream()
    cache.prefetch([("big",), ("small",)], "cuda")
    with torch.cuda.stream(side):  # a reader on another stream must see the landed copy
        value = cache.get(("big",), "cuda")
        total = value.sum()
    torch.cuda.synchronize()
    torch.testing.assert_close(total.cpu(), big.sum(), rtol=1e-4, atol=1e-2)
    transfers = cache.stats()["h2d_transfers"]
    for _ in range(10):
        cache.get(("big",), "cuda")
    assert cache.stats()["h2d_transfers"] == transfers
    got = cache.get_batch([("small",)], "cuda")[0]
    assert got[0].is_cuda and torch.equal(got[0].cpu(), torch.arange(10))
    cache.pin_pattern(("small",), "cuda")
    cache.max_bytes = 1
    cache.put(("evict-me",), torch.ones(8))
    assert cache.get(("small",), "cuda") is not None


def test_pattern_larger_than_the_bound_is_returned_uncached():
    cache = PatternCache(max_bytes=1024)
    big = cache.get_or_create(("big",), lambda: torch.ones(1000))
    assert torch.equal(big, torch.ones(1000)) and len(cache) == 0 and cache.stats()["builds"] == 1
    plan = cache.get_or_create(("plan",), lambda: tuple(range(1000)))  # a Python pattern too
    assert plan == tuple(range(1000)) and len(cache) == 0
    x = rand((1, 40, 4, 8), grad=True)
    out = dilated_attention(x, x, x, SEGS, RATES, pattern_cache=PatternCache(max_bytes=1))  # plan never fits
    torch.testing.assert_close(out, dilated_attention(x, x, x, SEGS, RATES))
    out.sum().backward()


def test_bound_full_of_pinned_entries_still_serves_new_patterns():
    cache = PatternCache(max_bytes=2048)
    cache.put(("pinned",), torch.ones(400))
    cache.pin_pattern(("pinned",), "cpu")
    value = cache.get_or_create(("new",), lambda: torch.zeros(200))
    assert torch.equal(value, torch.zeros(200)) and ("new",) not in cache and ("pinned",) in cache
    x = rand((1, 20, 2, 8), grad=False)
    dilated_attention(x, x, x, SEGS, RATES, pattern_cache=cache)  # the plan does not fit: used uncached
    assert cache.stats()["host_bytes"] <= cache.max_bytes or cache.stats()["entries"] == 1


def test_key_bytes_count_in_the_bound():
    cache = PatternCache(max_bytes=64 << 10)
    for i in range(2000):
        cache.put(("key", i, "x" * 10_000), _pattern(i))  # 10 KB keys, 64 B values
        s = cache.stats()
        assert s["host_bytes"] <= cache.max_bytes
    assert len(cache) <= 6


def test_eviction_pops_the_least_recent_entries_and_skips_pinned_ones():
    cache = PatternCache(max_bytes=10_000 * (64 + _object_bytes(("e", 10_000))))
    for i in range(10_000):
        cache.put(("e", i), _pattern(i))
    before = cache.stats()["evictions"]
    cache.put(("pinned",), _pattern(-1))
    cache.pin_pattern(("pinned",), "cpu")
    cache.get(("e", 2))  # recently used: survives
    cache.put(("e", 10_000), _pattern(0))
    assert cache.stats()["evictions"] - before == 2  # room for the pinned entry and the new one
    assert cache.get(("e", 0)) is None and cache.get(("e", 1)) is None and cache.get(("e", 2)) is not None
    assert cache.get(("e", 3)) is not None and ("pinned",) in cache
