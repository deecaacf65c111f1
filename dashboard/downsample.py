"""Downsampling a long series to at most ``max_points`` points for the API and the plots.

The first and the last point are kept as they are; the points between are split into
equal buckets, each reported at its middle step with its mean and its min/max band, so a
1,000-point answer still shows every spike of a million-step run.
"""

from __future__ import annotations

import numpy as np

from .series import round_significant


def bucket_bounds(n: int, max_points: int) -> np.ndarray:
    """Start indices of the buckets covering rows 1..n-2 (rows 0 and n-1 stand alone)."""
    buckets = max_points - 2
    return 1 + (np.arange(buckets) * (n - 2)) // buckets


def downsample(steps: np.ndarray, values: dict[str, np.ndarray], max_points: int) -> dict:
    """Returns {"step": [...], "series": {key: {"value", "min", "max"}}} as numpy arrays."""
    n = len(steps)
    if n <= max_points:
        series = {}
        for key, column in values.items():
            if column.dtype == np.float32:
                column = round_significant(column)
            series[key] = {"value": column, "min": column, "max": column}
        return {"step": steps, "downsampled": False, "series": series}
    starts = bucket_bounds(n, max_points)
    ends = np.append(starts[1:], n - 1)
    middle = (starts + ends - 1) // 2
    out_steps = np.concatenate(([steps[0]], steps[middle], [steps[-1]]))
    series = {}
    for key, column in values.items():
        short = column.dtype == np.float32
        column = column.astype(np.float64) if short else column   # sums in float64
        inner = column[:n - 1]
        finite = np.isfinite(inner)
        sums = np.add.reduceat(np.where(finite, inner, 0.0), starts)
        counts = np.add.reduceat(finite.astype(np.int64), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        lows = np.fmin.reduceat(inner, starts)     # fmin/fmax ignore nan unless all are nan
        highs = np.fmax.reduceat(inner, starts)
        first, last = column[0], column[n - 1]
        parts = {"value": np.concatenate(([first], means, [last])),
                 "min": np.concatenate(([first], lows, [last])),
                 "max": np.concatenate(([first], highs, [last]))}
        series[key] = {part: round_significant(v) if short else v for part, v in parts.items()}
    return {"step": out_steps, "downsampled": True, "series": series}


def to_json_list(array: np.ndarray) -> list:
    """numpy -> list with nan/inf as None (JSON has no NaN)."""
    values = array.tolist()
    if np.isfinite(array).all():
        return values
    return [v if v == v and v not in (float("inf"), float("-inf")) else None for v in values]
