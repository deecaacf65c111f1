"""SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, `preempted` is recorded, the exit
code is 128 + signal, and a resume continues exactly. Real processes and real signals throughout:
the scripts run directly and under launch_training.sh (trainkit/preemption.py, launch_training.sh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from helpers_qlora import REPO, logged_steps, run_script, signal_at_log_step, tiny_config, wait_for_log_step
from trainkit.fileio import iter_jsonl
from trainkit.runlog import RunLog

LAUNCHER = REPO / "launch_training.sh"


def stream(run_dir: Path, name: str) -> list[dict]:
    return list(iter_jsonl(run_dir / "logs" / name))


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def adapter(directory: Path) -> dict:
    return load_file(directory / "adapter_model.safetensors")


def assert_preempted(run_dir: Path, code: int, *, saved: bool) -> int:
    """The records of a preempted run; returns the step it stopped at."""
    info = run_info(run_dir)
    assert info["status"] == "preempted" and info["exit_code"] == code, info
    events = stream(run_dir, "events.jsonl")
    preempted = [e for e in events if e["event"] == "preempted"]
    assert len(preempted) == 1 and preempted[0]["exit_code"] == code, events[-3:]
    assert events[-1]["event"] == "stop" and events[-1]["reason"] == "preempted"
    step = preempted[0]["step"]
    if saved:
        checkpoint = run_dir / f"checkpoint-{step}"
        assert preempted[0]["checkpoint"] == str(checkpoint)
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    else:
        assert preempted[0]["checkpoint"] is None
    return step


# ---------------------------------------------------------------- train_qlora.py run directly
def test_sigterm_saves_at_the_step_and_resume_is_exact(tmp_path):
    """SIGTERM mid-training: checkpoint at that step, `preempted`, exit 143; the resume logs every step
    once and ends with the adapter of an uninterrupted run, bitwise."""
    reference_cfg = tiny_config(tmp_path / "ref")
    assert run_script(["--config", str(reference_cfg)]).returncode == 0
    reference_dir = tmp_path / "ref" / "out" / "tiny"

    cfg = tiny_config(tmp_path / "term")
    run_dir = tmp_path / "term" / "out" / "tiny"
    result = signal_at_log_step("train_qlora.py", cfg, run_dir, 2, signal.SIGTERM)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    step = assert_preempted(run_dir, 143, saved=True)
    assert 2 <= step < 12

    resumed = run_script(["--config", str(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / f'checkpoint-{step}'}" in resumed.stdout
    assert logged_steps(run_dir) == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in stream(run_dir, "training_log.jsonl")] == \
        [r["loss"] for r in stream(reference_dir, "training_log.jsonl")]
    final, expected = adapter(run_dir / "final-checkpoint-12"), adapter(reference_dir / "final-checkpoint-12")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["exit_code"] == 0
    # the interrupted attempt's records stay: they describe how it ended
    assert [e["event"] for e in stream(run_dir, "events.jsonl")].count("preempted") == 1


def test_grace_exceeded_exits_with_records_and_resume_keeps_them(tmp_path):
    """A grace time too short for the step and the save: exit 143 anyway, the records written; the
    resume from the earlier checkpoint keeps the interrupted attempt's preempted and stop events."""
    cfg = tiny_config(tmp_path, training={"preemption_grace_seconds": 0.001})
    run_dir = tmp_path / "out" / "tiny"
    result = signal_at_log_step("train_qlora.py", cfg, run_dir, 6, signal.SIGTERM)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "not saved within training.preemption_grace_seconds" in result.stderr
    step = assert_preempted(run_dir, 143, saved=False)
    assert step >= 6
    assert not list(run_dir.glob(f"checkpoint-{step + 1}"))

    resumed = run_script(["--config", str(cfg), "--resume"])  # from checkpoint-4
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(run_dir) == [2, 4, 6, 8, 10, 12]
    events = stream(run_dir, "events.jsonl")
    kept = [e for e in events if e["event"] in ("preempted", "stop")]
    assert [(e["event"], e.get("reason")) for e in kept] == [("preempted", None), ("stop", "preempted"), ("stop", "finished")]
    assert kept[0]["step"] == step
    resume_at = [e for e in events if e["event"] == "resume"][0]["step"]
    assert resume_at < step  # kept although its step is after the checkpoint the run resumed from


