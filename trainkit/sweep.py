"""Sweeps: run every (config, dataset, seed) combination on one node, or as a SLURM job array.

    python -m trainkit.sweep run --configs configs/a.yaml configs/b.yaml --seeds 1 2 3 \\
        --datasets sst2 mrpc --gpus "0 1 3" --gpu-plan "2,2,1" \\
        [--sweep-dir sweeps/glue] [--output-dir outputs] [--script train_lora.py] \\
        [--python "accelerate launch --num_processes 1"] [--cpu-slots N] \\
        [--dry-run] [--foreground] [-- training.max_steps=500 optimization.learning_rate=2e-4]
    python -m trainkit.sweep status [--sweep-dir sweeps/glue] [--json]
    python -m trainkit.sweep slurm --configs configs/a.yaml --seeds 1 2 3 --datasets sst2 mrpc \\
        --partition gpu --gpus-per-job 1 --time 04:00:00 [--max-concurrent 8] \\
        [--account A] [--cpus-per-task 8] [--mem 64G] [--out sweep.sbatch] [-- overrides ...]

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

Detached by default. `run` prints the plan, then starts the scheduler as a new session
(`python -m trainkit.sweep run ... --foreground`, stdin /dev/null, output appended to
<sweep dir>/sweep.log, pid in <sweep dir>/scheduler.pid) and returns: closing the terminal
does not stop the sweep. `--foreground` runs the scheduler in this process. Ctrl-C, SIGTERM or
SIGHUP to the scheduler sends SIGTERM to every running job's process group (SIGKILL after
`--grace` seconds, or at a second signal), records those jobs as `interrupted` and exits 130.
Only one scheduler runs per sweep dir.

<sweep dir>/state.json (written atomically after every change):

    {"version": 1, "sweep_dir", "cwd", "host", "scheduler_pid", "scheduler_state":
     "running" | "done" | "interrupted", "started", "updated", "script", "python",
     "output_dir", "extra_overrides", "slots": ["gpu0#0", ...],
     "jobs": [{"index", "run_name", "config", "dataset", "seed", "run_dir", "log",
               "state": "queued" | "running" | "finished" | "failed" | "interrupted" | "skipped",
               "skip_reason", "slot", "gpu", "cuda_visible_devices", "pid", "command",
               "resume", "exit_code", "start_time", "end_time", "run_status"}, ...]}

`slot` is "gpu<id>#<k>" or "cpu#<k>"; `gpu` is the GPU id (null on CPU); times are unix seconds;
`exit_code` is negative for a job killed by a signal; `run_status` is run.json's status when the
job ended. The scheduler exits 0 when every job finished (or was skipped), else 1.

`status` prints the jobs of a sweep (default: the newest sweeps/*/state.json): state, GPU,
elapsed time, the last logged step / total_steps (<run dir>/logs/training_log.jsonl) and the
latest validation task_score (<run dir>/logs/eval_log.jsonl), and whether the scheduler is alive.

`slurm` writes a job-array script instead of running anything: `#SBATCH --array=0-(N-1)[%M]`
over the N jobs that are not finished, a bash array JOBS of their commands indexed by
SLURM_ARRAY_TASK_ID, per-task logs (<sweep dir>/logs/slurm-%A_%a.out for the wrapper, the job's
own output in <sweep dir>/logs/<run name>.log). At run time each task skips a finished run and
adds `--resume` when a complete checkpoint exists. SLURM sets CUDA_VISIBLE_DEVICES itself.

Errors in the selection (missing config or script, bad --gpu-plan, plan length neither 1 nor
the number of GPUs, nothing to run, ...) print one line `sweep: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit.checkpoints import find_latest_checkpoint
from trainkit.runlock import pid_alive
from trainkit.runlog import LOGS_DIR, RUN_INFO_FILE, STREAMS, iter_jsonl, read_json, write_json_atomic
from trainkit.tasks.official import OFFICIAL_METRICS, TASK_SCORE, base_task, selection_score

STATE_FILE = "state.json"
PID_FILE = "scheduler.pid"
SWEEP_LOG = "sweep.log"
JOB_LOGS = "logs"
DEFAULT_SCRIPT = "train_lora.py"
SWEEPS_ROOT = "sweeps"
REPO = Path(__file__).resolve().parents[1]
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
ACTIVE = ("queued", "running")


class SweepError(Exception):
    """A problem with the sweep's arguments: one line on stderr, exit 2."""


