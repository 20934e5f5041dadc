"""Serving: a continuous-batching engine over paged KV pools with
window-aware page freeing, `LLM` for offline batched generation, and
`mixkit serve`, an OpenAI-compatible HTTP server (server.py, the `serve`
extra). One module per concern: blocks (pages), scheduler, runner (the
model over pages), sampling, detok, engine."""
from .engine import LLM, Engine, Output, PromptTooLong
from .sampling import SamplingParams

__all__ = ["LLM", "Engine", "Output", "PromptTooLong", "SamplingParams"]
