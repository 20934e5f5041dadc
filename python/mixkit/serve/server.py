"""`mixkit serve`: an OpenAI-compatible HTTP server on the engine (FastAPI and
uvicorn, the `serve` extra).

Endpoints: /v1/completions and /v1/chat/completions (streamed as
server-sent events ending with `data: [DONE]`, or whole), /v1/models,
/health and /metrics (Prometheus text). Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}.

The engine runs in one thread of its own (EngineLoop); request handlers hand
it requests through a queue and read their tokens from an asyncio queue per
request, so the event loop never waits on the model. A client that
disconnects has its request aborted and its pages freed. SIGTERM (uvicorn's
graceful shutdown) stops accepting connections, lets running requests
finish, stops the engine and exits with code 0.
"""

import argparse
import asyncio
import json
import queue
import signal
import threading
import time
import uuid
from collections import deque

from .engine import Engine, PromptTooLong
from .sampling import SamplingParams

class EngineLoop:
    """The engine's thread: applies queued adds and aborts between steps, steps
    while there is work and delivers each request's outputs to its asyncio
    queue (None ends it)."""

    def __init__(self, engine: Engine, follow=None):
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.sinks: dict = {}  # rid -> (loop, asyncio.Queue)
        self.wake = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self.rate = deque(maxlen=64)  # (time, generated tokens) samples for tokens/s
        self.follow = follow  # tensor parallel: broadcasts each step's commands to the other ranks
        self.thread = threading.Thread(target=self._run, name="mixkit-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, prompt, params: SamplingParams, loop) -> tuple[str, asyncio.Queue]:
        self.engine.check(prompt, params)  # raises before anything is queued
        rid = uuid.uuid4().hex
        if params.seed is None:  # drawn here, so every tensor-parallel rank samples alike
            params = params.replace(seed=self.engine.next_seed())
        q: asyncio.Queue = asyncio.Queue()
        self.sinks[rid] = (loop, q)
        self.commands.put(("add", rid, list(prompt), params, time.perf_counter()))
        self.wake.set()
        return rid, q

    def abort(self, rid) -> None:
        if self.sinks.pop(rid, None) is not None:
            self.commands.put(("abort", rid))
            self.wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Let the requests in flight finish, then end the thread."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)

    def _deliver(self, rid, item) -> None:
        sink = self.sinks.get(rid)
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply(self) -> list:
        done = []
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return done
            done.append(cmd)
            if cmd[0] == "add":
                _, rid, prompt, params, arrived = cmd
                try:
                    self.engine.add(prompt, params, rid=rid, arrived=arrived)
                except ValueError as exc:  # checked already; only a changed limit gets here
                    self._deliver(rid, exc)
            else:
                self.engine.abort(cmd[1])

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                cmds = self._apply()
                idle = not engine.has_work()
                # One decision, read once: what the other ranks are told is
                # what this thread does (stop() may land between two reads).
                done = idle and self.stopping and self.commands.empty()
                if self.follow is not None:
                    self.follow.send(cmds, stop=done)
                if done:
                    return
                if idle:
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                for out in engine.step():
                    self._deliver(out.rid, out)
                    if out.finished:
                        self._deliver(out.rid, None)
                        self.sinks.pop(out.rid, None)
                self.rate.append((time.perf_counter(), engine.generated_tokens))
        except BaseException as exc:  # surfaces in /health and ends every waiting request
            self.error = exc
            for rid in list(self.sinks):
                self._deliver(rid, exc)
            raise

    def tokens_per_second(self) -> float:
        if len(self.rate) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.rate[0], self.rate[-1]
        if time.perf_counter() - t1 > 2.0:  # nothing generated lately
            return 0.0
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body, key, default, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", key)
    return v


def sampling_from(body: dict, default_max: int) -> SamplingParams:
    """SamplingParams from an OpenAI request body; ApiError for bad fields."""
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max, int)
    n = _number(body, "n", 1, int)
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per prompt), got {n}", "n")
    logprobs = body.get("logprobs")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
        top_k=_number(body, "top_k", None, int), seed=_number(body, "seed", None, int), stop=[s for s in stop if s],
        logprobs=bool(logprobs) or logprobs == 0, ignore_eos=bool(body.get("ignore_eos", False)))
    try:
        params.validate()
    except ValueError as exc:
        raise ApiError(400, str(exc), str(exc).split(" ", 1)[0]) from None
    return params


