"""A shortened run of benchmarks/bench_dashboard.py: the same targets on a smaller, growing log."""

from __future__ import annotations

import importlib.util

import pytest

from dashboard.testing import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_dashboard", REPO_ROOT / "benchmarks" / "bench_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_shortened_benchmark_meets_the_targets(tmp_path, capsys):
    bench = load_bench()
    result = bench.run_benchmark(lines=200_000, seconds=5, rate=50, server="gunicorn", workdir=tmp_path)
    with capsys.disabled():
        print("\n" + bench.table(result))
    assert result["first_answer_s"] < bench.TARGETS["first_answer_s"]
    assert result["stats_p99_ms"] < bench.TARGETS["stats_p99_ms"]
    assert result["metrics_p99_ms"] < bench.TARGETS["metrics_p99_ms"]
    assert result["rss_mb"] < bench.TARGETS["rss_mb"]
    assert result["metrics_points"] == 1000
    assert result["sees_appends"] and result["appended"] > 100
