"""SIGTERM / SIGINT: finish the current optimizer step, save a checkpoint, exit with 128 + signal.

Schedulers send SIGTERM some seconds before SIGKILL (SLURM: KillWait, 30 s by default, or
`--signal`; Kubernetes: terminationGracePeriodSeconds, 30 s by default); Ctrl-C sends SIGINT.
What happens, on every process:

- before the training loop (imports, data, model loading) there is nothing to save: the signal
  raises `Preempted`, which the script records (status `preempted`) and exits with;
- inside the loop (after `arm()`) the signal only sets a flag. Each script adds the flag to the
  all-reduce it already does once per optimizer step, so every rank sees the same sum and all
  stop after the same step; the script then saves `checkpoint-<step>` and `TrainingRun.finish` writes the
  `preempted` event and status;
- a grace timer (training.preemption_grace_seconds) starts at the first signal: if the step and
  the save are not done by then, the records are written and the process exits anyway (a
  half-written checkpoint stays a staging directory, removed at the next start);
- a second signal exits at once, the same way.

Exit code: 128 + signal number (143 for SIGTERM, 130 for SIGINT), what a shell reports for a
process ended by that signal; SLURM requeue scripts and Kubernetes restart policies treat it as
"stopped from outside, run again". Under launch_training.sh the code is recorded per rank in
$TRAINKIT_EXIT_DIR and the process exits 0 towards accelerate (trainkit.launcher.exit_towards_parent),
so torchrun does not print its failure report; the launcher exits with the recorded code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PREEMPTED_EXIT_CODES = frozenset(128 + s for s in STOP_SIGNALS)  # 143, 130


def exit_code_for(signum: int) -> int:
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Preempted(BaseException):
    """A stop signal before the training loop: nothing to save. A BaseException like
    KeyboardInterrupt, so library code catching Exception does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal_name(signum)} before training started: nothing to save")
        self.signum = signum
        self.exit_code = exit_code_for(signum)

    def report(self) -> None:
        """The one stderr line for this stop: from rank 0 only, not one per process."""
        if os.environ.get("RANK", "0") == "0":
            print(str(self), file=sys.stderr)


class Preemption:
    """The process's stop-signal state (one per process: signals are process-wide)."""

    def __init__(self):
        self.signum: int | None = None
        self.received_at: float | None = None
        self.armed = False               # in the training loop: a signal stops at the end of the step
        self.grace_seconds = 25.0
        self.runlog = None               # set by watch(): where the hard-exit records go
        self.current_step: Callable[[], int] = lambda: 0
        self._timer: threading.Timer | None = None
        self._records_lock = threading.Lock()
        self._installed = False
        self._flags: dict = {}           # device -> (0., 1.) tensors for flag()

    # ---------------------------------------------------------------- setup
    def install(self) -> None:
        """Handle SIGTERM and SIGINT (idempotent; only the main thread may install handlers)."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        self._installed = True

    def watch(self, runlog, grace_seconds: float, current_step: Callable[[], int]) -> "Preemption":
        """Called by a script once its RunLog exists: where to record a hard exit, and the grace time."""
        self.install()
        self.runlog, self.grace_seconds, self.current_step = runlog, float(grace_seconds), current_step
        if self.signum is not None:  # a signal already arrived (while the script was importing)
            raise Preempted(self.signum)
        return self

    def arm(self) -> None:
        """The training loop starts: from now on a signal stops after the current optimizer step."""
        self.armed = True

    # ---------------------------------------------------------------- the per-step vote
    @property
    def requested(self) -> bool:
        return self.signum is not None

    def flag(self, device):
        """0-d float64 tensor, 1 when a stop signal arrived on this process: the scripts add it to
        their per-step all-reduce, so a sum > 0 means every rank stops after this step."""
        import torch

        # Made once per device: a new tensor from a Python number is a host-to-device copy, which
        # on CUDA waits for the queued step; this runs every optimizer step. Callers only read it.
        if device not in self._flags:
            self._flags[device] = tuple(torch.tensor(v, dtype=torch.float64, device=device) for v in (0.0, 1.0))
        return self._flags[device][self.requested]

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum or signal.SIGTERM)

    # ---------------------------------------------------------------- the signal
    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            self.hard_exit(f"second {signal_name(signum)}: exiting at once without a checkpoint")
        self.signum, self.received_at = signum, time.time()
        if not self.armed:
            raise Preempted(signum)
        self.say(f"{signal_name(signum)}: finishing the current optimizer step and saving a checkpoint "
                 f"(at most {self.grace_seconds:g} s, training.preemption_grace_seconds; a second signal exits at once)")
        self._timer = threading.Timer(self.grace_seconds, self.hard_exit,
                                      args=(f"the checkpoint was not saved within training.preemption_grace_seconds "
                                            f"({self.grace_seconds:g} s)",))
        self._timer.daemon = True
        self._timer.start()

    def say(self, message: str) -> None:
        if self.runlog is None or self.runlog.is_main:
            print(f"[trainkit] {message}", file=sys.stderr, flush=True)

    def hard_exit(self, why: str) -> None:
        """Write the preempted records (main process) and end the process now: the grace time ran
        out or a second signal came. Runs in the signal handler or in the timer's thread."""
        if not self._records_lock.acquire(blocking=False):
            return  # the script is writing its own end records (settle), or another hard exit is under way
        code = self.exit_code
        self.say(why)
        if self.runlog is not None:
            try:
                self.record(self.runlog, self.current_step(), checkpoint=None, detail=why)
            except Exception:  # exiting matters more than the record
                pass
        from trainkit.launcher import exit_towards_parent, record_exit_code

        record_exit_code(code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_towards_parent(code))

    # ---------------------------------------------------------------- the records
    def record(self, runlog, step: int, checkpoint: str | None, detail: str = "") -> int:
        """The `preempted` and `stop` events and run.json (status preempted, exit_code). Returns the code."""
        code = self.exit_code
        name = signal_name(self.signum or signal.SIGTERM)
        saved = f"checkpoint saved: {checkpoint}" if checkpoint else "no checkpoint saved"
        message = f"{name} at step {step}: {saved}" + (f" ({detail})" if detail else "")
        runlog.event(step, "preempted", message, signal=name, checkpoint=checkpoint, exit_code=code,
                     grace_seconds=self.grace_seconds)
        runlog.event(step, "stop", f"run ended: preempted by {name}", reason="preempted")
        runlog.update_run_info(status="preempted", end_time=time.time(), exit_code=code, error=None)
        return code

    def settle(self) -> None:
        """The script writes its end records now: a late grace timer must not overwrite them."""
        if self._records_lock.acquire(blocking=False):  # held until the process ends
            if self._timer is not None:
                self._timer.cancel()


PREEMPTION = Preemption()
