"""Dashboard speed and memory with a huge, growing training log.

    python benchmarks/bench_dashboard.py                      # 1,000,000 lines, gunicorn, 30 s of queries
    python benchmarks/bench_dashboard.py --lines 100000 --seconds 5 --server flask

Writes a run whose training_log.jsonl has --lines lines, starts the dashboard on it (a
real server in a subprocess), keeps appending --rate lines/s, and measures: the time
to the first answer after start, the time until the whole log is indexed, p50/p99
latency of /stats and of a 1,000-point /metrics query, and the server's peak RSS.
Prints a table; exits 1 when a target is missed (targets from issue 3).
"""

from __future__ import annotations

import argparse
import json
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

from dashboard.fake_runs import big_log_line, write_big_log  # noqa: E402
from dashboard.testing import children, free_port, get, rss_bytes, start_gunicorn, stop  # noqa: E402

TARGETS = {"first_answer_s": 2.0, "stats_p99_ms": 50.0, "metrics_p99_ms": 50.0, "rss_mb": 300.0}


def start_server(kind: str, logdir: Path, port: int) -> subprocess.Popen:
    if kind == "gunicorn":
        return start_gunicorn(str(logdir), port)
    return subprocess.Popen([sys.executable, "-m", "dashboard", "--logdir", str(logdir), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def server_rss(process: subprocess.Popen) -> int:
    total = 0
    for pid in [process.pid, *children(process.pid)]:
        try:
            total += rss_bytes(pid)
        except OSError:
            pass
    return total


class Appender(threading.Thread):
    """Appends training lines like a trainer does: one write + flush per line."""

    def __init__(self, path: Path, first_step: int, rate: float, total: int):
        super().__init__(daemon=True)
        self.path, self.step, self.rate, self.total = path, first_step, rate, total
        self.stopping = threading.Event()
        self.rng = random.Random(1)

    def run(self):
        next_time = time.monotonic()
        with open(self.path, "a") as f:
            while not self.stopping.is_set():
                self.step += 1
                f.write(big_log_line(self.step, time.time(), self.total, self.rng))
                f.flush()
                next_time += 1.0 / self.rate
                self.stopping.wait(max(0.0, next_time - time.monotonic()))


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_benchmark(lines: int, seconds: float, rate: float, server: str, workdir: Path | None = None) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench_dashboard_"))
    started = time.perf_counter()
    run_dir = write_big_log(workdir, lines, name="big-run")
    log_path = run_dir / "logs" / "training_log.jsonl"
    result = {"lines": lines, "log_mb": log_path.stat().st_size / 2**20, "write_s": time.perf_counter() - started,
              "server": server, "rate": rate, "seconds": seconds}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    appender = Appender(log_path, lines, rate, lines * 2)
    t0 = time.perf_counter()
    process = start_server(server, workdir, port)
    peak_rss = 0
    try:
        while True:   # the first answer about the run (the log may still be indexing)
            try:
                status, _, body = get(base + "/api/runs/big-run/stats", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("no answer within 120 s")
            time.sleep(0.02)
        result["first_answer_s"] = time.perf_counter() - t0
        appender.start()
        while True:
            stats = json.loads(get(base + "/api/runs/big-run/stats")[2])
            peak_rss = max(peak_rss, server_rss(process))
            if stats["indexing"]["done"]:
                break
            time.sleep(0.05)
        result["indexed_s"] = time.perf_counter() - t0
        # the page draws plots: their memory (matplotlib) belongs in the RSS measured
        begin = time.perf_counter()
        for name in ("loss", "lr", "grad_norm", "throughput"):
            status, _, png = get(base + f"/api/runs/big-run/plots/{name}.png")
            if status != 200 or not png.startswith(b"\x89PNG"):
                raise RuntimeError(f"plot {name}: {status}")
        result["plots_ms"] = (time.perf_counter() - begin) * 1000 / 4

        timings = {"stats": [], "metrics": []}
        urls = {"stats": base + "/api/runs/big-run/stats",
                "metrics": base + "/api/runs/big-run/metrics?keys=loss&max_points=1000"}
        ends = time.perf_counter() + seconds
        last_rss = 0.0
        while time.perf_counter() < ends:
            for name, url in urls.items():
                begin = time.perf_counter()
                status, _, body = get(url)
                timings[name].append((time.perf_counter() - begin) * 1000)
                if status != 200:
                    raise RuntimeError(f"{url}: {status} {body[:200]!r}")
            if time.perf_counter() - last_rss > 0.5:
                peak_rss = max(peak_rss, server_rss(process))
                last_rss = time.perf_counter()
        metrics = json.loads(body)
        result["metrics_points"] = metrics["points"]
        appender.stopping.set()
        appender.join()
        time.sleep(1.5)
        final = json.loads(get(urls["stats"])[2])
        result["appended"] = appender.step - lines
        result["final_step"] = final["step"]
        result["sees_appends"] = final["step"] == appender.step
        for name, values in timings.items():
            result[f"{name}_n"] = len(values)
            result[f"{name}_p50_ms"] = statistics.median(values)
            result[f"{name}_p99_ms"] = percentile(values, 99)
        result["rss_mb"] = max(peak_rss, server_rss(process)) / 2**20
    finally:
        appender.stopping.set()
        stop(process)
    return result


def table(result: dict) -> str:
    rows = [
        ("log lines / size", f"{result['lines']:,} lines, {result['log_mb']:.0f} MB", "", ""),
        ("server", result["server"], "", ""),
        ("first answer after start", f"{result['first_answer_s']:.2f} s", f"< {TARGETS['first_answer_s']:g} s",
         result["first_answer_s"] < TARGETS["first_answer_s"]),
        ("whole log indexed after", f"{result['indexed_s']:.2f} s (answers meanwhile)", "", ""),
        (f"plot drawn from {result['lines']:,} rows (uncached)", f"{result['plots_ms']:.0f} ms", "", ""),
        ("stats p50 / p99", f"{result['stats_p50_ms']:.1f} / {result['stats_p99_ms']:.1f} ms ({result['stats_n']} req)",
         f"p99 < {TARGETS['stats_p99_ms']:g} ms", result["stats_p99_ms"] < TARGETS["stats_p99_ms"]),
        ("metrics (1,000 points) p50 / p99",
         f"{result['metrics_p50_ms']:.1f} / {result['metrics_p99_ms']:.1f} ms ({result['metrics_n']} req)",
         f"p99 < {TARGETS['metrics_p99_ms']:g} ms", result["metrics_p99_ms"] < TARGETS["metrics_p99_ms"]),
        ("peak server RSS", f"{result['rss_mb']:.0f} MB", f"< {TARGETS['rss_mb']:g} MB",
         result["rss_mb"] < TARGETS["rss_mb"]),
        ("appended while measuring", f"{result['appended']} lines at {result['rate']:g}/s; last step seen "
         f"{result['final_step']:,}", "all seen", result["sees_appends"]),
    ]
    widths = [max(len(str(r[i])) if not isinstance(r[i], bool) else 4 for r in rows + [("metric", "value", "target", "ok")])
              for i in range(4)]
    out = []
    for i, row in enumerate([("metric", "value", "target", "ok")] + rows):
        cells = [("PASS" if c else "FAIL") if isinstance(c, bool) else str(c) for c in row]
        out.append(" | ".join(c.ljust(w) for c, w in zip(cells, widths)))
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def passed(result: dict) -> bool:
    return (result["first_answer_s"] < TARGETS["first_answer_s"] and result["stats_p99_ms"] < TARGETS["stats_p99_ms"]
            and result["metrics_p99_ms"] < TARGETS["metrics_p99_ms"] and result["rss_mb"] < TARGETS["rss_mb"]
            and result["sees_appends"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of queries")
    parser.add_argument("--rate", type=float, default=50.0, help="lines appended per second meanwhile")
    parser.add_argument("--server", choices=["gunicorn", "flask"], default="gunicorn")
    parser.add_argument("--json", action="store_true", help="also print the raw result as JSON")
    args = parser.parse_args(argv)
    result = run_benchmark(args.lines, args.seconds, args.rate, args.server)
    print(table(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
