"""The dashboard's HTTP API against a real server (werkzeug, threaded) and fake run directories."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import types

import numpy as np

import pytest

from dashboard import create_app
from fake_runs import RUN_NAMES, SyntheticRun, generate, set_mtime
from dashboard.gpu import GpuMonitor
from dashboard.runs import RunStore
from helpers_dashboard import ThreadedServer, get, get_json, wait_until
from urllib.parse import quote


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    generate(root, seed=1)
    (root / "secret.txt").write_text("outside any run")
    return root


@pytest.fixture(scope="module")
def server(logdir):
    app = create_app(str(logdir), poll_interval=0.1, stall_seconds=600, stream_seconds=3)
    with ThreadedServer(app) as srv:
        wait_until(lambda: get_json(srv.url + "/health")[1]["indexing_done"] and
                   get_json(srv.url + "/health")[1]["runs"] == len(RUN_NAMES), message="indexing")
        yield srv


def wait_indexed(url, runs):
    wait_until(lambda: (lambda h: h["runs"] == runs and h["indexing_done"])(get_json(url + "/health")[1]),
               message=f"{runs} runs indexed")


def raw_get(server, path, with_headers=False, headers=None):
    """Send the path exactly as written (no client-side normalization of '..' or %2F, no redirects)."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    if with_headers:
        return response.status, dict(response.getheaders()), body
    return response.status, response.getheader("Content-Type", ""), body


