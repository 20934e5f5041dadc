"""The block manager: pages of the KV pools, reference counts, the prefix
cache and window-aware freeing.

Layers with the same attention window share one group: one pool of
`num_pages` pages per layer, one block table per request, page ids valid in
every layer of the group. A sliding group with window W frees a request's
page as soon as the page lies entirely behind the window of the request's
next query (position n sees keys n - W + 1 .. n), so a long request holds
O(W) pages there; a full-attention group keeps every page.

Pages are reference-counted. A page that fills up is registered under the
hash of the token prefix it ends, so a later request whose prompt starts
with the same tokens shares it instead of recomputing it (its count goes up).
A page whose count drops to 0 keeps its contents and its hash until it is
needed for something else (least recently freed first); it counts as free.
The hash is SHA-256 over the previous page's hash and the page's token ids:
a collision would hand one request another's keys and values, and Python's
own hash of a tuple of ints can be made to collide.
"""
from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

NO_PAGE = -1


def page_hash(parent: bytes | None, tokens) -> bytes:
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


@dataclass
class Group:
    window: int | None
    layers: list[int]
    num_pages: int
    free: deque = field(default_factory=deque)
    refs: list[int] = field(default_factory=list)
    cached: "OrderedDict[int, None]" = field(default_factory=OrderedDict)  # count 0, contents kept (LRU)
    by_hash: dict = field(default_factory=dict)
    hash_of: dict = field(default_factory=dict)

    def __post_init__(self):
        self.free = deque(range(self.num_pages))
        self.refs = [0] * self.num_pages

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached)


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, windows: list[int | None]):
        """windows: the attention window of each layer (None: full attention)."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"BlockManager: num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.page_size = page_size
        by_window: dict = {}
        for layer, w in enumerate(windows):
            by_window.setdefault(w, []).append(layer)
        self.groups = [Group(w, layers, num_pages) for w, layers in by_window.items()]
        self.layer_group = [0] * len(windows)
        for g, group in enumerate(self.groups):
            for layer in group.layers:
                self.layer_group[layer] = g
        # request id -> [block table per group]. Entries below freed[rid][g]
        # are NO_PAGE (behind the window), every entry from there on is a page,
        # so neither freeing nor allocating rescans a long request's table.
        self.tables: dict = {}
        self.freed: dict = {}
        self.hashes: dict = {}  # request id -> hashes of its full pages, in order
        self.peak_held = [0] * len(self.groups)

    # ---- sizes -----------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.groups[0].num_pages

    def num_free(self) -> list[int]:
        return [g.num_free for g in self.groups]

    def held(self, rid) -> list[int]:
        """Pages request rid holds per group."""
        return [sum(p != NO_PAGE for p in t) for t in self.tables.get(rid, [[]] * len(self.groups))]

    def pages_needed(self, group: Group, start: int, end: int) -> tuple[int, int]:
        """Logical pages [first, last) that computing positions [start, end) needs."""
        lo = 0 if group.window is None else max(0, start - group.window + 1)
        return lo // self.page_size, math.ceil(end / self.page_size)

    def max_request_tokens(self, chunk: int) -> float:
        """The longest request (prompt + output) the pools hold on their own
        when it computes up to `chunk` tokens a step: a full group holds every
        position; a sliding group needs the window plus a chunk, wherever
        page boundaries fall."""
        limit = float("inf")
        for g in self.groups:
            if g.window is None:
                limit = min(limit, g.num_pages * self.page_size)
            elif math.ceil((g.window + chunk - 1) / self.page_size) + 1 > g.num_pages:
                limit = 0
        return limit

    # ---- pages -----------------------------------------------------------------
    def _take(self, g: Group) -> int:
        if g.free:
            page = g.free.popleft()
        else:
            page, _ = g.cached.popitem(last=False)
            h = g.hash_of.pop(page)
            del g.by_hash[h]
        g.refs[page] = 1
        return page

    def _release(self, g: Group, page: int) -> None:
        g.refs[page] -= 1
        if g.refs[page] == 0:
            if page in g.hash_of:
                g.cached[page] = None
            else:
                g.free.append(page)

    def free_behind_window(self, rid, next_pos: int) -> None:
        """Release the pages no query from position next_pos on can see."""
        freed = self.freed.setdefault(rid, [0] * len(self.groups))
        for k, (g, table) in enumerate(zip(self.groups, self.tables.get(rid, []))):
            if g.window is None:
                continue
            first, _ = self.pages_needed(g, next_pos, next_pos + 1)
            for i in range(freed[k], min(first, len(table))):
                if table[i] != NO_PAGE:
                    self._release(g, table[i])
                    table[i] = NO_PAGE
            freed[k] = max(freed[k], min(first, len(table)))

    def allocate(self, rid, start: int, end: int) -> bool:
        """Make sure positions [start, end) of request rid have pages (after
        freeing those behind the window of start). False, with nothing
        allocated, when a group has too few free pages."""
        tables = self.tables.setdefault(rid, [[] for _ in self.groups])
        self.free_behind_window(rid, start)
        want = []
        for g, table in zip(self.groups, tables):
            first, last = self.pages_needed(g, start, end)
            missing = range(max(first, len(table)), last)  # pages below len(table) exist or lie behind the window
            if len(missing) > g.num_free:
                return False
            want.append(missing)
        for g, table, missing in zip(self.groups, tables, want):
            if len(missing):
                table.extend([NO_PAGE] * (missing.start - len(table)))
                table.extend(self._take(g) for _ in missing)
        for k, g in enumerate(self.groups):
            self.peak_held[k] = max(self.peak_held[k], g.num_pages - g.num_free)
        return True

    def free(self, rid) -> None:
        for g, table in zip(self.groups, self.tables.pop(rid, [])):
            for page in table:
                if page != NO_PAGE:
                    self._release(g, page)
        self.hashes.pop(rid, None)
        self.freed.pop(rid, None)

    # ---- prefix cache ------------------------------------------------------------
    def register_full_pages(self, rid, tokens: list[int], computed: int) -> None:
        """Register the pages of rid that the first `computed` tokens filled."""
        hashes = self.hashes.setdefault(rid, [])
        ps = self.page_size
        while (len(hashes) + 1) * ps <= computed:
            i = len(hashes)
            h = page_hash(hashes[-1] if hashes else None, tokens[i * ps:(i + 1) * ps])
            hashes.append(h)
            for g, table in zip(self.groups, self.tables[rid]):
                page = table[i] if i < len(table) else NO_PAGE
                if page != NO_PAGE and page not in g.hash_of and h not in g.by_hash:
                    g.hash_of[page], g.by_hash[h] = h, page

    def match_prefix(self, rid, tokens: list[int]) -> int:
        """Share the cached pages of the longest page-aligned prefix of
        tokens (leaving at least one token to compute); returns its length."""
        ps, parent, pages = self.page_size, None, []
        hashes = []
        for i in range((len(tokens) - 1) // ps):
            h = page_hash(parent, tokens[i * ps:(i + 1) * ps])
            found = [g.by_hash.get(h) for g in self.groups]
            if any(p is None for p in found):
                break
            pages.append(found)
            hashes.append(h)
            parent = h
        if not pages:
            return 0
        tables = self.tables.setdefault(rid, [[] for _ in self.groups])
        for i, found in enumerate(pages):
            for g, table, page in zip(self.groups, tables, found):
                if g.refs[page] == 0:
                    del g.cached[page]
                g.refs[page] += 1
                table.append(page)
        self.hashes[rid] = hashes
        return len(pages) * ps
