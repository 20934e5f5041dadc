"""Per-request sampling settings and the batched sampler.

Every row of a batch has its own temperature, top-k, top-p and random
generator. A sampled token is argmax(p / E) with E ~ Exp(1) drawn from the
request's own generator (the exponential race, equivalent to drawing from p),
so a seeded request gets the same tokens whatever it is batched with, and a
recomputed (preempted) request draws nothing while it catches up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks for (OpenAI's fields and defaults).

    temperature 0 is greedy. top_k None or 0 keeps every token; top_p 1.0
    keeps every token. seed: None draws one at random. stop: strings that end
    the text (not included in it); stop_token_ids: ids that end it. max_tokens:
    the most new tokens. logprobs: also return the log-probability of each
    chosen token under the model's unmodified distribution (log_softmax of the
    logits, before temperature, top-k or top-p). ignore_eos keeps generating
    past the end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    def validate(self) -> "SamplingParams":
        """Raises ValueError naming the first bad field."""
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            bad("top_k", "must be an integer >= 0 (0 or None: no limit)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be integers")
        return self

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def make_generator(seed: int, device) -> torch.Generator:
    """The request's own generator."""
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           want_logprobs: bool = False) -> tuple[list[int], list[float] | None]:
    """Next token per row of logits (B, vocab) and, with want_logprobs, each
    chosen token's log-probability under log_softmax(logits)."""
    logits = logits.float()
    b, vocab = logits.shape
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        x = logits.index_select(0, idx) / temps[:, None]
        ks = [params[i].top_k or vocab for i in rows]
        ps = [params[i].top_p for i in rows]
        if min(ks) < vocab or min(ps) < 1.0:
            sorted_x, order = x.sort(-1, descending=True)
            drop = torch.zeros_like(sorted_x, dtype=torch.bool)
            if min(ks) < vocab:
                k = torch.tensor(ks, device=logits.device)
                drop |= torch.arange(vocab, device=logits.device)[None] >= k[:, None]
            if min(ps) < 1.0:
                sp = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), -1)
                # a token goes when the tokens ranked above it already reach top_p
                drop |= (sp.cumsum(-1) - sp) >= torch.tensor(ps, device=logits.device)[:, None]
            x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
        probs = torch.softmax(x, -1)
        race = torch.stack([torch.empty(vocab, device=logits.device).exponential_(generator=generators[i])
                            for i in rows])
        tokens[idx] = (probs / race).argmax(-1)
    logprobs = None
    if want_logprobs:
        logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0].tolist()
    return tokens.tolist(), logprobs
