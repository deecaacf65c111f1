"""The JSON API (/api/*), the live stream, /health and Prometheus /metrics.

Every answer is JSON (PNG for plots, text for /metrics). Unknown runs and names give 404,
bad query parameters 400, both with a JSON body: {"error": ..., "message": ...}.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import select
import ssl
import socket
import threading
import time

from flask import Blueprint, Response, current_app, jsonify, request, url_for

from . import plots, prometheus
from .downsample import to_json_list
from .runs import NUMERIC_FIELDS, int_if_whole
from trainkit.config import redact
from trainkit.fileio import json_safe
from trainkit.runlog import DISTILL_TRAINING_FIELDS

bp = Blueprint("api", __name__)

KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_KEYS = 16
MAX_POINTS = 10_000
DEFAULT_POINTS = 1_000
MAX_COMPARE = 12
MAX_LAYER_SNAPSHOTS = 1_000   # per-layer expert history: at most this many snapshots, evenly spaced
STREAM_TABLES = {"training": "training", "eval": "eval", "experts": "experts"}
# fields a run of the contract may log (a query for one it has not logged yet gets nulls, not a 400)
CONTRACT_KEYS = {"training": NUMERIC_FIELDS["training"] | set(DISTILL_TRAINING_FIELDS),
                 "eval": NUMERIC_FIELDS["eval"] | {"is_best"} | set(plots.METRIC_COLUMNS),
                 "experts": NUMERIC_FIELDS["experts"]}


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
                   indexing_done=all(r.first_pass_done for r in runs.runs.values()),
                   streams_open=current_app.extensions["dashboard.streams"].open)


@bp.get("/api/runs")
def list_runs():
    runs = store()
    return jsonify(logdir=str(runs.logdir), runs_version=runs.runs_version,
                   runs=[r.summary(settings().stall_seconds) for r in runs.ordered()])


@bp.get("/api/runs/<run_name>")
def run_info(run_name):
    run = get_run(run_name)
    with run.lock:
        return jsonify(**run.summary(settings().stall_seconds), info=redact(run.info, whole=True))   # also run.json files other tools wrote


@bp.get("/api/runs/<run_name>/stats")
def run_stats(run_name):
    return jsonify(get_run(run_name).stats(settings().stall_seconds))


# ----- metrics ---------------------------------------------------------------------------
def parse_keys(raw: str) -> list[str]:
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if not keys or len(keys) > MAX_KEYS:
        raise ApiError(400, "bad_parameter", f"keys must name 1 to {MAX_KEYS} fields")
    for key in keys:
        if not KEY_RE.match(key):
            raise ApiError(400, "bad_parameter", f"bad key {key!r}")
    return list(dict.fromkeys(keys))


def series_json(data: dict) -> dict:
    return {"step": to_json_list(data["step"]), "downsampled": data["downsampled"], "bucket_rows": data["bucket_rows"],
            "series": {k: {part: to_json_list(v) for part, v in s.items()} for k, s in data["series"].items()}}


def row_range(table, since_step, start_step, end_step) -> tuple[int, int]:
    """Rows with step > since_step and start_step <= step <= end_step."""
    start = table.index_after(since_step) if since_step is not None else 0
    if start_step is not None:
        start = max(start, table.index_at_or_after(start_step))
    end = table.index_after(end_step) if end_step is not None else len(table)
    return start, max(start, end)


@bp.get("/api/runs/<run_name>/metrics")
def run_metrics(run_name):
    run = get_run(run_name)
    stream = request.args.get("stream", "training")
    if stream not in STREAM_TABLES:
        raise ApiError(400, "bad_parameter", f"stream must be one of {sorted(STREAM_TABLES)}")
    keys = parse_keys(request.args.get("keys", "loss"))
    since_step, start_step, end_step = float_arg("since_step"), float_arg("start_step"), float_arg("end_step")
    max_points = int_arg("max_points", DEFAULT_POINTS, 3, MAX_POINTS)
    with run.lock:
        table = getattr(run, STREAM_TABLES[stream])
        known = set(table.keys) | CONTRACT_KEYS[stream]
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ApiError(400, "unknown_key", f"unknown key(s) {unknown} in stream {stream!r}",
                           available=sorted(set(table.keys) - {"step"}))
        start, end = row_range(table, since_step, start_step, end_step)
        data = table.downsample(keys, max_points, start, end)
        total = len(table)
        last_step = float(table.steps[-1]) if total else None
        generation = table.generation
    return jsonify(run=run.name, stream=stream, keys=keys, since_step=since_step, start_step=start_step,
                   end_step=end_step, max_points=max_points, points=len(data["step"]), rows=end - start,
                   total_rows=total, last_step=last_step, generation=generation, **series_json(data))


@bp.get("/api/runs/<run_name>/keys")
def run_keys(run_name):
    """The numeric fields each stream of the run has logged (what /metrics and compare can show)."""
    run = get_run(run_name)
    with run.lock:
        return jsonify(run=run.name, **{stream: sorted(set(getattr(run, table).keys) - {"step"})
                                        for stream, table in STREAM_TABLES.items()})


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
    smoothing = float_arg("smoothing")
    if smoothing is not None and not 0 <= smoothing < 1:
        raise ApiError(400, "bad_parameter", f"smoothing must be in [0, 1), got {smoothing}")
    log_y = request.args.get("log_y", "0")
    if log_y not in ("0", "1"):
        raise ApiError(400, "bad_parameter", f"log_y must be 0 or 1, got {log_y!r}")
    return _png(plots.render(run, plot_name, plots.DEFAULT_SMOOTHING if smoothing is None else smoothing, log_y == "1"))


def _compare_args():
    """Runs from repeated ``run=`` parameters (any name, commas included), else from the older
    comma-separated ``runs=`` (names without commas), else the 4 newest."""
    names = [n for n in request.args.getlist("run") if n]
    if not names:
        names = [n for n in request.args.get("runs", "").split(",") if n]
    if not names:
        names = [r.name for r in store().ordered()[:4]]
    names = list(dict.fromkeys(names))
    if len(names) > MAX_COMPARE:
        raise ApiError(400, "bad_parameter", f"compare at most {MAX_COMPARE} runs, got {len(names)}")
    key = request.args.get("key", "loss")
    stream = request.args.get("stream", "training")
    if stream not in ("training", "eval"):
        raise ApiError(400, "bad_parameter", "stream must be training or eval")
    if not KEY_RE.match(key):
        raise ApiError(400, "bad_parameter", f"bad key {key!r}")
    runs = [store().get(n) for n in names]
    missing = [n for n, r in zip(names, runs) if r is None]
    if missing:
        raise ApiError(404, "unknown_run", f"no run named {', '.join(map(repr, missing))} under the logdir",
                       unknown=missing)
    return runs, key, stream


@bp.get("/api/compare")
def compare():
    runs, key, stream = _compare_args()
    max_points = int_arg("max_points", DEFAULT_POINTS, 3, MAX_POINTS)
    out, without = {}, []
    for run in runs:
        with run.lock:
            table = getattr(run, stream)
            if key not in table.columns:
                without.append(run.name)
            data = table.downsample([key], max_points)
        series = data["series"][key]
        out[run.name] = {"step": to_json_list(data["step"]), "value": to_json_list(series["value"]),
                         "min": to_json_list(series["min"]), "max": to_json_list(series["max"]),
                         "bucket_rows": data["bucket_rows"]}
    if len(without) == len(runs) and key not in CONTRACT_KEYS[stream]:
        raise ApiError(400, "unknown_key", f"none of the runs logged {key!r} in stream {stream!r}")
    return jsonify(key=key, stream=stream, runs=out, without_key=without)


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
        per_layer = sorted(run.expert_layer_imbalance.items())
        stride = max(1, -(-len(per_layer) // MAX_LAYER_SNAPSHOTS))   # every stride-th snapshot
        per_layer = per_layer[::stride] + ([per_layer[-1]] if per_layer and (len(per_layer) - 1) % stride else [])
        layers = max((len(v) for _, v in per_layer), default=0)
        return jsonify(run=run.name, is_moe=len(table) > 0, snapshots=len(table),
                       num_experts=int_if_whole(table.last("num_experts")), top_k=int_if_whole(table.last("top_k")),
                       latest={"step": int_if_whole(getattr(run, "expert_latest_step", None)),
                               "layers": run.expert_layers},
                       history={"step": to_json_list(table.steps), **history},
                       layer_history={"step": [s for s, _ in per_layer],
                                      "load_imbalance": [[v[i] if i < len(v) else None for _, v in per_layer]
                                                         for i in range(layers)]})


# ----- GPU, Prometheus ----------------------------------------------------------------------
@bp.get("/api/gpu")
def gpu():
    history = request.args.get("history", "1") not in ("0", "false", "no")
    return jsonify(gpu_monitor().snapshot(with_history=history))


@bp.get("/metrics")
def prometheus_metrics():
    return prometheus.metrics_response()


@bp.get("/api/alerts")
def alerts():
    """Alerts sent (or tried) since the dashboard started, oldest first."""
    return jsonify(current_app.extensions["dashboard.alerts"].snapshot())


# ----- live stream (server-sent events) ----------------------------------------------------
class StreamSlots:
    """At most ``limit`` live streams at once (each holds a server thread)."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.open = 0
        self.lock = threading.Lock()

    def acquire(self) -> bool:
        with self.lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.open -= 1


