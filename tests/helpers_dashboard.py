"""Helpers for the dashboard's tests and benchmark: real servers on loopback, Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from werkzeug.serving import WSGIRequestHandler, make_server

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10.0, headers: dict | None = None):
    """(status, headers, body bytes) without raising on 4xx/5xx."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, timeout: float = 10.0, headers: dict | None = None):
    status, _, body = get(url, timeout, headers)
    return status, json.loads(body)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1, message: str = "condition"):
    ends = time.monotonic() + timeout
    last = None
    while time.monotonic() < ends:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError) as exc:   # server not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message} (last: {last!r})")


class QuietRequestHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):   # one line per request would drown test output
        pass


class ThreadedServer:
    """The Flask app on werkzeug's threaded server, in a thread of this process."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.app = app
        self.server = make_server(host, 0, app, threaded=True, request_handler=QuietRequestHandler)
        # join request threads on close: a daemon thread still drawing a plot (C++ in matplotlib)
        # when the interpreter exits aborts the process ("terminate called without an active exception")
        self.server.daemon_threads = False
        self.server.block_on_close = True
        self.url = f"http://{host}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.app.extensions["dashboard.store"].stop()   # also ends the live streams
        self.server.shutdown()
        self.server.server_close()


def start_gunicorn(logdir: str, port: int, threads: int = 32, env: dict | None = None) -> subprocess.Popen:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    command = [str(gunicorn) if gunicorn.exists() else "gunicorn", "--workers", "1", "--worker-class", "gthread",
               "--threads", str(threads), "--bind", f"127.0.0.1:{port}", "--timeout", "120",
               "--log-level", "warning", "dashboard:create_app()"]
    env = {**os.environ, "DASHBOARD_LOGDIR": str(logdir), "MALLOC_ARENA_MAX": "2", **(env or {})}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when missing (needs root and apt)."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError("chromium is missing and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
                   check=True, env=env)


def chromium_driver(user_data_dir: str, width: int = 1440, height: int = 2200):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    # an explicit driver path: selenium-manager then downloads nothing
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