def test_second_signal_exits_at_once(tmp_path):
    """A second SIGTERM while the first is being handled: exit 143 at once, with the records."""
    cfg = tiny_config(tmp_path, training={"max_steps": 200, "preemption_grace_seconds": 600})
    run_dir = tmp_path / "out" / "tiny"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_qlora.py"), "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log_step(proc, run_dir, 2)
        os.kill(proc.pid, signal.SIGTERM)
        first_line = proc.stderr.readline()
        while "finishing the current optimizer step" not in first_line:  # the first signal is being handled
            assert first_line, "no line about the first signal"
            first_line = proc.stderr.readline()
        os.kill(proc.pid, signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 143, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "second SIGTERM" in err and "Traceback" not in err
    info = run_info(run_dir)
    assert info["status"] == "preempted" and info["exit_code"] == 143


def test_signal_before_the_loop_is_one_line(tmp_path):
    """SIGINT while the script loads (nothing to save yet): one line, exit 130, status preempted."""
    cfg = tiny_config(tmp_path)
    run_dir = tmp_path / "out" / "tiny"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_qlora.py"), "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (run_dir / "logs").is_dir():  # the RunLog exists; data and model are loading
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted by SIGINT" in err
    info = run_info(run_dir)
    assert info["status"] == "preempted" and info["exit_code"] == 130
    assert not list(run_dir.glob("checkpoint-*"))


# ---------------------------------------------------------------- the other two scripts
def test_train_lora_sigterm_saves_a_checkpoint(tmp_path):
    from test_train_lora import lora_config

    cfg = lora_config(tmp_path, training={"max_steps": 8})
    run_dir = tmp_path / "out" / "gla"
    result = signal_at_log_step("train_lora.py", cfg, run_dir, 2, signal.SIGTERM)
    assert result.returncode == 143, result.stderr[-3000:]
    step = assert_preempted(run_dir, 143, saved=True)
    assert step < 8


def test_distill_sigterm_saves_a_checkpoint(tmp_path):
    from test_distill import distill_config

    cfg = distill_config(tmp_path)
    run_dir = tmp_path / "out" / "kd"
    result = signal_at_log_step("distill.py", cfg, run_dir, 2, signal.SIGTERM)
    assert result.returncode == 143, result.stderr[-3000:]
    step = assert_preempted(run_dir, 143, saved=True)
    assert step < 12
    assert json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["data_state"] is not None


# ---------------------------------------------------------------- launch_training.sh
def launcher_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINKIT_", "ACCELERATE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", TRAINKIT_NO_VENV="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def trainer_pids(pids) -> dict[int, int]:
    """{RANK: pid} of the training processes among `pids` (`python -m trainkit.launcher exec ...`,
    which torchrun starts with RANK in their environment)."""
    ranks = {}
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"trainkit.launcher" in cmdline and b"exec" in cmdline:
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0].split(b"=", 1)[1])] = pid
    return ranks


def start_launcher(cfg: Path, *args: str) -> subprocess.Popen:
    # Its own session, as a terminal gives a job: the group of a Ctrl-C is the launcher's.
    return subprocess.Popen([str(LAUNCHER), "--config", str(cfg), *args], cwd=REPO, env=launcher_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def start_two_ranks(tmp_path: Path, port_base: int) -> tuple[subprocess.Popen, Path, set[int]]:
    """A 40-step tiny run on two CPU processes under launch_training.sh, once it has logged step 2:
    (the launcher, the run dir, the launcher's process tree then)."""
    cfg = tiny_config(tmp_path, training={"max_steps": 40})
    run_dir = tmp_path / "out" / "tiny"
    proc = start_launcher(cfg, "--num-processes", "2", "--main-process-port", str(port_base + os.getpid() % 1000))
    try:
        wait_for_log_step(proc, run_dir, 2)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, run_dir, descendants(proc.pid)


def test_sigterm_to_launcher_reaches_both_ranks_and_leaves_no_orphans(tmp_path):
    """Two CPU processes: SIGTERM to launch_training.sh is passed to the trainers, which agree on the
    step, save one checkpoint and exit; the launcher waits for them and exits 143; nothing is left."""
    proc, run_dir, tree = start_two_ranks(tmp_path, port_base=29500)
    try:
        assert len(tree) >= 3, tree  # accelerate (torchrun) and two trainers
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, (out[-2000:], err[-3000:])
    left = [pid for pid in tree if alive(pid)]
    assert not left, f"processes left running: {left}"
    assert run_info(run_dir)["world_size"] == 2
    step = assert_preempted(run_dir, 143, saved=True)
    assert step < 40
    assert "Traceback" not in err and "ChildFailedError" not in err


def test_ctrl_c_stops_with_a_checkpoint_and_no_traceback_wall(tmp_path):
    """SIGINT to the launcher's whole process group, as Ctrl-C in a terminal sends it: a checkpoint,
    exit 130, and a few lines on stderr instead of accelerate's traceback."""
    cfg = tiny_config(tmp_path, training={"max_steps": 40})
    run_dir = tmp_path / "out" / "tiny"
    proc = start_launcher(cfg)
    try:
        wait_for_log_step(proc, run_dir, 2)
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out[-2000:], err[-3000:])
    assert "Traceback" not in err, err
    after_signal = err[err.index("finishing the current optimizer step") - 40:] if "finishing" in err else err
    assert len(after_signal.strip().splitlines()) <= 4, err
    assert not [pid for pid in tree if alive(pid)]
    assert_preempted(run_dir, 130, saved=True)
    # a relaunch resumes the preempted run from its checkpoint
    resumed = subprocess.run([str(LAUNCHER), "--config", str(cfg), "--dry-run"], cwd=REPO, env=launcher_env(),
                             capture_output=True, text=True, timeout=120)
    assert "--resume" in resumed.stdout and "status: preempted" in resumed.stdout, resumed.stdout


