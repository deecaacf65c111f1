"""The jobs of a sweep, the slots they run in, and what their run directories say.

Jobs. One job per (config, dataset, seed), in that nesting order (job 0 is the first config,
first dataset, first seed). Each runs

    <python> <script> --config C [--resume] task.name=D training.seed=S \\
        paths.run_name=<config stem>__<D>__seed<S> paths.output_dir=<output dir> [extra overrides]

so its run directory is <output dir>/<config stem>__<D>__seed<S>, and its output goes to
<sweep dir>/logs/<run name>.log (appended; each attempt starts with a `=== ... ===` line).

GPUs. `--gpus "0 1 3"` (spaces or commas) names the GPUs; `--gpu-plan "2,2,1"` is the number of
concurrent jobs per GPU (one number applies to every GPU; default 1). Each job gets
CUDA_VISIBLE_DEVICES set to its GPU. `--gpus ""` (or `--gpus` with no value) runs on CPU:
`--cpu-slots` concurrent jobs (default 1) with CUDA_VISIBLE_DEVICES="". Without `--gpus`, the
GPUs are CUDA_VISIBLE_DEVICES when set, else those `nvidia-smi` lists, else none (CPU).

Skipping and resuming. A job whose run.json says "status": "finished" is skipped (plan state
`finished-skip`); one whose run.json says "running" with a live pid on this host is skipped too
(`running-skip`: someone else runs it). Any other job runs; it gets `--resume` when its run
directory holds a complete checkpoint (trainkit.checkpoints.find_latest_checkpoint; plan state
`resume`), otherwise it starts fresh (plan state `todo`). Both checks are repeated right before
a job starts. So starting the same sweep again after a crash or Ctrl-C finishes what is left.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit.checkpoints import find_latest_checkpoint
from trainkit.runlock import pid_alive
from trainkit.fileio import read_json
from trainkit.runlog import RUN_INFO_FILE
from trainkit.tasks.official import OFFICIAL_METRICS, base_task

# The sweep directory: <sweep dir>/state.json, scheduler.pid, sweep.log, logs/<run name>.log
STATE_FILE = "state.json"
PID_FILE = "scheduler.pid"
SWEEP_LOG = "sweep.log"
JOB_LOGS = "logs"
SWEEPS_ROOT = "sweeps"
DEFAULT_SCRIPT = "train_lora.py"
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
RESERVED_KEYS = ("task.name", "training.seed", "paths.run_name", "paths.output_dir")


class SweepError(Exception):
    """A problem with the sweep's arguments: one line on stderr, exit 2."""


@dataclass
class Job:
    index: int
    config: str
    dataset: str
    seed: int
    run_name: str
    run_dir: str
    log: str


@dataclass
class Slot:
    name: str
    gpu: str | None  # None: CPU

    @property
    def cuda_visible_devices(self) -> str:
        return "" if self.gpu is None else self.gpu


@dataclass
class Plan:
    jobs: list[Job]
    slots: list[Slot]
    sweep_dir: Path
    output_dir: str
    script: str
    python: list[str]
    extra: list[str]
    warnings: list[str] = field(default_factory=list)


def run_name_for(config: str, dataset: str, seed: int) -> str:
    return f"{Path(config).stem}__{dataset}__seed{seed}"


def split_list(text: str) -> list[str]:
    return [t for t in re.split(r"[\s,]+", text.strip()) if t]