def init_streams(app) -> None:
    app.extensions["dashboard.streams"] = StreamSlots(app.config["DASHBOARD"].max_streams)


def _sse(event: str, payload: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'), default=str)}\n\n"


def client_socket(environ):
    """The client's socket where the server tells it (werkzeug, gunicorn); None behind TLS or elsewhere."""
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    return sock if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket) else None


def client_gone(sock) -> bool:
    """True once the client closed its end. An EventSource never sends after its request, so a
    readable socket with nothing to read (EOF) means it left; without this check a quiet stream
    only noticed at its next write (the 15 s ping), holding its slot that long."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _stream_response(run_name: str | None):
    runs = store()
    if run_name is not None:
        get_run(run_name)
    slots = current_app.extensions["dashboard.streams"]
    if not slots.acquire():
        raise ApiError(503, "too_many_streams", "too many live streams open; poll /api/runs/<run>/stats instead")
    config = settings()
    app = current_app._get_current_object()
    sock = client_socket(request.environ)

    def generate():
        try:
            yield "retry: 2000\n\n"
            ends = time.monotonic() + config.stream_seconds
            last_key, last_ping = None, time.monotonic()
            while time.monotonic() < ends and not runs.stopping.is_set() and not client_gone(sock):
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
                runs.wait_for_pass(timeout=max(config.poll_interval * 2, 1.0))
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


