"""Preemption and the run-dir lock on two GPUs (NCCL), as users meet them: launch_training.sh with its
own GPU detection, SIGTERM to the launcher mid-run, then the same command again. Marked `gpu`; needs two
CUDA devices. The CPU versions (gloo) are in test_preemption.py and test_run_lock.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch

from helpers_qlora import REPO, logged_steps, tiny_config, wait_for_log_step
from test_preemption import alive, assert_preempted, descendants, run_info, stream

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

LAUNCHER = REPO / "launch_training.sh"


def gpu_launcher_env() -> dict:
    """The user's environment with every GPU visible; the python on PATH as is (no venv setup)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRAINKIT_", "ACCELERATE_")) and k != "CUDA_VISIBLE_DEVICES"}
    env.update(TRAINKIT_NO_VENV="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def launch(cfg, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(LAUNCHER), "--config", str(cfg), "--num-processes", "2", *args], cwd=REPO,
                            env=gpu_launcher_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_sigterm_on_two_gpus_saves_once_and_the_same_command_resumes(tmp_path):
    cfg = tiny_config(tmp_path, training={"max_steps": 3000},
                      logging={"log_interval": 2, "eval_interval": 1000, "checkpoint_interval": 1000,
                               "expert_stats_interval": 10})
    run_dir = tmp_path / "out" / "tiny"
    first = launch(cfg)
    try:
        try:
            wait_for_log_step(first, run_dir, 10, timeout=400)
        except AssertionError:
            out, err = first.communicate(timeout=60) if first.poll() is not None else ("", "")
            raise AssertionError(f"{out[-2000:]}\n{err[-3000:]}")
        # The lock: a second launch of the same run is refused at once, naming the holder.
        second = subprocess.run([str(LAUNCHER), "--config", str(cfg), "--num-processes", "2"], cwd=REPO,
                                env=gpu_launcher_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "is in use by" in second.stderr, second.stderr[-2000:]
        tree = descendants(first.pid)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    print(err[-1500:])
    assert first.returncode == 143, (out[-2000:], err[-3000:])
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert not [pid for pid in tree if alive(pid)], "processes left running"
    info = run_info(run_dir)
    assert info["world_size"] == 2 and info["versions"].get("cuda"), info
    step = assert_preempted(run_dir, 143, saved=True)
    assert 10 <= step < 3000

    # The same command resumes (a shorter schedule: max_steps may change, recorded as config_changed).
    end = step + 10
    again = subprocess.run([str(LAUNCHER), "--config", str(cfg), "--num-processes", "2", f"training.max_steps={end}"],
                           cwd=REPO, env=gpu_launcher_env(), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir / f'checkpoint-{step}'}" in again.stdout, again.stdout[-2000:]
    steps = logged_steps(run_dir)
    assert steps == sorted(set(range(2, end + 1, 2)) | {end}), steps  # every log_interval, and the last step
    events = stream(run_dir, "events.jsonl")
    assert [e["event"] for e in events].count("preempted") == 1  # the interrupted attempt's record stays
    changed = [e for e in events if e["event"] == "config_changed"]
    assert changed and changed[0]["changes"]["training.max_steps"] == [3000, end], changed
    final = run_info(run_dir)
    assert final["status"] == "finished" and final["exit_code"] == 0
    print(json.dumps({"preempted_at": step, "resumed_to": end, "world_size": final["world_size"],
                      "gpu": final["versions"].get("gpu")}))
