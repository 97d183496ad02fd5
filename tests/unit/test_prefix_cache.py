"""Prefix cache: LRU under a byte budget, tenant-salted content keys, counters."""

from __future__ import annotations

import numpy as np

from runtime.decoder.kv_cache import PrefixCache, PrefixEntry, prefix_key


def entry(nbytes_per_array: int) -> PrefixEntry:
    arr = np.zeros(nbytes_per_array // 4, np.float32)
    return PrefixEntry((arr,), (arr,), length=1, images=0)


def test_keys_depend_on_tenant_tokens_and_images() -> None:
    ids = np.array([1, 2, 3])
    base = prefix_key("t1", ids, ["item:P1"])
    assert base == prefix_key("t1", ids.copy(), ["item:P1"])
    assert base != prefix_key("t2", ids, ["item:P1"])
    assert base != prefix_key("t1", np.array([1, 2, 4]), ["item:P1"])
    assert base != prefix_key("t1", ids, ["item:P2"])


def test_lru_eviction_under_budget_and_counters() -> None:
    cache = PrefixCache(budget_bytes=3000)
    for k in "abc":
        cache.put(k, entry(400))  # 800 bytes each
    assert cache.bytes == 2400 and len(cache) == 3
    assert cache.get("a") is not None  # a becomes most recent
    cache.put("d", entry(400))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.bytes <= 3000 and cache.evictions == 1
    assert cache.hits == 3 and cache.misses == 1 and abs(cache.hit_rate - 0.75) < 1e-9
    cache.put("huge", entry(4000))  # larger than the whole budget: not cached, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_forget_drops_only_the_owners_entries() -> None:
    cache = PrefixCache(budget_bytes=10_000)
    cache.put("a", entry(400), owner=("t1", "u1"))
    cache.put("b", entry(400), owner=("t2", "u1"))  # same user id in another tenant
    cache.put("c", entry(400))  # inline history: no owner
    cache.put("d", entry(400), owner=("t1", "u2"))
    assert cache.get("d", owner=("t1", "u1")) is not None  # u1's stored history hit u2's prefix: tagged too
    assert cache.forget(("t1", "u1")) == 2
    assert cache.get("a") is None and cache.get("d") is None
    assert cache.get("b") is not None and cache.get("c") is not None
    assert cache.bytes == 1600 and len(cache) == 2
    assert cache.forget(("t1", "u1")) == 0 and cache.forget(("t2", "u1")) == 1 and cache.bytes == 800