def test_health_and_runs_newest_first_with_statuses(server):
    status, health = get_json(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["runs"] == 5
    status, data = get_json(server.url + "/api/runs")
    names = [r["name"] for r in data["runs"]]
    assert names[0] == "moe-qlora-running" and set(names) == set(RUN_NAMES)
    statuses = {r["name"]: r["status"] for r in data["runs"]}
    assert statuses == {"dense-qlora-finished": "finished", "moe-qlora-running": "running",
                        "dense-lora-failed": "failed", "moe-resumed": "finished", "dense-stalled": "stalled"}


def test_runs_are_known_before_the_readers_first_pass(logdir, reader_held):
    # a request before the first pass once got 404 for a run on disk, and health said "indexing_done"
    # (all() of no runs)
    app = create_app(str(logdir), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        health = get_json(srv.url + "/health")[1]
        assert health["reader_passes"] == 0 and health["indexing_done"] is False
        assert health["runs"] == len(RUN_NAMES)
        assert get(srv.url + "/api/runs/dense-stalled/stats")[0] == 200
        # "latest" is known too: the stream's first update followed an arbitrary run (CI, gunicorn test)
        order_before = [run["name"] for run in get_json(srv.url + "/api/runs")[1]["runs"]]
        assert order_before[0] == "moe-qlora-running"
        events = sse_events(srv, "/api/stream")
        event, data = next(events)
        events.close()
        assert event == "update" and data["run"] == "moe-qlora-running"
        reader_held.set()
        wait_indexed(srv.url, len(RUN_NAMES))
        assert [run["name"] for run in get_json(srv.url + "/api/runs")[1]["runs"]] == order_before


def test_stats_of_a_running_moe_run(server):
    status, stats = get_json(server.url + "/api/runs/moe-qlora-running/stats")
    assert status == 200
    assert stats["step"] == 300 and stats["total_steps"] == 1000 and stats["progress"] == pytest.approx(0.3)
    assert stats["is_moe"] and stats["status"] == "running"
    for key in ("loss", "loss_smoothed", "lr", "grad_norm", "tokens_per_sec", "memory_allocated_gb"):
        assert isinstance(stats[key], float), key
    assert 1.5 < stats["loss"] < 3.5
    assert stats["best_eval"]["metric"] == "eval_loss" and stats["best_eval"]["is_best"] is True
    assert stats["errors"] == 1 and stats["evals"] == 6 and stats["checkpoints"] == 2


def test_resume_drops_the_earlier_attempts_steps(server):
    _, stats = get_json(server.url + "/api/runs/moe-resumed/stats")
    assert stats["resumes"] and stats["resumes"][0]["from_step"] == 260 and stats["resumes"][0]["to_step"] == 201
    assert stats["attempt"] == 2
    _, metrics = get_json(server.url + "/api/runs/moe-resumed/metrics?keys=loss&max_points=10000")
    steps = metrics["step"]
    assert steps == sorted(set(steps)) and len(steps) == 350 and steps[-1] == 350


def test_metrics_downsampled_with_band(server):
    status, data = get_json(server.url + "/api/runs/dense-qlora-finished/metrics?keys=loss,lr&max_points=50")
    assert status == 200 and data["downsampled"] and data["rows"] == 400
    assert 30 <= data["points"] <= 50 and data["points"] == len(data["step"]) and data["bucket_rows"] > 1
    assert data["step"][0] == 1 and data["step"][-1] == 400
    loss = data["series"]["loss"]
    assert all(lo <= v <= hi for lo, v, hi in zip(loss["min"], loss["value"], loss["max"]))
    _, full = get_json(server.url + "/api/runs/dense-qlora-finished/metrics?keys=loss&max_points=1000")
    assert full["series"]["loss"]["value"][0] == loss["value"][0]
    assert full["series"]["loss"]["value"][-1] == loss["value"][-1]
    assert max(full["series"]["loss"]["value"]) == max(loss["max"])
    _, since = get_json(server.url + "/api/runs/dense-qlora-finished/metrics?keys=loss&since_step=390")
    assert since["step"] == list(range(391, 401)) and not since["downsampled"]
    _, evals = get_json(server.url + "/api/runs/dense-qlora-finished/metrics?stream=eval&keys=eval_loss,perplexity")
    assert evals["step"] == [50, 100, 150, 200, 250, 300, 350, 400]


@pytest.mark.parametrize("query", ["max_points=abc", "max_points=2", "max_points=100000", "since_step=x",
                                   "since_step=nan", "since_step=inf", "keys=", "keys=not_a_field",
                                   "keys=a;b", "stream=nope", "keys=" + ",".join(["loss"] * 17)])
def test_bad_metric_parameters_give_400_json(server, query):
    status, data = get_json(server.url + f"/api/runs/moe-qlora-running/metrics?{query}")
    assert status == 400 and data["error"] in ("bad_parameter", "unknown_key") and data["message"]


@pytest.mark.parametrize("path", ["/api/runs/nope/stats", "/api/runs/nope/metrics", "/api/runs/nope/plots/loss.png",
                                  "/api/runs/nope/checkpoints", "/api/runs/nope/events", "/api/runs/nope/errors",
                                  "/api/runs/nope/experts", "/api/runs/nope/stream", "/api/runs/moe-qlora-running/plots/nope.png",
                                  "/api/compare?runs=nope", "/api/nothing-here", "/nothing-here"])
def test_unknown_names_give_404_json(server, path):
    status, data = get_json(server.url + path)
    assert status == 404 and data["error"]


@pytest.mark.parametrize("path", [
    "/api/runs/../secret.txt/stats", "/api/runs/..%2Fsecret.txt/stats", "/api/runs/%2e%2e/stats",
    "/api/runs/%2E%2E%2Fsecret.txt/stats", "/api/runs/%2Fetc%2Fpasswd/stats", "/api/runs//etc/passwd/stats",
    "/api/runs/..%252Fsecret.txt/stats", "/api/runs/moe-qlora-running/plots/..%2F..%2Fsecret.txt.png",
    "/api/runs/moe-qlora-running/plots/%2Fetc%2Fpasswd.png", "/api/runs/..%5Csecret.txt/stats",
    "/api/runs/moe-qlora-running%2F..%2Fdense-stalled/stats", "/api/runs/./stats", "/api/runs/%00/stats",
    "/api/compare?runs=../secret.txt", "/api/compare.png?runs=/etc/passwd",
])
def test_path_traversal_gives_404_and_reads_nothing_outside(server, path):
    status, content_type, body = raw_get(server, path)
    assert status == 404, (path, status, body[:200])
    assert "application/json" in content_type
    assert b"outside any run" not in body and b"root:" not in body


def test_plots_are_png_cached_and_redrawn_when_data_changes(server, logdir):
    _, index = get_json(server.url + "/api/runs/dense-stalled/plots")
    names = {p["name"] for p in index["plots"]}
    assert {"loss", "eval", "metric", "lr", "grad_norm", "throughput", "memory", "experts_heatmap", "experts_imbalance"} <= names
    for plot in index["plots"]:
        status, headers, body = get(server.url + plot["url"])
        assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
    status, headers, first = get(server.url + "/api/runs/dense-stalled/plots/loss.png")
    assert get(server.url + "/api/runs/dense-stalled/plots/loss.png")[2] == first       # cached
    status, _, _ = get(server.url + "/api/runs/dense-stalled/plots/loss.png", headers={"If-None-Match": headers["ETag"]})
    assert status == 304
    with open(logdir / "dense-stalled" / "logs" / "training_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 121, "time": time.time(), "loss": 9.0}) + "\n")
    wait_until(lambda: get(server.url + "/api/runs/dense-stalled/plots/loss.png")[2] != first, message="redraw")
    status, _, png = get(server.url + "/api/compare.png?runs=dense-stalled,moe-resumed&key=loss")
    assert status == 200 and png.startswith(b"\x89PNG")
    status, data = get_json(server.url + "/api/compare?runs=dense-stalled,moe-resumed&key=loss&max_points=20")
    assert set(data["runs"]) == {"dense-stalled", "moe-resumed"} and 12 <= len(data["runs"]["moe-resumed"]["step"]) <= 20


def test_checkpoints_kept_deleted_best(server):
    _, data = get_json(server.url + "/api/runs/dense-qlora-finished/checkpoints")
    rows = {c["name"]: c for c in data["checkpoints"]}
    assert rows["checkpoint-100"]["state"] == "deleted" and rows["checkpoint-200"]["state"] == "deleted"
    assert rows["checkpoint-300"]["state"] == "kept" and rows["checkpoint-400"]["state"] == "kept"
    assert rows["final-checkpoint-400"]["final"] and rows["final-checkpoint-400"]["state"] == "kept"
    kept = [c for c in data["checkpoints"] if c["state"] == "kept" and not c["final"]]
    assert all(c["metric_name"] == "eval_loss" and isinstance(c["metric_value"], float) and c["size_bytes"] > 40_000
               for c in kept)
    best = [c for c in data["checkpoints"] if c["is_best"]]
    assert best and data["best_step"] == best[0]["step"] and data["best_adapter"] is True


def test_events_since_and_errors_with_traceback(server):
    _, data = get_json(server.url + "/api/runs/dense-qlora-finished/events?limit=5000")
    kinds = [e["event"] for e in data["events"]]
    assert kinds[0] == "start" and kinds[-1] == "stop" and "checkpoint_deleted" in kinds and "new_best" in kinds
    middle = data["events"][len(data["events"]) // 2]["time"]
    _, later = get_json(server.url + f"/api/runs/dense-qlora-finished/events?since={middle}")
    assert later["events"] and all(e["time"] > middle for e in later["events"])
    _, only = get_json(server.url + "/api/runs/dense-qlora-finished/events?event=eval&limit=2")
    assert [e["event"] for e in only["events"]] == ["eval", "eval"] and only["events"][-1]["step"] == 400
    _, errors = get_json(server.url + "/api/runs/dense-lora-failed/errors")
    assert errors["status"] == "failed" and "OutOfMemoryError" in errors["fatal_error"]
    assert errors["errors"][0]["fatal"] and "Traceback" in errors["errors"][0]["traceback"]


def test_experts(server):
    _, data = get_json(server.url + "/api/runs/moe-qlora-running/experts")
    assert data["is_moe"] and data["num_experts"] == 8 and data["top_k"] == 2 and data["snapshots"] == 15
    assert len(data["latest"]["layers"]) == 6 and len(data["latest"]["layers"][0]["tokens_per_expert"]) == 8
    _, dense = get_json(server.url + "/api/runs/dense-qlora-finished/experts")
    assert not dense["is_moe"] and dense["latest"]["layers"] == []


def test_legacy_endpoints_answer_for_the_most_recent_run(server):
    for path, key in (("/api/stats", "name"), ("/api/plots", "run"), ("/api/checkpoints", "run"),
                      ("/api/events", "run"), ("/api/errors", "run")):
        status, data = get_json(server.url + path)
        assert status == 200 and data[key] == "moe-qlora-running", path
    status, gpu = get_json(server.url + "/api/gpu")
    assert status == 200 and gpu["available"] is False and gpu["reason"]


def sse_events(server, path):
    """(event, data) of one server-sent-event stream, until the server ends it ("bye")."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        event, data = None, None
        while line := response.readline():
            raw = line.decode().rstrip("\n")
            if raw.startswith("event:"):
                event = raw.split(":", 1)[1].strip()
            elif raw.startswith("data:"):
                data = json.loads(raw.split(":", 1)[1])
            elif raw == "" and event:
                yield event, data
                if event == "bye":
                    return
                event, data = None, None
    finally:
        connection.close()


def test_live_stream_sends_updates(server, logdir):
    path = "/api/runs/dense-lora-failed/stream"
    events = sse_events(server, path)
    event, data = next(events)
    assert event == "update" and data["stats"]["step"] == 180
    with open(logdir / "dense-lora-failed" / "logs" / "training_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 181, "time": time.time(), "loss": 2.5}) + "\n")
    # stream_seconds=3: on a loaded machine the server can end the stream before its reader got to the new
    # line; the browser then reconnects (its first update says step 180 while the line is unread), so does this
    for _ in range(10):
        event, data = next(events)
        if event == "update" and data["stats"]["step"] == 181:
            break
        if event == "bye":
            events = sse_events(server, path)
    assert event == "update" and data["stats"]["step"] == 181
    assert [event for event, _ in events] == ["bye"]   # the server ends it, the browser reconnects


def test_runs_appearing_and_disappearing_over_http(server, logdir):
    run = SyntheticRun(logdir, "zz-new-run", moe=False, total_steps=50, start_time=time.time())
    for _ in range(5):
        run.advance(now=time.time())
    # listed first, once its run.json is read (a pass can list the directory a moment before: RunLog makes
    # logs/ before it writes run.json)
    wait_until(lambda: get_json(server.url + "/api/runs")[1]["runs"][0]["name"] == "zz-new-run",
               message="new run listed as the newest")
    assert get_json(server.url + "/api/stats")[1]["name"] == "zz-new-run"   # the newest run now
    shutil.rmtree(logdir / "zz-new-run")
    wait_until(lambda: get_json(server.url + "/api/runs/zz-new-run/stats")[0] == 404, message="run gone")


def test_page_is_served(server):
    status, headers, body = get(server.url + "/")
    assert status == 200 and b'id="run-picker"' in body and b"<script" in body
    assert b"src=\"http" not in body          # no third-party JavaScript


def test_token_required_when_set(logdir):
    app = create_app(str(logdir), token="s3cret", poll_interval=0.1)
    with ThreadedServer(app) as srv:
        assert get(srv.url + "/health")[0] == 200
        for path in ("/", "/api/runs", "/api/stats", "/api/gpu", "/metrics", "/api/runs/moe-resumed/plots/loss.png"):
            status, data = get_json(srv.url + path) if path != "/" else (get(srv.url + path)[0], None)
            assert status == 401, path
        assert get(srv.url + "/api/runs?token=wrong")[0] == 401
        assert get(srv.url + "/api/runs?token=s3cret")[0] == 200
        assert get(srv.url + "/api/runs", headers={"Authorization": "Bearer s3cret"})[0] == 200
        # the page keeps the token in a cookie and sends the browser to the URL without it
        status, headers, _ = raw_get(srv, "/?token=s3cret&run=moe-resumed", with_headers=True)
        assert status == 303 and headers["Location"] == "/?run=moe-resumed"
        assert "dashboard_token=s3cret" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        assert get(srv.url + "/api/runs", headers={"Cookie": "dashboard_token=s3cret"})[0] == 200
        assert get(srv.url + "/?run=moe-resumed", headers={"Cookie": "dashboard_token=s3cret"})[0] == 200


class FakeNvml(types.SimpleNamespace):
    """The few pynvml calls the monitor makes, for one fake GPU."""
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2

    def __init__(self):
        super().__init__(utilization=55)

    def nvmlInit(self): pass
    def nvmlSystemGetDriverVersion(self): return b"550.54"
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return "NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetUUID(self, h): return "GPU-123"
    def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=self.utilization, memory=30)
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(used=40 * 2**30, total=80 * 2**30)
    def nvmlDeviceGetTemperature(self, h, kind): return 61
    def nvmlDeviceGetPowerUsage(self, h): return 350_000
    def nvmlDeviceGetEnforcedPowerLimit(self, h): raise RuntimeError("not supported")
    def nvmlDeviceGetClockInfo(self, h, kind): return 1980 if kind == 1 else 2619
    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=1, usedGpuMemory=2**30)]


def test_gpu_monitor_with_nvml_and_without():
    nvml = FakeNvml()
    monitor = GpuMonitor(interval=0, nvml=nvml)
    monitor.sample()
    nvml.utilization = 90
    monitor.sample()
    snap = monitor.snapshot()
    gpu = snap["gpus"][0]
    assert snap["available"] and snap["driver_version"] == "550.54"
    assert gpu["utilization_percent"] == 90 and gpu["power_watts"] == 350.0 and gpu["power_limit_watts"] is None
    assert gpu["temperature_c"] == 61 and gpu["sm_clock_mhz"] == 1980 and gpu["processes"][0]["pid"] == 1
    assert [h["utilization_percent"] for h in gpu["history"]] == [55, 90]

    class Broken:
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")
    snap = GpuMonitor(nvml=Broken()).snapshot()
    assert snap == {"available": False, "reason": "NVML unavailable: OSError: NVML Shared Library Not Found", "gpus": []}


def test_never_a_500_for_odd_requests(server):
    odd = ["/api/runs/moe-qlora-running/metrics?keys=%00", "/api/runs/moe-qlora-running/metrics?max_points=-1",
           "/api/runs/moe-qlora-running/metrics?since_step=1e400", "/api/runs/moe-qlora-running/events?since=abc",
           "/api/runs/moe-qlora-running/events?limit=0", "/api/runs/moe-qlora-running/errors?limit=x",
           "/api/compare?runs=" + ",".join(["a"] * 20), "/api/compare?key=../../x", "/api/compare?stream=x",
           "/api/runs/%ff%fe/stats", "/api/runs/" + "a" * 5000 + "/stats", "/api/gpu?history=0",
           "/api/runs/moe-qlora-running/metrics?keys=loss&keys=lr", "/api/stream?run=nope"]
    for path in odd:
        status, _, body = raw_get(server, path)
        assert status in (200, 400, 404), (path, status, body[:300])
        json.loads(body)


def test_odd_runs_never_give_a_500(tmp_path):
    """Runs with one line, only nulls, odd types in run.json and expert logs: every endpoint answers."""
    def write(run, stream, records):
        (tmp_path / run / "logs").mkdir(parents=True, exist_ok=True)
        with open(tmp_path / run / "logs" / stream, "a") as f:
            for record in records:
                f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")

    write("one-line", "training_log.jsonl", [{"step": 1, "loss": 2.0}])
    write("all-null", "training_log.jsonl", [{"step": s, "loss": None, "lr": None} for s in range(5)])
    write("all-null", "eval_log.jsonl", [{"step": 2, "eval_loss": None, "is_best": True}])
    write("odd-experts", "expert_usage_log.jsonl", [
        {"step": 1, "layers": [{"tokens_per_expert": ["a", None, 3]}, "not a layer", {"load_imbalance": "x"}]},
        {"step": 2, "layers": []}, {"step": 3, "mean_load_imbalance": 1.5}])
    write("odd-experts", "events.jsonl", [{"step": 1, "event": "checkpoint_saved", "path": 42},
                                          {"step": 1, "event": "new_best"}, {"step": 2, "event": "resume"}])
    write("odd-experts", "error_log.jsonl", [{"step": 1, "traceback": "x" * 200_000}, {"step": 2, "type": None}])
    (tmp_path / "odd-info").mkdir()
    (tmp_path / "odd-info" / "run.json").write_text(json.dumps(
        {"status": 5, "total_steps": "many", "model": ["x"], "start_time": "yesterday", "error": {"a": 1}}))
    (tmp_path / "list-info").mkdir()
    (tmp_path / "list-info" / "run.json").write_text("[1, 2]")
    (tmp_path / "list-info" / "checkpoint-7").mkdir()
    (tmp_path / "list-info" / "checkpoint-7" / "trainer_state.json").write_text('{"metric_value": NaN}')
    app = create_app(str(tmp_path), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        wait_until(lambda: get_json(srv.url + "/health")[1]["runs"] == 5, message="runs")
        wait_until(lambda: get_json(srv.url + "/health")[1]["indexing_done"], message="indexing")
        for run in ("one-line", "all-null", "odd-experts", "odd-info", "list-info"):
            paths = [f"/api/runs/{run}", f"/api/runs/{run}/stats", f"/api/runs/{run}/metrics?keys=loss,lr",
                     f"/api/runs/{run}/metrics?stream=eval&keys=eval_loss&max_points=3",
                     f"/api/runs/{run}/checkpoints", f"/api/runs/{run}/events", f"/api/runs/{run}/errors",
                     f"/api/runs/{run}/experts", f"/api/compare.png?runs={run}&key=loss"]
            paths += [f"/api/runs/{run}/plots/{name}.png" for name in
                      ("loss", "eval", "lr", "grad_norm", "throughput", "memory", "experts_heatmap", "experts_imbalance")]
            for path in paths:
                status, headers, body = get(srv.url + path)
                assert status == 200, (path, status, body[:300])
                if "png" not in path:
                    json.loads(body)
        assert get(srv.url + "/metrics")[0] == 200
        _, stats = get_json(srv.url + "/api/runs/odd-info/stats")
        assert stats["status"] == "unknown" and stats["total_steps"] is None
        _, checkpoints = get_json(srv.url + "/api/runs/list-info/checkpoints")
        assert checkpoints["checkpoints"][0]["step"] == 7 and checkpoints["checkpoints"][0]["metric_value"] is None


def test_run_keys_and_metric_ranges(server):
    _, keys = get_json(server.url + "/api/runs/moe-qlora-running/keys")
    assert {"loss", "lr", "time", "tokens", "router_aux_loss"} <= set(keys["training"]) and "step" not in keys["training"]
    assert {"eval_loss", "perplexity", "is_best"} <= set(keys["eval"]) and "num_experts" in keys["experts"]
    _, zoomed = get_json(server.url + "/api/runs/moe-qlora-running/metrics?keys=loss&start_step=100&end_step=150")
    assert zoomed["step"] == list(range(100, 151)) and zoomed["rows"] == 51 and zoomed["bucket_rows"] == 1
    _, window = get_json(server.url + "/api/runs/moe-qlora-running/metrics?keys=loss&start_step=100&max_points=20")
    assert window["step"][0] == 100 and window["step"][-1] == 300 and window["downsampled"] and window["points"] <= 20
    assert isinstance(window["generation"], int)


def test_a_resume_moves_the_generation_so_clients_reload(tmp_path):
    run = SyntheticRun(tmp_path, "r", moe=False, total_steps=100, start_time=time.time())
    for _ in range(20):
        run.advance(now=time.time())
    app = create_app(str(tmp_path), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        url = srv.url + "/api/runs/r/metrics?keys=loss"
        first = wait_until(lambda: (lambda d: d if d["total_rows"] == 20 else None)(get_json(url)[1]), message="rows")
        with open(tmp_path / "r" / "logs" / "training_log.jsonl", "a") as f:      # resumed from step 10
            f.write(json.dumps({"step": 11, "time": time.time(), "loss": 0.5}) + "\n")
        later = wait_until(lambda: (lambda d: d if d["total_rows"] == 11 else None)(get_json(url)[1]), message="resume")
        assert later["generation"] == first["generation"] + 1 and later["step"][-1] == 11


def test_compare_takes_any_run_name_and_names_unknown_ones(tmp_path):
    for name in ("lr=1e-4,bs=8", "lr=3e-4,bs=8", "plain"):
        run = SyntheticRun(tmp_path, name, moe=False, total_steps=60, start_time=time.time())
        for _ in range(30):
            run.advance(now=time.time())
    app = create_app(str(tmp_path), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        wait_indexed(srv.url, 3)
        query = "&".join(f"run={quote(n, safe='')}" for n in ("lr=1e-4,bs=8", "lr=3e-4,bs=8"))
        status, data = get_json(srv.url + f"/api/compare?{query}&key=loss&max_points=50")
        assert status == 200 and list(data["runs"]) == ["lr=1e-4,bs=8", "lr=3e-4,bs=8"]
        assert all(len(r["step"]) == 30 and len(r["min"]) == 30 for r in data["runs"].values())
        status, png_headers, png = get(srv.url + f"/api/compare.png?{query}&key=loss")
        assert status == 200 and png.startswith(b"\x89PNG")
        status, error = get_json(srv.url + f"/api/compare?{query}&run=gone%2Cmissing&key=loss")
        assert status == 404 and error["error"] == "unknown_run" and error["unknown"] == ["gone,missing"]
        assert "'gone,missing'" in error["message"]
        status, legacy = get_json(srv.url + "/api/compare?runs=plain&key=loss")   # the older comma form
        assert status == 200 and list(legacy["runs"]) == ["plain"]
        status, error = get_json(srv.url + "/api/compare?run=plain&key=no_such_key")
        assert status == 400 and error["error"] == "unknown_key"


def test_experts_are_served_with_integer_counts(server):
    status, headers, body = get(server.url + "/api/runs/moe-qlora-running/experts")
    assert status == 200 and b'"num_experts":8,' in body and b'"top_k":2,' in body
    data = json.loads(body)
    assert type(data["num_experts"]) is int and type(data["latest"]["step"]) is int
    history = data["layer_history"]
    assert len(history["load_imbalance"]) == 6 and len(history["step"]) == 15
    assert all(len(layer) == 15 for layer in history["load_imbalance"])


def test_heatmap_png_has_whole_layer_and_expert_ticks():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from dashboard import plots
    for layers, experts in ((3, 4), (2, 8), (6, 8)):   # few layers: matplotlib alone ticks 0.5, 1.5, ...
        fig = Figure()
        plots._draw_experts_heatmap(fig, {"matrix": np.arange(layers * experts, dtype=float).reshape(layers, experts),
                                          "step": 20})
        ax = fig.axes[0]
        for ticks, size in ((ax.get_yticks(), layers), (ax.get_xticks(), experts)):
            shown = [t for t in ticks if -0.5 <= t <= size - 0.5]
            assert shown and all(float(t).is_integer() for t in shown), (layers, experts, ticks)


def test_run_info_has_secrets_redacted(tmp_path):
    run = SyntheticRun(tmp_path, "r", moe=False, total_steps=10, start_time=time.time())
    run.log.update_run_info(config={"tracking": {"hf_token": "hf_LEAK1", "project": "demo"},
                                    "api_keys": ["sk-LEAK2"], "secret": {"nested": "LEAK3"}},
                            env_overrides={"WANDB_API_KEY": {"key": "tracking.key", "value": "LEAK4"}})
    app = create_app(str(tmp_path), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        status, headers, body = wait_until(lambda: (lambda r: r if b"demo" in r[2] else None)(get(srv.url + "/api/runs/r")),
                                           message="run.json read")
        assert status == 200 and b"LEAK" not in body
        info = json.loads(body)["info"]
        assert info["config"]["tracking"] == {"hf_token": "***", "project": "demo"}
        assert info["config"]["api_keys"] == ["***"] and info["config"]["secret"] == {"nested": "***"}
        assert info["versions"]["torch"] == "2.5.1"


def test_failure_reason_and_exit_code_of_failed_and_stalled_runs(server):
    _, failed = get_json(server.url + "/api/runs/dense-lora-failed/stats")
    failure = failed["failure"]
    assert failure["kind"] == "failed" and failure["exit_code"] == 1 and failure["exit_code_source"] == "inferred"
    assert failure["reason"].startswith("OutOfMemoryError: CUDA out of memory") and failure["step"] == 180
    assert failure["error_type"] == "OutOfMemoryError" and failure["time"]
    _, running = get_json(server.url + "/api/runs/moe-qlora-running/stats")
    assert running["failure"] is None


def test_nan_stop_stall_and_exit_codes_recorded_by_a_tool(tmp_path):
    run = SyntheticRun(tmp_path, "nan", moe=False, total_steps=50, start_time=time.time())
    for _ in range(5):
        run.advance(now=time.time())
    run.log.event(5, "stop", "run ended: nan_limit", reason="nan_limit")
    run.log.update_run_info(status="failed", error="stopped: nan_limit", end_time=time.time())
    other = SyntheticRun(tmp_path, "coded", moe=False, total_steps=50, start_time=time.time())
    other.advance(now=time.time())
    other.log.update_run_info(status="failed", error="killed", exit_code=137)
    quiet = SyntheticRun(tmp_path, "quiet", moe=False, total_steps=50, start_time=time.time() - 7200)
    quiet.advance()
    quiet_since = time.time() - 3600
    set_mtime(quiet.run_dir, quiet_since)
    app = create_app(str(tmp_path), poll_interval=0.1, stall_seconds=600)
    with ThreadedServer(app) as srv:
        wait_indexed(srv.url, 3)
        failure = get_json(srv.url + "/api/runs/nan/stats")[1]["failure"]
        assert failure["kind"] == "nan_stop" and failure["exit_code"] == 1 and failure["stop_reason"] == "nan_limit"
        assert failure["reason"] == "stopped: nan_limit"
        coded = get_json(srv.url + "/api/runs/coded/stats")[1]["failure"]
        assert coded["exit_code"] == 137 and coded["exit_code_source"] == "run.json"
        stalled = get_json(srv.url + "/api/runs/quiet/stats")[1]["failure"]
        assert stalled["kind"] == "stalled" and stalled["exit_code"] is None and stalled["stall_seconds"] == 600
        # how long exactly depends on how long the test took to get here: only its lower bound is known
        assert stalled["time"] == pytest.approx(quiet_since, abs=1e-3) and stalled["seconds_without_log"] >= 3600
        assert re.fullmatch(r"no log written for \d+ min \(stalled after 10 min\)", stalled["reason"])
        assert stalled["process"] == "running"        # run.json names this test's pid on this host


def test_run_directory_names_that_are_not_utf8_break_nothing(tmp_path):
    """Before: one such directory made /metrics answer 500 for every run."""
    run = SyntheticRun(tmp_path, "fine", moe=False, total_steps=10, start_time=time.time())
    run.advance(now=time.time())
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9-run"
    os.makedirs(raw + b"/logs")
    with open(raw + b"/logs/training_log.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "time": time.time(), "loss": 2.0}) + "\n")
    app = create_app(str(tmp_path), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        wait_indexed(srv.url, 2)
        status, headers, body = get(srv.url + "/metrics")
        assert status == 200 and 'run="caf\\\\xe9-run"' in body.decode()
        names = [r["name"] for r in get_json(srv.url + "/api/runs")[1]["runs"]]
        assert "caf\\xe9-run" in names
        status, stats = get_json(srv.url + "/api/runs/" + quote("caf\\xe9-run", safe="") + "/stats")
        assert status == 200 and stats["step"] == 1
        assert get(srv.url + "/api/runs/caf%E9-run/stats")[0] == 404


@pytest.mark.parametrize("smoothing", [0.0, 0.6])
def test_png_loss_plot_keeps_its_markers_and_legend_with_smoothing_off(logdir, smoothing):
    # the checkpoint / resume lines and the legend once sat inside "if smoothing": ?smoothing=0 lost them
    from matplotlib.figure import Figure

    from dashboard import plots
    store = RunStore(logdir)
    while store.poll_once():
        pass
    run = store.get("moe-resumed")
    snap = plots._snapshot(run, "loss")
    snap.update(smoothing=smoothing, log_y=False)
    assert snap["checkpoints"] and snap["resumes"]
    fig = Figure()
    plots._DRAW["loss"](fig, snap)
    ax = fig.axes[0]
    vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]
    assert len(vertical) == len(snap["checkpoints"]) + len(snap["resumes"])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "resume" in labels and "checkpoint (dotted: deleted)" in labels
    assert any(label.startswith("EMA") for label in labels) == (smoothing > 0)


def test_png_plots_take_smoothing_and_log_y(server):
    base = server.url + "/api/runs/dense-qlora-finished/plots/loss.png"
    default = get(base)[2]
    for query in ("?log_y=1", "?smoothing=0.95", "?smoothing=0"):
        status, headers, png = get(base + query)
        assert status == 200 and png.startswith(b"\x89PNG") and png != default, query
    for query in ("?log_y=2", "?smoothing=1", "?smoothing=-0.1", "?smoothing=x"):
        status, data = get_json(base + query)
        assert status == 400 and data["error"] == "bad_parameter", query
