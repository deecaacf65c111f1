"""One writer per run directory (trainkit/runlock.py): real second processes against a first one
that holds the run, through the real launcher and the real scripts.

A first run is held at a chosen moment without timing: the fake trainer (tests/fake_trainer.py)
waits on `start_hold_file` after taking the run dir and before run.json (a run still loading its
data and model), and a real train_qlora.py run is stopped with SIGSTOP once it has taken its run
dir (a stopped process keeps its files, and so its lock).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_launcher import launcher_env, write_run_config
from helpers_qlora import run_script, script_env, tiny_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch_training.sh"
FAKE_TRAINER = REPO / "tests" / "fake_trainer.py"
HOST = socket.gethostname()
WAIT_S = 300  # only for a clear failure when a state never comes; no test waits for wall time


def wait_for(condition, what: str, procs=()) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                raise AssertionError(f"process {p.args} exited ({p.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.01)


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "logs" / "training_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def fake_config(tmp_path: Path, steps: int = 4) -> tuple[Path, Path]:
    """A launcher config whose script is tests/fake_trainer.py; returns (config, run dir)."""
    return write_run_config(tmp_path, FAKE_TRAINER, training={"max_steps": steps}), tmp_path / "out" / "run"


def start_launcher(config: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([str(LAUNCHER), "--config", str(config)], cwd=REPO, env=launcher_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def launch(config: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCHER), "--config", str(config)], cwd=REPO, env=launcher_env(**env), text=True,
                          capture_output=True, timeout=WAIT_S, stdin=subprocess.DEVNULL)


def assert_in_use_line(stderr: str, holder_pid: int) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "is in use by" in lines[0] and f"pid {holder_pid} on host {HOST}" in lines[0], lines[0]


def old_attempts(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f"{run_dir.name}.old-*"))


# ---------------------------------------------------------------- the launcher

def test_second_launch_while_the_first_is_loading_exits_2_and_moves_nothing(tmp_path):
    """Issue 10 item 1, 'started 3 s apart': the second launch moved the first's live run dir aside."""
    config, run_dir = fake_config(tmp_path)
    (run_dir / "logs").mkdir(parents=True)  # an earlier attempt without a checkpoint: the first launch moves it aside
    (run_dir / "logs" / "training_log.jsonl").write_text('{"step": 1, "time": 0, "loss": 9.0}\n')
    hold = tmp_path / "loaded"
    first = start_launcher(config, FAKE_TRAINER_START_HOLD_FILE=str(hold))
    try:
        # the first has moved the earlier attempt aside and taken the run dir; it is "loading"
        wait_for(lambda: old_attempts(run_dir) and (run_dir / "logs").is_dir(), "the first launch took the run dir", [first])

        second = launch(config)
        assert second.returncode == 2, (second.stdout, second.stderr)
        assert_in_use_line(second.stderr, first.pid)
        assert second.stderr.startswith("launch_training.sh: error: ")

        # the script started directly is refused as well, even with the launcher's variable set
        lock_file = run_dir.parent / ".run.lock"
        direct = subprocess.run([sys.executable, str(FAKE_TRAINER), "--config", str(config)], cwd=REPO, text=True,
                                capture_output=True, timeout=WAIT_S, env={**os.environ, "TRAINKIT_RUN_LOCK": str(lock_file)})
        assert direct.returncode == 2, (direct.stdout, direct.stderr)
        assert_in_use_line(direct.stderr, first.pid)

        assert len(old_attempts(run_dir)) == 1  # only the earlier attempt was moved aside
        hold.touch()
        out, err = first.communicate(timeout=WAIT_S)
    finally:
        hold.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, (out, err)
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert logged_steps(old_attempts(run_dir)[0]) == [1]
    holder = json.loads(lock_file.read_text())
    assert (holder["pid"], holder["host"], holder["program"]) == (first.pid, HOST, "launch_training.sh")


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "auto-resume"])
def test_two_launches_at_once_one_exits_2_and_each_step_is_logged_once(tmp_path, resume):
    """Issue 10 item 1: two launches at once both trained (steps twice, interleaved); two
    auto-resumes at once duplicated steps and one crashed on the other's staging dir."""
    config, run_dir = fake_config(tmp_path)
    if resume:  # an interrupted run with checkpoint-2: both launches decide to resume
        subprocess.run([sys.executable, str(FAKE_TRAINER), "--config", str(config), "fake.fail_at_step=3"],
                       cwd=REPO, capture_output=True, check=False, timeout=WAIT_S)
        assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file()
    hold = tmp_path / "loaded"
    launches = [start_launcher(config, FAKE_TRAINER_START_HOLD_FILE=str(hold)) for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in launches), "one of the two launches exited")
        loser = next(p for p in launches if p.poll() is not None)
        winner = next(p for p in launches if p is not loser)
        out, err = loser.communicate()
        assert loser.returncode == 2, (out, err)
        assert_in_use_line(err, winner.pid)
        hold.touch()
        out, err = winner.communicate(timeout=WAIT_S)
        assert winner.returncode == 0, (out, err)
    finally:
        hold.touch()
        for p in launches:
            if p.poll() is None:
                p.kill()
                p.wait()
    if resume:
        assert "resuming from" in out
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert not old_attempts(run_dir)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp")]


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    """A holder killed with SIGKILL leaves its lock file behind (naming it): the next launch runs and
    records itself; a record naming a dead pid (no flock) does not block either."""
    config, run_dir = fake_config(tmp_path, steps=2)
    lock_file = run_dir.parent / ".run.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainkit import runlock; "
                               "runlock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(run_dir)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    refused = launch(config)
    assert refused.returncode == 2
    assert_in_use_line(refused.stderr, holder.pid)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads(lock_file.read_text())["pid"] == holder.pid  # the stale record stays behind

    first = start_launcher(config)
    out, err = first.communicate(timeout=WAIT_S)
    assert first.returncode == 0, (out, err)
    assert json.loads(lock_file.read_text())["pid"] == first.pid
    assert logged_steps(run_dir) == [1, 2]