def create_app(engine: Engine, model_name: str, chat_style: str = "mistral", follow=None):
    """The FastAPI app serving `engine` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from ..tokenizer import encode_chat

    state = {"loop": None, "draining": False}
    created = int(time.time())

    async def lifespan(app):
        state["loop"] = EngineLoop(engine, follow).start()
        yield
        state["draining"] = True
        await asyncio.get_running_loop().run_in_executor(None, state["loop"].stop)

    app = FastAPI(title="mixkit", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model", model_name)
        if model != model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", "model",
                           "model_not_found", "not_found_error")
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        return body

    def submit(prompt: list[int], params: SamplingParams, param: str):
        try:
            return state["loop"].submit(prompt, params, asyncio.get_running_loop())
        except PromptTooLong as exc:
            raise ApiError(400, str(exc), param, "context_length_exceeded") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), param) from None

    async def results(rid, q: asyncio.Queue):
        """The request's outputs until it finishes; aborts it if the consumer goes away."""
        finished = False
        try:
            while True:
                item = await q.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise ApiError(500, f"the engine failed: {item}", kind="server_error")
                yield item
        finally:
            if not finished:
                state["loop"].abort(rid)

    async def watch_disconnect(request: Request, task: asyncio.Task):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    async def collect(request: Request, jobs):
        """Run the (rid, queue) jobs to the end; a client that disconnects
        cancels them (and so aborts the requests)."""
        async def run_all():
            outs = []
            for rid, q in jobs:
                items = [o async for o in results(rid, q)]
                outs.append(items)
            return outs

        task = asyncio.ensure_future(run_all())
        watcher = asyncio.ensure_future(watch_disconnect(request, task))
        try:
            return await task
        except asyncio.CancelledError:
            for rid, _ in jobs:
                state["loop"].abort(rid)
            raise
        finally:
            watcher.cancel()

    def usage(prompt_tokens, completion_tokens):
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def token_strs(ids):
        tok = engine.tokenizer
        return [tok.decode([i]) for i in ids]

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    # ---- endpoints -------------------------------------------------------------------
    @app.get("/health")
    async def health():
        loop = state["loop"]
        if loop is None or loop.error is not None:
            raise ApiError(503, f"the engine failed: {loop.error if loop else 'not started'}", kind="server_error")
        return {"status": "draining" if state["draining"] else "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mixkit", "max_model_len": engine.context_limit()}]}

    @app.get("/metrics")
    async def metrics():
        s = engine.stats()
        loop = state["loop"]
        lines = [
            "# HELP mixkit_requests_running Requests being computed.", "# TYPE mixkit_requests_running gauge",
            f"mixkit_requests_running {s['running']}",
            "# HELP mixkit_requests_waiting Requests waiting for pages or a batch slot.",
            "# TYPE mixkit_requests_waiting gauge", f"mixkit_requests_waiting {s['waiting']}",
            "# HELP mixkit_kv_pages_free Free KV pages per layer group (window: 0 for full attention).",
            "# TYPE mixkit_kv_pages_free gauge"]
        for g, free in zip(engine.blocks.groups, s["free_pages"]):
            lines.append(f'mixkit_kv_pages_free{{window="{g.window or 0}"}} {free}')
        lines += ["# HELP mixkit_kv_pages_total KV pages per layer group.", "# TYPE mixkit_kv_pages_total gauge"]
        for g in engine.blocks.groups:
            lines.append(f'mixkit_kv_pages_total{{window="{g.window or 0}"}} {g.num_pages}')
        lines += ["# HELP mixkit_generation_tokens_total Tokens generated.",
                  "# TYPE mixkit_generation_tokens_total counter", f"mixkit_generation_tokens_total {s['generated_tokens']}",
                  "# HELP mixkit_generation_tokens_per_second Generated tokens per second, recent steps.",
                  "# TYPE mixkit_generation_tokens_per_second gauge",
                  f"mixkit_generation_tokens_per_second {loop.tokens_per_second() if loop else 0.0:.3f}",
                  "# HELP mixkit_preemptions_total Requests preempted for pages.",
                  "# TYPE mixkit_preemptions_total counter", f"mixkit_preemptions_total {s['preemptions']}",
                  "# HELP mixkit_steps_total Engine steps.", "# TYPE mixkit_steps_total counter",
                  f"mixkit_steps_total {s['steps']}",
                  "# HELP mixkit_step_seconds_total Engine time per phase of a step: schedule, prepare (host "
                  "inputs), forward, sample, detokenize (and stop strings).",
                  "# TYPE mixkit_step_seconds_total counter"]
        lines += [f'mixkit_step_seconds_total{{phase="{k}"}} {v:.6f}' for k, v in engine.step_times.items()]
        lines += ["# HELP mixkit_time_to_first_token_seconds Time from arrival to the first token.",
                  "# TYPE mixkit_time_to_first_token_seconds histogram"]
        h = engine.ttft
        for le, n in zip(h.BOUNDS, h.counts):
            lines.append(f'mixkit_time_to_first_token_seconds_bucket{{le="{le}"}} {n}')
        lines += [f'mixkit_time_to_first_token_seconds_bucket{{le="+Inf"}} {h.count}',
                  f"mixkit_time_to_first_token_seconds_sum {h.sum:.6f}",
                  f"mixkit_time_to_first_token_seconds_count {h.count}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def encode_prompt(prompt) -> list[int]:
        if isinstance(prompt, str):
            return engine.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
            else [prompt]
        if body.get("echo"):
            raise ApiError(400, "'echo' is not supported", "echo")
        params = sampling_from(body, 16)
        stream = bool(body.get("stream", False))
        if stream and len(prompts) != 1:
            raise ApiError(400, "streaming takes one prompt", "prompt")
        ids = [encode_prompt(p) for p in prompts]
        jobs = [submit(p, params, "prompt") for p in ids]
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(i, text, finish, logprob_ids=None, logprobs=None, offset=0):
            lp = None
            if params.logprobs and logprob_ids is not None:
                strs = token_strs(logprob_ids)
                offsets, at = [], offset
                for s in strs:
                    offsets.append(at)
                    at += len(s)
                lp = {"tokens": strs, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        if stream:
            rid, q = jobs[0]

            async def events():
                sent = 0
                async for o in results(rid, q):
                    if not (o.text or o.finished or params.logprobs):
                        continue  # text held back (a partial character or stop string)
                    yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                               "choices": [choice(0, o.text, o.finish_reason, o.token_ids, o.logprobs, sent)]})
                    sent += len(o.text)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        outs = await collect(request, jobs)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (p, items) in enumerate(zip(ids, outs)):
            text = "".join(o.text for o in items)
            toks = [t for o in items for t in o.token_ids]
            lps = [x for o in items for x in (o.logprobs or [])]
            choices.append(choice(i, text, items[-1].finish_reason if items else "abort", toks, lps))
            prompt_tokens += len(p)
            completion_tokens += len(toks)
        return {"id": cid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        msgs = []
        for m in messages:
            if not isinstance(m, dict):
                raise ApiError(400, "each message must be an object with 'role' and 'content'", "messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            msgs.append({"role": m.get("role"), "content": content})
        try:
            prompt = encode_chat(engine.tokenizer, msgs, style=chat_style)[0]
        except ValueError as exc:
            raise ApiError(400, str(exc).replace("format_chat: ", ""), "messages") from None
        if body.get("top_logprobs"):
            raise ApiError(400, "'top_logprobs' is not supported (only the chosen tokens' logprobs)", "top_logprobs")
        params = sampling_from(body, 256)
        rid, q = submit(prompt, params, "messages")
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprob_items(ids, lps):
            if not params.logprobs or ids is None:
                return None
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
                                for s, lp in zip(token_strs(ids), lps or [])]}

        if body.get("stream"):
            async def events():
                head = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name}
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
                async for o in results(rid, q):
                    if not (o.text or o.finished or params.logprobs):
                        continue
                    delta = {"content": o.text} if o.text else {}
                    yield sse({**head, "choices": [{"index": 0, "delta": delta,
                                                    "logprobs": logprob_items(o.token_ids, o.logprobs),
                                                    "finish_reason": o.finish_reason}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        items = (await collect(request, [(rid, q)]))[0]
        toks = [t for o in items for t in o.token_ids]
        lps = [x for o in items for x in (o.logprobs or [])]
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(o.text for o in items)},
                             "logprobs": logprob_items(toks, lps),
                             "finish_reason": items[-1].finish_reason if items else "abort"}],
                "usage": usage(len(prompt), len(toks))}

    return app


