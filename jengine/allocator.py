"""Host-side KV page bookkeeping: a deterministic free list, refcounts and a prefix cache.

The device holds the pages (`models.transformer.empty_kv_cache`); this module decides which page
ids a sequence uses. Allocation is deterministic so runs replay exactly, although placement never
changes a bit of output (attention gathers pages in logical order): free pages that hold no
prefix-cache key first, lowest id first; then cached ones, least recently freed first.

Prefix cache: a full page is keyed by `(parent key, its tokens, policy version)`; the chain makes a
key name the whole prefix, and the version makes a request admitted after a weight update miss
KV computed under older weights. A freed page keeps its key and content until the page is handed
out again, so later requests can still hit it; handing out uncached pages first keeps a finished
request's KV for its continuation (the next turn of a conversation) as long as the pool allows.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Sequence


class OutOfPages(RuntimeError):
    """The allocator cannot serve a request; the scheduler must preempt or wait."""


PageKey = tuple  # (parent PageKey | None, tuple of token ids, policy version)


def page_keys(tokens: Sequence[int], page_size: int, version: int) -> list[PageKey]:
    """Keys of every full page of `tokens`, chained from the first page."""
    keys: list[PageKey] = []
    parent = None
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = (hash(parent), tuple(tokens[start : start + page_size]), version)
        keys.append(parent)
    return keys


class BlockAllocator:
    """Pages `0 .. num_pages-1`; each is free or owned by one or more sequences (refcount)."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"{num_pages=} must be >= 1")
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_pages
        self._free_heap = list(range(num_pages))  # free pages holding no key, by id
        self._evictable: dict[int, None] = {}  # free pages holding a key, least recently freed
        self._is_free = [True] * num_pages
        self.num_free = num_pages
        self._cached: dict[PageKey, int] = {}  # key -> page holding that prefix's KV
        self._key_of: dict[int, PageKey] = {}  # page -> its key

    # -- allocation -------------------------------------------------------------------------

    def _take(self, page: int) -> None:
        self._is_free[page] = False
        self.num_free -= 1
        self.refcount[page] = 1

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages: uncached ones lowest id first, then cached ones least recently freed
        first. A cached page handed out loses its key."""
        if n > self.num_free:
            raise OutOfPages(f"need {n} pages, {self.num_free} of {self.num_pages} free")
        out = []
        while len(out) < n:
            if self._free_heap:
                page = heapq.heappop(self._free_heap)
            else:
                page = next(iter(self._evictable))
                del self._evictable[page]
            self._forget(page)
            self._take(page)
            out.append(page)
        return out

    def free(self, pages: Sequence[int]) -> None:
        """Drops one reference to each page; a page with none left becomes free (keeps its key).

        Checks every page first: a bad list (a page not held, or dropped more times than held)
        raises before any refcount changes.
        """
        for page, n in collections.Counter(pages).items():
            if not 0 <= page < self.num_pages or self.refcount[page] < n:
                raise AssertionError(f"page {page} freed while not owned")
        for page in pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self._is_free[page] = True
                self.num_free += 1
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    heapq.heappush(self._free_heap, page)

    # -- prefix cache -----------------------------------------------------------------------

    def _forget(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._cached[key]

    def lookup(self, keys: Sequence[PageKey]) -> list[int]:
        """Takes a reference on the longest run of cached pages matching `keys` from the start."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in keys:
            page = self._cached.get(key)
            if page is None:
                break
            if self._is_free[page]:
                del self._evictable[page]
                self._take(page)
            else:
                self.refcount[page] += 1
            hits.append(page)
        return hits

    def num_cached(self, keys: Sequence[PageKey]) -> int:
        """How many of `keys`, from the start, `lookup` would hit (takes nothing)."""
        n = 0
        while self.enable_prefix_caching and n < len(keys) and keys[n] in self._cached:
            n += 1
        return n

    def register(self, page: int, key: PageKey) -> None:
        """Records that `page` (owned, full) holds the KV of prefix `key`."""
        if not self.enable_prefix_caching or key in self._cached or page in self._key_of:
            return
        self._cached[key] = page
        self._key_of[page] = key

    def clear_prefix_cache(self) -> None:
        for page in self._evictable:
            heapq.heappush(self._free_heap, page)
        self._evictable.clear()
        self._cached.clear()
        self._key_of.clear()

    # -- invariants -------------------------------------------------------------------------

    def check_invariants(self, owners: dict[str, Sequence[int]]) -> None:
        """Raises AssertionError unless the books balance for these owners (id -> page list).

        No page is owned twice by one owner, each refcount equals its number of owners,
        free pages have refcount 0, and free + used = total.
        """
        counts = [0] * self.num_pages
        for owner, pages in owners.items():
            if len(set(pages)) != len(pages):
                raise AssertionError(f"{owner} owns a page twice: {list(pages)}")
            for page in pages:
                counts[page] += 1
        if counts != self.refcount:
            bad = [p for p in range(self.num_pages) if counts[p] != self.refcount[p]]
            raise AssertionError(f"refcounts disagree with owners at pages {bad[:10]}")
        free = [p for p in range(self.num_pages) if self._is_free[p]]
        if any(self.refcount[p] for p in free):
            raise AssertionError("a free page has a nonzero refcount")
        used = sum(1 for c in self.refcount if c > 0)
        if len(free) != self.num_free or len(free) + used != self.num_pages:
            raise AssertionError(f"free {len(free)} + used {used} != total {self.num_pages}")
        for key, page in self._cached.items():
            if self._key_of.get(page) != key:
                raise AssertionError(f"prefix cache maps a key to page {page} that disowns it")
        if sorted([*self._free_heap, *self._evictable]) != free or any(
                p in self._key_of for p in self._free_heap):  # fmt: skip
            raise AssertionError("the free lists are not the free pages, cached ones apart")