# ---------------------------------------------------------------- resume keeps how attempts ended
def test_truncate_after_keeps_fatal_errors_and_stop_events(tmp_path):
    log = RunLog(tmp_path)
    for step in (2, 4, 6):
        log.write("training", {"step": step, "loss": 1.0})
    log.error(5, "NonFiniteLoss", "skipped")
    log.error(6, "RuntimeError", "boom", traceback="...", fatal=True)
    log.event(5, "nan_skip", "skipped", consecutive=1)
    log.event(6, "stop", "run failed: boom", reason="failed")
    log.write("events", {"step": 6, "event": "preempted", "message": "SIGTERM", "checkpoint": None})
    log.truncate_after(4)
    assert [r["step"] for r in stream(tmp_path, "training_log.jsonl")] == [2, 4]
    assert [(r["type"], r["step"]) for r in stream(tmp_path, "error_log.jsonl")] == [("RuntimeError", 6)]
    assert [r["event"] for r in stream(tmp_path, "events.jsonl")] == ["stop", "preempted"]


def test_dashboard_keeps_the_interrupted_attempts_records(tmp_path):
    """The dashboard's reader keeps an earlier attempt's stop/preempted events and fatal errors after
    the resume rewrote the logs, shows status preempted with its recorded exit code."""
    from dashboard.runs import RunStore

    run_dir = tmp_path / "logs_root" / "r"
    log = RunLog(run_dir)
    log.update_run_info(status="running", total_steps=12)
    for step in (2, 4, 6):
        log.write("training", {"step": step, "loss": 1.0, "total_steps": 12})
    log.write("events", {"step": 6, "event": "preempted", "message": "SIGTERM at step 6: no checkpoint saved",
                         "checkpoint": None, "exit_code": 143})
    log.event(6, "stop", "run ended: preempted by SIGTERM", reason="preempted")
    log.update_run_info(status="preempted", exit_code=143)
    store = RunStore(tmp_path / "logs_root")
    store.poll_once()
    run = store.runs["r"]
    summary = run.stats(600)
    assert summary["status"] == "preempted"
    assert summary["failure"]["kind"] == "preempted" and summary["failure"]["exit_code"] == 143
    assert summary["failure"]["exit_code_source"] == "run.json"
    from dashboard.alerts import condition, message_text

    assert condition(run, 600) == "preempted"
    assert "was preempted at step 6 (exit code 143): SIGTERM at step 6" in message_text("preempted", "r", summary)
    # the resume from checkpoint-4 rewrites the logs, then logs step 6 again
    log.truncate_after(4)
    log.event(4, "resume", "resumed from checkpoint-4")
    log.update_run_info(status="running", exit_code=None)
    log.write("training", {"step": 6, "loss": 0.5, "total_steps": 12})
    store.poll_once()
    events = [e["event"] for e in run.events]
    assert events.count("preempted") == 1 and events.count("stop") == 1 and events[-1] == "resume"
    assert [r["step"] for r in stream(run_dir, "training_log.jsonl")] == [2, 4, 6]
    assert run.stats(600)["failure"] is None


def test_grace_key_is_validated(tmp_path):
    cfg = tiny_config(tmp_path, training={"preemption_grace_seconds": 0})
    result = run_script(["--config", str(cfg)], timeout=120)
    assert result.returncode == 2 and "training.preemption_grace_seconds: must be > 0" in result.stderr
    assert yaml.safe_load(cfg.read_text())["training"]["preemption_grace_seconds"] == 0


def test_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to rank 1 only: its flag travels in the per-step all-reduce, so rank 0 stops after the
    same step and both take part in the checkpoint; no rank is left waiting in a collective."""
    proc, run_dir, tree = start_two_ranks(tmp_path, port_base=29600)
    try:
        ranks = trainer_pids(tree)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, (out[-2000:], err[-3000:])
    step = assert_preempted(run_dir, 143, saved=True)
    assert step < 40 and logged_steps(run_dir)[-1] <= step
    assert not [pid for pid in tree if alive(pid)]
