"""`status`: the jobs of a sweep and their progress.

`status` prints the jobs of a sweep (default: the newest sweeps/*/state.json): state, GPU,
elapsed time, the last logged step / total_steps (<run dir>/logs/training_log.jsonl) and the
latest validation task_score (<run dir>/logs/eval_log.jsonl), and whether the scheduler is alive.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainkit.fileio import iter_jsonl, last_jsonl_record, read_json
from trainkit.runlog import LOGS_DIR, RUN_INFO_FILE, STREAMS
from trainkit.sweep.plan import STATE_FILE, SWEEPS_ROOT, SweepError, format_table
from trainkit.sweep.scheduler import scheduler_alive
from trainkit.tasks.official import TASK_SCORE, selection_score


def run_progress(run_dir: str) -> dict:
    """Last logged step, total_steps, and the latest validation task_score of a run directory."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / RUN_INFO_FILE, default={}) or {}
    last = last_jsonl_record(run_dir / LOGS_DIR / STREAMS["training"]) or {}
    score, score_step = None, None
    for rec in iter_jsonl(run_dir / LOGS_DIR / STREAMS["eval"]):
        if rec.get("split") == "test":
            continue
        value = rec.get(TASK_SCORE)
        if value is None and rec.get("task"):
            try:
                value = selection_score(rec["task"], rec)
            except KeyError:
                value = None
        if value is not None:
            score, score_step = value, rec.get("step")
    return {"step": last.get("step"), "total_steps": last.get("total_steps", info.get("total_steps")),
            "task_score": score, "task_score_step": score_step, "run_status": info.get("status")}


def _elapsed(rec: dict, now: float) -> float | None:
    if rec.get("start_time") is None:
        return None
    return (rec.get("end_time") or now) - rec["start_time"]


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def find_latest_sweep(root: Path = Path(SWEEPS_ROOT)) -> Path | None:
    candidates = [p.parent for p in root.glob(f"*/{STATE_FILE}")]
    return max(candidates, key=lambda p: ((p / STATE_FILE).stat().st_mtime, str(p))) if candidates else None


def cmd_status(args) -> int:
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else find_latest_sweep()
    if sweep_dir is None:
        raise SweepError(f"no sweep found under {SWEEPS_ROOT}/ (give --sweep-dir)")
    state = read_json(sweep_dir / STATE_FILE, default=None)
    if not isinstance(state, dict):
        raise SweepError(f"{sweep_dir}: no {STATE_FILE} (not a sweep directory, or its scheduler never started)")
    now = time.time()
    pid = scheduler_alive(sweep_dir)
    base = Path(state.get("cwd") or ".")
    jobs = []
    for rec in state.get("jobs", []):
        run_dir = rec["run_dir"] if Path(rec["run_dir"]).is_absolute() or Path(rec["run_dir"]).exists() \
            else str(base / rec["run_dir"])
        jobs.append({**rec, "elapsed": _elapsed(rec, now), **run_progress(run_dir)})
    counts = {}
    for j in jobs:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    if args.json:
        print(json.dumps({"sweep_dir": str(sweep_dir), "scheduler_pid": pid, "scheduler_alive": pid is not None,
                          "scheduler_state": state.get("scheduler_state"), "counts": counts, "jobs": jobs},
                         indent=2, default=str))
        return 0
    alive = (f"alive (pid {pid})" if pid is not None
             else f"not running (last state: {state.get('scheduler_state')}, pid {state.get('scheduler_pid')})")
    print(f"sweep {sweep_dir}: scheduler {alive}; " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if pid is None and any(j["state"] == "running" for j in jobs):
        print("warning: the scheduler is not running but jobs are recorded as running (it was killed): "
              "start the same sweep again to resume them")
    rows = []
    for j in jobs:
        step = "-" if j["step"] is None else (f"{j['step']}/{j['total_steps']}" if j["total_steps"] else str(j["step"]))
        score = "-" if j["task_score"] is None else f"{j['task_score']:.2f} @{j['task_score_step']}"
        gpu = j.get("gpu") if j.get("gpu") is not None else ("cpu" if j.get("slot") else "-")
        state_text = j["state"] + (" (resume)" if j.get("resume") else "")
        rows.append([j["index"], j["run_name"], state_text, gpu, _hms(j["elapsed"]), step, score,
                     "-" if j.get("exit_code") is None else j["exit_code"]])
    print(format_table(["job", "run", "state", "gpu", "elapsed", "step", "task_score", "exit"], rows))
    return 0