# ---- the command ----------------------------------------------------------------------

def add_parser(sub) -> None:
    """Register `mixkit serve` on the CLI's subparsers (with mixkit.cli's checked option types)."""
    from ..cli import device, existing_dir, integer, option_type, utf8_text

    @option_type("host", ["", "a host"])
    def host(text: str) -> str:
        if not text or any(c.isspace() for c in text):
            raise argparse.ArgumentTypeError(f"expected a host name or address, got {text!r}")
        return text

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching over paged KV)")
    s.add_argument("--model", type=existing_dir, metavar="DIR", required=True,
                   help="model directory (weights, config.json and tokenizer)")
    s.add_argument("--host", type=host, default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=integer(1, 65535), default=8000, help="port to listen on")
    s.add_argument("--max-batch", type=integer(1), metavar="N", default=64, help="most requests computed together")
    s.add_argument("--kv-pages", type=integer(1), metavar="N", help="KV pages per layer (default: max-batch requests "
                   "of 256 tokens, at least one of the model's full context)")
    s.add_argument("--page-size", type=integer(1), metavar="N", default=16, help="tokens per KV page")
    s.add_argument("--token-budget", type=integer(1), metavar="N", help="tokens per step (default max(512, max-batch))")
    s.add_argument("--served-model-name", type=utf8_text, metavar="NAME",
                   help="the model's name in the API (default: the directory's name)")
    s.add_argument("--chat-style", choices=["mistral", "llama2"], default="mistral",
                   help="chat template of /v1/chat/completions")
    s.add_argument("--device", type=device, metavar="{cpu,cuda}", help="default: cuda if available, else cpu")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    s.add_argument("--tp", type=integer(1), metavar="N", default=1, help="tensor-parallel ranks; run under torchrun "
                   "--nproc_per_node N with --tp N (rank 0 serves HTTP)")
    s.set_defaults(func=main)


