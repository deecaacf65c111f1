"""The JSON API (/api/*), the live stream, /health and Prometheus /metrics.

Every answer is JSON (PNG for plots, text for /metrics). Unknown runs and names give 404,
bad query parameters 400, both with a JSON body: {"error": ..., "message": ...}.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time

from flask import Blueprint, Response, current_app, jsonify, request, url_for

from . import plots, prometheus
from .downsample import downsample, to_json_list
from .runs import NUMERIC_FIELDS
from trainkit.runlog import json_safe

bp = Blueprint("api", __name__)

KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_KEYS = 16
MAX_POINTS = 10_000
DEFAULT_POINTS = 1_000
STREAM_TABLES = {"training": "training", "eval": "eval", "experts": "experts"}


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra):
        super().__init__(message)
        self.status, self.error, self.message, self.extra = status, error, message, extra


@bp.app_errorhandler(ApiError)
def _api_error(exc: ApiError):
    response = jsonify(error=exc.error, message=exc.message, **exc.extra)
    response.status_code = exc.status
    return response


def store():
    return current_app.extensions["dashboard.store"]


def settings():
    return current_app.config["DASHBOARD"]


def gpu_monitor():
    return current_app.extensions["dashboard.gpu"]


def get_run(name: str):
    run = store().get(name)   # a dict lookup: names are never joined into paths
    if run is None:
        raise ApiError(404, "unknown_run", f"no run named {name!r} under the logdir")
    return run


def latest_run():
    run = store().latest()
    if run is None:
        raise ApiError(404, "no_runs", "no run directories under the logdir yet")
    return run


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be an integer, got {raw!r}")
    if not low <= value <= high:
        raise ApiError(400, "bad_parameter", f"{name} must be between {low} and {high}, got {value}")
    return value


def float_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be a number, got {raw!r}")
    if not math.isfinite(value):
        raise ApiError(400, "bad_parameter", f"{name} must be finite, got {raw!r}")
    return value


# ----- health, runs, stats ------------------------------------------------------------
@bp.get("/health")
def health():
    runs = store()
    return jsonify(status="ok", runs=len(runs.runs), uptime_seconds=round(time.time() - runs.started_at, 3),
                   reader_passes=runs.passes,
                   indexing_done=all(r.first_pass_done for r in runs.runs.values()))


@bp.get("/api/runs")
def list_runs():
    runs = store()
    return jsonify(logdir=str(runs.logdir), runs_version=runs.runs_version,
                   runs=[r.summary(settings().stall_seconds) for r in runs.ordered()])


@bp.get("/api/runs/<run_name>")
def run_info(run_name):
    run = get_run(run_name)
    with run.lock:
        return jsonify(**run.summary(settings().stall_seconds), info=run.info)


@bp.get("/api/runs/<run_name>/stats")
def run_stats(run_name):
    return jsonify(get_run(run_name).stats(settings().stall_seconds))


# ----- metrics ---------------------------------------------------------------------------
@bp.get("/api/runs/<run_name>/metrics")
def run_metrics(run_name):
    run = get_run(run_name)
    stream = request.args.get("stream", "training")
    if stream not in STREAM_TABLES:
        raise ApiError(400, "bad_parameter", f"stream must be one of {sorted(STREAM_TABLES)}")
    keys = [k.strip() for k in request.args.get("keys", "loss").split(",") if k.strip()]
    if not keys or len(keys) > MAX_KEYS:
        raise ApiError(400, "bad_parameter", f"keys must name 1 to {MAX_KEYS} fields")
    for key in keys:
        if not KEY_RE.match(key):
            raise ApiError(400, "bad_parameter", f"bad key {key!r}")
    since_step = float_arg("since_step")
    max_points = int_arg("max_points", DEFAULT_POINTS, 3, MAX_POINTS)
    with run.lock:
        table = getattr(run, STREAM_TABLES[stream])
        known = set(table.keys) | NUMERIC_FIELDS[stream]
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ApiError(400, "unknown_key", f"unknown key(s) {unknown} in stream {stream!r}",
                           available=sorted(set(table.keys) - {"step"}))
        start = table.index_after(since_step) if since_step is not None else 0
        steps = table.steps[start:]
        data = downsample(steps, {k: table.column(k)[start:] for k in keys}, max_points)
        total = len(table)
        last_step = float(table.steps[-1]) if total else None
    return jsonify(run=run.name, stream=stream, keys=keys, since_step=since_step, max_points=max_points,
                   points=len(data["step"]), rows=len(steps), total_rows=total, last_step=last_step,
                   downsampled=data["downsampled"], step=to_json_list(data["step"]),
                   series={k: {part: to_json_list(v) for part, v in s.items()} for k, s in data["series"].items()})


# ----- plots ------------------------------------------------------------------------------
def _plot_version(run, name: str) -> str:
    streams = plots.PLOTS[name][1]
    return "-".join(str(run.versions[s]) for s in streams)


def _plot_index(run):
    return [{"name": name, "title": title,
             "url": url_for("api.run_plot", run_name=run.name, plot_name=name, v=_plot_version(run, name))}
            for name, (title, _) in plots.PLOTS.items()]


@bp.get("/api/runs/<run_name>/plots")
def run_plots(run_name):
    run = get_run(run_name)
    return jsonify(run=run.name, plots=_plot_index(run))


def _png(png: bytes) -> Response:
    etag = hashlib.blake2b(png, digest_size=12).hexdigest()
    if request.if_none_match.contains(etag):
        response = Response(status=304)
    else:
        response = Response(png, mimetype="image/png")
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/api/runs/<run_name>/plots/<plot_name>.png")
def run_plot(run_name, plot_name):
    run = get_run(run_name)
    if plot_name not in plots.PLOTS:
        raise ApiError(404, "unknown_plot", f"no plot named {plot_name!r}", available=sorted(plots.PLOTS))
    return _png(plots.render(run, plot_name))


def _compare_args():
    names = [n for n in request.args.get("runs", "").split(",") if n]
    if not names:
        names = [r.name for r in store().ordered()[:4]]
    if len(names) > 12:
        raise ApiError(400, "bad_parameter", "compare at most 12 runs")
    key = request.args.get("key", "loss")
    stream = request.args.get("stream", "training")
    if stream not in ("training", "eval"):
        raise ApiError(400, "bad_parameter", "stream must be training or eval")
    if not KEY_RE.match(key):
        raise ApiError(400, "bad_parameter", f"bad key {key!r}")
    return [get_run(n) for n in dict.fromkeys(names)], key, stream


@bp.get("/api/compare")
def compare():
    runs, key, stream = _compare_args()
    max_points = int_arg("max_points", DEFAULT_POINTS, 3, MAX_POINTS)
    out = {}
    for run in runs:
        with run.lock:
            table = getattr(run, stream)
            data = downsample(table.steps, {key: table.column(key)}, max_points)
        out[run.name] = {"step": to_json_list(data["step"]),
                         "value": to_json_list(data["series"][key]["value"])}
    return jsonify(key=key, stream=stream, runs=out)


@bp.get("/api/compare.png")
def compare_png():
    runs, key, stream = _compare_args()
    return _png(plots.render_compare(runs, key, stream))


# ----- checkpoints, events, errors, experts ----------------------------------------
@bp.get("/api/runs/<run_name>/checkpoints")
def run_checkpoints(run_name):
    run = get_run(run_name)
    with run.lock:
        rows = [dict(c) for c in run.checkpoints]
        best = next((c["step"] for c in rows if c["is_best"]), None)
        return jsonify(run=run.name, checkpoints=rows, best_step=best,
                       best_adapter=bool(getattr(run, "best_adapter", False)))


@bp.get("/api/runs/<run_name>/events")
def run_events(run_name):
    run = get_run(run_name)
    since = float_arg("since")
    limit = int_arg("limit", 200, 1, 5000)
    kind = request.args.get("event")
    with run.lock:
        events = [e for e in run.events
                  if (since is None or (isinstance(e.get("time"), (int, float)) and e["time"] > since))
                  and (kind is None or e.get("event") == kind)]
        total = run.event_count
    latest = max((e["time"] for e in events if isinstance(e.get("time"), (int, float))), default=since)
    return jsonify(run=run.name, total=total, returned=len(events[-limit:]), latest_time=latest,
                   events=events[-limit:])


@bp.get("/api/runs/<run_name>/errors")
def run_errors(run_name):
    run = get_run(run_name)
    limit = int_arg("limit", 100, 1, 1000)
    with run.lock:
        errors = list(run.errors)[-limit:]
        return jsonify(run=run.name, total=run.error_count, fatal_error=run.info.get("error"),
                       status=run.status(settings().stall_seconds), errors=errors)


@bp.get("/api/runs/<run_name>/experts")
def run_experts(run_name):
    run = get_run(run_name)
    with run.lock:
        table = run.experts
        history = {k: to_json_list(table.column(k)) for k in
                   ("mean_load_imbalance", "total_dead_experts", "tokens_routed")}
        return jsonify(run=run.name, is_moe=len(table) > 0, snapshots=len(table),
                       num_experts=table.last("num_experts"), top_k=table.last("top_k"),
                       latest={"step": getattr(run, "expert_latest_step", None), "layers": run.expert_layers},
                       history={"step": to_json_list(table.steps), **history})


# ----- GPU, Prometheus ----------------------------------------------------------------------
@bp.get("/api/gpu")
def gpu():
    history = request.args.get("history", "1") not in ("0", "false", "no")
    return jsonify(gpu_monitor().snapshot(with_history=history))


@bp.get("/metrics")
def prometheus_metrics():
    stall = settings().stall_seconds
    all_stats = [run.stats(stall) for run in store().ordered()]
    text = prometheus.render(all_stats, gpu_monitor().snapshot(with_history=False))
    return Response(text, mimetype="text/plain; version=0.0.4; charset=utf-8")


# ----- live stream (server-sent events) ----------------------------------------------------
def init_streams(app) -> None:
    app.extensions["dashboard.streams"] = threading.BoundedSemaphore(max(1, app.config["DASHBOARD"].max_streams))


def _sse(event: str, payload: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'), default=str)}\n\n"


def _stream_response(run_name: str | None):
    runs = store()
    if run_name is not None:
        get_run(run_name)
    slots = current_app.extensions["dashboard.streams"]
    if not slots.acquire(blocking=False):
        raise ApiError(503, "too_many_streams", "too many live streams open; poll /api/runs/<run>/stats instead")
    config = settings()
    app = current_app._get_current_object()

    def generate():
        try:
            yield "retry: 2000\n\n"
            ends = time.monotonic() + config.stream_seconds
            last_key, last_ping = None, time.monotonic()
            while time.monotonic() < ends and not runs.stopping.is_set():
                run = runs.get(run_name) if run_name is not None else runs.latest()
                key = (runs.runs_version, run.name if run else None, tuple(run.versions.values()) if run else None)
                if run_name is not None and run is None:
                    yield _sse("gone", {"run": run_name})
                    return
                if key != last_key:
                    last_key = key
                    with app.app_context():
                        stats = run.stats(config.stall_seconds) if run else None
                    yield _sse("update", {"run": run.name if run else None, "runs_version": runs.runs_version,
                                          "stats": json_safe(stats)})
                elif time.monotonic() - last_ping > 15:
                    last_ping = time.monotonic()
                    yield ": ping\n\n"
                runs.wait_for_pass(timeout=max(config.poll_interval * 4, 1.0))
            yield _sse("bye", {"reconnect": True})
        finally:
            slots.release()

    response = Response(generate(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"   # nginx in front: do not buffer the stream
    return response


@bp.get("/api/stream")
def stream_latest():
    run = request.args.get("run")
    return _stream_response(run or None)


@bp.get("/api/runs/<run_name>/stream")
def stream_run(run_name):
    return _stream_response(run_name)


# ----- the older single-run dashboard's endpoints: they answer for the most recent run --------
@bp.get("/api/stats")
def legacy_stats():
    return run_stats(latest_run().name)


@bp.get("/api/plots")
def legacy_plots():
    return run_plots(latest_run().name)


@bp.get("/api/checkpoints")
def legacy_checkpoints():
    return run_checkpoints(latest_run().name)


@bp.get("/api/events")
def legacy_events():
    return run_events(latest_run().name)


@bp.get("/api/errors")
def legacy_errors():
    return run_errors(latest_run().name)


