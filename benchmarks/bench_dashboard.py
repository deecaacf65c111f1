"""Dashboard speed with a huge, growing training log: the API under load, and the page in Chromium.

    python benchmarks/bench_dashboard.py                       # 1,000,000 lines, both servers, the page at 1 and 50 lines/s
    python benchmarks/bench_dashboard.py --lines 100000 --seconds 5 --browser-seconds 10
    python benchmarks/bench_dashboard.py --servers gunicorn --no-browser

Writes a run whose training_log.jsonl has --lines lines, then:

API, for each of --servers (``python -m dashboard`` = flask, gunicorn): starts the server on
the run, times the first answer and the indexing of the whole log, then for --seconds
alternates /stats and 1,000-point /metrics?keys=loss queries while --rate lines/s are
appended, and reports p50/p99 of each, the server's peak RSS and whether it saw every line.

Page (gunicorn, headless Chromium, unless --no-browser): opens the page on a freshly started
server (indexing with the page open), then, for each of --rates lines/s for --browser-seconds:
time to interactive (navigation to every chart drawn and the figures shown, once indexed), the lag between a
line's append and its point on each training chart (the page records when each chart first
drew a step), and the server's CPU use. Prints a table with the goals; exits 1 when a goal
is missed. Tests never assert these figures (shared machines are noisy); this script does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))   # the run generator and server/browser helpers the dashboard tests use

from fake_runs import big_log_line, write_big_log  # noqa: E402
from helpers_dashboard import (children, chromium_driver, free_port, get, rss_bytes, start_gunicorn,  # noqa: E402
                               stop)

GOALS = {"first_answer_s": 2.0, "stats_p99_ms": 50.0, "metrics_p99_ms": 50.0, "rss_mb": 300.0,
         "lag_p95_s": 1.5, "tti_s": 1.5}
LAG_CHARTS = ("loss", "lr", "grad_norm", "throughput", "memory")   # every chart of the appended stream
RUN = "big-run"


# ----- servers --------------------------------------------------------------------------------------
def start_server(kind: str, logdir: Path, port: int) -> subprocess.Popen:
    if kind == "gunicorn":
        return start_gunicorn(str(logdir), port)
    return subprocess.Popen([sys.executable, "-m", "dashboard", "--logdir", str(logdir), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tree(process: subprocess.Popen) -> list[int]:
    return [process.pid, *children(process.pid)]


def server_rss(process: subprocess.Popen) -> int:
    total = 0
    for pid in tree(process):
        try:
            total += rss_bytes(pid)
        except OSError:
            pass
    return total


def server_cpu_seconds(process: subprocess.Popen) -> float:
    """User + system CPU seconds of the server and its workers so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree(process):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])      # utime, stime
        except OSError:
            pass
    return total / ticks


def wait_first_answer(base: str, process: subprocess.Popen, t0: float) -> float:
    while True:   # the first answer about the run (the log may still be indexing)
        try:
            if get(base + f"/api/runs/{RUN}/stats", timeout=5)[0] == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.perf_counter() - t0 > 120:
            raise RuntimeError("no answer within 120 s")
        time.sleep(0.02)


def wait_indexed(base: str, process: subprocess.Popen, t0: float) -> tuple[float, int]:
    peak = 0
    while True:
        stats = json.loads(get(base + f"/api/runs/{RUN}/stats")[2])
        peak = max(peak, server_rss(process))
        if stats["indexing"]["done"]:
            return time.perf_counter() - t0, peak
        time.sleep(0.05)


class Appender(threading.Thread):
    """Appends training lines like a trainer does: one write + flush per line; records when."""

    def __init__(self, path: Path, first_step: int, rate: float, total: int):
        super().__init__(daemon=True)
        self.path, self.step, self.rate, self.total = path, first_step, rate, total
        self.stopping = threading.Event()
        self.rng = random.Random(1)
        self.written: list[tuple[int, float]] = []   # (step, unix time it was flushed)

    def run(self):
        next_time = time.monotonic()
        with open(self.path, "a") as f:
            while not self.stopping.is_set():
                self.step += 1
                f.write(big_log_line(self.step, time.time(), self.total, self.rng))
                f.flush()
                self.written.append((self.step, time.time()))
                next_time += 1.0 / self.rate
                self.stopping.wait(max(0.0, next_time - time.monotonic()))

    def finish(self):
        self.stopping.set()
        self.join()


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def last_step(log_path: Path) -> int:
    with open(log_path, "rb") as f:
        f.seek(max(0, os.path.getsize(log_path) - 4096))
        return json.loads(f.read().splitlines()[-1])["step"]


