"""Hardening of the dashboard against real servers on loopback: the Host allow-list (DNS
rebinding), security headers, the token kept out of banners, access logs and URLs, and live
stream slots freed as soon as a client leaves."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from dashboard import create_app
from fake_runs import generate
from helpers_dashboard import REPO_ROOT, ThreadedServer, free_port, get, get_json, start_gunicorn, stop, wait_until
from helpers_launcher import write_fake_run_config

PYTHON = sys.executable
TOKEN = "tok-0123456789-SECRET-abcdef"   # distinctive: found in any output it leaks into


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    generate(root, seed=4, scale=0.3)
    return root


@pytest.fixture(scope="module")
def server(logdir):
    app = create_app(str(logdir), poll_interval=0.1, allowed_hosts=("dash.example.org", ".corp.example"))
    with ThreadedServer(app) as srv:
        wait_until(lambda: get_json(srv.url + "/health")[1]["indexing_done"], message="indexing")
        yield srv


def request(url: str, path: str, headers: dict | None = None):
    """GET with exactly these headers (urllib would set Host itself); no redirects followed."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    for name, value in {"Host": f"127.0.0.1:{port}", **(headers or {})}.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), body


# ----- DNS rebinding: the Host header -----------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "app.localhost:{port}",
                                  "[::1]:{port}", "10.1.2.3:{port}", "dash.example.org", "a.corp.example:80",
                                  "corp.example"])
def test_known_host_names_are_served(server, host):
    port = server.url.rsplit(":", 1)[1]
    status, _, body = request(server.url, "/api/runs", {"Host": host.format(port=port)})
    assert status == 200, body[:200]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5000", "127.0.0.1.evil.example", "localhost.evil.example",
                                  "dash.example.org.evil.example", "xcorp.example"])
def test_other_host_names_are_refused_everywhere(server, host):
    """A page on evil.example that re-points its name at 127.0.0.1 gets nothing, not even /health."""
    for path in ("/", "/api/runs", "/health", "/metrics", "/api/runs/moe-qlora-running/stream", "/static/dashboard.js"):
        status, headers, body = request(server.url, path, {"Host": host})
        assert status == 400, (path, status)
        assert b'"error":"host_not_allowed"' in body and b"DASHBOARD_ALLOWED_HOSTS" in body


def test_the_bound_name_and_dashboard_allowed_hosts_from_the_environment(logdir, monkeypatch):
    monkeypatch.setenv("DASHBOARD_ALLOWED_HOSTS", "Grafana.Internal, .lab.example")
    app = create_app(str(logdir), poll_interval=0.1, host="gpu-node-7")
    with ThreadedServer(app) as srv:
        for host, expected in (("gpu-node-7:5000", 200), ("grafana.internal", 200), ("x.lab.example", 200),
                               ("gpu-node-8", 400)):
            assert request(srv.url, "/health", {"Host": host})[0] == expected, host


# ----- headers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/api/runs", "/api/runs/dense-stalled/plots/loss.png", "/static/charts.js",
                                  "/metrics", "/api/runs/nope/stats", "/nothing-here"])
def test_security_headers_on_every_answer(server, path):
    status, headers, _ = request(server.url, path)
    assert status in (200, 404)
    assert headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_the_page_loads_no_inline_or_third_party_code(server):
    """script-src 'self' holds only if the page has no inline script or style to allow."""
    status, _, body = request(server.url, "/")
    page = body.decode()
    assert status == 200 and "<script>" not in page and "<style" not in page and " style=" not in page
    assert 'src="http' not in page and 'href="http' not in page
    for asset in ("/static/vendor/uplot/uPlot.iife.min.js", "/static/vendor/uplot/uPlot.min.css",
                  "/static/charts.js", "/static/dashboard.js", "/static/dashboard.css"):
        assert asset in page
        assert request(server.url, asset)[0] == 200


# ----- the token ------------------------------------------------------------------------------------
def spawn(command, env):
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHON": PYTHON, **env}, start_new_session=True)


def finish(process):
    stop(process)
    return process.stdout.read(), process.stderr.read()


