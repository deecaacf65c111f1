"""Dashboard settings: command-line flags win over DASHBOARD_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number")


@dataclass
class Settings:
    logdir: str = "outputs"
    token: str = ""                 # when set, the page, /api/* and /metrics require it
    stall_seconds: float = 300.0    # a running run whose logs stopped this long is shown 'stalled'
    poll_interval: float = 0.5      # seconds between looks at the log files
    stream_seconds: float = 300.0   # an SSE connection ends after this; browsers reconnect
    max_streams: int = 16           # concurrent SSE connections (each holds a server thread)
    gpu_interval: float = 2.0       # seconds between GPU samples

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        settings = cls(
            logdir=os.environ.get("DASHBOARD_LOGDIR", cls.logdir),
            token=os.environ.get("DASHBOARD_TOKEN", ""),
            stall_seconds=_env_float("DASHBOARD_STALL_SECONDS", cls.stall_seconds),
            poll_interval=_env_float("DASHBOARD_POLL_INTERVAL", cls.poll_interval),
            stream_seconds=_env_float("DASHBOARD_STREAM_SECONDS", cls.stream_seconds),
            max_streams=int(_env_float("DASHBOARD_MAX_STREAMS", cls.max_streams)),
            gpu_interval=_env_float("DASHBOARD_GPU_INTERVAL", cls.gpu_interval),
        )
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise TypeError(f"unknown dashboard setting {key!r}")
            if value is not None:
                setattr(settings, key, value)
        return settings
