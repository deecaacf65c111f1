"""`run`: a pool of slots on this node that starts each queued job when a slot is free.

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
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from trainkit.runlock import pid_alive
from trainkit.fileio import read_json, write_json_atomic
from trainkit.runlog import RUN_INFO_FILE
from trainkit.sweep.plan import (JOB_LOGS, PID_FILE, STATE_FILE, SWEEP_LOG, Job, Plan, Slot, job_command,
                                 run_status)

REPO = Path(__file__).resolve().parents[2]


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
