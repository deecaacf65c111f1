"""benchmarks/bench_dashboard.py end to end on a small growing log: it runs against both servers and
the page in Chromium, its answers are right and every appended line is seen. The figures and their
goals are the script's business (printed, never asserted here: shared machines are noisy)."""

from __future__ import annotations

import importlib.util

import pytest

from helpers_dashboard import REPO_ROOT, ensure_chromium


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_dashboard", REPO_ROOT / "benchmarks" / "bench_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lag_is_the_time_until_a_chart_first_drew_the_step():
    bench = load_bench()
    appended = [(101, 10.0), (102, 10.5), (103, 11.0), (104, 11.5)]
    draws = [[100, 9_000], [102, 10_800], [103, 11_100], [103, 11_400]]   # [last step drawn, ms]
    lags, missing = bench.lags(appended, draws, since=10.2)
    assert lags == pytest.approx([0.3, 0.1]) and missing == 1           # 101 is before since; 104 never drawn


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_a_small_log(tmp_path, capsys):
    ensure_chromium()
    bench = load_bench()
    lines = 20_000
    result = bench.run_benchmark(lines=lines, seconds=2, rate=50, servers=("flask", "gunicorn"), browser_rates=(1, 50),
                                 browser_seconds=3, workdir=tmp_path, tti_loads=2)
    with capsys.disabled():
        print("\n" + bench.table(result))
    assert [api["server"] for api in result["api"]] == ["flask", "gunicorn"]
    for api in result["api"]:
        assert api["sees_appends"] and api["appended"] > 0 and api["final_step"] > lines
        assert api["stats_n"] > 0 and api["metrics_n"] == api["stats_n"]
        # a 1,000-point query on ~20,000 rows: buckets of a few rows, between 2/3 and all of the points
        assert 600 <= api["metrics_points"] <= 1000 and api["metrics_bucket_rows"] > 1
        assert api["first_answer_s"] > 0 and api["indexed_s"] >= api["first_answer_s"] and api["rss_mb"] > 0
    browser = result["browser"]
    assert set(browser["rates"]) == {1, 50}
    for rate, page in browser["rates"].items():
        assert len(page["tti_s"]) == 2 and all(t > 0 for t in page["tti_s"])
        assert page["appended"] > 0 and page["cpu_percent"] >= 0 and page["console_errors"] == []
        for chart in bench.LAG_CHARTS:                                  # every appended line reached every chart
            drawn = page["charts"][chart]
            assert drawn["missing"] == 0 and drawn["n"] == page["appended"] and drawn["p95_s"] >= 0, (rate, chart)
    rows = bench.table(result).splitlines()
    assert any("lag append -> loss chart" in r for r in rows) and any("time to interactive" in r for r in rows)
    assert all(isinstance(ok, bool) for _, ok in bench.verdicts(result))
