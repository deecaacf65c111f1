"""/metrics for Prometheus (and Grafana), through prometheus_client and a custom collector.

Names follow Prometheus' conventions: base units (bytes, seconds, hertz, celsius, ratios
0-1), ``_total`` only on counters, timestamps as ``*_time_seconds`` (unix seconds). Only
runs whose logs changed within DASHBOARD_METRICS_WINDOW seconds (default one hour) are
exported, so finished runs drop out instead of being scraped forever. The collector
reads the in-memory index; a scrape never touches the log files.
"""

from __future__ import annotations

import time

from flask import Response, current_app, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

GIB = 2 ** 30
STATUSES = ("running", "finished", "failed", "preempted", "stalled", "unknown")

# (name, help, stats key, scale) of per-run gauges
RUN_GAUGES = [
    ("trainkit_step", "Latest logged optimizer step", "step", 1),
    ("trainkit_total_steps", "Optimizer steps the run will take", "total_steps", 1),
    ("trainkit_progress_ratio", "step / total_steps (0-1)", "progress", 1),
    ("trainkit_epoch", "Fractional epoch of the latest logged step", "epoch", 1),
    ("trainkit_loss", "Latest training loss", "loss", 1),
    ("trainkit_loss_smoothed", "Mean training loss of the last 25 logged steps", "loss_smoothed", 1),
    ("trainkit_learning_rate", "Latest learning rate", "lr", 1),
    ("trainkit_grad_norm", "Latest gradient norm before clipping", "grad_norm", 1),
    ("trainkit_router_aux_loss", "Latest MoE router load-balancing loss", "router_aux_loss", 1),
    ("trainkit_tokens_per_second", "Throughput over the latest logging interval, all processes", "tokens_per_sec", 1),
    ("trainkit_step_duration_seconds", "Mean seconds per optimizer step over the latest logging interval",
     "step_time", 1),
    ("trainkit_eta_seconds", "Estimated seconds to the end of training", "eta_seconds", 1),
    ("trainkit_memory_allocated_bytes", "Device memory allocated (CPU runs: process RSS)", "memory_allocated_gb", GIB),
    ("trainkit_memory_peak_bytes", "Peak device memory allocated since start", "memory_peak_gb", GIB),
    ("trainkit_start_time_seconds", "Unix time the run (or its latest attempt) started", "start_time", 1),
    ("trainkit_last_log_time_seconds", "Unix time of the latest training log line", "last_log_time", 1),
    ("trainkit_last_activity_time_seconds", "Unix time the run's logs or run.json last changed", "last_activity", 1),
    ("trainkit_checkpoints", "Checkpoints kept on disk", "checkpoints", 1),
    ("trainkit_attempt", "Attempt number (1 + resumes)", "attempt", 1),
]
# (name without _total, help, stats key) of per-run counters
RUN_COUNTERS = [
    ("trainkit_tokens", "Non-padding tokens seen (all processes); drops back on a resume", "tokens"),
    ("trainkit_errors", "Lines in error_log.jsonl", "errors"),
    ("trainkit_events", "Lines in events.jsonl", "events"),
    ("trainkit_evaluations", "Evaluations logged", "evals"),
]
# (name, help, GPU snapshot key, scale)
GPU_GAUGES = [
    ("trainkit_gpu_utilization_ratio", "GPU busy fraction over the last sample period (0-1)", "utilization_percent", 0.01),
    ("trainkit_gpu_memory_used_bytes", "GPU memory used", "memory_used_bytes", 1),
    ("trainkit_gpu_memory_total_bytes", "GPU memory total", "memory_total_bytes", 1),
    ("trainkit_gpu_temperature_celsius", "GPU temperature", "temperature_c", 1),
    ("trainkit_gpu_power_watts", "GPU power draw", "power_watts", 1),
    ("trainkit_gpu_power_limit_watts", "GPU enforced power limit", "power_limit_watts", 1),
    ("trainkit_gpu_sm_clock_hertz", "GPU SM clock", "sm_clock_mhz", 1e6),
    ("trainkit_gpu_memory_clock_hertz", "GPU memory clock", "memory_clock_mhz", 1e6),
]