# ----- the API under load ------------------------------------------------------------------------------
def api_phase(kind: str, workdir: Path, seconds: float, rate: float) -> dict:
    log_path = workdir / RUN / "logs" / "training_log.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    result = {"server": kind}
    t0 = time.perf_counter()
    process = start_server(kind, workdir, port)
    appender = Appender(log_path, last_step(log_path), rate, 10 ** 7)
    try:
        result["first_answer_s"] = wait_first_answer(base, process, t0)
        appender.start()
        result["indexed_s"], peak_rss = wait_indexed(base, process, t0)
        result["indexing_cpu_s"] = server_cpu_seconds(process)
        timings = {"stats": [], "metrics": []}
        urls = {"stats": base + f"/api/runs/{RUN}/stats",
                "metrics": base + f"/api/runs/{RUN}/metrics?keys=loss&max_points=1000"}
        ends, last_rss, body = time.perf_counter() + seconds, 0.0, b""
        while time.perf_counter() < ends:
            for name, url in urls.items():
                begin = time.perf_counter()
                status, _, body = get(url)
                timings[name].append((time.perf_counter() - begin) * 1000)
                if status != 200:
                    raise RuntimeError(f"{url}: {status} {body[:200]!r}")
            if time.perf_counter() - last_rss > 0.5:
                peak_rss, last_rss = max(peak_rss, server_rss(process)), time.perf_counter()
        metrics = json.loads(body)
        result["metrics_points"] = metrics["points"]
        result["metrics_bucket_rows"] = metrics["bucket_rows"]
        appender.finish()
        target = appender.step
        seen = None
        for _ in range(100):   # the server reads the last lines within a poll interval or two
            seen = json.loads(get(urls["stats"])[2])["step"]
            if seen == target:
                break
            time.sleep(0.05)
        result.update(appended=len(appender.written), rate=rate, final_step=seen, sees_appends=seen == target,
                      rss_mb=max(peak_rss, server_rss(process)) / 2**20)
        for name, values in timings.items():
            result[f"{name}_n"] = len(values)
            result[f"{name}_p50_ms"] = statistics.median(values)
            result[f"{name}_p99_ms"] = percentile(values, 99)
    finally:
        appender.stopping.set()
        stop(process)
    return result


# ----- the page in Chromium ---------------------------------------------------------------------------------
def open_page(driver, url: str, timeout: float = 60.0) -> float:
    """Navigate and wait until every chart drew and the stats are shown; returns the time to interactive in seconds."""
    driver.get(url)
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        ready = driver.execute_script("return window.TK && TK.readyMs !== undefined && TK.readyMs !== null ? TK.readyMs : null")
        if ready is not None:
            return ready / 1000
        time.sleep(0.02)
    raise RuntimeError("the page did not draw its charts")


def wait_drawn(driver, step: int, timeout: float = 60.0) -> dict:
    """TK.draws once every chart of LAG_CHARTS drew ``step`` (or at the timeout: the lines left are then
    counted as never drawn). A lag is measured from the draw times, so waiting changes no figure; a fixed
    2 s pause counted lines the page was about to draw as missing on a loaded machine."""
    ends = time.monotonic() + timeout
    while True:
        draws = driver.execute_script("return TK.draws")
        if all(max((s for s, _ in draws.get(chart, [])), default=-1) >= step for chart in LAG_CHARTS) \
                or time.monotonic() > ends:
            return draws
        time.sleep(0.1)


def lags(appended: list[tuple[int, float]], draws: list, since: float) -> tuple[list[float], int]:
    """For each line appended after ``since``: seconds until the chart first drew a step >= it."""
    out, missing, j = [], 0, 0
    draws = sorted((step, ms / 1000) for step, ms in draws)
    for step, written in appended:
        if written < since:
            continue
        while j < len(draws) and draws[j][0] < step:
            j += 1
        first = min((t for s, t in draws[j:] if s >= step), default=None)
        if first is None:
            missing += 1
        else:
            out.append(max(0.0, first - written))
    return out, missing