def test_python_m_dashboard_never_prints_the_token_in_its_banner_or_access_log(logdir):
    port = free_port()
    process = spawn([PYTHON, "-m", "dashboard", "--logdir", str(logdir), "--host", "0.0.0.0", "--port", str(port)],
                    {"DASHBOARD_TOKEN": TOKEN})
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/health")[0] == 200, timeout=20, message="server up")
        assert get(f"http://127.0.0.1:{port}/api/runs?token={TOKEN}")[0] == 200
        status, headers, _ = request(f"http://127.0.0.1:{port}", f"/?run=x&token={TOKEN}")
        assert status == 303 and TOKEN not in headers["Location"]
        assert get(f"http://127.0.0.1:{port}/api/runs?token=wrong")[0] == 401
    finally:
        out, err = finish(process)
    assert f"local: http://127.0.0.1:{port}/?token=<DASHBOARD_TOKEN>" in out
    assert "LAN:" in out and "<DASHBOARD_TOKEN>" in out
    assert "GET /api/runs?token=*** HTTP" in err       # the access log line is there, the token is not
    assert TOKEN not in out + err


def test_start_dashboard_sh_never_prints_the_token_gunicorn_access_log_included(logdir):
    port = free_port()
    process = spawn(["./start_dashboard.sh", "--logdir", str(logdir), "--port", str(port)],
                    {"DASHBOARD_TOKEN": TOKEN, "DASHBOARD_ACCESS_LOG": "1"})
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/health")[0] == 200, timeout=30, message="server up")
        assert get(f"http://127.0.0.1:{port}/api/runs?token={TOKEN}")[0] == 200
        wait_until(lambda: get(f"http://127.0.0.1:{port}/api/runs?token={TOKEN}&again=1")[0] == 200, message="again")
    finally:
        out, err = finish(process)
    assert f"local: http://127.0.0.1:{port}/?token=<DASHBOARD_TOKEN>" in out
    assert '"GET /api/runs HTTP/1.1" 200' in out + err   # gunicorn logged the request, without its query
    assert TOKEN not in out + err


FAKE_TRAINER = textwrap.dedent("""\
    # Stands in for a training script: waits until the dashboard the launcher started answers, then exits.
    import os, time, urllib.request
    url = f"http://127.0.0.1:{os.environ['DASHBOARD_PORT']}/health"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
""")


def test_launch_training_sh_dashboard_never_prints_the_token(tmp_path):
    config = write_fake_run_config(tmp_path, FAKE_TRAINER)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINKIT_", "ACCELERATE_"))}
    env.update(PATH=f"{os.path.dirname(PYTHON)}{os.pathsep}{env.get('PATH', '')}", TRAINKIT_NO_VENV="1",
               CUDA_VISIBLE_DEVICES="", PYTHON=PYTHON, DASHBOARD_TOKEN=TOKEN, DASHBOARD_PORT=str(port))
    result = subprocess.run([str(REPO_ROOT / "launch_training.sh"), "--config", str(config), "--dashboard"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "dashboard started" in output and f"local: http://127.0.0.1:{port}/?token=<DASHBOARD_TOKEN>" in output
    assert TOKEN not in output


# ----- live stream slots -----------------------------------------------------------------------------
def open_stream(url: str, path: str):
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    received = b""
    while b"event: update" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock, received


def reopen_stream(url: str, path: str) -> bool:
    """True when a new stream is accepted (then closed again); False while the slot is taken (503)."""
    status, _, _ = get(url + path.replace("/stream", "/stats"))
    assert status == 200
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return sock.recv(64).startswith(b"HTTP/1.1 200")


def check_slot_freed_on_disconnect(url: str) -> None:
    """Before: a quiet stream noticed its client had left only at its next write (the 15 s ping), so a
    browser that reloaded or closed the tab kept its slot that long. One slot: the next viewer waits."""
    path = "/api/runs/dense-stalled/stream"
    sock, first = open_stream(url, path)
    assert first.startswith(b"HTTP/1.1 200")
    assert not reopen_stream(url, path)                 # the one slot is taken: 503
    sock.close()
    wait_until(lambda: reopen_stream(url, path), timeout=8, message="the slot of the closed stream")
    wait_until(lambda: get_json(url + "/health")[1]["streams_open"] == 0, timeout=8, message="no stream open")


def test_a_closed_stream_frees_its_slot_at_once_werkzeug(logdir):
    app = create_app(str(logdir), poll_interval=0.1, max_streams=1, stream_seconds=300)
    with ThreadedServer(app) as srv:
        check_slot_freed_on_disconnect(srv.url)


def test_a_closed_stream_frees_its_slot_at_once_gunicorn(logdir):
    port = free_port()
    process = start_gunicorn(str(logdir), port, threads=4,
                             env={"DASHBOARD_MAX_STREAMS": "1", "DASHBOARD_STREAM_SECONDS": "300"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get_json(url + "/health")[1]["indexing_done"], timeout=30, message="gunicorn up")
        check_slot_freed_on_disconnect(url)
    finally:
        stop(process)
