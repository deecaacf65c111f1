"""/metrics in the Prometheus text exposition format (version 0.0.4) for Grafana."""

from __future__ import annotations

import math

RUN_GAUGES = [
    # (metric name, help, stats key)
    ("trainkit_step", "Latest logged optimizer step", "step"),
    ("trainkit_total_steps", "Optimizer steps the run will take", "total_steps"),
    ("trainkit_progress_ratio", "step / total_steps", "progress"),
    ("trainkit_loss", "Latest training loss", "loss"),
    ("trainkit_loss_smoothed", "Moving average of the training loss", "loss_smoothed"),
    ("trainkit_learning_rate", "Latest learning rate", "lr"),
    ("trainkit_grad_norm", "Latest gradient norm before clipping", "grad_norm"),
    ("trainkit_tokens_per_second", "Latest throughput in tokens per second (all processes)", "tokens_per_sec"),
    ("trainkit_tokens_total", "Cumulative non-padding tokens seen", "tokens"),
    ("trainkit_eta_seconds", "Estimated seconds to the end of training", "eta_seconds"),
    ("trainkit_memory_allocated_gib", "Device memory allocated (GiB)", "memory_allocated_gb"),
    ("trainkit_memory_peak_gib", "Peak device memory allocated (GiB)", "memory_peak_gb"),
    ("trainkit_errors", "Lines in error_log.jsonl", "errors"),
    ("trainkit_seconds_since_update", "Seconds since the run's logs last changed", "seconds_since_update"),
]
STATUSES = ("running", "finished", "failed", "stalled", "unknown")


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)) and math.isfinite(value):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return None


def render(all_stats: list[dict], gpu: dict) -> str:
    lines = ["# HELP trainkit_dashboard_runs Runs found under the logdir",
             "# TYPE trainkit_dashboard_runs gauge",
             f"trainkit_dashboard_runs {len(all_stats)}"]

    def family(name, help_text, samples):
        samples = [(labels, _number(v)) for labels, v in samples]
        samples = [(labels, v) for labels, v in samples if v is not None]
        if not samples:
            return
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    for name, help_text, key in RUN_GAUGES:
        family(name, help_text, [({"run": s["name"]}, s.get(key)) for s in all_stats])
    family("trainkit_status", "1 for the run's current status",
           [({"run": s["name"], "status": status}, int(s["status"] == status))
            for s in all_stats for status in STATUSES])
    family("trainkit_eval_loss", "Latest evaluation loss",
           [({"run": s["name"]}, (s.get("last_eval") or {}).get("eval_loss")) for s in all_stats])
    family("trainkit_best_metric", "Best evaluation metric so far",
           [({"run": s["name"], "metric": (s.get("best_eval") or {}).get("metric", "eval_loss")},
             (s.get("best_eval") or {}).get("metric_value", (s.get("best_eval") or {}).get("eval_loss")))
            for s in all_stats])
    family("trainkit_skipped_lines", "Malformed JSONL lines skipped by the dashboard",
           [({"run": s["name"], "stream": stream}, sum(reasons.values()))
            for s in all_stats for stream, reasons in (s.get("skipped_lines") or {}).items()])

    family("trainkit_gpu_available", "1 when NVML answered", [({}, int(bool(gpu.get("available"))))])
    gpus = gpu.get("gpus") or []
    for name, help_text, key in [
        ("trainkit_gpu_utilization_percent", "GPU utilization", "utilization_percent"),
        ("trainkit_gpu_memory_used_bytes", "GPU memory used", "memory_used_bytes"),
        ("trainkit_gpu_memory_total_bytes", "GPU memory total", "memory_total_bytes"),
        ("trainkit_gpu_temperature_celsius", "GPU temperature", "temperature_c"),
        ("trainkit_gpu_power_watts", "GPU power draw", "power_watts"),
        ("trainkit_gpu_sm_clock_mhz", "GPU SM clock", "sm_clock_mhz"),
    ]:
        family(name, help_text, [({"gpu": str(g["index"]), "name": g.get("name") or ""}, g.get(key)) for g in gpus])
    return "\n".join(lines) + "\n"
