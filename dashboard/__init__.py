"""Live training dashboard: a Flask app that reads run directories (never writes them).

    python -m dashboard --logdir outputs             # development server
    gunicorn -k gthread -w 1 --threads 32 'dashboard:create_app()'   # production

Settings come from keyword arguments, else DASHBOARD_* environment variables (see
``dashboard.settings``). One process holds the in-memory index of the logs, so run one
gunicorn worker with threads, not several workers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flask import Flask, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from .alerts import Alerter
from .gpu import GpuMonitor
from .runs import RunStore
from .settings import Settings
from trainkit.fileio import json_safe

REPO_ROOT = Path(__file__).resolve().parent.parent
STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger(__name__)


class FiniteJSONProvider(DefaultJSONProvider):
    """Flask would write NaN, which is not JSON; send null instead."""
    sort_keys = False

    def dumps(self, obj, **kwargs):
        kwargs.setdefault("allow_nan", False)
        try:   # the common case (e.g. a metrics answer of 10,000 numbers) needs no walk over every value
            return super().dumps(obj, **kwargs)
        except (ValueError, TypeError):   # NaN / inf, or a numpy scalar
            return super().dumps(json_safe(obj), **kwargs)


def _log_to_stderr() -> None:
    """Alerts and errors go to the dashboard's log: stderr, unless the host program configured logging."""
    logger = logging.getLogger("dashboard")
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s dashboard %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def create_app(logdir: str | None = None, **overrides) -> Flask:
    """App factory. ``overrides`` are Settings fields (token, stall_seconds, poll_interval, ...)."""
    settings = Settings.from_env(logdir=logdir, **overrides)
    _log_to_stderr()
    app = Flask(__name__, template_folder=str(REPO_ROOT / "templates"), static_folder=str(STATIC_DIR),
                static_url_path="/static")
    app.json = FiniteJSONProvider(app)
    app.config["DASHBOARD"] = settings

    store = RunStore(settings.logdir, poll_interval=settings.poll_interval, stall_seconds=settings.stall_seconds)
    gpu = GpuMonitor(interval=settings.gpu_interval)
    alerter = Alerter(store, settings)
    store.on_pass.append(gpu.sample_if_due)
    store.on_pass.append(alerter.check)
    app.extensions["dashboard.store"] = store
    app.extensions["dashboard.gpu"] = gpu
    app.extensions["dashboard.alerts"] = alerter

    from . import api, auth, pages, prometheus, security
    api.init_streams(app)
    prometheus.init_app(app)
    app.before_request(security.check_host)
    app.before_request(auth.check_token)
    app.before_request(store.ensure_started)
    app.after_request(security.add_security_headers)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # 404/405 from routing (e.g. an encoded '/' in a run name) answer JSON like the API
        response = jsonify(error=exc.name.lower().replace(" ", "_"), message=exc.description,
                           path=request.path)
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unexpected error answering %s", request.path)
        response = jsonify(error="internal_error", message=f"{type(exc).__name__}: {exc}")
        response.status_code = 500
        return response

    store.ensure_started()   # start reading before the first request comes
    return app
