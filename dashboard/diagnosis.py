"""Why a run stopped, for the banner at the top of its page and for alerts.

Reads only what the run directory says (run.json, the latest ``stop`` event, the latest
fatal error line). The exit code is the one run.json records (``exit_code``) when a tool
wrote it; otherwise it follows from how trainkit's entry points exit
(``trainkit.cli.run_main``, ``trainkit.training_run.TrainingRun.finish``): 0 finished, 1 for a stop by
``training.max_consecutive_nonfinite`` (reason ``nan_limit``) or an uncaught exception,
2 for a config error, 130 when interrupted (SIGINT/SIGTERM), the code of a SystemExit; a run
run.json says `preempted` (trainkit.preemption) exited 128 + signal, 143 when the stop event does
not say otherwise. Trainers write `exit_code` since the preemption work; older runs are inferred.
A stalled run wrote nothing when it stopped (killed by SIGKILL or the OOM killer, or hung),
so its exit code is unknown; when it ran on this host, whether its process still exists
is checked.
"""

from __future__ import annotations

import socket

from trainkit.runlock import pid_alive

from .logreader import is_number

EXIT_CODES_BY_ERROR = {"ConfigError": 2, "KeyboardInterrupt": 130}


def _exit_code(info: dict, fatal: dict | None, status: str) -> tuple[int | None, str | None]:
    recorded = info.get("exit_code")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return recorded, "run.json"
    if status == "finished":
        return 0, "inferred"
    if status == "preempted":
        return 143, "inferred"
    if status != "failed":
        return None, None
    error_type = (fatal or {}).get("type")
    if error_type == "SystemExit":
        code = str((fatal or {}).get("message", "")).rsplit(":", 1)[-1].strip()
        return (int(code), "inferred") if code.lstrip("-").isdigit() else (1, "inferred")
    return EXIT_CODES_BY_ERROR.get(error_type, 1), "inferred"


def _process_state(info: dict) -> str:
    """'running' / 'gone' when the run's process lives on this host, else 'unknown'."""
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != socket.gethostname():
        return "unknown"
    return "running" if pid_alive(pid) else "gone"  # a zombie has exited: gone


def failure_kind(status: str, stop: dict | None) -> str | None:
    """"failed", "nan_stop" (stopped by the NaN limit), "preempted" (stopped by SIGTERM/SIGINT, resumable)
    or "stalled"; None for a healthy run. The failure banner's kind and the alert's (dashboard.alerts)."""
    if status == "preempted":
        return "preempted"
    if status == "failed":
        return "nan_stop" if (stop or {}).get("reason") == "nan_limit" else "failed"
    return "stalled" if status == "stalled" else None


def describe_failure(info: dict, status: str, stop: dict | None, fatal: dict | None,
                     last_activity: float, stall_seconds: float, now: float, preempted: dict | None = None) -> dict | None:
    """None for a healthy run; else what the page shows at the top of a failed, preempted or stalled
    run. `preempted` is the latest `preempted` event, if any."""
    kind = failure_kind(status, stop)
    if kind is None:
        return None
    code, source = _exit_code(info, fatal, status)
    out = {"kind": kind, "exit_code": code, "exit_code_source": source,
           "step": None, "time": None, "reason": None, "error_type": None, "stop_reason": None}
    if status == "failed":
        stop_reason = (stop or {}).get("reason")
        out["stop_reason"] = stop_reason if isinstance(stop_reason, str) else None
        error = info.get("error") if isinstance(info.get("error"), str) else None
        if fatal:
            out["error_type"] = fatal.get("type") if isinstance(fatal.get("type"), str) else None
            error = error or (f"{out['error_type']}: {fatal.get('message')}" if fatal.get("message") else out["error_type"])
        if not error and stop:
            error = stop.get("message") if isinstance(stop.get("message"), str) else None
        out["reason"] = error or "run.json says failed, with no error message"
        source_line = fatal or stop or {}
        out["step"] = source_line.get("step") if is_number(source_line.get("step")) else None
        end = info.get("end_time")
        out["time"] = end if is_number(end) else source_line.get("time") if is_number(source_line.get("time")) else None
    elif status == "preempted":
        out["stop_reason"] = "preempted"
        checkpoint = (preempted or {}).get("checkpoint")
        message = (preempted or {}).get("message")
        out["reason"] = (message if isinstance(message, str) else "stopped by SIGTERM/SIGINT") + (
            "; launch_training.sh resumes it" if isinstance(checkpoint, str) else
            "; launch_training.sh resumes it from its latest checkpoint")
        line = preempted or stop or {}
        out["step"] = line.get("step") if is_number(line.get("step")) else None
        end = info.get("end_time")
        out["time"] = end if is_number(end) else None
    else:
        quiet = now - last_activity if last_activity else None
        out["seconds_without_log"] = quiet
        out["stall_seconds"] = stall_seconds
        out["time"] = last_activity or None
        out["process"] = _process_state(info)
        out["reason"] = (f"no log written for {quiet / 60:.0f} min (stalled after {stall_seconds / 60:g} min)"
                         if quiet is not None else "no log written")
        if out["process"] == "gone":
            out["reason"] += f"; its process {info.get('pid')} is gone (killed without a traceback: SIGKILL or the OOM killer?)"
    return out
