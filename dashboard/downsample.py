"""Downsampling a long series to at most ``max_points`` points, extended as rows arrive.

The first and the last row of the range asked for are reported as they are. The rows
between are split into buckets of ``w`` rows on one fixed grid (row ``r`` falls in bucket
``(r - 1) // w``), ``w`` the smallest of 1, 2, 3, 4, 6, 8, 12, ... (2**k and 3 * 2**k) that
fits; each bucket is reported at its middle row's step with its mean (``value``) and its
``min``/``max`` band, so a 1,000-point answer still shows every spike of a million-step run.
An answer has between about 2/3 of ``max_points`` and ``max_points`` points. A fixed grid
is what lets a growing series be extended instead of recomputed: the buckets before the
newest rows do not move.

Each column keeps the sum, count, min and max of its finite values per block of
``BLOCK_ROWS`` rows (``BlockStats``), extended only by the rows that arrived since the last
query. A bucket of 1,024 rows is 16 blocks, so a 1,000-point answer over a million rows
costs a few array operations over 16k blocks, not a pass over a million values; only the
ragged ends of a range (fewer than ``BLOCK_ROWS`` rows each) are read row by row.
"""

from __future__ import annotations

import numpy as np

BLOCK_ROWS = 64


def round_significant(values: np.ndarray, digits: int = 7) -> np.ndarray:
    """float32 values as the short decimals they were written as (2.345, not 2.3450000286)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitude = np.floor(np.log10(np.abs(values)))
        scale = np.power(10.0, digits - 1 - np.where(np.isfinite(magnitude), magnitude, 0))
        return np.where(np.isfinite(values) & (values != 0), np.round(values * scale) / scale, values)


def _reduce_rows(values: np.ndarray, width: int):
    """(sum, count, min, max) of the finite values of each run of ``width`` rows."""
    rows = values.reshape(-1, width)
    finite = np.isfinite(rows)
    with np.errstate(invalid="ignore"):
        lows = np.fmin.reduce(rows, axis=1)     # fmin/fmax ignore nan unless all are nan
        highs = np.fmax.reduce(rows, axis=1)
    return (np.where(finite, rows, 0.0).sum(axis=1, dtype=np.float64), finite.sum(axis=1),
            lows.astype(np.float64), highs.astype(np.float64))


class BlockStats:
    """Per-block aggregates of one column: block ``i`` covers rows ``[1 + i*B, 1 + (i+1)*B)``."""

    def __init__(self) -> None:
        self.blocks = 0
        self.sum = np.empty(0)
        self.count = np.empty(0, dtype=np.int64)
        self.min = np.empty(0)
        self.max = np.empty(0)

    def truncate(self, rows: int) -> None:
        """Rows from ``rows`` on were dropped (a resume): forget the blocks that held them."""
        self.blocks = min(self.blocks, max(0, (rows - 1) // BLOCK_ROWS))

    def extend(self, column: np.ndarray) -> None:
        """Add the blocks completed by rows appended since the last call (``column`` is every row)."""
        target = max(0, (len(column) - 1) // BLOCK_ROWS)
        if target <= self.blocks:
            return
        if target > len(self.sum):
            capacity = max(target, 2 * len(self.sum), 256)
            for name in ("sum", "count", "min", "max"):
                old = getattr(self, name)
                grown = np.empty(capacity, dtype=old.dtype)
                grown[:self.blocks] = old[:self.blocks]
                setattr(self, name, grown)
        start, end = self.blocks, target
        parts = _reduce_rows(column[1 + start * BLOCK_ROWS:1 + end * BLOCK_ROWS], BLOCK_ROWS)
        for name, values in zip(("sum", "count", "min", "max"), parts):
            getattr(self, name)[start:end] = values
        self.blocks = target

    def grouped(self, first: int, end: int, per_bucket: int):
        """(sum, count, min, max) of blocks ``[first, end)`` taken ``per_bucket`` at a time."""
        sl = slice(first, end)
        shape = (-1, per_bucket)
        with np.errstate(invalid="ignore"):
            return (self.sum[sl].reshape(shape).sum(axis=1), self.count[sl].reshape(shape).sum(axis=1),
                    np.fmin.reduce(self.min[sl].reshape(shape), axis=1),
                    np.fmax.reduce(self.max[sl].reshape(shape), axis=1))


def _range_aggregate(column: np.ndarray, stats: BlockStats | None, lo: int, hi: int):
    """(sum, count, min, max) of rows ``[lo, hi)``: whole blocks from ``stats``, the ragged ends row by row."""
    first = -(-(lo - 1) // BLOCK_ROWS)          # the first block starting at or after lo
    end = (hi - 1) // BLOCK_ROWS                # blocks before this one end at or before hi
    if stats is not None and first < end <= stats.blocks:
        pieces = [stats.grouped(first, end, end - first)]
        for rows in (column[lo:1 + first * BLOCK_ROWS], column[1 + end * BLOCK_ROWS:hi]):
            if len(rows):
                pieces.append(_reduce_rows(rows, len(rows)))
    else:
        pieces = [_reduce_rows(column[lo:hi], hi - lo)]
    with np.errstate(invalid="ignore"):
        return (sum(float(p[0][0]) for p in pieces), sum(int(p[1][0]) for p in pieces),
                float(np.fmin.reduce([p[2][0] for p in pieces])), float(np.fmax.reduce([p[3][0] for p in pieces])))


def bucket_width(lo: int, hi: int, max_points: int) -> int:
    """Smallest width (2**k or 3 * 2**k) whose buckets over the interior rows [lo, hi) number at most max_points - 2."""
    power = 1
    while True:
        for width in (power, 3 * power // 2) if power >= 2 else (power,):
            if (hi - 2) // width - (lo - 1) // width + 1 <= max_points - 2:
                return width
        power *= 2


def downsample_rows(steps: np.ndarray, columns: dict[str, np.ndarray], blocks: dict[str, BlockStats],
                    start: int, end: int, max_points: int) -> dict:
    """Rows ``[start, end)`` of the columns as at most ``max_points`` points.

    Returns {"step", "series": {key: {"value", "min", "max"}}, "downsampled", "bucket_rows"}
    with numpy arrays. ``blocks`` may lack a key (its buckets are then read row by row).
    """
    count = end - start
    if count <= max_points:
        series = {}
        for key, column in columns.items():
            values = column[start:end]
            if values.dtype == np.float32:
                values = round_significant(values)
            series[key] = {"value": values, "min": values, "max": values}
        return {"step": steps[start:end], "series": series, "downsampled": False, "bucket_rows": 1}

    lo, hi = start + 1, end - 1                 # the interior: rows between the first and the last
    width = bucket_width(lo, hi, max_points)
    full_first = -(-(lo - 1) // width)          # buckets [full_first, full_end) lie wholly inside [lo, hi)
    full_end = (hi - 1) // width
    if full_first > full_end:                   # lo and hi - 1 share one bucket
        left, right, full_end = (lo, hi), None, full_first
    else:
        boundary_left, boundary_right = 1 + full_first * width, 1 + full_end * width
        left = (lo, boundary_left) if boundary_left > lo else None
        right = (boundary_right, hi) if boundary_right < hi else None
    edges_left, edges_right = [left] if left else [], [right] if right else []
    middle_rows = np.concatenate([[(a + b - 1) // 2 for a, b in edges_left],
                                  1 + np.arange(full_first, full_end) * width + (width - 1) // 2,
                                  [(a + b - 1) // 2 for a, b in edges_right]]).astype(np.int64)
    out_steps = np.concatenate(([steps[start]], steps[middle_rows], [steps[end - 1]]))

    series = {}
    for key, column in columns.items():
        stats = blocks.get(key)
        if full_end > full_first:
            per = width // BLOCK_ROWS
            if per and width % BLOCK_ROWS == 0 and stats is not None and full_end * per <= stats.blocks:
                sums, counts, lows, highs = stats.grouped(full_first * per, full_end * per, per)
            else:
                sums, counts, lows, highs = _reduce_rows(column[1 + full_first * width:1 + full_end * width], width)
        else:
            sums = counts = lows = highs = np.empty(0)
        edges = [_range_aggregate(column, stats, a, b) for a, b in edges_left]
        tails = [_range_aggregate(column, stats, a, b) for a, b in edges_right]
        sums = np.concatenate([[e[0] for e in edges], sums, [t[0] for t in tails]])
        counts = np.concatenate([[e[1] for e in edges], counts, [t[1] for t in tails]])
        lows = np.concatenate([[e[2] for e in edges], lows, [t[2] for t in tails]])
        highs = np.concatenate([[e[3] for e in edges], highs, [t[3] for t in tails]])
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        first, last = float(column[start]), float(column[end - 1])
        parts = {"value": np.concatenate(([first], means, [last])),
                 "min": np.concatenate(([first], lows, [last])),
                 "max": np.concatenate(([first], highs, [last]))}
        if column.dtype == np.float32:
            parts = {name: round_significant(v) for name, v in parts.items()}
        series[key] = parts
    return {"step": out_steps, "series": series, "downsampled": True, "bucket_rows": width}


def downsample(steps: np.ndarray, values: dict[str, np.ndarray], max_points: int) -> dict:
    """Downsample whole arrays (no cached blocks): for data that is not a stored column."""
    return downsample_rows(steps, values, {}, 0, len(steps), max_points)


def ema_debiased(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased for its zero start.

    last = last * weight + (1 - weight) * y;  smoothed = last / (1 - weight ** finite_values_so_far).
    Non-finite values stay non-finite and do not move the average. The page draws the same
    curve in the browser (``emaDebiased`` in dashboard/static/charts.js); this one is for the PNGs.
    """
    out = np.full(len(values), np.nan)
    last, seen = 0.0, 0
    if weight <= 0:
        return np.asarray(values, dtype=np.float64).copy()
    for i, y in enumerate(np.asarray(values, dtype=np.float64).tolist()):
        if y == y and y not in (float("inf"), float("-inf")):
            last = last * weight + (1 - weight) * y
            seen += 1
            out[i] = last / (1 - weight ** seen)
    return out


def to_json_list(array: np.ndarray) -> list:
    """numpy -> list with nan/inf as None (JSON has no NaN)."""
    values = array.tolist()
    if np.isfinite(array).all():
        return values
    return [v if v == v and v not in (float("inf"), float("-inf")) else None for v in values]
