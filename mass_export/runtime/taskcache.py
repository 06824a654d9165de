"""Prepared task sets, bounded in bytes, shared by threads: a miss never blocks a hit.

No lock is held while a value is prepared. One preparation runs per key at a time: other threads wanting the
same key wait for it (they count as ``waits``), threads wanting a cached key return at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Hashable

import numpy as np

from mass_export.core.errors import ConfigError

# Default budget: this share of the memory the kernel reports available at load, capped (a runtime shares its
# machine; one ViT-B-16 task set is 344 MB of fp32 weights) and never below one small tower.
CACHE_SHARE_OF_AVAILABLE = 0.25
CACHE_CAP_BYTES = 8 << 30
CACHE_FLOOR_BYTES = 256 << 20
CACHE_FALLBACK_BYTES = 2 << 30  # where /proc/meminfo cannot be read


def available_memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_cache_bytes() -> int:
    available = available_memory_bytes()
    if available is None:
        return CACHE_FALLBACK_BYTES
    return int(min(CACHE_CAP_BYTES, max(CACHE_FLOOR_BYTES, CACHE_SHARE_OF_AVAILABLE * available)))


def nbytes(value, seen: set | None = None) -> int:
    """Bytes held by a prepared value: arrays (numpy, or ORT OrtValues) in nested dicts/tuples, each counted once
    (on CPU an entry's uploaded arrays are its host arrays)."""
    seen = set() if seen is None else seen
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v, seen) for v in value)
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = getattr(value, "nbytes", None)
    if size is not None:
        return int(size)
    shape = getattr(value, "shape", None)  # an ORT OrtValue: shape() and element type
    if callable(shape):
        return int(np.prod(shape())) * 4
    return 0


class TaskSetCache:
    """``get(key)`` returns ``prepare(key)``'s value, kept while the values together fit ``capacity_bytes``
    (and, if given, ``max_entries``); least recently used first out."""

    def __init__(self, prepare: Callable[[Hashable], object], capacity_bytes: int | None = None,
                 max_entries: int | None = None, size_of: Callable[[object], int] = nbytes):
        capacity_bytes = default_cache_bytes() if capacity_bytes is None else int(capacity_bytes)
        if capacity_bytes < 0 or (max_entries is not None and max_entries < 0):
            raise ConfigError(f"cache bounds must be >= 0 (got {capacity_bytes} bytes, {max_entries} entries)")
        self.prepare, self.size_of = prepare, size_of
        self.capacity_bytes, self.max_entries = capacity_bytes, max_entries
        self.entries: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._in_flight: dict = {}  # key -> Future
        self._lock = threading.Lock()
        self.hits = self.misses = self.waits = self.preparations = self.evictions = self.uncached = 0
        self.prepare_seconds = 0.0
        self.bytes = 0

    def lookup(self, key):
        """The cached value (a hit) or None; never prepares, never waits."""
        with self._lock:
            if key not in self.entries:
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key][0]

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self.entries

    def in_flight(self, key) -> bool:
        with self._lock:
            return key in self._in_flight

    def get(self, key):
        with self._lock:
            if key in self.entries:
                self.hits += 1
                self.entries.move_to_end(key)
                return self.entries[key][0]
            future = self._in_flight.get(key)
            owner = future is None
            if owner:
                self.misses += 1
                future = self._in_flight[key] = Future()
            else:
                self.waits += 1
        if not owner:
            return future.result()
        started = time.perf_counter()
        try:
            value = self.prepare(key)
        except BaseException as error:
            with self._lock:
                del self._in_flight[key]
            future.set_exception(error)
            raise
        seconds = time.perf_counter() - started
        with self._lock:
            self.preparations += 1
            self.prepare_seconds += seconds
            self._store(key, value)
            del self._in_flight[key]
        future.set_result(value)
        return value

    def _store(self, key, value) -> None:
        size = self.size_of(value)
        if size > self.capacity_bytes or self.max_entries == 0:
            self.uncached += 1
            return
        self.entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.capacity_bytes or (self.max_entries is not None
                                                   and len(self.entries) > self.max_entries):
            _, (_, evicted) = self.entries.popitem(last=False)
            self.bytes -= evicted
            self.evictions += 1

    def discard(self, key) -> None:
        with self._lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key)[1]

    def info(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "waits": self.waits,
                    "preparations": self.preparations, "prepare_seconds": round(self.prepare_seconds, 4),
                    "evictions": self.evictions, "uncached": self.uncached, "entries": len(self.entries),
                    "bytes": self.bytes, "capacity_bytes": self.capacity_bytes, "max_entries": self.max_entries,
                    "keys": list(self.entries)}
