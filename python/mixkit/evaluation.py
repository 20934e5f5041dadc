"""Language-model evaluation per component: loss, perplexity and The Pile's
bits per UTF-8 byte.

A document is [BOS] + encode(text) (BOS when the tokenizer has one and
add_bos), tokens t_0 .. t_{n-1}; the scored tokens are t_1 .. t_{n-1}, each
predicted from the tokens before it, so a document scores n - 1 tokens (with
BOS, every text token). With the sums over a component,
    loss = sum(NLL) / L_T   (nats/token),   perplexity = exp(loss),
    bits_per_byte = (L_T / L_B) * loss / ln 2 = sum(NLL) / (L_B ln 2),
L_T the tokens scored and L_B the UTF-8 bytes of the documents' text (The Pile,
section 4.1). Without BOS the first token is context only, yet its bytes stay
in L_B, so BPB is then slightly optimistic, as in The Pile's own setup.

Rolling windows: a window holds at most seq_len input tokens. The first
window scores targets t_1 .. t_min(seq_len, n-1) from inputs t_0 ..; every
later window scores the next `stride` targets and gives the model the
seq_len - stride tokens before them as unscored context. Every target is
scored exactly once. Windows of all documents are packed into rows of up to
batch_size * seq_len tokens and run through Transformer's packed path
(cu_seqlens): each window attends only to itself, with positions from 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

from .tokenizer import Tokenizer


@dataclass
class EvalResult:
    name: str
    documents: int
    tokens: int  # L_T, targets scored
    bytes: int  # L_B, UTF-8 bytes of the text
    nll: float  # summed, nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2)) if self.bytes else float("nan")

    def as_dict(self) -> dict:
        return {"name": self.name, "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def rolling_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a document of n_tokens tokens: (start, end, n_scored) with
    inputs t[start:end] (end - start <= seq_len) whose last n_scored logits
    predict targets t[end - n_scored + 1 : end + 1]. Targets 1 .. n-1 are each
    covered once."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"rolling_windows: need 1 <= stride <= seq_len, got stride {stride}, seq_len {seq_len}")
    out = []
    first = min(seq_len, n_tokens - 1)  # targets 1 .. first
    if first > 0:
        out.append((0, first, first))
    done = first  # last target scored
    while done < n_tokens - 1:
        last = min(done + stride, n_tokens - 1)
        end = last  # inputs up to t[last - 1] predict t[last]
        out.append((max(0, end - seq_len), end, last - done))
        done = last
    return out


@torch.inference_mode()
def evaluate(model, tokenizer: Tokenizer, data: Iterable[str] | Mapping[str, Iterable[str]], seq_len: int, *,
             stride: int | None = None, batch_size: int = 4, add_bos: bool = True,
             device: str | torch.device | None = None) -> dict[str, EvalResult]:
    """Score documents with a mixkit Transformer; returns {component: EvalResult}.

    data: texts (one component, "documents") or {component: texts}.
    stride: targets per window after the first (default seq_len // 2, so each
    later window has seq_len / 2 tokens of context); stride = seq_len gives
    disjoint windows. batch_size: windows' worth of tokens per forward.
    """
    if isinstance(data, Mapping):
        components = {str(k): list(v) for k, v in data.items()}
    elif isinstance(data, str):
        raise TypeError("evaluate: data must be an iterable of texts or {component: texts}, not one str")
    else:
        components = {"documents": list(data)}
    if not components:
        raise ValueError("evaluate: no components")
    stride = stride or max(1, seq_len // 2)
    if not 1 <= stride <= seq_len:
        raise ValueError(f"evaluate: need 1 <= stride <= seq_len, got stride {stride}, seq_len {seq_len}")
    bos = tokenizer.bos_id if add_bos else None
    if add_bos and bos is None:
        raise ValueError(f"evaluate: {tokenizer!r} has no BOS token; pass add_bos=False")
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"evaluate: the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = {}
    budget = batch_size * seq_len
    try:
        for name, texts in components.items():
            if not texts:
                raise ValueError(f"evaluate: component {name!r} has no documents")
            res = EvalResult(name, len(texts), 0, 0, 0.0)
            pending: list[tuple[list[int], int]] = []  # (window inputs + next target, n_scored)
            used = 0

            def flush():
                nonlocal used
                if pending:
                    res.nll += _score(model, pending, device)
                    pending.clear()
                    used = 0

            for text in texts:
                ids = ([bos] if bos is not None else []) + tokenizer.encode(text)
                res.bytes += len(text.encode("utf-8"))
                for start, end, n_scored in rolling_windows(len(ids), seq_len, stride):
                    if used + (end - start) > budget:
                        flush()
                    pending.append((ids[start:end + 1], n_scored))
                    used += end - start
                    res.tokens += n_scored
            flush()
            results[name] = res
    finally:
        model.train(was_training)
    return results


def _score(model, windows: list[tuple[list[int], int]], device) -> float:
    """Summed NLL of the windows, packed in one row: each window's inputs are
    its tokens but the last, its targets the last n_scored tokens."""
    inputs, targets, lens = [], [], [0]
    for toks, n_scored in windows:
        inputs += toks[:-1]
        targets += [-100] * (len(toks) - 1 - n_scored) + toks[len(toks) - n_scored:]
        lens.append(len(toks) - 1)
    cu = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    tokens = torch.tensor(inputs, dtype=torch.int64, device=device)[None]
    logits = model(tokens, cu_seqlens=cu.to(device), max_seqlen=max(lens))[0]
    tgt = torch.tensor(targets, dtype=torch.int64, device=device)
    keep = tgt != -100
    return F.cross_entropy(logits[keep].float(), tgt[keep], reduction="sum").item()


def compression_baselines(texts: Iterable[str]) -> dict[str, float]:
    """Bits per UTF-8 byte of `gzip -9` and `xz -9e` on the same documents, each
    compressed on its own (as `gzip -9 FILE` would, container header and
    checksum included), the way `evaluate` scores each document on its own:
    {"gzip -9": bpb, "xz -9e": bpb}. Python's gzip and lzma modules, so the
    figures come from the same run as the model's."""
    import gzip
    import lzma

    raw = gz = xz = 0
    for text in texts:
        data = text.encode("utf-8")
        raw += len(data)
        gz += len(gzip.compress(data, compresslevel=9, mtime=0))
        xz += len(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                preset=9 | lzma.PRESET_EXTREME))
    if not raw:
        raise ValueError("compression_baselines: no bytes to compress")
    return {"gzip -9": 8 * gz / raw, "xz -9e": 8 * xz / raw}
