"""Alerts to a Slack-compatible webhook (DASHBOARD_WEBHOOK_URL): a run failed, stopped on
non-finite losses, stalled, or finished.

The reader thread calls ``check()`` after each pass; a message is queued when a run's
condition changes to one of those four, once per run, condition and attempt (a resume
re-arms them). Runs that were already failed, stalled or finished when the dashboard
started are the past: they send nothing. A worker thread POSTs ``{"text": ...}`` (Slack,
Mattermost, Rocket.Chat and Discord's /slack endpoint take it) with retries, and
every alert, delivered or not, is written to the dashboard's log and kept for
``GET /api/alerts``. The webhook URL is a secret (Slack's carries its key in the path):
only its scheme and host are ever logged.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from urllib.parse import urlsplit

from .diagnosis import failure_kind

log = logging.getLogger(__name__)

KINDS = ("failed", "nan_stop", "stalled", "preempted", "finished")
ATTEMPTS = 3            # tries per message
RETRY_SECONDS = 2.0     # doubled after each failed try
TIMEOUT_SECONDS = 10.0
HISTORY = 200


def webhook_label(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…" if parts.netloc else "(webhook)"


def _fmt_step(step) -> str:
    return f"{int(step):,}" if isinstance(step, (int, float)) else "?"


def message_text(kind: str, run_name: str, stats: dict) -> str:
    failure = stats.get("failure") or {}
    host = f" on {stats['host']}" if stats.get("host") else ""
    step = _fmt_step(failure.get("step") if failure.get("step") is not None else stats.get("step"))
    code = failure.get("exit_code")
    code_text = f" (exit code {code})" if code is not None else ""
    if kind == "failed":
        return f":x: trainkit run `{run_name}`{host} failed at step {step}{code_text}: {failure.get('reason')}"
    if kind == "nan_stop":
        return (f":warning: trainkit run `{run_name}`{host} stopped at step {step} after too many non-finite "
                f"losses{code_text}: {failure.get('reason')}")
    if kind == "preempted":
        return (f":pause_button: trainkit run `{run_name}`{host} was preempted at step {step}{code_text}: "
                f"{failure.get('reason')}")
    if kind == "stalled":
        return f":hourglass: trainkit run `{run_name}`{host} stalled at step {step}: {failure.get('reason')}"
    best = stats.get("best_eval") or {}
    best_text = ""
    if best:
        value = best.get("metric_value", best.get("eval_loss"))
        best_text = f"; best {best.get('metric') or 'eval_loss'} {value:.4g} at step {_fmt_step(best.get('step'))}" \
            if isinstance(value, (int, float)) else ""
    return f":white_check_mark: trainkit run `{run_name}`{host} finished: {step} steps{best_text}"


def condition(run, stall_seconds: float) -> str | None:
    """The alert kind a run's current state calls for, if any. From the run's status and last stop
    alone: the reader thread asks this of every run on every pass, and run.stats() builds every
    figure of the run under its lock (a request's work, not a pass's)."""
    with run.lock:
        status = run.status(stall_seconds)
        return "finished" if status == "finished" else failure_kind(status, run.last_stop)


class Alerter:
    def __init__(self, store, settings):
        self.store = store
        self.settings = settings
        self.url = settings.webhook_url
        self.lock = threading.Lock()
        self.state: dict[str, str | None] = {}   # run -> condition seen at the last check
        self.sent: set[tuple] = set()            # (run, kind, attempt)
        self.history: deque = deque(maxlen=HISTORY)
        self.counts: Counter = Counter()         # (kind, outcome) -> alerts, for /metrics
        self.outbox: queue.Queue = queue.Queue()
        self.worker: threading.Thread | None = None

    # ----- deciding (reader thread) ------------------------------------------------------
    def check(self) -> None:
        if not self.url:
            return
        runs = dict(self.store.runs)
        # the past: the runs on disk when the dashboard started (not those known at the first check: a run
        # created and ended while a large log was being indexed is news); their past sends nothing
        past = self.store.found_at_start
        for name, run in runs.items():
            if not run.first_pass_done:
                continue   # still indexing: its state is not known yet
            kind = condition(run, self.settings.stall_seconds)
            if name not in self.state:
                self.state[name] = kind if name in past else None
                if name in past:
                    continue
            previous, self.state[name] = self.state[name], kind
            key = (name, kind, run.attempt)
            if kind is None or kind == previous or key in self.sent:
                continue
            self.sent.add(key)
            stats = run.stats(self.settings.stall_seconds)   # the message's figures: only for an alert sent
            self.enqueue(kind, name, message_text(kind, name, {**stats, "host": run.info.get("host")}))
        for name in set(self.state) - set(runs):
            del self.state[name]

    def enqueue(self, kind: str, run_name: str, text: str) -> None:
        record = {"run": run_name, "kind": kind, "text": text, "time": time.time(), "delivered": None,
                  "http_status": None, "error": None, "attempts": 0}
        with self.lock:
            self.history.append(record)
        log.info("alert %s for run %r: %s", kind, run_name, text)
        self.outbox.put(record)
        if self.worker is None or not self.worker.is_alive():
            self.worker = threading.Thread(target=self._deliver_loop, name="dashboard-alerts", daemon=True)
            self.worker.start()

    # ----- delivering (worker thread) ----------------------------------------------------
    def _deliver_loop(self) -> None:
        while True:
            record = self.outbox.get()
            self._deliver(record)

    def _deliver(self, record: dict) -> None:
        body = json.dumps({"text": record["text"]}).encode()
        wait, delivered, status, error = RETRY_SECONDS, False, None, None
        for attempt in range(1, ATTEMPTS + 1):
            record["attempts"] = attempt
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "trainkit-dashboard"})
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                    delivered, status, error = True, response.status, None
                    break
            except urllib.error.HTTPError as exc:
                status, error = exc.code, f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:
                    break   # the hook refuses this message: retrying will not help
            except (OSError, ValueError) as exc:   # refused, timed out, DNS
                error = f"{type(exc).__name__}: {exc}"
            if attempt < ATTEMPTS:
                time.sleep(wait)
                wait *= 2
        # the log line first, then the outcome in /api/alerts and /metrics: whoever sees it settled there
        # (a test, a script) finds it in the log too
        where = webhook_label(self.url)
        if delivered:
            log.info("alert %s for run %r delivered to %s (HTTP %s)", record["kind"], record["run"], where, status)
        else:
            log.warning("alert %s for run %r NOT delivered to %s after %d tries: %s", record["kind"], record["run"],
                        where, record["attempts"], error)
        with self.lock:
            record.update(delivered=delivered, http_status=status, error=error)   # None until settled
            self.counts[(record["kind"], "delivered" if delivered else "failed")] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"enabled": bool(self.url), "webhook": webhook_label(self.url) if self.url else None,
                    "alerts": [dict(r) for r in self.history]}