def _number(value):
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value == value and value not in (float("inf"), float("-inf")):
        return value
    return None


class DashboardCollector(Collector):
    """Builds every family from the store at scrape time."""

    def __init__(self, store, gpu, alerter, settings):
        self.store, self.gpu, self.alerter, self.settings = store, gpu, alerter, settings

    def exported_runs(self, now: float) -> list[dict]:
        window = self.settings.metrics_window
        stats = []
        for run in self.store.ordered():
            if run.last_activity and now - run.last_activity <= window:
                stats.append(run.stats(self.settings.stall_seconds))
        return stats

    def collect(self):
        now = time.time()
        runs = self.exported_runs(now)
        yield GaugeMetricFamily("trainkit_dashboard_runs", "Run directories under the logdir",
                                value=len(self.store.runs))
        yield GaugeMetricFamily("trainkit_dashboard_exported_runs",
                                "Runs exported here (logs changed within DASHBOARD_METRICS_WINDOW)", value=len(runs))
        alerts = CounterMetricFamily("trainkit_dashboard_alerts", "Webhook alerts by kind and outcome",
                                     labels=["kind", "outcome"])
        with self.alerter.lock:
            for (kind, outcome), count in sorted(self.alerter.counts.items()):
                alerts.add_metric([kind, outcome], count)
        yield alerts

        info = InfoMetricFamily("trainkit_run", "The run's script and model", labels=["run"])
        for s in runs:
            info.add_metric([s["name"]], {"script": str(s.get("script") or ""), "model": str(s.get("model") or "")})
        yield info
        for name, help_text, key, scale in RUN_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["run"])
            for s in runs:
                value = _number(s.get(key))
                if value is not None:
                    family.add_metric([s["name"]], value * scale)
            yield family
        for name, help_text, key in RUN_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["run"])
            for s in runs:
                value = _number(s.get(key))
                if value is not None:
                    family.add_metric([s["name"]], value)
            yield family
        status = GaugeMetricFamily("trainkit_status", "1 for the run's current status, 0 for the others",
                                   labels=["run", "status"])
        for s in runs:
            for name in STATUSES:
                status.add_metric([s["name"], name], float(s["status"] == name))
        yield status
        eval_loss = GaugeMetricFamily("trainkit_eval_loss", "Latest evaluation loss", labels=["run"])
        best = GaugeMetricFamily("trainkit_best_metric", "Best value so far of the metric that ranks checkpoints",
                                 labels=["run", "metric"])
        for s in runs:
            last = s.get("last_eval") or {}
            if _number(last.get("eval_loss")) is not None:
                eval_loss.add_metric([s["name"]], last["eval_loss"])
            top = s.get("best_eval") or {}
            value = _number(top.get("metric_value", top.get("eval_loss")))
            if value is not None:
                best.add_metric([s["name"], str(top.get("metric") or "eval_loss")], value)
        yield eval_loss
        yield best
        skipped = CounterMetricFamily("trainkit_skipped_lines", "Malformed JSONL lines the dashboard skipped",
                                      labels=["run", "stream"])
        for s in runs:
            for stream, reasons in (s.get("skipped_lines") or {}).items():
                skipped.add_metric([s["name"], stream], sum(reasons.values()))
        yield skipped

        snapshot = self.gpu.snapshot(with_history=False)
        yield GaugeMetricFamily("trainkit_gpu_available", "1 when NVML answered", value=float(bool(snapshot.get("available"))))
        gpus = snapshot.get("gpus") or []
        for name, help_text, key, scale in GPU_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["gpu", "name"])
            for g in gpus:
                value = _number(g.get(key))
                if value is not None:
                    family.add_metric([str(g["index"]), str(g.get("name") or "")], value * scale)
            yield family


def init_app(app) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DashboardCollector(app.extensions["dashboard.store"], app.extensions["dashboard.gpu"],
                                         app.extensions["dashboard.alerts"], app.config["DASHBOARD"]))
    app.extensions["dashboard.prometheus"] = registry


def metrics_response() -> Response:
    """The exposition the scraper asked for (Accept: OpenMetrics or the classic text format)."""
    registry = current_app.extensions["dashboard.prometheus"]
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), headers={"Content-Type": content_type})