def _fail(msg: str) -> int:
    import sys

    print(f"mixkit serve: error: {msg}", file=sys.stderr)
    return 2


def main(args) -> int:
    """`mixkit serve`: load, build the engine, serve until SIGTERM/SIGINT (exit 0)."""
    from pathlib import Path

    import torch

    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        return _fail("the server needs FastAPI and uvicorn: pip install 'mixkit[serve]'")
    from ..models import load
    from ..tokenizer import load_tokenizer
    from .engine import eos_ids_of

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        return _fail(f"--model {args.model} is not a directory")
    for name in ("max_batch", "page_size", "port"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.kv_pages is not None and args.kv_pages < 1:
        return _fail("--kv-pages must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mesh = None
    if args.tp > 1:
        from ..parallel import tp_mesh_from_env
        try:
            mesh, device = tp_mesh_from_env(args.tp, device)
        except ValueError as exc:
            return _fail(str(exc))
    try:
        tokenizer = load_tokenizer(model_dir)
        model = load(model_dir, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None, mesh=mesh)
        engine = Engine(model.eval(), tokenizer, num_pages=args.kv_pages, page_size=args.page_size,
                        max_batch=args.max_batch, token_budget=args.token_budget,
                        eos_ids=eos_ids_of(model_dir, tokenizer))
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    name = args.served_model_name or model_dir.resolve().name
    follow = None
    if mesh is not None:
        from .parallel import Follower, Leader
        if mesh.get_local_rank() != 0:
            # torchrun passes SIGTERM to every rank: the followers keep stepping
            # until rank 0 has drained and broadcasts the stop.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)
            Follower(engine, mesh).run()
            return 0
        follow = Leader(mesh)
    import uvicorn

    app = create_app(engine, name, args.chat_style, follow)
    kv = engine.runner.kv_bytes() / 2 ** 20
    print(f"mixkit serve: {name} on {device}, {engine.blocks.num_pages} KV pages of {args.page_size} tokens per "
          f"layer ({kv:.1f} MiB), context {engine.context_limit()}; http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn catches SIGTERM/SIGINT for its graceful shutdown (stop accepting,
    # finish the requests in flight, the lifespan's engine drain), then
    # re-raises the signal into the handler it found: a no-op here, so a
    # drained server exits 0 rather than dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None)
    print("mixkit serve: drained and stopped", flush=True)
    return 0