def test_zombie_pid_does_not_hold_a_run(tmp_path):
    """Issue 10 item 9: a zombie counted as alive, so a run.json naming one blocked the launcher
    ('in use by a running training') though the process had exited."""
    from trainkit.runlog import RUN_INFO_FILE

    config, run_dir = fake_config(tmp_path)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not waited for: a zombie until reaped
    try:
        wait_for(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 "the child became a zombie")
        (run_dir / "checkpoint-2").mkdir(parents=True)
        (run_dir / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}\n')
        (run_dir / RUN_INFO_FILE).write_text(json.dumps({"status": "running", "pid": zombie.pid, "host": HOST}))
        r = subprocess.run([str(LAUNCHER), "--dry-run", "--config", str(config)], cwd=REPO, env=launcher_env(),
                           text=True, capture_output=True, timeout=WAIT_S)
        assert r.returncode == 0, r.stderr
        assert "resuming from" in r.stdout

        from dashboard.diagnosis import _process_state
        from trainkit.runlock import pid_alive
        assert not pid_alive(zombie.pid)
        assert pid_alive(os.getpid())
        assert _process_state({"pid": zombie.pid, "host": HOST}) == "gone"
    finally:
        zombie.wait()


# ---------------------------------------------------------------- the scripts

def test_two_direct_train_qlora_runs_at_once_second_exits_2(tmp_path):
    """Issue 10 item 1 with the real script started twice by hand (no launcher): the second moved
    the first's live run dir aside and both trained."""
    config = tiny_config(tmp_path, training={"max_steps": 4})
    run_dir = tmp_path / "out" / "tiny"
    first = subprocess.Popen([sys.executable, str(REPO / "train_qlora.py"), "--config", str(config)], cwd=REPO,
                             env=script_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (run_dir / "logs").is_dir(), "the first run took its run dir", [first])
        first.send_signal(signal.SIGSTOP)  # a stopped process keeps its files, and so its lock
        try:
            second = run_script(["--config", str(config)])
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.startswith("error: ")
        assert_in_use_line(second.stderr, first.pid)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert logged_steps(run_dir) == [2, 4]
    assert not old_attempts(run_dir)


def test_second_launch_while_a_real_train_qlora_launch_is_loading(tmp_path):
    """Issue 10 item 1 end to end with the real script under the launcher (accelerate launch, the
    script accepting its launcher's lock): a second launch while the first loads its data and model
    exits 2 and moves nothing; the first trains on."""
    from trainkit.runlog import RUN_INFO_FILE

    config = tiny_config(tmp_path, training={"max_steps": 4})
    run_dir = tmp_path / "out" / "tiny"
    first = subprocess.Popen([str(LAUNCHER), "--config", str(config)], cwd=REPO, env=launcher_env(OMP_NUM_THREADS="1"),
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "logs").is_dir() and not (run_dir / RUN_INFO_FILE).exists(),
                 "the first run took its run dir", [first])
        os.killpg(first.pid, signal.SIGSTOP)  # launcher, accelerate and script, still loading
        try:
            assert not (run_dir / RUN_INFO_FILE).exists()
            second = launch(config)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode == 2, (second.stdout, second.stderr)
        assert_in_use_line(second.stderr, first.pid)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, (out[-3000:], err[-3000:])
    assert logged_steps(run_dir) == [2, 4]
    assert not old_attempts(run_dir)


# ---------------------------------------------------------------- without flock

@pytest.mark.parametrize("recorded", ["dead", "zombie", "alive"])
def test_record_decides_where_flock_is_not_supported(tmp_path, monkeypatch, recorded):
    """On a filesystem without flock (ENOLCK), a record naming a dead or zombie pid is taken over and
    overwritten with the new holder; a live holder on this host blocks."""
    from trainkit import runlock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)" if recorded == "alive" else "pass"])
    try:
        if recorded == "dead":
            child.wait()
        elif recorded == "zombie":
            wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", "zombie")
        run_dir = tmp_path / "out" / "run"
        lock_file = runlock.lock_path(run_dir)
        lock_file.parent.mkdir(parents=True)
        lock_file.write_text(json.dumps(runlock.holder_record(child.pid, "train_qlora.py")) + "\n")
        monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
        if recorded == "alive":
            with pytest.raises(runlock.RunDirInUse, match=f"pid {child.pid} on host {HOST}"):
                runlock.acquire(run_dir)
        else:
            runlock.acquire(run_dir)
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            os.close(runlock._held.pop(str(lock_file)))
    finally:
        child.kill()
        child.wait()
