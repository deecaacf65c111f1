"""Numeric time series of one JSONL stream, stored as growable numpy columns.

A million training lines as Python dicts would take gigabytes; as float64 columns they
take 8 bytes per field per line. Rows are kept in strictly increasing ``step`` order: a
step that goes backwards is a resume, and the rows of the earlier attempt from that step
on are dropped (the run-directory contract in trainkit/runlog.py). ``generation`` counts
such drops (and clears), so a client that appends increments knows when to reload.
"""

from __future__ import annotations

import math

import numpy as np

from .downsample import BlockStats, downsample_rows, round_significant

MAX_COLUMNS = 64  # a stream that invents new keys on every line cannot exhaust memory
# Fields that need float64 (exact steps and token counts, unix times); every other field is
# stored as float32, which halves the memory of a long run and keeps 7 significant digits.
FLOAT64_FIELDS = {"step", "time", "tokens", "epoch", "eval_tokens", "tokens_routed"}


def column_dtype(key: str):
    return np.float64 if key in FLOAT64_FIELDS else np.float32


def _to_float_column(values: list) -> np.ndarray:
    try:
        column = np.array(values, dtype=np.float64)   # None -> nan, bool -> 0/1
    except (TypeError, ValueError):
        column = np.array([v if isinstance(v, (int, float)) else None for v in values], dtype=np.float64)
    column[~np.isfinite(column)] = np.nan
    return column


class SeriesTable:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.generation = getattr(self, "generation", -1) + 1
        self.blocks: dict = {}                # key -> downsample.BlockStats, built on first query
        self.n = 0
        self.capacity = 0
        self.columns: dict[str, np.ndarray] = {"step": np.empty(0, dtype=np.float64)}
        self.strings: dict[str, str] = {}     # last value of each text field (e.g. eval "metric")
        self.resumes: list[dict] = []

    def __len__(self) -> int:
        return self.n

    @property
    def keys(self) -> list[str]:
        return list(self.columns)

    def column(self, key: str) -> np.ndarray:
        """A view of the stored rows of ``key`` (all nan when the key never appeared)."""
        column = self.columns.get(key)
        if column is None:
            return np.full(self.n, np.nan)
        return column[:self.n]

    @property
    def steps(self) -> np.ndarray:
        return self.columns["step"][:self.n]

    def last(self, key: str):
        """Latest finite value of ``key``, looking back a little past gaps (e.g. a nan loss)."""
        column = self.columns.get(key)
        if column is None or self.n == 0:
            return None
        tail = column[max(0, self.n - 256):self.n]
        finite = np.flatnonzero(np.isfinite(tail))
        if not finite.size:
            return None
        value = tail[finite[-1]]
        return float(round_significant(value)) if column.dtype == np.float32 else float(value)

    def last_row(self) -> dict:
        if self.n == 0:
            return {}
        row = {}
        for key, column in self.columns.items():
            value = column[self.n - 1]
            if math.isfinite(value):
                row[key] = float(round_significant(value)) if column.dtype == np.float32 else float(value)
        return row

    def index_after(self, step: float) -> int:
        return int(np.searchsorted(self.steps, step, side="right"))

    def index_at_or_after(self, step: float) -> int:
        return int(np.searchsorted(self.steps, step, side="left"))

    def downsample(self, keys: list[str], max_points: int, start: int = 0, end: int | None = None) -> dict:
        """Rows [start, end) of ``keys`` as at most ``max_points`` points (see dashboard.downsample)."""
        end = self.n if end is None else end
        columns = {}
        for key in keys:
            columns[key] = self.column(key)
            if key in self.columns:   # a key never logged has no blocks: it is all nan
                self.blocks.setdefault(key, BlockStats()).extend(columns[key])
        return downsample_rows(self.steps, columns, self.blocks, start, end, max_points)

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self._reallocate(max(needed, int(self.capacity * 1.5) + 1024))

    def _reallocate(self, capacity: int) -> None:
        for key, column in self.columns.items():
            grown = np.empty(capacity, dtype=column.dtype)
            grown[:self.n] = column[:self.n]
            self.columns[key] = grown
        self.capacity = capacity

    def reserve(self, rows: int) -> None:
        """Allocate room for ``rows`` rows at once (a big log's size is known before it is read)."""
        if rows > self.capacity:
            self._reallocate(rows)

    def trim(self) -> None:
        """Give back the growth slack (up to a third) once a big log has been read."""
        slack = max(4096, self.n // 50)
        if self.capacity > self.n + 2 * slack:
            self._reallocate(self.n + slack)

    def append(self, records: list[dict]) -> list[dict]:
        """Add validated records (each with a finite numeric ``step``); returns resumes seen."""
        if not records:
            return []
        steps = np.array([r["step"] for r in records], dtype=np.float64)
        previous = np.empty_like(steps)
        previous[0] = self.steps[-1] if self.n else -math.inf
        previous[1:] = steps[:-1]
        resumes = [{"from_step": float(previous[i]), "to_step": float(steps[i]),
                    "time": records[i].get("time")} for i in np.flatnonzero(steps <= previous)]
        if resumes:
            # keep a row only if no later row has a smaller or equal step
            later_min = np.minimum.accumulate(steps[::-1])[::-1]
            keep = np.ones(len(steps), dtype=bool)
            keep[:-1] = steps[:-1] < later_min[1:]
            self.n = int(np.searchsorted(self.steps, later_min[0], side="left"))
            self.generation += 1
            for stats in self.blocks.values():
                stats.truncate(self.n)
            records = [r for r, k in zip(records, keep) if k]
            steps = steps[keep]
            self.resumes.extend(resumes)
        keys = set().union(*(r.keys() for r in records))
        keys.discard("step")
        start = self.n
        self._grow(start + len(records))
        self.columns["step"][start:start + len(records)] = steps
        for key in keys:
            values = [r.get(key) for r in records]
            column = self.columns.get(key)
            if column is None:
                if len(self.columns) >= MAX_COLUMNS:
                    continue
                if all(v is None or isinstance(v, (str, list, dict)) for v in values):
                    text = [v for v in values if isinstance(v, str)]
                    if text:
                        self.strings[key] = text[-1][:200]
                    continue   # not a numeric field
                column = np.full(self.capacity, np.nan, dtype=column_dtype(key))
                self.columns[key] = column
            column[start:start + len(records)] = _to_float_column(values)
        for key, column in self.columns.items():
            if key != "step" and key not in keys:
                column[start:start + len(records)] = np.nan
        self.n = start + len(records)
        return resumes