def browser_phase(workdir: Path, rates: list[float], seconds: float, tti_loads: int = 3) -> dict:
    log_path = workdir / RUN / "logs" / "training_log.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    page = f"{base}/?run={RUN}"
    result = {"rates": {}}
    profile = tempfile.mkdtemp(prefix="bench_chromium_")
    driver = chromium_driver(profile, width=1440, height=2200)   # started first: its start-up is not the server's
    process = None
    try:
        t0 = time.perf_counter()
        process = start_server("gunicorn", workdir, port)
        wait_first_answer(base, process, t0)
        driver.get(page)                              # the page is open while the log is indexed
        result["indexed_with_page_s"], _ = wait_indexed(base, process, t0)
        result["indexing_with_page_cpu_s"] = server_cpu_seconds(process)
        for rate in rates:
            appender = Appender(log_path, last_step(log_path), rate, 10 ** 7)
            appender.start()
            ttis = [open_page(driver, page) for _ in range(tti_loads)]   # fresh navigations, log growing
            since = time.time()
            cpu0, wall0 = server_cpu_seconds(process), time.monotonic()
            time.sleep(seconds)
            cpu = (server_cpu_seconds(process) - cpu0) / (time.monotonic() - wall0)
            appender.finish()
            draws = wait_drawn(driver, appender.step)   # the last appended lines reach the charts
            per_chart = {}
            for chart in LAG_CHARTS:
                values, missing = lags(appender.written, draws.get(chart, []), since)
                per_chart[chart] = {"n": len(values), "missing": missing,
                                    "p50_s": statistics.median(values) if values else None,
                                    "p95_s": percentile(values, 95) if values else None,
                                    "max_s": max(values) if values else None}
            severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            result["rates"][rate] = {"tti_s": ttis, "charts": per_chart, "cpu_percent": 100 * cpu,
                                     "appended": len([w for w in appender.written if w[1] >= since]),
                                     "console_errors": severe}
    finally:
        driver.quit()
        if process is not None:
            stop(process)
    return result


# ----- all of it ---------------------------------------------------------------------------------------------
def run_benchmark(lines: int, seconds: float, rate: float, servers=("flask", "gunicorn"), browser_rates=(1.0, 50.0),
                  browser_seconds: float = 60.0, workdir: Path | None = None, tti_loads: int = 3) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench_dashboard_"))
    started = time.perf_counter()
    run_dir = write_big_log(workdir, lines, name=RUN)
    log_path = run_dir / "logs" / "training_log.jsonl"
    result = {"lines": lines, "log_mb": log_path.stat().st_size / 2**20, "write_s": time.perf_counter() - started,
              "api": [api_phase(kind, workdir, seconds, rate) for kind in servers]}
    if browser_rates:
        result["browser"] = browser_phase(workdir, list(browser_rates), browser_seconds, tti_loads)
    return result


def _ok(value, goal) -> bool:
    return value is not None and value <= goal


def verdicts(result: dict) -> list[tuple[str, bool]]:
    out = []
    for api in result["api"]:
        s = api["server"]
        out += [(f"{s} first answer", api["first_answer_s"] < GOALS["first_answer_s"]),
                (f"{s} stats p99", api["stats_p99_ms"] <= GOALS["stats_p99_ms"]),
                (f"{s} metrics p99", api["metrics_p99_ms"] <= GOALS["metrics_p99_ms"]),
                (f"{s} RSS", api["rss_mb"] < GOALS["rss_mb"]), (f"{s} sees appends", api["sees_appends"])]
    for rate, r in (result.get("browser") or {}).get("rates", {}).items():
        out.append((f"page TTI at {rate:g}/s", _ok(max(r["tti_s"]), GOALS["tti_s"])))
        for chart, c in r["charts"].items():
            out.append((f"lag {chart} at {rate:g}/s", _ok(c["p95_s"], GOALS["lag_p95_s"]) and not c["missing"]))
    return out


