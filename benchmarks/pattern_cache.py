"""Pattern cache benchmark: cost of a hit and a miss, and forward time with and without the cache.

    python benchmarks/pattern_cache.py                 # CPU
    python benchmarks/pattern_cache.py --device cuda   # adds n = 1M

(a) microseconds per plan lookup (key building included) for the global cache and a
per-instance cache, hits and misses, beside building the plan / ring schedule outright;
(b) forward time at several n with the global cache, a per-instance cache and no cache
(the plan rebuilt on every call), with host-to-device copies and hit rate in steady state.
Prints a table, writes JSON.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import DilatedAttention, PatternCache, get_global_pattern_cache  # noqa: E402
from dilated_attention.bench import time_call  # noqa: E402
from dilated_attention.pattern_cache import _object_bytes  # noqa: E402
from dilated_attention.plan import build_plan, cached_plan, plan_items  # noqa: E402
from dilated_attention.ring_plan import build_ring_schedule  # noqa: E402

SCHEDULES = {
    "longnet": ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]),
    "ragged": ([1000, 3000, 9000], [3, 7, 11]),
}


class NoCache(PatternCache):
    """Builds every pattern on every call: the cost the cache removes."""

    def get_or_create(self, key, builder, device=None):
        self._stats.builds += 1
        return builder()


def per_call_us(fn, reps=20000):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def lookup_costs(h=12):
    segs, rates = SCHEDULES["longnet"]
    rows = []
    for name, cache in (("global", get_global_pattern_cache()), ("per-instance", PatternCache())):
        cached_plan(cache, 65536, h, segs, rates, "paper")
        hit = per_call_us(lambda: cached_plan(cache, 65536, h, segs, rates, "paper"))
        keys = iter(range(10**9))
        miss = per_call_us(lambda: cache.get(("plan", next(keys), h, tuple(segs), tuple(rates), "paper")))
        rows.append({"cache": name, "hit_us": hit, "miss_us": miss})
    build = per_call_us(lambda: build_plan(65536, h, segs, rates, "paper"), reps=2000)
    plan = plan_items(build_plan(131072, h, segs, rates, "paper"))
    sched = per_call_us(lambda: build_ring_schedule(131072, 32, "contiguous", plan, True), reps=20)
    return rows, {"build_plan_us": build, "build_ring_schedule_P32_us": sched}


def insert_costs(sizes=(100, 10_000)):
    """Microseconds per insert into a full cache of ``size`` entries (each insert evicts one)."""
    out = {}
    value = torch.zeros(16)
    for size in sizes:
        cache = PatternCache(max_bytes=size * (64 + _object_bytes(("e", 10**9))))
        for i in range(size):
            cache.put(("e", i), value)
        keys = iter(range(size, 10**9))
        out[size] = per_call_us(lambda: cache.put(("e", next(keys)), value), reps=5000)
    return out


def forward_times(device, dtype, seq_lens, h=12, d=64, budget_s=1.0):
    rows = []
    for sched_name, (segs, rates) in SCHEDULES.items():
        for n in seq_lens:
            q, k, v = (torch.randn(1, n, h, d, device=device, dtype=dtype) for _ in range(3))
            result = {"schedule": sched_name, "n": n}
            for variant in ("global", "per-instance", "none"):
                attn = DilatedAttention(segs, rates, use_pattern_cache=variant == "global")
                if variant == "none":
                    attn._own_cache = NoCache()
                cache = attn.pattern_cache
                with torch.no_grad():
                    attn(q, k, v)  # warm
                    before = cache.stats()
                    times = [time_call(lambda: attn(q, k, v), device, budget_s=budget_s) for _ in range(3)]
                    after = cache.stats()
                lookups = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
                result[variant + "_ms"] = statistics.median(times) * 1e3
                result[variant + "_spread_ms"] = (max(times) - min(times)) * 1e3
                result[variant + "_h2d"] = after["h2d_transfers"] - before["h2d_transfers"]
                result[variant + "_hit_rate"] = (after["hits"] - before["hits"]) / lookups if lookups else None
            result["global_vs_per_instance"] = result["per-instance_ms"] / result["global_ms"]
            result["global_vs_none"] = result["none_ms"] / result["global_ms"]
            rows.append(result)
            print(f"{sched_name:>8} {n:>8} {result['global_ms']:>10.3f} {result['per-instance_ms']:>10.3f} "
                  f"{result['none_ms']:>10.3f} {result['global_vs_per_instance']:>8.3f} {result['global_vs_none']:>8.3f} "
                  f"{result['global_h2d']:>4} {result['global_hit_rate']:>6.3f}  (spread {result['global_spread_ms']:.3f} ms)",
                  flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    seq_lens = args.seq_lens or ([1024, 2048, 8192, 65536, 1 << 20] if cuda else [1024, 2048, 8192, 65536])
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "cpu"
    lookups, builds = lookup_costs()
    inserts = insert_costs()
    print(f"device {name}, torch {torch.__version__}")
    print("insert into a full cache (evicting one): " + ", ".join(f"{n} entries {us:.2f} us" for n, us in inserts.items()))
    print(f"{'cache':>12} {'hit us':>8} {'miss us':>8}")
    for r in lookups:
        print(f"{r['cache']:>12} {r['hit_us']:>8.3f} {r['miss_us']:>8.3f}")
    print(f"build_plan {builds['build_plan_us']:.1f} us; ring schedule at P=32, n=128K: "
          f"{builds['build_ring_schedule_P32_us'] / 1e3:.2f} ms")
    print(f"{'schedule':>8} {'n':>8} {'global ms':>10} {'inst ms':>10} {'none ms':>10} {'g/inst':>8} {'g/none':>8} "
          f"{'h2d':>4} {'hits':>6}")
    rows = forward_times(args.device, dtype, seq_lens)
    path = args.json or os.path.join("bench-results", f"pattern-cache-{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "lookups": lookups, "builds": builds,
                   "insert_us_by_entries": inserts,
                   "forward": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
