"""GPU telemetry through NVML (package nvidia-ml-py, module ``pynvml``).

Without a GPU or driver ``nvmlInit`` raises (``NVMLError_LibraryNotFound`` and friends);
the dashboard then answers ``available: false`` with the reason and never an error.
Samples are taken by the reader thread every few seconds, not per request, so a hundred
browsers polling /api/gpu cost no NVML calls.
"""

from __future__ import annotations

import threading
import time
from collections import deque

HISTORY = 150   # samples kept per GPU (5 minutes at the default 2 s)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(300).replace(b"\0", b" ").decode(errors="replace").strip() or str(pid)
    except OSError:
        return str(pid)   # another container's process: NVML knows it, /proc does not


class GpuMonitor:
    def __init__(self, interval: float = 2.0, nvml=None):
        self.interval = interval
        self.nvml = nvml           # tests pass a fake module; None imports pynvml
        self.lock = threading.Lock()
        self.initialized = False
        self.reason: str | None = None
        self.gpus: list[dict] = []
        self.history: dict[int, deque] = {}
        self.sampled_at = 0.0
        self.driver = None

    def _init(self) -> bool:
        if self.initialized:
            return True
        if self.reason is not None:
            return False
        try:
            if self.nvml is None:
                import pynvml
                self.nvml = pynvml
            self.nvml.nvmlInit()
            self.driver = _text(self.nvml.nvmlSystemGetDriverVersion())
            self.initialized = True
            return True
        except ImportError as exc:
            self.reason = f"nvidia-ml-py is not installed ({exc})"
        except Exception as exc:   # pynvml.NVMLError_* without a driver or GPU
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}".strip()
        return False

    def sample_if_due(self) -> None:
        if time.monotonic() - self.sampled_at >= self.interval:
            self.sample()

    def sample(self) -> None:
        self.sampled_at = time.monotonic()
        if not self._init():
            return
        nvml = self.nvml
        gpus = []
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            with self.lock:
                self.reason = f"NVML error: {exc}"
                self.gpus = []
            return
        now = time.time()
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                continue
            gpu = {"index": index, "time": now,
                   "name": self._try(lambda: _text(nvml.nvmlDeviceGetName(handle))),
                   "uuid": self._try(lambda: _text(nvml.nvmlDeviceGetUUID(handle)))}
            util = self._try(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            gpu["utilization_percent"] = getattr(util, "gpu", None)
            gpu["memory_utilization_percent"] = getattr(util, "memory", None)
            memory = self._try(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            gpu["memory_used_bytes"] = getattr(memory, "used", None)
            gpu["memory_total_bytes"] = getattr(memory, "total", None)
            gpu["temperature_c"] = self._try(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            power = self._try(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            gpu["power_watts"] = power / 1000.0 if power is not None else None
            limit = self._try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
            gpu["power_limit_watts"] = limit / 1000.0 if limit is not None else None
            gpu["sm_clock_mhz"] = self._try(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
            gpu["memory_clock_mhz"] = self._try(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))
            processes = self._try(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
            gpu["processes"] = [{"pid": p.pid, "name": _process_name(p.pid),
                                 "memory_used_bytes": getattr(p, "usedGpuMemory", None)} for p in processes]
            gpus.append(gpu)
        with self.lock:
            self.reason = None
            self.gpus = gpus
            for gpu in gpus:
                self.history.setdefault(gpu["index"], deque(maxlen=HISTORY)).append(
                    {k: gpu[k] for k in ("time", "utilization_percent", "memory_used_bytes",
                                         "temperature_c", "power_watts")})

    @staticmethod
    def _try(call):
        try:
            return call()
        except Exception:   # one unsupported query (e.g. power on some boards) must not hide the rest
            return None

    def snapshot(self, with_history: bool = True) -> dict:
        if not self.initialized and self.reason is None:
            self.sample()   # first request before the reader thread sampled
        with self.lock:
            if not self.initialized or (self.reason and not self.gpus):
                return {"available": False, "reason": self.reason or "not sampled yet", "gpus": []}
            gpus = [dict(g) for g in self.gpus]
            if with_history:
                for gpu in gpus:
                    gpu["history"] = list(self.history.get(gpu["index"], ()))
            return {"available": True, "driver_version": self.driver, "count": len(gpus), "gpus": gpus}
