"""A corpus that needs no download: the Python standard library's own `.py`
sources on this machine, one document per file, like The Pile's GitHub
component.

Files are ordered by the SHA-1 of their path relative to the stdlib root, so
the order is deterministic and a size cap takes a spread of modules rather
than the alphabetically first package. The held-out split is decided by the
same hash: a file is held out when its hash, as a fraction of 2^160, is below
`heldout_fraction`, so a file stays in its split whatever the cap.
site-packages and __pycache__ are skipped, and so are files that are not
valid UTF-8 (a few test fixtures, on purpose).
"""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the stdlib root, with "/" separators
    text: str


def _hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha1(rel.encode()).digest(), "big")


@functools.lru_cache(maxsize=4)
def _python_files(root: str) -> tuple[str, ...]:
    """Relative paths of the .py files under root, in hash order (the walk
    takes about 0.5 s for the stdlib, hence the cache)."""
    rels = []
    for p in Path(root).rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if "site-packages" in parts or "__pycache__" in parts or not p.is_file():
            continue
        rels.append(rel)
    return tuple(sorted(rels, key=lambda r: (_hash(r), r)))


def stdlib_documents(split: str = "train", *, max_bytes: int | None = 2_000_000, max_files: int | None = None,
                     heldout_fraction: float = 0.05, root: str | Path | None = None) -> list[SourceFile]:
    """The stdlib `.py` files of one split, in hash order, until max_bytes of
    UTF-8 text or max_files files (None: no cap). The default 2 MB keeps a
    CPU quick start to seconds of tokenizing."""
    if split not in SPLITS:
        raise ValueError(f"stdlib_documents: split must be one of {SPLITS}, got {split!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"stdlib_documents: heldout_fraction must be in (0, 1), got {heldout_fraction}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    cut = int(heldout_fraction * 2 ** 160)
    rels = [r for r in _python_files(str(root)) if (_hash(r) < cut) == (split == "heldout")]
    out, total = [], 0
    for rel in rels:
        if max_files is not None and len(out) >= max_files:
            break
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if not text.strip():
            continue
        if max_bytes is not None and total + size > max_bytes:
            if out:
                break
            continue  # a first file alone over the cap: look for a smaller one
        out.append(SourceFile(rel, text))
        total += size
    if not out:
        raise ValueError(f"stdlib_documents: no {split} .py files under {root} within the cap "
                         f"(max_bytes={max_bytes}, max_files={max_files})")
    return out
