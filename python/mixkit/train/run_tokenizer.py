"""The tokenizer of a training run: chosen by the run file's `data.tokenizer`,
trained on the run's training documents when asked, and written into the
model directory so that `mixkit generate` and `mixkit eval` find it there.

    tokenizer = "byte"                      # UTF-8 bytes, BOS 256, EOS 257 (the default)
    tokenizer = "path/to/dir"               # tokenizer.json or tokenizer.model in that directory
    tokenizer = {train_bpe = 2048}          # a byte-level BPE trained on the training split
    tokenizer = {train_bpe = 2048, max_bytes = 20_000_000}   # on at most this much of it

Only training documents reach the BPE trainer: the components' training
files (for `stdlib = true`, the training split of the path hash), never the
[data.heldout] files or the stdlib's held-out split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, save_tokenizer, train_bpe
from .config import ConfigError

BPE_KEYS = {"train_bpe", "max_bytes", "min_frequency"}


def check_tokenizer_spec(spec: Any) -> None:
    """Raise ConfigError for a `data.tokenizer` that is neither a str nor a
    {train_bpe = N} table."""
    if isinstance(spec, str):
        return
    if not isinstance(spec, dict) or "train_bpe" not in spec:
        raise ConfigError(f"data.tokenizer: expected 'byte', a tokenizer directory or {{train_bpe = N}}, got {spec!r}")
    unknown = set(spec) - BPE_KEYS
    if unknown:
        raise ConfigError(f"data.tokenizer: unknown key(s) {sorted(unknown)}; known: {sorted(BPE_KEYS)}")
    n = spec["train_bpe"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 258:
        raise ConfigError(f"data.tokenizer.train_bpe: the vocabulary size, an int >= 258, got {n!r}")


def _capped(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    total = 0
    for t in texts:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(t.encode("utf-8"))
        yield t


def build_tokenizer(spec: Any, training_texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The run's tokenizer from its spec; training_texts() yields the
    training documents (called only for {train_bpe = N})."""
    check_tokenizer_spec(spec)
    if isinstance(spec, str):
        return ByteTokenizer() if spec == "byte" else load_tokenizer(spec)
    return train_bpe(_capped(training_texts(), spec.get("max_bytes")), spec["train_bpe"],
                     min_frequency=spec.get("min_frequency", 2))


def save_model_tokenizer(tokenizer: Tokenizer, model_dir: str | Path) -> Path:
    """Write the tokenizer into a model directory written by models.save, and
    its BOS/EOS ids into config.json (generation stops at EOS; transformers
    reads them there too)."""
    d = save_tokenizer(tokenizer, model_dir)
    cfg_path = d / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["bos_token_id"], cfg["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return d
