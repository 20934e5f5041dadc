"""Tokenized documents on disk, memory-mapped, and in memory.

One shard per input file, three files per shard in `out_dir`:
  `{name}.tokens.bin`   all documents' token ids back to back, uint16 when the
                        vocabulary has fewer than 65536 ids, else uint32;
  `{name}.index.npy`    int64 document offsets into it, (n_docs + 1,), from 0;
  `{name}.json`         metadata (dtype, counts, source file, tokenizer), written
                        last: its presence is what marks the shard finished.
Each file is written under a temporary name and renamed into place (atomic on
POSIX), so a crash loses at most the shards in progress; a rerun skips every
finished shard whose source file is unchanged (same size and mtime) and whose
tokenizer is the same.
Shards are tokenized in worker processes of a spawn context (safe where fork
is not: CUDA initialised, macOS, threads), with a tqdm bar over shards.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .readers import DataError, read_documents


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2 ** 16 else np.dtype(np.uint32)


class Documents:
    """Tokenized documents: `len(docs)`, `docs[i]` (a 1-D integer array),
    `docs.lengths` (int64 array). Concatenating several is `Documents.concat`."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, name: str = "documents",
                 loss_mask: np.ndarray | None = None):
        self.tokens, self.offsets, self.name = tokens, np.asarray(offsets, dtype=np.int64), name
        self.lengths = np.diff(self.offsets)
        # Optional per-token bool, aligned with tokens: which tokens carry loss
        # as prediction *targets* (SFT: answer tokens). None: all of them.
        self.loss_mask = loss_mask

    def mask(self, i: int) -> np.ndarray | None:
        return None if self.loss_mask is None else self.loss_mask[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_lists(cls, docs: Iterable[Sequence[int]], name: str = "documents",
                   masks: Iterable[Sequence[bool]] | None = None) -> "Documents":
        arrays = [np.asarray(d, dtype=np.int64) for d in docs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        loss_mask = None
        if masks is not None:
            masks = [np.asarray(m, dtype=bool) for m in masks]
            if [len(m) for m in masks] != [len(a) for a in arrays]:
                raise ValueError(f"{name}: each loss mask must have its document's length")
            loss_mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
        return cls(tokens, offsets, name, loss_mask)

    @classmethod
    def concat(cls, parts: Sequence["Documents"], name: str = "documents") -> "Documents":
        return _Concat(parts, name)


class _Concat(Documents):
    """Several Documents (say, memory-mapped shards) seen as one, without copying."""

    def __init__(self, parts: Sequence[Documents], name: str):
        if not parts:
            raise ValueError(f"{name}: no shards")
        self.parts, self.name, self.loss_mask = list(parts), name, None
        if any(p.loss_mask is not None for p in self.parts):
            raise ValueError(f"{name}: concatenating documents with loss masks is not supported")
        self.lengths = np.concatenate([p.lengths for p in self.parts])
        self._first = np.zeros(len(self.parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self.parts], out=self._first[1:])
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        p = int(np.searchsorted(self._first, i, side="right")) - 1
        return self.parts[p][int(i - self._first[p])]


def open_shard(path_prefix: str | Path) -> Documents:
    """Memory-map a finished shard (`{prefix}.tokens.bin` + `.index.npy` + `.json`)."""
    prefix = Path(path_prefix)
    meta_path = prefix.with_name(prefix.name + ".json")
    if not meta_path.is_file():
        raise DataError(f"{prefix}: no finished shard ({meta_path.name} missing)")
    meta = json.loads(meta_path.read_text())
    offsets = np.load(prefix.with_name(prefix.name + ".index.npy"))
    bin_path = prefix.with_name(prefix.name + ".tokens.bin")
    n = int(offsets[-1])
    tokens = (np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(n,)) if n
              else np.zeros(0, dtype=meta["dtype"]))
    return Documents(tokens, offsets, meta.get("source", prefix.name))


def _shard_name(source: Path) -> str:
    stem = source.name.split(".jsonl")[0]
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def _fingerprint(source: Path, tokenizer) -> dict:
    st = source.stat()
    return {"source": str(source.resolve()), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns,
            "tokenizer": repr(tokenizer), "tokenizer_sha1": hashlib.sha1(pickle.dumps(tokenizer)).hexdigest(),
            "vocab_size": tokenizer.vocab_size}


def _is_finished(prefix: Path, fingerprint: dict) -> bool:
    meta_path = prefix.with_name(prefix.name + ".json")
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return all(meta.get(k) == v for k, v in fingerprint.items())


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tokenize_shard(job) -> tuple[str, int, int]:
    """Worker: tokenize one source file into one shard. Returns (prefix, docs, tokens)."""
    source, prefix, tokenizer, field, fingerprint = job
    source, prefix = Path(source), Path(prefix)
    dtype = token_dtype(tokenizer.vocab_size)
    lengths = []
    tmp_bin = prefix.with_name(f".{prefix.name}.tokens.bin.tmp{os.getpid()}")
    try:
        with open(tmp_bin, "wb") as fh:
            for text in read_documents(source, field):
                ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
                fh.write(ids.astype(dtype).tobytes())
                lengths.append(len(ids))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_bin, prefix.with_name(prefix.name + ".tokens.bin"))
    finally:
        if tmp_bin.exists():
            tmp_bin.unlink()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    _write_atomic(prefix.with_name(prefix.name + ".index.npy"), lambda fh: np.save(fh, offsets))
    meta = {**fingerprint, "dtype": dtype.name, "n_docs": len(lengths), "n_tokens": int(offsets[-1]), "field": field}
    _write_atomic(prefix.with_name(prefix.name + ".json"), lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    return str(prefix), len(lengths), int(offsets[-1])


def tokenize_files(sources: Sequence[str | Path], tokenizer, out_dir: str | Path, *, field: str = "text",
                   workers: int | None = None, progress: bool = True) -> Documents:
    """Tokenize .jsonl(.gz/.zst) files into memory-mapped shards in out_dir
    (one shard per file, see the module docstring) and return them as one
    Documents in the order of `sources`. Finished shards are reused.

    workers: processes (spawn); 0 tokenizes in this process; None: min(files,
    os.cpu_count()). Tokens are the tokenizer's `encode` ids; BOS/EOS are
    added later by the packer.
    """
    from tqdm.auto import tqdm

    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("tokenize_files: no source files")
    for s in sources:
        if not s.is_file():
            raise FileNotFoundError(f"tokenize_files: {s} does not exist")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefixes = [out_dir / _shard_name(s) for s in sources]
    jobs = []
    for s, p in zip(sources, prefixes):
        fp = _fingerprint(s, tokenizer)
        if not _is_finished(p, fp):
            jobs.append((str(s), str(p), tokenizer, field, fp))
    if workers is None:
        workers = min(len(jobs), os.cpu_count() or 1)
    bar = tqdm(total=len(sources), initial=len(sources) - len(jobs), desc="tokenize", unit="shard",
               disable=not progress)
    with bar:
        if workers and len(jobs) > 1:
            with _pool(workers) as pool:
                for _ in pool.imap_unordered(_tokenize_shard, jobs):
                    bar.update(1)
        else:
            for job in jobs:
                _tokenize_shard(job)
                bar.update(1)
    return Documents.concat([open_shard(p) for p in prefixes], name=str(out_dir))


def _pool(workers: int):
    """A spawn pool whose workers ignore SIGINT: they start while it is
    ignored (an ignored signal stays ignored across exec, and Python leaves
    it so). Ctrl-C, which a terminal sends to every process of the job, then
    stops the parent alone, whose `with` ends the pool, instead of printing
    a traceback from each worker. A Ctrl-C in the milliseconds the workers
    take to start is lost (a blocked one would be taken by another thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return multiprocessing.get_context("spawn").Pool(workers)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(workers)
    finally:
        signal.signal(signal.SIGINT, old)


def tokenize_texts(texts: Iterable[str], tokenizer, name: str = "documents") -> Documents:
    """Tokenize in-memory texts in this process (small corpora, tests)."""
    texts = list(texts)
    batch = getattr(tokenizer, "encode_batch", None)  # HF tokenizers encode a batch on all cores
    return Documents.from_lists(batch(texts) if batch is not None else (tokenizer.encode(t) for t in texts), name)
