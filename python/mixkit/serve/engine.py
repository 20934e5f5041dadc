"""The continuous-batching engine and `LLM`, offline generation on it.

`Engine.step()` schedules one batch (scheduler.py), runs it (runner.py),
samples the requests whose prompt is complete (sampling.py), detokenises
(detok.py) and returns what each request produced in the step. Requests
come and go between steps: `add` and `abort` may be called at any time
from the thread that calls `step`.
"""
from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .blocks import BlockManager
from .detok import Detokenizer
from .runner import Chunk, ModelRunner
from .sampling import SamplingParams, make_generator, sample
from .scheduler import Request, Scheduler


class Histogram:
    """Cumulative counts of observations at or below each bound, their sum
    and count (Prometheus' histogram), in constant memory."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.counts = [0] * len(self.BOUNDS)
        self.sum, self.count = 0.0, 0

    def add(self, x: float) -> None:
        for i, b in enumerate(self.BOUNDS):
            if x <= b:
                self.counts[i] += 1
        self.sum += x
        self.count += 1


class PromptTooLong(ValueError):
    """A prompt (plus its output) that the model or the page pools cannot hold."""


@dataclass
class Output:
    """What one request produced in a step (or all of it, from LLM.generate)."""
    rid: object
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" or "length" (or "abort")
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _State:
    req: Request
    params: SamplingParams
    generator: torch.Generator
    detok: Detokenizer
    arrived: float
    first_token: float | None = None
    logprobs: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, model, tokenizer=None, *, num_pages: int | None = None, page_size: int = 16,
                 max_batch: int = 64, token_budget: int | None = None, chunk: int | None = None,
                 max_model_len: int | None = None, eos_ids=(), cuda_graphs: bool | None = None):
        """model: a mixkit Transformer (in eval mode, on its device);
        tokenizer: for text in and out (token ids work without one).

        num_pages: pages per layer pool (default: enough for max_batch
        requests of 256 tokens, at least one max_model_len request);
        token_budget: tokens per step (default max(512, max_batch)); chunk:
        most prompt tokens of one request per step (default the budget).
        max_model_len: prompt plus output limit (default the model's
        max_seq_len). eos_ids end a request unless it sets ignore_eos."""
        self.model, self.tokenizer = model, tokenizer
        args = model.args
        self.max_model_len = max_model_len or args.max_seq_len
        self.token_budget = token_budget or max(512, max_batch)
        self.chunk = min(chunk or self.token_budget, self.token_budget)
        windows = [layer.attention.window for layer in model.layers]
        if num_pages is None:
            full = -(-self.max_model_len // page_size) if None in windows else 0
            num_pages = max(full, max_batch * -(-256 // page_size), -(-(max(w or 0 for w in windows) +
                                                                          self.chunk) // page_size) + 2)
        self.blocks = BlockManager(num_pages, page_size, windows)
        if chunk is None:  # the largest chunk a sliding window leaves room for
            room = min([(num_pages - 1) * page_size - w + 1 for w in windows if w is not None] or [self.chunk])
            self.chunk = max(1, min(self.chunk, room))
        if self.blocks.max_request_tokens(self.chunk) == 0:
            raise ValueError(f"Engine: {num_pages} pages of {page_size} cannot hold a sliding window plus a "
                             f"{self.chunk}-token chunk; use more pages or a smaller chunk")
        self.runner = ModelRunner(model, self.blocks, self.max_model_len, cuda_graphs=cuda_graphs,
                                  max_batch=max_batch)
        self.scheduler = Scheduler(self.blocks, max_batch, self.token_budget, self.chunk)
        self.eos_ids = set(eos_ids)
        self.states: dict = {}
        self._arrivals = itertools.count()
        self._seeds = random.Random(0)
        # counters for /metrics and the benchmark
        self.generated_tokens = 0
        self.prompt_tokens_computed = 0
        self.steps = 0
        self.ttft = Histogram()
        # seconds per phase, summed over steps: where a step's time goes
        self.step_times: dict = {"schedule": 0.0, "prepare": 0.0, "forward": 0.0, "sample": 0.0, "detokenize": 0.0}

    # ---- requests ----------------------------------------------------------------
    def context_limit(self) -> int:
        """The most tokens (prompt plus output) one request can have."""
        return int(min(self.max_model_len, self.blocks.max_request_tokens(self.chunk)))

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raises ValueError for bad sampling settings or token ids and
        PromptTooLong when the request cannot fit; changes nothing."""
        params.validate()
        if not prompt:
            raise ValueError("the prompt must have at least one token")
        vocab = self.model.args.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        limit = self.context_limit()
        if len(prompt) >= limit:
            raise PromptTooLong(f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(prompt)} tokens (and at least one more is to be generated)")

    def next_seed(self) -> int:
        """A seed for a request that gives none: from the engine's own
        sequence, so tensor-parallel ranks fed the same requests agree."""
        return self._seeds.randrange(2 ** 62)

    def add(self, prompt: list[int], params: SamplingParams, rid=None, arrived: float | None = None) -> object:
        """Queue a request (see check for what it raises); returns its id.
        arrived: its arrival time (time.perf_counter), for TTFT; default now."""
        self.check(prompt, params)
        rid = next(self._arrivals) if rid is None else rid
        if rid in self.states:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(rid, list(prompt), next(self._arrivals),
                      min(self.context_limit(), len(prompt) + params.max_tokens))
        seed = params.seed if params.seed is not None else self.next_seed()
        self.states[rid] = _State(req, params, make_generator(seed, self.runner.device),
                                  Detokenizer(self.tokenizer, params.stop) if self.tokenizer else None,
                                  arrived if arrived is not None else time.perf_counter())
        self.scheduler.add(req)
        return rid

    def abort(self, rid) -> None:
        st = self.states.pop(rid, None)
        if st is not None:
            self.scheduler.remove(st.req)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one step -------------------------------------------------------------------
    def step(self) -> list[Output]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        chunks = []
        for req, n in batch:
            chunks.append(Chunk(req.rid, req.tokens[req.computed:req.computed + n], req.computed,
                                req.computed + n == req.num_tokens))
        t1 = time.perf_counter()
        logits = self.runner.execute(chunks)
        t2 = time.perf_counter()
        for req, n in batch:
            req.computed += n
            self.prompt_tokens_computed += n
            self.blocks.register_full_pages(req.rid, req.tokens, req.computed)
        sampling = [req for req, n in batch if req.computed == req.num_tokens]
        states = [self.states[r.rid] for r in sampling]
        tokens, logprobs = sample(logits, [s.params for s in states], [s.generator for s in states],
                                  want_logprobs=any(s.params.logprobs for s in states))
        t3 = time.perf_counter()
        outs = [self._advance(st, tok, logprobs[i] if logprobs else None, t3) for i, (st, tok) in
                enumerate(zip(states, tokens))]
        t4 = time.perf_counter()
        self.steps += 1
        prep = self.runner.prepare_s
        for key, dt in zip(self.step_times, (t1 - t0, prep, t2 - t1 - prep, t3 - t2, t4 - t3)):
            self.step_times[key] += dt
        return outs

    def _advance(self, st: _State, token: int, logprob: float | None, now: float) -> Output:
        req, p = st.req, st.params
        if st.first_token is None:
            st.first_token = now
            self.ttft.add(now - st.arrived)
        self.generated_tokens += 1
        req.output.append(token)
        if logprob is not None and p.logprobs:
            st.logprobs.append(logprob)
        reason = None
        is_stop = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
        text = ""
        if st.detok is not None and not is_stop:
            text = st.detok.add(token)
            if st.detok.stopped:
                reason = "stop"
        if is_stop:
            reason = "stop"
        elif reason is None and req.num_tokens >= req.max_total:
            reason = "length"
        if reason is not None:
            if st.detok is not None:
                text += st.detok.finish()
            self.scheduler.remove(req)
            self.states.pop(req.rid, None)
            req.finished = True
        return Output(req.rid, [token], text, [logprob] if p.logprobs and logprob is not None else None,
                      reason is not None, reason, len(req.prompt), len(req.output))

    def stats(self) -> dict:
        return dict(running=self.num_running, waiting=self.num_waiting, free_pages=self.blocks.num_free(),
                    total_pages=self.blocks.num_pages, peak_pages=list(self.blocks.peak_held),
                    generated_tokens=self.generated_tokens, steps=self.steps,
                    preemptions=self.scheduler.preemptions)


