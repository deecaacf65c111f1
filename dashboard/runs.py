"""The runs under the logdir and what their logs say, kept up to date by one reader thread.

Requests never touch the files: a background thread looks at the logdir every
``poll_interval`` seconds, reads only the bytes appended since its last look, and
updates the in-memory state of each run under that run's lock. Requests take the lock
for the few milliseconds a query needs.

Run names in URLs are only ever looked up in the dict of discovered runs, so no request
can name a path; every file is opened only if its real path is inside the logdir. A
directory name that is not valid UTF-8 gets a printable name (its odd bytes as ``\\xff``);
the dict maps that name to the real path.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from trainkit.fileio import read_json
from trainkit.runlog import (BEST_ADAPTER_DIR, CHECKPOINT_PREFIX, FINAL_CHECKPOINT_PREFIX, LOGS_DIR,
                             NAN_FIELDS, RUN_INFO_FILE, STREAMS, TRAINER_STATE_FILE, TRAINING_FIELDS)

from .diagnosis import describe_failure
from .logreader import JsonlTail, is_number
from .series import SeriesTable

log = logging.getLogger(__name__)

MAX_EVENTS = 20_000        # newest events kept per run
MAX_ERRORS = 1_000
MAX_TRACEBACK_CHARS = 64_000
SMOOTHING_WINDOW = 25      # logged lines in the moving average of the loss
CHECKPOINT_SCAN_SECONDS = 3.0
CHECKPOINT_RE = re.compile(rf"^(?:{FINAL_CHECKPOINT_PREFIX}|{CHECKPOINT_PREFIX})(\d+)$")
# Steps are optimizer steps; above 2**53 a float64 cannot even hold them exactly. A line with
# such a step (e.g. "step": 1e308) is corrupt: taking it would make every later line look like
# a resume that drops it.
MAX_STEP = 2.0 ** 53
MAX_NAN_FIELDS = 64        # names kept per eval line (a line has a few metrics)

# numeric fields that must be a number or null, else the line is skipped as "wrong_type"
NUMERIC_FIELDS = {
    "training": set(TRAINING_FIELDS) - {"step"},
    "eval": {"time", "eval_loss", "perplexity", "eval_tokens", "eval_seconds", "metric_value"},
    "experts": {"time", "num_experts", "top_k", "tokens_routed", "mean_load_imbalance", "total_dead_experts"},
    "errors": {"time"},
    "events": {"time"},
}
TEXT_FIELDS = {"events": {"event", "message"}, "errors": {"type", "message"}, "eval": {"metric"}}


def make_validator(stream: str):
    numeric, text = NUMERIC_FIELDS[stream], TEXT_FIELDS.get(stream, set())
    number_types = {int, float}   # exact types: a bool is not a number here

    def validate(obj: dict) -> str | None:
        # runs once per line of a million-line log: type() checks, no isinstance chains
        step = obj.get("step")
        if type(step) not in number_types or not 0 <= step <= MAX_STEP:   # nan and inf fail the comparison
            return "bad_step"
        for key in numeric.intersection(obj):
            value = obj[key]
            kind = type(value)
            if kind is float:
                if value - value != 0:          # inf or nan (e.g. 1e999 parses as inf)
                    return "wrong_type"
            elif kind is not int and value is not None:
                return "wrong_type"
        for key in text.intersection(obj):
            if obj[key] is not None and not isinstance(obj[key], str):
                return "wrong_type"
        if stream == "events" and not isinstance(obj.get("event"), str):
            return "wrong_type"
        if stream == "experts" and not isinstance(obj.get("layers", []), list):
            return "wrong_type"
        return None
    return validate


class RunState:
    """Everything the dashboard knows about one run directory."""

    def __init__(self, name: str, path: Path, inside) -> None:
        self.name = name
        self.path = path
        self.inside = inside
        self.lock = threading.RLock()
        self.info: dict = {}
        self.info_stat: tuple | None = None
        self.tails = {stream: JsonlTail(path / LOGS_DIR / filename, make_validator(stream), inside)
                      for stream, filename in STREAMS.items()}
        self.training = SeriesTable()
        self.eval = SeriesTable()
        self.experts = SeriesTable()          # scalar summary per snapshot
        self.eval_nan_fields: dict[float, list[str]] = {}  # step -> fields the eval line logged as NaN (undefined)
        self.expert_layers: list[dict] = []   # per-layer detail of the latest snapshot
        self.expert_layer_imbalance: dict[float, list] = {}  # step -> per-layer imbalance
        self.events: deque = deque(maxlen=MAX_EVENTS)
        self.errors: deque = deque(maxlen=MAX_ERRORS)
        self.event_count = 0
        self.error_count = 0
        self.attempt = 1
        self.last_stop: dict | None = None    # the latest "stop" event (reason finished / failed / nan_limit ...)
        self.last_preempted: dict | None = None   # the latest "preempted" event of the current attempt
        self.last_fatal: dict | None = None   # the latest error line with fatal: true
        self.checkpoints: list[dict] = []
        self.checkpoint_cache: dict[str, tuple] = {}
        self.checkpoints_scanned = 0.0
        self.versions = {stream: 0 for stream in STREAMS} | {"info": 0, "checkpoints": 0}
        self.last_activity = 0.0              # newest mtime of run.json and the logs
        self.first_pass_done = False

    # ----- reading ---------------------------------------------------------------------
    def update(self, deadline: float) -> bool:
        """Read what is new; returns True when it stopped at the deadline with work left."""
        self._read_info()
        left = False
        for stream, tail in self.tails.items():
            while True:
                batch = tail.poll()
                if batch.reset or batch.records:
                    with self.lock:
                        if batch.reset:
                            self._clear(stream)
                        self._apply(stream, batch.records)
                        self.versions[stream] += 1
                if tail.mtime_ns:
                    self.last_activity = max(self.last_activity, tail.mtime_ns / 1e9)
                if not batch.more:
                    break
                if time.monotonic() > deadline:
                    left = True
                    break
        if time.monotonic() - self.checkpoints_scanned > CHECKPOINT_SCAN_SECONDS or self._checkpoint_events_changed():
            self._scan_checkpoints()
        if not left and not self.first_pass_done:
            self.first_pass_done = True
            with self.lock:
                for table in (self.training, self.eval, self.experts):
                    table.trim()
        return left

    def read_header(self) -> None:
        """What orders the runs (run.json's start time, the logs' mtimes), read when the run is
        found: a stream opened before the reader's first pass otherwise followed an arbitrary run
        as "latest" (start times unknown), as CI saw once in test_start_dashboard_sh_prefers_gunicorn."""
        self._read_info()
        for tail in self.tails.values():
            try:
                if self.inside(tail.path):
                    self.last_activity = max(self.last_activity, os.stat(tail.path).st_mtime)
            except OSError:
                pass

    def _read_info(self) -> None:
        path = self.path / RUN_INFO_FILE
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                # a run.json linked from outside the logdir is neither read nor allowed to move
                # last_activity (its mtime would tell what happens outside)
                if not self.inside(path):
                    return
                st = os.stat(path)
        except OSError:
            return
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.last_activity = max(self.last_activity, st.st_mtime)
        if key == self.info_stat:
            return
        info = read_json(path, default=None)
        if isinstance(info, dict):
            with self.lock:
                self.info = info
                self.info_stat = key
                self.versions["info"] += 1

    def _clear(self, stream: str) -> None:
        if stream == "training":
            self.training.clear()
        elif stream == "eval":
            self.eval.clear()
            self.eval_nan_fields = {}
        elif stream == "experts":
            self.experts.clear()
            self.expert_layers = []
            self.expert_layer_imbalance = {}
        elif stream == "events":
            self.events.clear()
            self.event_count = 0
            self.attempt = 1
            self.last_stop = None
            self.last_preempted = None
        elif stream == "errors":
            self.errors.clear()
            self.error_count = 0
            self.last_fatal = None

    def _apply(self, stream: str, records: list[dict]) -> None:
        if stream == "training":
            tail = self.tails[stream]
            if not len(self.training) and records and tail.size > 2 * tail.offset:
                # a long log read from the start: size the columns once instead of growing them
                self.training.reserve(int(tail.size / tail.offset * len(records) * 1.05))
            self.training.append(records)
        elif stream == "eval":
            self.eval.append(records)
            self._apply_nan_fields(records)
        elif stream == "experts":
            self._apply_experts(records)
        elif stream == "events":
            # events and errors are a history, not a series: a resume does not erase them
            for record in records:
                if record.get("event") == "resume":
                    self.attempt += 1
                    self.last_stop = None
                    self.last_preempted = None
                elif record.get("event") == "stop":
                    self.last_stop = record
                elif record.get("event") == "preempted":
                    self.last_preempted = record
                self.events.append({**record, "attempt": self.attempt})
            self.event_count += len(records)
        elif stream == "errors":
            for record in records:
                traceback = record.get("traceback")
                if isinstance(traceback, str) and len(traceback) > MAX_TRACEBACK_CHARS:
                    record["traceback"] = traceback[-MAX_TRACEBACK_CHARS:]
                if record.get("fatal") is True:
                    self.last_fatal = record
                self.errors.append(record)
            self.error_count += len(records)

    def _apply_nan_fields(self, records: list[dict]) -> None:
        """Which fields of each eval line were NaN (trainkit.runlog: null + nan_fields): a chart
        shows a gap either way, the page says "undefined" for these instead of "missing"."""
        for record in records:
            step = float(record["step"])
            names = record.get(NAN_FIELDS)
            if isinstance(names, list) and names:
                self.eval_nan_fields[step] = [str(n)[:100] for n in names[:MAX_NAN_FIELDS]]
            else:
                self.eval_nan_fields.pop(step, None)  # a later line at the same step replaces the row
        if self.eval_nan_fields and self.eval.resumes:  # drop the steps a resume dropped
            keep = set(self.eval.steps.tolist())
            self.eval_nan_fields = {s: v for s, v in self.eval_nan_fields.items() if s in keep}

    def _apply_experts(self, records: list[dict]) -> None:
        summaries = []
        for record in records:
            layers = [layer for layer in record.get("layers") or [] if isinstance(layer, dict)]
            imbalance = [layer.get("load_imbalance") if is_number(layer.get("load_imbalance")) else None
                         for layer in layers]
            summaries.append({k: v for k, v in record.items() if k != "layers"})
            self.expert_layer_imbalance[float(record["step"])] = imbalance
            if layers:
                self.expert_layers = layers
                self.expert_latest_step = record["step"]
        self.experts.append(summaries)
        if self.experts.resumes:   # drop per-layer history of the earlier attempt
            keep = set(self.experts.steps.tolist())
            self.expert_layer_imbalance = {s: v for s, v in self.expert_layer_imbalance.items() if s in keep}

    def _checkpoint_events_changed(self) -> bool:
        return self.versions["events"] != getattr(self, "_checkpoint_events_version", -1)

    def _scan_checkpoints(self) -> None:
        self.checkpoints_scanned = time.monotonic()
        self._checkpoint_events_version = self.versions["events"]
        on_disk = {}
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            entries = []
        for entry in entries:
            match = CHECKPOINT_RE.match(entry.name)
            if not match or not entry.is_dir() or not self.inside(Path(entry.path)):
                continue
            try:
                mtime = entry.stat().st_mtime_ns
            except OSError:
                continue
            cached = self.checkpoint_cache.get(entry.name)
            if cached is None or cached[0] != mtime:
                state_path = Path(entry.path) / TRAINER_STATE_FILE
                state = (read_json(state_path, default={}) or {}) if self.inside(state_path) else {}
                cached = (mtime, state if isinstance(state, dict) else {}, _dir_size(Path(entry.path)))
                self.checkpoint_cache[entry.name] = cached
            on_disk[entry.name] = (int(match.group(1)), cached)
        with self.lock:
            saved, deleted, best_step = {}, set(), None
            for event in self.events:
                name = Path(str(event.get("path", ""))).name
                if event.get("event") == "checkpoint_saved" and name:
                    saved[name] = event
                elif event.get("event") == "checkpoint_deleted" and name:
                    deleted.add(name)
                elif event.get("event") == "new_best":
                    best_step = event.get("step")
            if best_step is None and len(self.eval):
                best = np.flatnonzero(self.eval.column("is_best") > 0)
                best_step = float(self.eval.steps[best[-1]]) if best.size else None
        rows = []
        for name in set(on_disk) | set(saved) | deleted:
            match = CHECKPOINT_RE.match(name)
            if not match:
                continue
            step = int(match.group(1))
            event = saved.get(name, {})
            _, state, size = on_disk[name][1] if name in on_disk else (None, {}, None)
            metric_value = state.get("metric_value", event.get("metric_value"))
            rows.append({
                "name": name, "step": step,
                "metric_name": state.get("metric_name", event.get("metric")),
                "metric_value": metric_value if is_number(metric_value) else None,
                "size_bytes": size if size is not None else event.get("size_bytes"),
                "time": event.get("time"),
                "state": "kept" if name in on_disk else "deleted",
                "final": name.startswith(FINAL_CHECKPOINT_PREFIX),
                "is_best": best_step is not None and step == best_step,
            })
        rows.sort(key=lambda r: (r["step"], r["final"]))
        best_adapter = (self.path / BEST_ADAPTER_DIR).is_dir()
        with self.lock:
            if rows != self.checkpoints or best_adapter != getattr(self, "best_adapter", None):
                self.checkpoints = rows
                self.best_adapter = best_adapter
                self.versions["checkpoints"] += 1

    # ----- answers ---------------------------------------------------------------------
    def status(self, stall_seconds: float, now: float | None = None) -> str:
        status = self.info.get("status")
        if status not in ("running", "finished", "failed", "preempted"):
            status = "unknown"
        now = time.time() if now is None else now
        if status == "running" and self.last_activity and now - self.last_activity > stall_seconds:
            return "stalled"
        return status

    def start_time(self) -> float:
        for key in ("last_start_time", "start_time"):
            if is_number(self.info.get(key)):
                return float(self.info[key])
        return self.last_activity

    def summary(self, stall_seconds: float) -> dict:
        with self.lock:
            last = self.training.last_row()
            model = self.info.get("model") if isinstance(self.info.get("model"), dict) else {}
            total = self.info.get("total_steps") if is_number(self.info.get("total_steps")) else last.get("total_steps")
            return {
                "name": self.name,
                "status": self.status(stall_seconds),
                "script": self.info.get("script"),
                "model": model.get("name"),
                "is_moe": bool(model.get("is_moe")) or len(self.experts) > 0,
                "step": int_if_whole(last.get("step")),
                "total_steps": total,
                "start_time": self.start_time() or None,
                "last_activity": self.last_activity or None,
                "versions": dict(self.versions),
            }

    def stats(self, stall_seconds: float) -> dict:
        now = time.time()
        with self.lock:
            summary = self.summary(stall_seconds)
            training = self.training
            last = training.last_row()
            losses = training.column("loss")[-SMOOTHING_WINDOW:]
            finite = losses[np.isfinite(losses)]
            step, total = summary["step"], summary["total_steps"]
            eta = last.get("eta_seconds")
            if eta is None and step is not None and total and len(training) > 1:
                eta = self._eta_from_rate(total - step)
            if eta is not None and "time" in last:
                eta = max(0.0, eta - max(0.0, now - last["time"]))  # the line is some seconds old
            stats = {
                **summary,
                "progress": (min(1.0, step / total) if step is not None and total else None),
                "eta_seconds": eta,
                "epoch": last.get("epoch"),
                "loss": training.last("loss"),
                "loss_smoothed": float(finite.mean()) if finite.size else None,
                "smoothing_window": SMOOTHING_WINDOW,
                "lr": training.last("lr"),
                "grad_norm": training.last("grad_norm"),
                "tokens": training.last("tokens"),
                "tokens_per_sec": training.last("tokens_per_sec"),
                "step_time": training.last("step_time"),
                "memory_allocated_gb": training.last("memory_allocated_gb"),
                "memory_peak_gb": training.last("memory_peak_gb"),
                "router_aux_loss": training.last("router_aux_loss"),
                "logged_steps": len(training),
                "last_log_time": last.get("time"),
                "seconds_since_update": (now - self.last_activity) if self.last_activity else None,
                "best_eval": self.best_eval(),
                "last_eval": self.eval_row(len(self.eval) - 1),
                "evals": len(self.eval),
                "checkpoints": sum(1 for c in self.checkpoints if c["state"] == "kept"),
                "best_adapter": bool(getattr(self, "best_adapter", False)),
                "errors": self.error_count,
                "fatal_error": self.info.get("error"),
                "events": self.event_count,
                "resumes": [dict(r) for r in training.resumes],
                "attempt": self.attempt,
                "skipped_lines": {s: dict(t.skipped) for s, t in self.tails.items() if t.skipped},
                "indexing": self.indexing(),
            }
            stats["failure"] = describe_failure(self.info, summary["status"], self.last_stop, self.last_fatal,
                                                self.last_activity, stall_seconds, now, preempted=self.last_preempted)
            return stats

    def _eta_from_rate(self, remaining_steps: float) -> float | None:
        """Seconds left at the pace of the last logged lines (when the trainer logs no ETA)."""
        steps = self.training.steps[-50:]
        times = self.training.column("time")[-50:]
        ok = np.isfinite(times)
        if ok.sum() < 2 or steps[ok][-1] <= steps[ok][0]:
            return None
        per_step = (times[ok][-1] - times[ok][0]) / (steps[ok][-1] - steps[ok][0])
        return max(0.0, float(per_step * remaining_steps))

    def indexing(self) -> dict:
        read = sum(t.offset for t in self.tails.values())
        size = sum(t.size for t in self.tails.values())
        return {"done": self.first_pass_done, "bytes_read": read, "bytes_total": max(size, read)}

    def eval_row(self, index: int) -> dict | None:
        if index < 0 or index >= len(self.eval):
            return None
        row = {key: float(self.eval.columns[key][index]) for key in self.eval.columns
               if np.isfinite(self.eval.columns[key][index])}
        if "is_best" in row:
            row["is_best"] = bool(row["is_best"])
        if "metric" in self.eval.strings:
            row["metric"] = self.eval.strings["metric"]
        nan = self.eval_nan_fields.get(float(self.eval.steps[index]))
        if nan:
            row[NAN_FIELDS] = nan
        return row

    def best_eval(self) -> dict | None:
        """The evaluation marked best (is_best), else the one with the lowest eval_loss."""
        if not len(self.eval):
            return None
        best = np.flatnonzero(self.eval.column("is_best") > 0)
        if best.size:
            return self.eval_row(int(best[-1]))
        losses = self.eval.column("eval_loss")
        if np.isfinite(losses).any():
            return self.eval_row(int(np.nanargmin(losses)))
        return None


def _dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class RunStore:
    """Discovers runs under the logdir and keeps them read up to date from one thread."""

    def __init__(self, logdir: str | os.PathLike, poll_interval: float = 0.5, stall_seconds: float = 300.0):
        self.logdir = Path(logdir).resolve()
        self.poll_interval = poll_interval
        self.stall_seconds = stall_seconds
        self.runs: dict[str, RunState] = {}
        self.found_at_start: frozenset[str] | None = None   # the runs on disk when serving began (alerts' past)
        self.runs_version = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None
        self.thread_pid = None
        self.stopping = threading.Event()
        self.started_at = time.time()
        self.passes = 0
        self.on_pass = []   # callbacks run by the reader thread after each pass (GPU sampling)

    def inside(self, path: Path) -> bool:
        try:
            real = Path(os.path.realpath(path))
        except OSError:
            return False
        return real == self.logdir or self.logdir in real.parents

    # ----- the reader thread -----------------------------------------------------------
    def ensure_started(self) -> None:
        # a fork (gunicorn --preload) leaves the thread behind in the parent: start one here
        if self.thread is not None and self.thread_pid == os.getpid() and self.thread.is_alive():
            return
        with self.lock:
            if self.thread is not None and self.thread_pid == os.getpid() and self.thread.is_alive():
                return
            self.stopping.clear()
            # find the run directories before serving: a request that came before the reader's first
            # pass was told that a run on disk did not exist (404), and /health that indexing was done
            self._discover()
            if self.found_at_start is None:
                self.found_at_start = frozenset(self.runs)
            self.thread = threading.Thread(target=self._loop, name="dashboard-log-reader", daemon=True)
            self.thread_pid = os.getpid()
            self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                busy = self.poll_once()
            except Exception:   # a reader that dies leaves the page frozen: log and go on
                log.exception("reading the logdir failed")
                busy = False
            for callback in self.on_pass:
                try:
                    callback()
                except Exception:
                    log.exception("dashboard background task failed")
            with self.changed:
                self.passes += 1
                self.changed.notify_all()
            if not busy:
                self.stopping.wait(max(0.0, self.poll_interval - (time.monotonic() - started)))

    def poll_once(self, budget_seconds: float = 0.5) -> bool:
        self._discover()
        busy = False
        for run in list(self.runs.values()):
            busy |= run.update(time.monotonic() + budget_seconds)
        return busy

    def _discover(self) -> None:
        found = {}
        try:
            entries = list(os.scandir(self.logdir))
        except OSError:
            entries = []
        # valid UTF-8 names first, so a printable stand-in never takes a real directory's name
        entries.sort(key=lambda e: (_printable_name(e.name, ()) != e.name, e.name))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if not entry.is_dir():
                    continue
            except OSError:
                continue
            path = Path(entry.path)
            if not ((path / RUN_INFO_FILE).is_file() or (path / LOGS_DIR).is_dir()):
                continue
            if self.inside(path):
                found[_printable_name(entry.name, found)] = path
        if set(found) != set(self.runs):
            runs = {name: self.runs.get(name) or self._new_run(name, path) for name, path in found.items()}
            # copy on write: requests iterate self.runs without taking a lock
            self.runs = runs
            self.runs_version += 1

    def _new_run(self, name: str, path: Path) -> RunState:
        run = RunState(name, path, self.inside)
        run.read_header()
        return run

    def wait_for_pass(self, timeout: float) -> bool:
        """Block until the reader finishes its next pass (the live stream sends a change as soon as read)."""
        with self.changed:
            target = self.passes + 1
            return self.changed.wait_for(lambda: self.passes >= target or self.stopping.is_set(), timeout)

    # ----- lookups -----------------------------------------------------------------------
    def get(self, name: str) -> RunState | None:
        return self.runs.get(name)

    def ordered(self) -> list[RunState]:
        """Newest first: by start time, then by last activity."""
        return sorted(self.runs.values(), key=lambda r: (r.start_time() or 0, r.last_activity), reverse=True)

    def latest(self) -> RunState | None:
        runs = self.ordered()
        return runs[0] if runs else None


def int_if_whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _printable_name(name: str, taken) -> str:
    """The directory name, or for a name that is not valid UTF-8 (surrogate-escaped by os.scandir)
    the same with its odd bytes written as \\xNN: JSON, URLs and Prometheus labels need text."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        printable = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    candidate, n = printable, 1
    while candidate in taken:   # a real directory could be called like that
        n += 1
        candidate = f"{printable}~{n}"
    return candidate
