"""/metrics through prometheus_client: the exposition parses, names follow Prometheus' conventions
(base units, _total only on counters, ratios 0-1), and only recently active runs are exported."""

from __future__ import annotations

import re
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from prometheus_client.exposition import generate_latest

from dashboard import create_app
from fake_runs import generate
from dashboard.gpu import GpuMonitor
from dashboard.prometheus import DashboardCollector
from helpers_dashboard import ThreadedServer, get, get_json, wait_until


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    generate(root, seed=6)             # dense-stalled's logs stopped 3 hours ago
    return root


def scrape(url: str, accept: str | None = None):
    status, headers, body = get(url + "/metrics", headers={"Accept": accept} if accept else None)
    assert status == 200
    return headers["Content-Type"], body.decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, **labels) -> list:
    return [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def test_exposition_follows_prometheus_conventions(logdir):
    app = create_app(str(logdir), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        wait_until(lambda: get_json(srv.url + "/health")[1]["indexing_done"], message="indexing")
        content_type, text = scrape(srv.url)
        assert content_type.startswith("text/plain; version=0.0.4")
        found = families(text)
        for name, family in found.items():
            assert re.fullmatch(r"trainkit_[a-z0-9_]+", name), name
            assert not re.search(r"_(gib|gb|mb|percent|mhz|ms)(_|$)", name), name    # base units only
            if family.type == "counter":
                assert all(s.name.endswith("_total") for s in family.samples), name
            else:
                assert not any(s.name.endswith("_total") for s in family.samples), name
        assert found["trainkit_tokens"].type == "counter" and found["trainkit_errors"].type == "counter"
        assert found["trainkit_skipped_lines"].type == "counter"
        assert found["trainkit_step"].type == "gauge" and found["trainkit_memory_allocated_bytes"].type == "gauge"
        step = samples(found["trainkit_step"], run="moe-qlora-running")
        assert [s.value for s in step] == [300.0]
        memory = samples(found["trainkit_memory_allocated_bytes"], run="moe-qlora-running")[0].value
        stats = get_json(srv.url + "/api/runs/moe-qlora-running/stats")[1]
        assert memory == pytest.approx(stats["memory_allocated_gb"] * 2**30)
        assert samples(found["trainkit_tokens"], run="moe-qlora-running")[0].value == stats["tokens"]
        assert 0 <= samples(found["trainkit_progress_ratio"], run="moe-qlora-running")[0].value <= 1
        status = {s.labels["status"]: s.value for s in samples(found["trainkit_status"], run="dense-lora-failed")}
        assert status == {"running": 0, "finished": 0, "failed": 1, "preempted": 0, "stalled": 0, "unknown": 0}
        info = samples(found["trainkit_run_info"], run="moe-qlora-running")[0]
        assert info.name == "trainkit_run_info" and info.labels["model"] == "Qwen3-30B-A3B"
        assert samples(found["trainkit_gpu_available"])[0].value == 0
        # only runs active within the window (default one hour): the 3-hours-quiet run is not exported
        exported = {s.labels["run"] for s in found["trainkit_step"].samples}
        assert "dense-stalled" not in exported and "moe-qlora-running" in exported
        assert samples(found["trainkit_dashboard_runs"])[0].value == 5
        assert samples(found["trainkit_dashboard_exported_runs"])[0].value == len(exported) == 4
        # OpenMetrics for scrapers that ask for it
        content_type, text = scrape(srv.url, "application/openmetrics-text; version=1.0.0")
        assert content_type.startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")


def test_the_window_is_configurable(logdir, monkeypatch):
    monkeypatch.setenv("DASHBOARD_METRICS_WINDOW", str(24 * 3600))
    app = create_app(str(logdir), poll_interval=0.1)
    with ThreadedServer(app) as srv:
        wait_until(lambda: get_json(srv.url + "/health")[1]["indexing_done"], message="indexing")
        exported = {s.labels["run"] for s in families(scrape(srv.url)[1])["trainkit_step"].samples}
        assert "dense-stalled" in exported and len(exported) == 5


class FakeNvml(types.SimpleNamespace):
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2
    def nvmlInit(self): pass
    def nvmlSystemGetDriverVersion(self): return "550.54"
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return "NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetUUID(self, h): return "GPU-1"
    def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=87, memory=30)
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(used=40 * 2**30, total=80 * 2**30)
    def nvmlDeviceGetTemperature(self, h, kind): return 61
    def nvmlDeviceGetPowerUsage(self, h): return 350_000
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return 700_000
    def nvmlDeviceGetClockInfo(self, h, kind): return 1980 if kind == 1 else 2619
    def nvmlDeviceGetComputeRunningProcesses(self, h): return []


def test_gpu_metrics_in_base_units(logdir):
    app = create_app(str(logdir), poll_interval=0.1)
    registry = CollectorRegistry(auto_describe=False)
    gpu = GpuMonitor(nvml=FakeNvml())
    gpu.sample()
    registry.register(DashboardCollector(app.extensions["dashboard.store"], gpu, app.extensions["dashboard.alerts"],
                                         app.config["DASHBOARD"]))
    found = families(generate_latest(registry).decode())
    app.extensions["dashboard.store"].stop()
    labels = {"gpu": "0", "name": "NVIDIA H100 80GB HBM3"}
    assert samples(found["trainkit_gpu_utilization_ratio"], **labels)[0].value == pytest.approx(0.87)
    assert samples(found["trainkit_gpu_memory_used_bytes"], **labels)[0].value == 40 * 2**30
    assert samples(found["trainkit_gpu_sm_clock_hertz"], **labels)[0].value == 1.98e9
    assert samples(found["trainkit_gpu_memory_clock_hertz"], **labels)[0].value == 2.619e9
    assert samples(found["trainkit_gpu_power_watts"], **labels)[0].value == 350.0
    assert samples(found["trainkit_gpu_power_limit_watts"], **labels)[0].value == 700.0
    assert samples(found["trainkit_gpu_temperature_celsius"], **labels)[0].value == 61
    assert samples(found["trainkit_gpu_available"])[0].value == 1