def eos_ids_of(model_dir: Path, tokenizer) -> list[int]:
    """The end-of-sequence ids of a model directory: config.json's
    eos_token_id (an int or a list), else the tokenizer's."""
    cfg = Path(model_dir) / "config.json"
    eos = json.loads(cfg.read_text()).get("eos_token_id") if cfg.is_file() else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_id
    return [eos] if isinstance(eos, int) else list(eos or [])


class LLM:
    """Offline batched generation on the engine.

    LLM("runs/quickstart/model").generate(["def f(", "import "], SamplingParams(max_tokens=32))
    """

    def __init__(self, model, tokenizer=None, *, device=None, dtype=None, mesh=None, **engine_kw):
        """model: a model directory (weights, config.json, tokenizer) or a
        mixkit Transformer. engine_kw: Engine's settings (num_pages,
        page_size, max_batch, token_budget, chunk, ...)."""
        from ..models import Transformer, load
        from ..tokenizer import load_tokenizer

        eos = engine_kw.pop("eos_ids", None)
        if isinstance(model, Transformer):
            self.model = model
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load(model, device=device, dtype=dtype, mesh=mesh)
            tokenizer = tokenizer or load_tokenizer(model)
            if eos is None:
                eos = eos_ids_of(model, tokenizer)
        self.model.eval()
        if eos is None:
            eos = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
        self.tokenizer = tokenizer
        self.engine = Engine(self.model, tokenizer, eos_ids=eos, **engine_kw)

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Output]:
        """One Output per prompt (str, or a list of token ids), in order: the
        new tokens, their text, logprobs when asked, and the finish reason."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        engine, ids = self.engine, []
        for prompt, p in zip(prompts, params):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("generate: text prompts need a tokenizer")
                prompt = self.tokenizer.encode(prompt)
            ids.append(engine.add(list(prompt), p.replace()))
        results = {rid: Output(rid, [], "", [] if p.logprobs else None) for rid, p in zip(ids, params)}
        while engine.has_work():
            for o in engine.step():
                r = results[o.rid]
                r.token_ids += o.token_ids
                r.text += o.text
                if o.logprobs is not None:
                    r.logprobs += o.logprobs
                r.finished, r.finish_reason = o.finished, o.finish_reason
                r.prompt_tokens, r.completion_tokens = o.prompt_tokens, o.completion_tokens
        return [results[rid] for rid in ids]
