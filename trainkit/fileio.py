"""File I/O shared by the trainers, the tools and the dashboard: JSONL reading and files written whole.

Standard library only, so the dashboard imports it without torch.

Reading JSONL
  iter_jsonl_rows(path)      strict: every non-blank line must be a JSON object; JsonlError names FILE line N
                             (data files: JSONL or JSONL.gz)
  iter_jsonl(path)           lenient: the complete JSON objects of a log that may be being written; a
                             partial last line (no newline yet) and unparseable lines are skipped
  complete_lines(data)       the whole lines of a chunk of bytes, for readers that follow a file (tails)
  last_jsonl_record(path)    the last complete JSON object, read from the end of a large file

Writing
  append_line(path, data)    one whole line appended (O_APPEND), or none of it
  atomic_file(path)          a temp file beside `path`, fsynced and renamed over it on success,
                             removed on failure: readers see the old file or the new one, never half
  write_text_atomic / write_bytes_atomic / write_json_atomic / write_jsonl_atomic  built on it
  fsync_tree / fsync_directory  for directories committed by one rename (checkpoints)
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
# A \uD800-\uDFFF escape: json.loads turns a lone one into a str that no encoder (arrow, tokenizers) accepts.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class JsonlError(ValueError):
    """A JSONL line (or file) that cannot be read; the message names the file and line."""


def _cause(exc: BaseException) -> str:
    # as trainkit.cli.one_line, which this stdlib-only module does not import
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------- reading

def open_jsonl_bytes(path: str | os.PathLike):
    """A JSONL or JSONL.gz file opened for reading bytes (lines are decoded one by one, so errors name them)."""
    path = Path(path)
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def parse_jsonl_line(raw: bytes, where: str) -> dict:
    """One JSONL line (bytes) as a dict; JsonlError naming `where` (FILE line N) when it is not
    UTF-8, not JSON, not an object, or holds a lone surrogate."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonlError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise JsonlError(f"{where} is not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise JsonlError(f"{where} is a JSON {type(row).__name__}, expected an object")
    if SURROGATE_ESCAPE.search(line):
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise JsonlError(f"{where}: a string holds a lone surrogate \\u{ord(e.object[e.start]):04x}, "
                             "which is not valid Unicode text") from None
    return row


def iter_jsonl_rows(path: str | os.PathLike, start: int = 0) -> Iterator[tuple[int, str, dict]]:
    """(row index, "FILE line N", row) of each non-blank line of a JSONL / JSONL.gz file, from row
    `start` (earlier rows are skipped without parsing). Lines are 1-based file lines, blank ones
    included; every error is one JsonlError naming the file and line."""
    index, lineno = -1, 0
    try:
        with open_jsonl_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                index += 1
                if index < start:
                    continue
                where = f"{path} line {lineno}"
                yield index, where, parse_jsonl_line(raw, where)
    except READ_ERRORS as e:
        raise JsonlError(f"cannot read {path} (corrupt or truncated?) after line {lineno}: {_cause(e)}") from None


def count_jsonl_rows(path: str | os.PathLike) -> int:
    """Non-blank lines of a JSONL / JSONL.gz file (rows of iter_jsonl_rows), without parsing them."""
    try:
        with open_jsonl_bytes(path) as f:
            return sum(1 for line in f if line.strip())
    except READ_ERRORS as e:
        raise JsonlError(f"cannot read {path} (corrupt or truncated?): {_cause(e)}") from None


def complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The whole lines of `data` (without their newlines) and the bytes they take; a last line with
    no newline yet is left out: its writer has not finished it."""
    end = data.rfind(b"\n")
    if end < 0:
        return [], 0
    return data[:end].split(b"\n"), end + 1


def _json_object(raw: bytes) -> dict | None:
    """A log line as a JSON object, or None when it is not one (garbage is skipped by log readers)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the complete, parseable JSON objects of a JSONL file; skip a partial last line.
    A missing file yields nothing."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # partial last line: its writer has not finished it
                obj = _json_object(raw)
                if obj is not None:
                    yield obj
    except FileNotFoundError:
        return


def last_jsonl_record(path: str | os.PathLike, max_bytes: int = 65536) -> dict | None:
    """The last complete JSON object of a (possibly large) JSONL file, read from its last `max_bytes`."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - max_bytes)
            f.seek(start)
            data = f.read()
    except OSError:
        return None
    lines, _ = complete_lines(data)
    if start and lines:
        lines = lines[1:]  # the first line may begin before the bytes read
    return next((obj for obj in map(_json_object, reversed(lines)) if obj is not None), None)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return default


# ---------------------------------------------------------------- writing

def json_safe(value: Any) -> Any:
    """JSON has no NaN/Infinity: make them null (and numpy scalars plain numbers) so every reader can parse it."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_line(path: str | os.PathLike, data: bytes) -> None:
    """Append one whole line with O_APPEND in one write; if the write fails part way (disk full), cut
    the file back so no partial line stays in front of the lines a later attempt appends."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries of a directory (a file renamed into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Every file below `path`, and `path` itself, on disk (before a directory is renamed into place)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fsync_directory(path)


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temp file `atomic_file` writes before renaming it to `path`."""
    path = Path(path)
    # pid and thread in the name: the preemption grace timer may write from another thread
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Yield a file opened on a temp file beside `path`; on success it is fsynced and renamed to
    `path`, on any failure removed (a half-written temp file would keep holding the space of a full disk)."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """A JSON file (indented, NaN/Infinity as null) written whole or not at all."""
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2, default=str))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """A JSONL file of `rows` (one object per line) written whole or not at all."""
    with atomic_file(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