# ---------------------------------------------------------------- selection
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
    reserved = {"task.name", "training.seed", "paths.run_name", "paths.output_dir"}
    for text in extra:
        key = text.split("=", 1)[0]
        if "=" not in text or not re.fullmatch(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+", key):
            raise SweepError(f"extra override {text!r}: expected section.key=value")
        if key in reserved:
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


# ---------------------------------------------------------------- run directories
def run_status(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(plan state, reason) of a run directory: finished-skip, running-skip, resume or todo."""
    info = read_json(Path(run_dir) / RUN_INFO_FILE, default=None)
    status = info.get("status") if isinstance(info, dict) else None
    if status == "finished":
        return "finished-skip", "run.json status finished"
    if (status == "running" and info.get("host") == socket.gethostname() and pid_alive(info.get("pid"))):
        return "running-skip", f"running elsewhere (pid {info.get('pid')})"
    if find_latest_checkpoint(run_dir) is not None:
        return "resume", f"status {status or 'unknown'}, resuming from {find_latest_checkpoint(run_dir).name}"
    return "todo", f"status {status}" if status else ""


def job_command(plan: Plan, job: Job, resume: bool | str) -> list[str]:
    """The job's argv; `resume` True adds --resume, a string is inserted verbatim (SLURM's $RESUME)."""
    flag = ["--resume"] if resume is True else ([resume] if isinstance(resume, str) else [])
    return [*plan.python, plan.script, "--config", job.config, *flag, f"task.name={job.dataset}",
            f"training.seed={job.seed}", f"paths.run_name={job.run_name}", f"paths.output_dir={plan.output_dir}",
            *plan.extra]


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def plan_states(plan: Plan) -> list[tuple[str, str]]:
    return [run_status(job.run_dir) for job in plan.jobs]


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
            f"command: {shlex.join(job_command(plan, plan.jobs[0], False)[:len(plan.python) + 1])} --config CONFIG "
            f"task.name=DATASET training.seed=SEED paths.run_name=RUN paths.output_dir={plan.output_dir}"
            + (f" {shlex.join(plan.extra)}" if plan.extra else ""))
    table = format_table(["job", "config", "dataset", "seed", "gpu slot", "run dir", "state"], rows)
    return "\n".join([head, *[f"warning: {w}" for w in plan.warnings], table])


# ---------------------------------------------------------------- scheduler
def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Scheduler:
    """A pool of slots: start the next queued job when a slot is free, poll the running ones."""

    def __init__(self, plan: Plan, states: list[tuple[str, str]], poll_interval: float = 1.0,
                 grace: float = 30.0, detached: bool = False):
        self.plan = plan
        self.poll_interval = poll_interval
        self.grace = grace
        self.stop_signal: int | None = None
        self.signal_count = 0
        self.procs: dict[int, subprocess.Popen] = {}
        self.free = list(plan.slots)
        self.slot_of: dict[int, Slot] = {}
        self.state_path = plan.sweep_dir / STATE_FILE
        now = time.time()
        self.state = {
            "version": 1, "sweep_dir": str(plan.sweep_dir), "cwd": os.getcwd(), "host": socket.gethostname(),
            "scheduler_pid": os.getpid(), "scheduler_state": "running", "detached": detached,
            "started": now, "updated": now, "script": plan.script, "python": plan.python,
            "output_dir": plan.output_dir, "extra_overrides": plan.extra, "slots": [s.name for s in plan.slots],
            "jobs": [],
        }
        for job, (pstate, reason) in zip(plan.jobs, states):
            skipped = pstate in ("finished-skip", "running-skip")
            self.state["jobs"].append({
                "index": job.index, "run_name": job.run_name, "config": job.config, "dataset": job.dataset,
                "seed": job.seed, "run_dir": job.run_dir, "log": job.log,
                "state": "skipped" if skipped else "queued", "skip_reason": reason if skipped else None,
                "slot": None, "gpu": None, "cuda_visible_devices": None, "pid": None, "command": None,
                "resume": None, "exit_code": None, "start_time": None, "end_time": None, "run_status": None,
            })
        self.queue = [j for j in plan.jobs if self.state["jobs"][j.index]["state"] == "queued"]

    # state.json
    def save(self) -> None:
        self.state["updated"] = time.time()
        write_json_atomic(self.state_path, self.state)

    def _on_signal(self, signum, frame) -> None:
        self.signal_count += 1
        if self.stop_signal is None:
            self.stop_signal = signum
        if self.signal_count > 1:  # second signal: no more grace
            for proc in self.procs.values():
                _killpg(proc.pid, signal.SIGKILL)

    def run(self) -> int:
        self.plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.plan.sweep_dir / JOB_LOGS).mkdir(exist_ok=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        pid_path = self.plan.sweep_dir / PID_FILE
        pid_path.write_text(f"{os.getpid()}\n")
        self.save()
        say(f"scheduler pid {os.getpid()}: {len(self.queue)} jobs to run on {len(self.plan.slots)} slots")
        try:
            while self.stop_signal is None:
                self._reap()
                while self.free and self.queue and self.stop_signal is None:
                    self._launch(self.queue.pop(0), self.free.pop(0))
                if not self.procs and not self.queue:
                    break
                time.sleep(self.poll_interval)
            if self.stop_signal is not None:
                self._interrupt()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if pid_path.exists() and pid_path.read_text().strip() == str(os.getpid()):
                pid_path.unlink()
        jobs = self.state["jobs"]
        counts = {s: sum(j["state"] == s for j in jobs) for s in ("finished", "skipped", "failed", "interrupted", "queued")}
        say("done: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        if self.stop_signal is not None:
            self.state["scheduler_state"] = "interrupted"
            self.save()
            return 130
        self.state["scheduler_state"] = "done"
        self.save()
        return 0 if all(j["state"] in ("finished", "skipped") for j in jobs) else 1

    def _launch(self, job: Job, slot: Slot) -> None:
        rec = self.state["jobs"][job.index]
        pstate, reason = run_status(job.run_dir)  # again: another process may have finished it meanwhile
        if pstate in ("finished-skip", "running-skip"):
            rec.update(state="skipped", skip_reason=reason)
            self.free.insert(0, slot)
            say(f"job {job.index} {job.run_name}: skipped ({reason})")
            self.save()
            return
        resume = pstate == "resume"
        cmd = job_command(self.plan, job, resume)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=slot.cuda_visible_devices)
        Path(job.log).parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        with open(job.log, "ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.index} on {slot.name} "
                      f"CUDA_VISIBLE_DEVICES={slot.cuda_visible_devices!r}: {shlex.join(cmd)} ===\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
            except OSError as e:
                log.write(f"=== could not start: {e} ===\n".encode())
                rec.update(state="failed", slot=slot.name, gpu=slot.gpu, command=cmd, resume=resume,
                           exit_code=None, start_time=now, end_time=now, skip_reason=f"could not start: {e}")
                self.free.insert(0, slot)
                say(f"job {job.index} {job.run_name}: could not start: {e}")
                self.save()
                return
        self.procs[job.index] = proc
        self.slot_of[job.index] = slot
        rec.update(state="running", slot=slot.name, gpu=slot.gpu, cuda_visible_devices=slot.cuda_visible_devices,
                   pid=proc.pid, command=cmd, resume=resume, exit_code=None, start_time=now, end_time=None,
                   run_status=None)
        say(f"job {job.index} {job.run_name}: started on {slot.name} (pid {proc.pid}{', --resume' if resume else ''})")
        self.save()

    def _finish(self, index: int, code: int | None, interrupted: bool = False) -> None:
        rec = self.state["jobs"][index]
        self.procs.pop(index, None)
        self.free.append(self.slot_of.pop(index))
        self.free.sort(key=lambda s: self.plan.slots.index(s))
        info = read_json(Path(rec["run_dir"]) / RUN_INFO_FILE, default={}) or {}
        rec.update(exit_code=code, end_time=time.time(), run_status=info.get("status"),
                   state="interrupted" if interrupted else ("finished" if code == 0 else "failed"))
        say(f"job {index} {rec['run_name']}: {rec['state']} (exit code {code}, "
            f"{rec['end_time'] - rec['start_time']:.0f} s)")
        self.save()

    def _reap(self) -> None:
        for index, proc in sorted(self.procs.items()):
            code = proc.poll()
            if code is not None:
                self._finish(index, code)

    def _interrupt(self) -> None:
        name = signal.Signals(self.stop_signal).name
        say(f"{name}: stopping {len(self.procs)} running jobs (SIGTERM to their process groups)")
        for proc in self.procs.values():
            _killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + self.grace
        while self.procs and time.time() < deadline:
            for index, proc in sorted(self.procs.items()):
                if proc.poll() is not None:
                    self._finish(index, proc.returncode, interrupted=True)
            time.sleep(0.05)
        for index, proc in sorted(self.procs.items()):
            _killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._finish(index, proc.returncode, interrupted=True)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def scheduler_alive(sweep_dir: Path) -> int | None:
    """The pid of the live scheduler of `sweep_dir`, or None."""
    try:
        pid = int((sweep_dir / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        state = read_json(sweep_dir / STATE_FILE, default={}) or {}
        if state.get("scheduler_state") != "running" or state.get("host") != socket.gethostname():
            return None
        pid = state.get("scheduler_pid")
    return pid if pid_alive(pid, must_contain="trainkit.sweep") else None


# ---------------------------------------------------------------- commands
def cmd_run(args) -> int:
    plan = build_plan(args)
    states = plan_states(plan)
    if not args.quiet_plan:
        print(format_plan(plan, states), flush=True)
    if not any(s in ("todo", "resume") for s, _ in states):
        raise SweepError(f"nothing to run: all {len(plan.jobs)} runs are finished or running elsewhere")
    if args.dry_run:
        print("dry run: nothing started")
        return 0
    live = scheduler_alive(plan.sweep_dir)
    if live is not None and live != os.getpid():
        raise SweepError(f"a scheduler (pid {live}) is already running {plan.sweep_dir}: "
                         f"see python -m trainkit.sweep status --sweep-dir {plan.sweep_dir}")
    if args.foreground:
        return Scheduler(plan, states, args.poll_interval, args.grace, detached=args.detached_child).run()
    return detach(args, plan)


def detach(args, plan: Plan) -> int:
    """Start `run --foreground` as a new session (no terminal, stdin /dev/null) and return."""
    sweep_dir = plan.sweep_dir
    (sweep_dir / JOB_LOGS).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "trainkit.sweep", "run", "--configs", *args.configs,
            "--seeds", *map(str, args.seeds), "--datasets", *args.datasets,
            "--gpus", " ".join(args.gpus), "--cpu-slots", str(args.cpu_slots),
            "--sweep-dir", str(sweep_dir), "--output-dir", args.output_dir, "--script", args.script,
            "--python", shlex.join(plan.python), "--poll-interval", str(args.poll_interval),
            "--grace", str(args.grace), "--foreground", "--detached-child", "--quiet-plan"]
    if args.gpu_plan and args.gpus:
        argv += ["--gpu-plan", args.gpu_plan]
    if plan.extra:
        argv += ["--", *plan.extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    log_path = sweep_dir / SWEEP_LOG
    with open(log_path, "ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} detached scheduler: {shlex.join(argv)} ===\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, close_fds=True)
    (sweep_dir / PID_FILE).write_text(f"{proc.pid}\n")
    # Wait until the scheduler has written its state (or died), so errors show here.
    deadline = time.time() + 30
    while time.time() < deadline:
        state = read_json(sweep_dir / STATE_FILE, default={}) or {}
        if state.get("scheduler_pid") == proc.pid:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    code = proc.poll()
    if code is not None and code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-10:]
        print("\n".join(tail), file=sys.stderr)
        print(f"sweep: error: the scheduler exited at once with code {code} (log: {log_path})", file=sys.stderr)
        return 1
    print(f"started detached scheduler pid {proc.pid}; it keeps running after this terminal closes.\n"
          f"  log:    {log_path}\n"
          f"  status: {shlex.join([sys.executable, '-m', 'trainkit.sweep', 'status', '--sweep-dir', str(sweep_dir)])}\n"
          f"  stop:   kill {proc.pid}   (its running jobs are stopped and recorded as interrupted)")
    return 0


# ---------------------------------------------------------------- status
def _tail_last_record(path: Path, max_bytes: int = 65536) -> dict | None:
    """The last complete JSON line of a (possibly large) JSONL file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return None
    for raw in reversed(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")[1:-1]):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def run_progress(run_dir: str) -> dict:
    """Last logged step, total_steps, and the latest validation task_score of a run directory."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / RUN_INFO_FILE, default={}) or {}
    last = _tail_last_record(run_dir / LOGS_DIR / STREAMS["training"]) or {}
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


# ---------------------------------------------------------------- slurm
def cmd_slurm(args) -> int:
    plan = build_plan(args)
    states = plan_states(plan)
    todo = [job for job, (s, _) in zip(plan.jobs, states) if s in ("todo", "resume")]
    rows = [[job.index, job.config, job.dataset, job.seed, job.run_dir, s] for job, (s, _) in zip(plan.jobs, states)]
    print(f"sweep {plan.sweep_dir}: {len(plan.jobs)} jobs, {len(todo)} in the array")
    print(format_table(["job", "config", "dataset", "seed", "run dir", "state"], rows))
    if not todo:
        raise SweepError(f"nothing to run: all {len(plan.jobs)} runs are finished or running elsewhere")
    out = Path(args.out) if args.out else plan.sweep_dir / "sweep.sbatch"
    text = slurm_script(args, plan, todo)
    out.parent.mkdir(parents=True, exist_ok=True)
    (plan.sweep_dir / JOB_LOGS).mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o755)
    print(f"wrote {out}: a job array of {len(todo)} tasks\nsubmit with:  sbatch {out}\n"
          f"watch with:   squeue --me   (task logs in {plan.sweep_dir / JOB_LOGS}/)")
    return 0


def slurm_script(args, plan: Plan, todo: list[Job]) -> str:
    cwd = os.getcwd()
    sweep_abs = (Path(cwd) / plan.sweep_dir).resolve() if not plan.sweep_dir.is_absolute() else plan.sweep_dir
    array = f"0-{len(todo) - 1}" + (f"%{args.max_concurrent}" if args.max_concurrent else "")
    name = args.job_name or plan.sweep_dir.name
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={name}",
             f"#SBATCH --partition={args.partition}",
             f"#SBATCH --gres=gpu:{args.gpus_per_job}" if args.gpus_per_job > 0 else None,
             f"#SBATCH --time={args.time}",
             f"#SBATCH --array={array}",
             f"#SBATCH --output={sweep_abs}/{JOB_LOGS}/slurm-%A_%a.out",
             f"#SBATCH --cpus-per-task={args.cpus_per_task}" if args.cpus_per_task else None,
             f"#SBATCH --mem={args.mem}" if args.mem else None,
             f"#SBATCH --account={args.account}" if args.account else None,
             "#",
             "# Generated by python -m trainkit.sweep slurm; submit with: sbatch " + shlex.quote(args.out or str(plan.sweep_dir / 'sweep.sbatch')),
             "# One array task per job below. A task skips a run whose run.json says finished and",
             "# adds --resume when the run directory holds a complete checkpoint.",
             "#",
             *[f"#   task {k}: {job.run_name}" for k, job in enumerate(todo)],
             "",
             "set -euo pipefail",
             f"cd {shlex.quote(cwd)}",
             "",
             "RUN_DIRS=(",
             *[f"  {shlex.quote(job.run_dir)}" for job in todo],
             ")",
             "LOGS=(",
             *[f"  {shlex.quote(str(sweep_abs / JOB_LOGS / (job.run_name + '.log')))}" for job in todo],
             ")",
             "# $RESUME is empty, or --resume when a complete checkpoint exists",
             "JOBS=(",
             *[f"  {shlex.quote(_slurm_command(plan, job))}" for job in todo],
             ")",
             "",
             'i="${SLURM_ARRAY_TASK_ID:?submit this script with sbatch (SLURM_ARRAY_TASK_ID is not set)}"',
             'if [ "$i" -ge "${#JOBS[@]}" ]; then echo "no job $i (${#JOBS[@]} jobs)" >&2; exit 1; fi',
             'RUN_DIR="${RUN_DIRS[$i]}"',
             'LOG="${LOGS[$i]}"',
             f'if [ -f "$RUN_DIR/{RUN_INFO_FILE}" ] && grep -Eq \'"status": *"finished"\' "$RUN_DIR/{RUN_INFO_FILE}"; then',
             '  echo "task $i: $RUN_DIR is finished: skipped"',
             "  exit 0",
             "fi",
             'RESUME=""',
             'if compgen -G "$RUN_DIR/checkpoint-*/trainer_state.json" > /dev/null; then RESUME="--resume"; fi',
             'echo "task $i on $(hostname) CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}: ${JOBS[$i]} (RESUME=$RESUME), log $LOG"',
             'mkdir -p "$(dirname "$LOG")"',
             'echo "=== $(date "+%F %T") slurm job ${SLURM_ARRAY_JOB_ID:-?}_$i on $(hostname): ${JOBS[$i]} $RESUME ===" >> "$LOG"',
             'eval "${JOBS[$i]}" >> "$LOG" 2>&1',
             ""]
    return "\n".join(line for line in lines if line is not None)


def _slurm_command(plan: Plan, job: Job) -> str:
    cmd = job_command(plan, job, "$RESUME")
    return " ".join(tok if tok == "$RESUME" else shlex.quote(tok) for tok in cmd)


# ---------------------------------------------------------------- CLI
def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", required=True, metavar="YAML", help="config files")
    p.add_argument("--seeds", nargs="+", type=int, required=True, metavar="S", help="training.seed values")
    p.add_argument("--datasets", nargs="+", required=True, metavar="TASK", help="task.name values (sst2, mrpc, ...)")
    p.add_argument("--sweep-dir", help="where state.json, sweep.log and the job logs go (default: sweeps/sweep-<time>)")
    p.add_argument("--output-dir", default="outputs", help="paths.output_dir of every job (default: outputs)")
    p.add_argument("--script", default=DEFAULT_SCRIPT, help=f"training script (default: {DEFAULT_SCRIPT})")
    p.add_argument("--python", default=None,
                   help="command that runs the script (default: this Python; e.g. 'accelerate launch --num_processes 2')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainkit.sweep",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Extra overrides for every job go after --, e.g. -- training.max_steps=500")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sweep on this node (detached unless --foreground)")
    _add_selection(run)
    run.add_argument("--gpus", nargs="*", default=None, metavar="IDS",
                     help='GPU ids, e.g. "0 1 3"; "" for CPU (default: CUDA_VISIBLE_DEVICES or nvidia-smi)')
    run.add_argument("--gpu-plan", default=None, help='concurrent jobs per GPU, e.g. "2,2,1" or "2" (default 1)')
    run.add_argument("--cpu-slots", type=int, default=1, help="concurrent jobs without GPUs (default 1)")
    run.add_argument("--dry-run", action="store_true", help="print the plan only")
    run.add_argument("--foreground", action="store_true", help="run the scheduler in this process")
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls (default 1)")
    run.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL on stop (default 30)")
    run.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--quiet-plan", action="store_true", help=argparse.SUPPRESS)
    status = sub.add_parser("status", help="show the jobs of a sweep")
    status.add_argument("--sweep-dir", help="default: the newest sweeps/*/state.json")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    slurm = sub.add_parser("slurm", help="write a SLURM job-array script instead of running")
    _add_selection(slurm)
    slurm.add_argument("--partition", required=True)
    slurm.add_argument("--gpus-per-job", type=int, default=1)
    slurm.add_argument("--time", default="04:00:00", help="per-task time limit (default 04:00:00)")
    slurm.add_argument("--max-concurrent", type=int, default=None, help="at most this many tasks at once (%%M)")
    slurm.add_argument("--cpus-per-task", type=int, default=None)
    slurm.add_argument("--mem", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--job-name", default=None, help="default: the sweep dir's name")
    slurm.add_argument("--out", default=None, help="script path (default: <sweep dir>/sweep.sbatch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.extra = extra
    try:
        if args.command == "status":
            if extra:
                raise SweepError("status takes no overrides")
            return cmd_status(args)
        if args.command == "run":
            args.gpus = detect_gpus() if args.gpus is None else [g for t in args.gpus for g in split_list(t)]
        else:
            args.gpus = []
        if args.command == "slurm" and args.gpus_per_job < 0:
            raise SweepError("--gpus-per-job must be >= 0")
        if args.command == "slurm" and args.max_concurrent is not None and args.max_concurrent < 1:
            raise SweepError("--max-concurrent must be >= 1")
        return cmd_run(args) if args.command == "run" else cmd_slurm(args)
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
