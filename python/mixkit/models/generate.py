"""Generation with the per-layer KV caches (a ring of the window's size for
sliding layers, a linear buffer for full ones): each prompt is prefilled in
chunks of at most the smallest window (into its own cache row), then all
sequences decode together with `Transformer.decode_step`
(mixkit.ops.decode_attn)."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Sequence

import torch

from .model import Transformer


def check_sampling(temperature: float, top_p: float, top_k: int | None, where: str = "sample") -> None:
    """ValueError naming the argument for sampling settings that select no
    token or mean nothing (top_p 0 or top_k 0 would leave no token to draw)."""
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{where}: temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise ValueError(f"{where}: top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 1):
        raise ValueError(f"{where}: top_k must be an integer >= 1 or None, got {top_k!r}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab): greedy at temperature 0,
    else softmax(logits / T) restricted to the top_k tokens and to the
    smallest set whose probability reaches top_p. Settings that leave no
    token (top_p 0, top_k 0) raise ValueError (check_sampling)."""
    check_sampling(temperature, top_p, top_k)
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
             stop: Iterable[int] = (), seed: int | None = None, prefill_chunk: int | None = None,
             on_token: Callable[[int, int], None] | None = None, cuda_graph: bool = False) -> list[list[int]]:
    """Generate up to max_new_tokens after each prompt; returns the new tokens
    per prompt (a stop token is included and ends that sequence).

    prompts: one list of ids, a list of lists (lengths may differ), or a (B, S)
    tensor. prefill_chunk: tokens per prefill call, at most (and by default)
    the sliding window. on_token(row, token) is called as tokens are produced.
    Sampling is deterministic for a given seed.

    cuda_graph: on a GPU, capture one decode step in a CUDA graph and replay
    it for every new token, so that per-token host overhead (kernel launches,
    op dispatch) disappears; the decode path has fixed shapes and no host
    sync, which is what makes it capturable.
    """
    check_sampling(temperature, top_p, top_k, "generate")
    if not (isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool)
            and max_new_tokens >= 0):
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.view(-1, prompts.shape[-1]).tolist()
    elif len(prompts) and isinstance(prompts[0], int):
        prompts = [prompts]
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    args = model.args
    windows = [w for w in args.windows if w is not None]
    window = min(windows) if windows else None  # a prefill chunk fits every sliding layer's ring
    full_layers = len(windows) < args.n_layers  # their caches hold the whole sequence
    total = max(len(p) for p in prompts) + max_new_tokens
    if full_layers and total > args.max_seq_len:
        raise ValueError(f"generate: prompt plus max_new_tokens is {total} tokens, more than max_seq_len "
                         f"{args.max_seq_len} of a model with full-attention layers")
    chunk = prefill_chunk or window or max(len(p) for p in prompts)
    if window is not None:
        chunk = min(chunk, window)
    device = model.output.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = set(stop)

    b = len(prompts)
    model.setup_caches(b, total if full_layers else None)
    try:
        last = []
        for row, prompt in enumerate(prompts):  # prefill each prompt alone: no padding reaches the cache
            ids = torch.tensor(prompt, device=device).view(1, -1)
            for start in range(0, len(prompt), chunk):
                logits = model(ids[:, start:start + chunk], start_pos=start, rows=slice(row, row + 1))
            last.append(logits[:, -1])
        logits = torch.cat(last)
        seqlens = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * b
        decode = model.decode_step
        if cuda_graph:
            if device.type != "cuda":
                raise ValueError("generate: cuda_graph needs the model on a CUDA device")
            decode = _GraphedDecode(model, b, device)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, top_k, generator)
            for row, t in enumerate(token.tolist()):
                if not done[row]:
                    out[row].append(t)
                    if on_token is not None:
                        on_token(row, t)
                    done[row] = t in stop
            if all(done) or step == max_new_tokens - 1:
                break
            # finished rows keep decoding (fixed shapes); their tokens are dropped
            logits = decode(token, seqlens)
            seqlens = seqlens + 1
        return out
    finally:
        model.clear_caches()


class _GraphedDecode:
    """model.decode_step captured once in a CUDA graph, replayed per token.

    The inputs live in static buffers that each call refills. Capture needs
    warm-up runs first; they execute the real step for the current inputs,
    which is idempotent (the same K/V land in the same cache slot), so the
    caches stay right. The returned logits are the graph's output buffer,
    overwritten by the next call.
    """

    def __init__(self, model: Transformer, batch: int, device: torch.device):
        self.model, self.graph = model, None
        self.token = torch.zeros(batch, dtype=torch.int64, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    def __call__(self, token: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token.view(-1))
        self.seqlens.copy_(seqlens)
        if self.graph is None:
            from ..bench.harness import capture_cuda_graph
            try:
                self.graph, self.logits = capture_cuda_graph(lambda: self.model.decode_step(self.token, self.seqlens))
            except RuntimeError as e:
                raise RuntimeError(f"generate: the decode step could not be captured in a CUDA graph ({e}); "
                                   "run without cuda_graph") from e
        self.graph.replay()
        return self.logits
