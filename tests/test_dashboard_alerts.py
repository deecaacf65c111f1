"""Webhook alerts (DASHBOARD_WEBHOOK_URL) against a real HTTP server on loopback: one Slack-style
message per run on failure, NaN stop, stall and finish; nothing for runs that ended before the
dashboard started; each alert in the dashboard's log, the webhook's secret path never."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dashboard import alerts, create_app
from fake_runs import SyntheticRun, generate, set_mtime
from helpers_dashboard import REPO_ROOT, ThreadedServer, free_port, get, get_json, stop, wait_until

SECRET_PATH = "/services/T000/B000/XXXXsecretXXXX"


class Webhook:
    """A Slack-compatible incoming webhook: records every JSON body POSTed to it."""

    def __init__(self, fail_first: int = 0):
        self.messages: list[dict] = []
        self.requests = 0
        self.fail_first = fail_first
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests += 1
                if hook.requests <= hook.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                assert self.path == SECRET_PATH and self.headers["Content-Type"] == "application/json"
                hook.messages.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}{SECRET_PATH}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        return [m["text"] for m in self.messages]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def passes(url: str) -> int:
    return get_json(url + "/health")[1]["reader_passes"]


def test_one_message_per_run_for_failure_nan_stop_stall_and_finish(tmp_path, webhook, caplog):
    generate(tmp_path, seed=5, scale=0.2)        # the past: a finished, a failed, a stalled run
    caplog.set_level(logging.INFO, logger="dashboard")
    # stall_seconds far above the test's length: generate()'s running run (logs written at its start) must not
    # stall mid-test (with 60 it did when the test took a minute: an alert for it)
    app = create_app(str(tmp_path), poll_interval=0.1, stall_seconds=600, webhook_url=webhook.url)
    with ThreadedServer(app) as srv:
        wait_until(lambda: get_json(srv.url + "/health")[1]["indexing_done"], message="indexing")
        start = passes(srv.url)
        wait_until(lambda: passes(srv.url) > start + 3, message="reader passes")
        assert webhook.messages == []            # runs that ended before the dashboard started send nothing

        now = time.time()
        crash = SyntheticRun(tmp_path, "crash", moe=False, total_steps=100, start_time=now)
        nan = SyntheticRun(tmp_path, "nan-run", moe=False, total_steps=100, start_time=now)
        done = SyntheticRun(tmp_path, "done", moe=False, total_steps=8, eval_every=5, start_time=now)
        # quiet: a run whose logs stopped twenty minutes ago, copied in now (a run that is new to the
        # dashboard and already stalled)
        quiet = SyntheticRun(tmp_path.parent / f"{tmp_path.name}-staging", "quiet", moe=False, total_steps=100,
                             start_time=now - 3600)
        for run in (crash, nan, done, quiet):
            for _ in range(5):
                run.advance(now=time.time())
        set_mtime(quiet.run_dir, time.time() - 1200)
        quiet.run_dir.rename(tmp_path / "quiet")
        wait_until(lambda: {"crash", "nan-run", "done", "quiet"} <= {r["name"] for r in get_json(srv.url + "/api/runs")[1]["runs"]},
                   message="new runs listed")
        crash.fail()
        nan.log.event(5, "stop", "run ended: nan_limit", reason="nan_limit")
        nan.log.update_run_info(status="failed", error="stopped: nan_limit", end_time=time.time())
        while done.step < done.total_steps:
            done.advance(now=time.time())
        done.finish()

        def kinds():
            return sorted((a["run"], a["kind"]) for a in get_json(srv.url + "/api/alerts")[1]["alerts"])
        expected = [("crash", "failed"), ("done", "finished"), ("nan-run", "nan_stop"), ("quiet", "stalled")]
        wait_until(lambda: kinds() == expected and len(webhook.messages) == 4, timeout=20, message="four alerts")
        start = passes(srv.url)
        wait_until(lambda: passes(srv.url) > start + 5, message="more reader passes")
        assert kinds() == expected and len(webhook.messages) == 4      # once each, not once per pass

        texts = {t.split("`")[1]: t for t in webhook.texts()}
        assert texts["crash"].startswith(":x: trainkit run `crash`") and "failed at step 5 (exit code 1)" in texts["crash"]
        assert "OutOfMemoryError: CUDA out of memory" in texts["crash"]
        assert "stopped at step 5 after too many non-finite losses (exit code 1): stopped: nan_limit" in texts["nan-run"]
        assert texts["quiet"].startswith(":hourglass:") and "stalled at step 5: no log written for" in texts["quiet"]
        assert texts["done"].startswith(":white_check_mark:") and "finished: 8 steps" in texts["done"]
        assert "best eval_loss" in texts["done"]
        status = get_json(srv.url + "/api/alerts")[1]
        assert status["enabled"] and status["webhook"] == f"http://127.0.0.1:{webhook.server.server_port}/…"
        assert all(a["delivered"] and a["http_status"] == 200 and a["attempts"] == 1 for a in status["alerts"])
        metrics = get(srv.url + "/metrics")[2].decode()
        assert 'trainkit_dashboard_alerts_total{kind="failed",outcome="delivered"} 1.0' in metrics

        # a run resumed after its crash that crashes again is a new attempt: alerted again
        crash.resume_from(3)
        crash.log.update_run_info(status="running", error=None, end_time=None)
        for _ in range(3):
            crash.advance(now=time.time())
        wait_until(lambda: get_json(srv.url + "/api/runs/crash/stats")[1]["status"] == "running", message="running again")
        crash.fail()
        wait_until(lambda: len(webhook.messages) == 5, timeout=20, message="alert for the second attempt")
        assert webhook.texts()[-1].startswith(":x: trainkit run `crash`") and "failed at step 6" in webhook.texts()[-1]

    logged = [r.getMessage() for r in caplog.records if r.name == "dashboard.alerts"]
    for run, kind in expected:
        assert any(f"alert {kind} for run {run!r} delivered to http://127.0.0.1:" in m for m in logged), (run, kind)
    assert not any(SECRET_PATH in m or "secret" in m.lower() for m in logged)


def test_a_run_that_ends_while_the_first_pass_runs_is_news(tmp_path, webhook, reader_held):
    # the past was once taken at the reader's first check, after the first pass: a run created and ended
    # while a large log was being indexed counted as the past and sent nothing
    generate(tmp_path, seed=5, scale=0.2)
    app = create_app(str(tmp_path), poll_interval=0.1, stall_seconds=600, webhook_url=webhook.url)
    with ThreadedServer(app) as srv:
        late = SyntheticRun(tmp_path, "late", moe=False, total_steps=3, start_time=time.time())
        while late.step < late.total_steps:
            late.advance(now=time.time())
        late.finish()
        assert passes(srv.url) == 0
        reader_held.set()
        wait_until(lambda: len(webhook.messages) == 1, timeout=30, message="the finish alert")
        start = passes(srv.url)
        wait_until(lambda: passes(srv.url) > start + 3, message="reader passes")
    assert webhook.texts() == [webhook.messages[0]["text"]] and "`late`" in webhook.messages[0]["text"]
    assert "finished" in webhook.messages[0]["text"]


def test_a_failing_webhook_is_retried_and_reported(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(alerts, "RETRY_SECONDS", 0.05)
    flaky = Webhook(fail_first=1)
    broken = Webhook(fail_first=100)
    caplog.set_level(logging.INFO, logger="dashboard")
    try:
        for hook, delivered in ((flaky, True), (broken, False)):
            root = tmp_path / ("flaky" if delivered else "broken")
            root.mkdir()
            app = create_app(str(root), poll_interval=0.1, webhook_url=hook.url)
            with ThreadedServer(app) as srv:
                wait_until(lambda: get_json(srv.url + "/health")[1]["indexing_done"], message="indexing")
                run = SyntheticRun(root, "r", moe=False, total_steps=3, start_time=time.time())
                wait_until(lambda: get_json(srv.url + "/health")[1]["runs"] == 1, message="run listed")
                for _ in range(3):
                    run.advance(now=time.time())
                run.finish()
                wait_until(lambda: (get_json(srv.url + "/api/alerts")[1]["alerts"] or [{}])[-1].get("delivered") is not None,
                           timeout=20, message="delivery settled")
                alert = get_json(srv.url + "/api/alerts")[1]["alerts"][-1]
                assert alert["delivered"] is delivered
                assert alert["attempts"] == (2 if delivered else alerts.ATTEMPTS)
                assert alert["http_status"] == (200 if delivered else 503)
        assert len(flaky.messages) == 1 and broken.messages == []
        assert any("NOT delivered" in r.getMessage() and "after 3 tries: HTTP 503" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
        assert not any(SECRET_PATH in r.getMessage() for r in caplog.records)
    finally:
        flaky.close()
        broken.close()


def test_python_m_dashboard_logs_its_alerts(tmp_path, webhook):
    """The dashboard's own log (stderr) records each alert, as deployed."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dashboard", "--logdir", str(tmp_path), "--port", str(port)],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"PATH": "/usr/bin:/bin", "DASHBOARD_WEBHOOK_URL": webhook.url,
                                    "DASHBOARD_POLL_INTERVAL": "0.1"})
    lines: list[str] = []

    def read_stderr():
        for line in process.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/health")[0] == 200, timeout=20, message="server up")
        run = SyntheticRun(tmp_path, "r", moe=False, total_steps=2, start_time=time.time())
        wait_until(lambda: get_json(f"http://127.0.0.1:{port}/health")[1]["runs"] == 1, message="run listed")
        run.advance(now=time.time())
        run.advance(now=time.time())
        run.finish()
        # the webhook records the POST before it answers, and the dashboard logs the delivery only once it
        # read that answer: stopping it when the webhook had the message lost the line (CI, 2 cores)
        wait_until(lambda: any(" delivered to " in line for line in lines), timeout=20, message="the delivery logged")
        assert len(webhook.messages) == 1
    finally:
        stop(process)
        reader.join(timeout=10)
    err = "".join(lines)
    assert "dashboard INFO alert finished for run 'r': :white_check_mark:" in err
    assert f"dashboard INFO alert finished for run 'r' delivered to http://127.0.0.1:{webhook.server.server_port}/… (HTTP 200)" in err
    assert SECRET_PATH not in err


def test_a_webhook_url_that_is_not_http_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dashboard", "--logdir", str(tmp_path), "--port", "1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "DASHBOARD_WEBHOOK_URL": "hooks.slack.com/services/x"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "DASHBOARD_WEBHOOK_URL must be an http:// or https:// URL"