def table(result: dict) -> str:
    rows = [("log", f"{result['lines']:,} lines, {result['log_mb']:.0f} MB (written in {result['write_s']:.1f} s)", "", "")]
    for api in result["api"]:
        s = "python -m dashboard" if api["server"] == "flask" else "gunicorn"
        rows += [
            (f"[{s}] first answer after start", f"{api['first_answer_s']:.2f} s", f"< {GOALS['first_answer_s']:g} s",
             api["first_answer_s"] < GOALS["first_answer_s"]),
            (f"[{s}] whole log indexed after", f"{api['indexed_s']:.1f} s (answers meanwhile; "
             f"server CPU {api['indexing_cpu_s']:.1f} s)", "", ""),
            (f"[{s}] /stats p50 / p99", f"{api['stats_p50_ms']:.1f} / {api['stats_p99_ms']:.1f} ms ({api['stats_n']} req)",
             f"p99 <= {GOALS['stats_p99_ms']:g} ms", api["stats_p99_ms"] <= GOALS["stats_p99_ms"]),
            (f"[{s}] /metrics loss, 1,000 max points: p50 / p99",
             f"{api['metrics_p50_ms']:.1f} / {api['metrics_p99_ms']:.1f} ms ({api['metrics_n']} req, "
             f"{api['metrics_points']} points of {api['metrics_bucket_rows']} rows)",
             f"p99 <= {GOALS['metrics_p99_ms']:g} ms", api["metrics_p99_ms"] <= GOALS["metrics_p99_ms"]),
            (f"[{s}] peak server RSS", f"{api['rss_mb']:.0f} MB", f"< {GOALS['rss_mb']:g} MB", api["rss_mb"] < GOALS["rss_mb"]),
            (f"[{s}] appended while measuring", f"{api['appended']} lines at {api['rate']:g}/s; last step seen "
             f"{api['final_step']:,}", "all seen", api["sees_appends"]),
        ]
    browser = result.get("browser")
    if browser:
        rows.append(("[page, gunicorn] log indexed with the page open",
                     f"{browser['indexed_with_page_s']:.1f} s (server CPU {browser['indexing_with_page_cpu_s']:.1f} s)", "", ""))
        for rate, r in browser["rates"].items():
            tti = r["tti_s"]
            rows.append((f"[page at {rate:g} lines/s] time to interactive",
                         f"median {statistics.median(tti):.2f} s, max {max(tti):.2f} s ({len(tti)} loads)",
                         f"<= {GOALS['tti_s']:g} s", max(tti) <= GOALS["tti_s"]))
            for chart, c in r["charts"].items():
                value = ("no point drawn" if c["p95_s"] is None else
                         f"p50 {c['p50_s']:.2f} / p95 {c['p95_s']:.2f} / max {c['max_s']:.2f} s ({c['n']} lines"
                         + (f", {c['missing']} never drawn" if c["missing"] else "") + ")")
                rows.append((f"[page at {rate:g} lines/s] lag append -> {chart} chart", value,
                             f"p95 <= {GOALS['lag_p95_s']:g} s", _ok(c["p95_s"], GOALS["lag_p95_s"]) and not c["missing"]))
            rows.append((f"[page at {rate:g} lines/s] server CPU", f"{r['cpu_percent']:.1f} % of one core", "", ""))
            if r["console_errors"]:
                rows.append((f"[page at {rate:g} lines/s] console errors", str(len(r["console_errors"])), "none", False))
    header = ("metric", "value", "goal", "ok")
    cells = [[("PASS" if c else "FAIL") if isinstance(c, bool) else str(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    out = []
    for i, row in enumerate(cells):
        out.append(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of API queries per server")
    parser.add_argument("--rate", type=float, default=50.0, help="lines appended per second during the API queries")
    parser.add_argument("--servers", default="flask,gunicorn", help="comma-separated: flask (python -m dashboard), gunicorn")
    parser.add_argument("--rates", default="1,50", help="lines/s appended while the page is open (comma-separated)")
    parser.add_argument("--browser-seconds", type=float, default=60.0, help="seconds the page is watched per rate")
    parser.add_argument("--no-browser", action="store_true", help="skip the page (no Chromium needed)")
    parser.add_argument("--json", action="store_true", help="also print the raw result as JSON")
    args = parser.parse_args(argv)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or any(s not in ("flask", "gunicorn") for s in servers):
        parser.error("--servers takes flask and/or gunicorn")
    rates = [] if args.no_browser else [float(r) for r in args.rates.split(",") if r.strip()]
    result = run_benchmark(args.lines, args.seconds, args.rate, servers, rates, args.browser_seconds)
    print(table(result))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0 if all(ok for _, ok in verdicts(result)) else 1


if __name__ == "__main__":
    sys.exit(main())
