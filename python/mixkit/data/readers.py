"""Documents from JSON-lines files: `.jsonl`, `.jsonl.gz` and `.jsonl.zst`.

Each line is one JSON object whose `field` (default "text") is a string.
Blank lines are skipped. Anything else that is wrong raises DataError naming
the file, and the line where there is one: an empty file, a line that is not
JSON, a missing or non-string field, invalid UTF-8, a corrupt or truncated
compressed stream.
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


def _open_binary(path: Path):
    name = path.name
    if name.endswith(".jsonl.gz"):
        return gzip.open(path, "rb")
    if name.endswith(".jsonl.zst"):
        try:
            import zstandard
        except ImportError as exc:
            raise ImportError(f"{path}: reading .zst needs the `zstandard` package: pip install zstandard") from exc
        return _ZstdLines(path, zstandard)
    if name.endswith(".jsonl"):
        return open(path, "rb")
    raise DataError(f"{path}: unknown document file type (expected one of {', '.join(SUFFIXES)})")


class _ZstdLines:
    """Lines of a .zst file, frame after frame. zstandard's stream_reader
    returns a truncated stream silently (as no data at all, measured with
    zstandard 0.25), so this feeds a decompressobj per frame and raises when
    the file ends inside a frame."""

    def __init__(self, path: Path, zstandard):
        self.path, self.zstd = path, zstandard

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        dctx = self.zstd.ZstdDecompressor()
        dobj, pending, fed = dctx.decompressobj(), b"", False
        with open(self.path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                while chunk:
                    fed = True
                    pending += dobj.decompress(chunk)
                    chunk = dobj.unused_data if dobj.eof else b""
                    if dobj.eof:
                        dobj, fed = dctx.decompressobj(), False
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line + b"\n"
        if fed and not dobj.eof:
            raise EOFError("the file ends inside a zstd frame")
        if pending:
            yield pending


def _stream_errors():
    # What gzip (EOFError when truncated, BadGzipFile for a bad header or CRC,
    # zlib.error inside) and zstandard raise on bad data; other OSErrors
    # (permissions, I/O) pass through unchanged.
    errors = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def read_documents(path: str | Path, field: str = "text") -> Iterator[str]:
    """Yield the `field` string of each line of a .jsonl/.jsonl.gz/.jsonl.zst file."""
    path = Path(path)
    count = 0
    lineno = 0
    try:
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason})") from None
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict) or field not in obj:
                    raise DataError(f"{path}:{lineno}: no field {field!r} in this line")
                text = obj[field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
                count += 1
                yield text
    except DataError:
        raise
    except _stream_errors() as exc:
        where = f"{path}:{lineno + 1}" if lineno else str(path)
        raise DataError(f"{where}: corrupt or truncated compressed stream ({type(exc).__name__}: {exc})") from exc
    if count == 0:
        raise DataError(f"{path}: no documents (the file is empty or holds only blank lines)")