def detect_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES when set, else the indices nvidia-smi lists, else [] (CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in split_list(env) if g != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return split_list(out.stdout) if out.returncode == 0 else []


def build_slots(gpus: list[str], gpu_plan: str | None, cpu_slots: int) -> tuple[list[Slot], list[str]]:
    """Slots interleaved across GPUs (gpu0#0, gpu1#0, ..., gpu0#1, ...) so the first jobs spread out."""
    warnings = []
    if not gpus:
        if cpu_slots < 1:
            raise SweepError(f"--cpu-slots must be at least 1 (got {cpu_slots})")
        if gpu_plan:
            warnings.append("no GPUs: --gpu-plan is ignored, using --cpu-slots")
        return [Slot(f"cpu#{k}", None) for k in range(cpu_slots)], warnings
    if len(set(gpus)) != len(gpus):
        raise SweepError(f"--gpus: a GPU is listed twice ({' '.join(gpus)})")
    items = split_list(gpu_plan) if gpu_plan else ["1"]
    if not items:
        raise SweepError(f"--gpu-plan: expected numbers like '2,2,1' (got {gpu_plan!r})")
    counts = []
    for item in items:
        if not item.isdigit():
            raise SweepError(f"--gpu-plan: {item!r} is not a number of concurrent jobs (got {gpu_plan!r})")
        counts.append(int(item))
    if len(counts) == 1:
        counts = counts * len(gpus)
    elif len(counts) != len(gpus):
        raise SweepError(f"--gpu-plan: {len(counts)} numbers for {len(gpus)} GPUs ({' '.join(gpus)}): "
                         f"give one number, or one per GPU")
    if sum(counts) == 0:
        raise SweepError("--gpu-plan: every GPU has 0 slots")
    slots = [Slot(f"gpu{gpu}#{k}", gpu) for k in range(max(counts)) for gpu, n in zip(gpus, counts) if k < n]
    return slots, warnings


def check_overrides(extra: list[str]) -> None:
    for text in extra:
        key = text.split("=", 1)[0]
        if "=" not in text or not re.fullmatch(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+", key):
            raise SweepError(f"extra override {text!r}: expected section.key=value")
        if key in RESERVED_KEYS:
            raise SweepError(f"extra override {text!r}: the sweep sets {key} for every job")


def default_sweep_dir() -> Path:
    return Path(SWEEPS_ROOT) / time.strftime("sweep-%Y%m%d-%H%M%S")


def build_plan(args) -> Plan:
    for config in args.configs:
        if not Path(config).is_file():
            raise SweepError(f"--configs: no such file: {config}")
    script = args.script
    if not Path(script).is_file():
        raise SweepError(f"--script: no such file: {script} (run from the repository root or give a path)")
    for dataset in args.datasets:
        if not NAME_RE.fullmatch(dataset):
            raise SweepError(f"--datasets: {dataset!r} may hold only letters, digits, '.', '_' and '-'")
    if len(set(args.seeds)) != len(args.seeds):
        raise SweepError(f"--seeds: a seed is listed twice ({' '.join(map(str, args.seeds))})")
    check_overrides(args.extra)
    python = shlex.split(args.python) if args.python else [sys.executable]
    if not python:
        raise SweepError("--python: empty command")
    warnings = []
    unknown = sorted({d for d in args.datasets if base_task(d) not in OFFICIAL_METRICS})
    if unknown:
        warnings.append(f"datasets without official metrics in trainkit.tasks.official: {', '.join(unknown)}")
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else default_sweep_dir()
    jobs, seen = [], {}
    for config in args.configs:
        for dataset in args.datasets:
            for seed in args.seeds:
                name = run_name_for(config, dataset, seed)
                if not NAME_RE.fullmatch(name):
                    raise SweepError(f"--configs: {config}: run name {name!r} may hold only letters, digits, '.', '_' and '-'")
                if name in seen:
                    raise SweepError(f"--configs: {seen[name]} and {config} give the same run name {name} (same file name)")
                seen[name] = config
                jobs.append(Job(len(jobs), config, dataset, seed, name, str(Path(args.output_dir) / name),
                                str(sweep_dir / JOB_LOGS / f"{name}.log")))
    slots, slot_warnings = build_slots(args.gpus, getattr(args, "gpu_plan", None), getattr(args, "cpu_slots", 1))
    return Plan(jobs, slots, sweep_dir, args.output_dir, script, python, list(args.extra), warnings + slot_warnings)


def run_status(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(plan state, reason) of a run directory: finished-skip, running-skip, resume or todo."""
    info = read_json(Path(run_dir) / RUN_INFO_FILE, default=None)
    status = info.get("status") if isinstance(info, dict) else None
    if status == "finished":
        return "finished-skip", "run.json status finished"
    if (status == "running" and info.get("host") == socket.gethostname() and pid_alive(info.get("pid"))):
        return "running-skip", f"running elsewhere (pid {info.get('pid')})"
    checkpoint = find_latest_checkpoint(run_dir)
    if checkpoint is not None:
        return "resume", f"status {status or 'unknown'}, resuming from {checkpoint.name}"
    return "todo", f"status {status}" if status else ""


def plan_states(plan: Plan) -> list[tuple[str, str]]:
    return [run_status(job.run_dir) for job in plan.jobs]


def resume_position(plan: Plan) -> int:
    """Where --resume goes in a job's argv: after `<python> <script> --config C`."""
    return len(plan.python) + 3


def job_command(plan: Plan, job: Job, resume: bool) -> list[str]:
    """The job's argv, with --resume when `resume`."""
    cmd = [*plan.python, plan.script, "--config", job.config, f"task.name={job.dataset}",
           f"training.seed={job.seed}", f"paths.run_name={job.run_name}", f"paths.output_dir={plan.output_dir}",
           *plan.extra]
    if resume:
        cmd.insert(resume_position(plan), "--resume")
    return cmd


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def format_plan(plan: Plan, states: list[tuple[str, str]]) -> str:
    todo = [i for i, (s, _) in enumerate(states) if s in ("todo", "resume")]
    first_wave = {i: plan.slots[k].name for k, i in enumerate(todo[: len(plan.slots)])}
    rows = []
    for job, (state, _) in zip(plan.jobs, states):
        slot = first_wave.get(job.index, "next free" if state in ("todo", "resume") else "-")
        rows.append([job.index, job.config, job.dataset, job.seed, slot, job.run_dir, state])
    slots_text = ", ".join(s.name for s in plan.slots)
    head = (f"sweep {plan.sweep_dir}: {len(plan.jobs)} jobs, {len(todo)} to run, "
            f"{len(plan.slots)} slots ({slots_text})\n"
            f"command: {shlex.join([*plan.python, plan.script])} --config CONFIG "
            f"task.name=DATASET training.seed=SEED paths.run_name=RUN paths.output_dir={plan.output_dir}"
            + (f" {shlex.join(plan.extra)}" if plan.extra else ""))
    table = format_table(["job", "config", "dataset", "seed", "gpu slot", "run dir", "state"], rows)
    return "\n".join([head, *[f"warning: {w}" for w in plan.warnings], table])
