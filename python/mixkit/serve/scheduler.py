"""First-come, first-served scheduling with chunked prefill and preemption.

Each step takes every running request (a decode is one token, an unfinished
prompt its next chunk), oldest first, then admits waiting requests in
arrival order while the step's token budget and the batch size allow. When a
request's pages cannot be allocated, the youngest running request is
preempted: its pages are released and it waits again, at its place in the
arrival order, to be recomputed from its prompt and the tokens it has
produced (the prefix cache usually still holds most of them). The oldest
request is never preempted for a younger one, and no waiting request is
admitted ahead of an older one, so nothing starves.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .blocks import BlockManager


@dataclass
class Request:
    rid: object
    prompt: list[int]
    arrival: int
    max_total: int  # prompt + max_tokens, capped by the model's context
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the pages
    preemptions: int = 0
    finished: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, token_budget: int, chunk: int):
        if token_budget < max_batch:
            raise ValueError(f"Scheduler: the token budget {token_budget} must be >= max_batch {max_batch}, "
                             "so every running decode fits a step")
        self.blocks, self.max_batch, self.budget, self.chunk = blocks, max_batch, token_budget, chunk
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival
        self.preemptions = 0

    def add(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)

    def remove(self, req: Request) -> None:
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
        self.blocks.free(req.rid)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.rid)
        req.computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self.add(req)

    def schedule(self) -> list[tuple[Request, int]]:
        """(request, tokens to compute) for one step, decodes first."""
        budget, out, preempted = self.budget, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.computed, budget, self.chunk)
            while not self.blocks.allocate(req.rid, req.computed, req.computed + n):
                preempted = True
                self._preempt(self.running[-1])
                if i >= len(self.running):
                    break  # req itself was the youngest: back to waiting
            if i >= len(self.running):
                break
            out.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_batch and not preempted:
            req = self.waiting[0]
            if req.computed == 0 and req.rid not in self.blocks.tables:
                req.computed = self.blocks.match_prefix(req.rid, req.tokens)
            n = min(req.num_tokens - req.computed, budget, self.chunk)
            if not self.blocks.allocate(req.rid, req.computed, req.computed + n):
                self.blocks.free(req.rid)  # shared prefix pages too: it waits holding nothing
                req.computed = 0
                break
            self.waiting.pop(0)
            bisect.insort(self.running, req, key=lambda r: r.arrival)
            out.append((req, n))
            budget -= n
        out.sort(key=lambda rn: rn[1] != 1)  # decodes (one token) first, stable
        return out
