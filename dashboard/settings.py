"""Dashboard settings: command-line flags win over DASHBOARD_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from urllib.parse import urlsplit


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number")


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


@dataclass
class Settings:
    logdir: str = "outputs"
    token: str = ""                 # when set, the page, /api/* and /metrics require it
    host: str = "127.0.0.1"         # the address the server binds; requests naming it in Host are accepted
    allowed_hosts: tuple = ()       # more Host names to accept (lower case; ".example.org" = its subdomains; "*" = any)
    stall_seconds: float = 300.0    # a running run whose logs stopped this long is shown 'stalled' (and alerted)
    poll_interval: float = 0.5      # seconds between looks at the log files
    stream_seconds: float = 300.0   # an SSE connection ends after this; browsers reconnect
    max_streams: int = 16           # concurrent SSE connections (each holds a server thread)
    gpu_interval: float = 2.0       # seconds between GPU samples
    webhook_url: str = ""           # Slack-compatible webhook that gets failure / NaN stop / stall / finish alerts
    metrics_window: float = 3600.0  # /metrics exports the runs whose logs changed within this many seconds

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        settings = cls(
            logdir=os.environ.get("DASHBOARD_LOGDIR", cls.logdir),
            token=os.environ.get("DASHBOARD_TOKEN", ""),
            host=os.environ.get("DASHBOARD_HOST", cls.host),
            allowed_hosts=_env_list("DASHBOARD_ALLOWED_HOSTS"),
            stall_seconds=_env_float("DASHBOARD_STALL_SECONDS", cls.stall_seconds),
            poll_interval=_env_float("DASHBOARD_POLL_INTERVAL", cls.poll_interval),
            stream_seconds=_env_float("DASHBOARD_STREAM_SECONDS", cls.stream_seconds),
            max_streams=int(_env_float("DASHBOARD_MAX_STREAMS", cls.max_streams)),
            gpu_interval=_env_float("DASHBOARD_GPU_INTERVAL", cls.gpu_interval),
            webhook_url=os.environ.get("DASHBOARD_WEBHOOK_URL", "").strip(),
            metrics_window=_env_float("DASHBOARD_METRICS_WINDOW", cls.metrics_window),
        )
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise TypeError(f"unknown dashboard setting {key!r}")
            if value is not None:
                setattr(settings, key, value)
        settings.allowed_hosts = tuple(h.lower() for h in settings.allowed_hosts)
        if settings.webhook_url and urlsplit(settings.webhook_url).scheme not in ("http", "https"):
            raise SystemExit("DASHBOARD_WEBHOOK_URL must be an http:// or https:// URL")
        return settings
