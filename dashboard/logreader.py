"""Incremental JSONL reading: one byte offset per file, so no request re-reads a whole file.

A line counts once its newline is there (a partial last line waits). A file that shrank,
got a new inode, or whose bytes before our offset changed (rewritten in place) is read
again from the start, and the caller is told so it can drop what it had. Appends always
grow a file, so a new mtime at the same size means bytes were rewritten in place: the
CRC-32 of everything read so far is then compared with the file's prefix (a ``touch``
costs one read of the file, not a re-index). Lines that are
not a JSON object with a numeric ``step`` (garbage, binary, NaN/Infinity, wrong types,
huge lines) are skipped and counted by reason; none of them stops the reader.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainkit.fileio import complete_lines

MAX_LINE_BYTES = 1 << 20      # a log record is a few hundred bytes; a longer line is skipped
CHUNK_BYTES = 4 << 20         # bytes read per call, so one big file cannot hog the reader
SIGNATURE_BYTES = 64          # bytes before the offset remembered to notice in-place rewrites


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")  # NaN / Infinity are not JSON


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)   # one decoder, not one per line


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Batch:
    records: list = field(default_factory=list)
    reset: bool = False   # the file was replaced/truncated: drop what was read before
    more: bool = False    # stopped at max_bytes with data left


class JsonlTail:
    """Follows one JSONL file. ``validate(obj)`` returns None or a skip reason."""

    def __init__(self, path: Path, validate: Callable[[dict], str | None], inside: Callable[[Path], bool]):
        self.path = path
        self.validate = validate
        self.inside = inside          # refuses files whose real path leaves the logdir
        self.offset = 0
        self.inode: int | None = None
        self.size_seen = -1
        self.mtime_ns = 0
        self.signature = b""
        self.crc = 0                  # CRC-32 of bytes [0, offset)
        self.skipping_long_line = False
        self.waiting_for_newline = False
        self.skipped: Counter = Counter()
        self.lines = 0                # records accepted since the last reset
        self.resets = 0

    @property
    def size(self) -> int:
        return max(self.size_seen, 0)

    @property
    def caught_up(self) -> bool:
        return self.offset >= self.size_seen or self.size_seen < 0

    def _reset(self) -> None:
        self.offset = 0
        self.signature = b""
        self.crc = 0
        self.skipping_long_line = False
        self.waiting_for_newline = False
        self.skipped.clear()
        self.lines = 0
        self.resets += 1

    def poll(self, max_bytes: int = CHUNK_BYTES) -> Batch:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            if self.inode is not None:
                self.inode, self.size_seen = None, -1
                self._reset()
                return Batch(reset=True)
            return Batch()
        except OSError:
            return Batch()
        unchanged = (st.st_size == self.size_seen and st.st_mtime_ns == self.mtime_ns
                     and st.st_ino == self.inode)
        if unchanged and (self.offset >= st.st_size or self.waiting_for_newline):
            return Batch()  # nothing new since the last look
        reset = False
        if self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset):
            self._reset()
            reset = True
        if not self.inside(self.path):
            return Batch(reset=reset)
        if (not reset and st.st_ino == self.inode and st.st_size == self.size_seen
                and st.st_mtime_ns != self.mtime_ns and self.offset and not self._prefix_unchanged()):
            self._reset()
            reset = True
        try:
            with open(self.path, "rb") as f:
                if self.offset and self.signature:
                    f.seek(self.offset - len(self.signature))
                    if f.read(len(self.signature)) != self.signature:
                        self._reset()
                        reset = True
                f.seek(self.offset)
                data = f.read(max_bytes)
        except OSError:
            return Batch(reset=reset)
        self.inode, self.mtime_ns = st.st_ino, st.st_mtime_ns
        self.size_seen = st.st_size
        batch = Batch(reset=reset, more=len(data) >= max_bytes)
        self.waiting_for_newline = False
        if not data:
            return batch
        start = 0
        if self.skipping_long_line:
            newline = data.find(b"\n")
            if newline < 0:
                self._consume(data)
                return batch
            self.skipping_long_line = False
            self.skipped["line_too_long"] += 1
            start = newline + 1
        lines, used = complete_lines(data[start:])
        if not used:
            if len(data) - start >= MAX_LINE_BYTES:   # no newline within a megabyte: skip to the next one
                self.skipping_long_line = True
                self._consume(data)
            else:
                self._consume(data[:start])
                self.waiting_for_newline = not batch.more  # a partial last line waits
            return batch
        self._consume(data[:start + used])
        self.waiting_for_newline = not batch.more and start + used < len(data)
        batch.records = self._parse(lines)
        return batch

    def _prefix_unchanged(self) -> bool:
        """True when bytes [0, offset) still hash to what was read (a same-size rewrite changes them)."""
        crc, left = 0, self.offset
        try:
            with open(self.path, "rb") as f:
                while left > 0:
                    chunk = f.read(min(left, CHUNK_BYTES))
                    if not chunk:
                        return False
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
        except OSError:
            return True   # unreadable now: the next poll decides
        return crc == self.crc

    def _consume(self, consumed: bytes) -> None:
        if not consumed:
            return
        self.crc = zlib.crc32(consumed, self.crc)
        self.offset += len(consumed)
        self.signature = (self.signature + consumed[-SIGNATURE_BYTES:])[-SIGNATURE_BYTES:]

    def _parse(self, lines: list[bytes]) -> list[dict]:
        records = []
        for raw in lines:
            if len(raw) > MAX_LINE_BYTES:
                self.skipped["line_too_long"] += 1
                continue
            if not raw.strip():
                continue
            try:
                obj = _DECODER.decode(raw.decode("utf-8"))
            except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
                self.skipped["invalid_json"] += 1
                continue
            if not isinstance(obj, dict):
                self.skipped["not_an_object"] += 1
                continue
            reason = self.validate(obj)
            if reason:
                self.skipped[reason] += 1
                continue
            records.append(obj)
        self.lines += len(records)
        return records
