"""Never a non-finite best; resume that checks the config; no resume over a gap; best-adapter
survives a kill between the two renames of its commit (issue 10, items 2, 3 and 9).

Real runs of the scripts as subprocesses (tiny configs of tests/helpers_qlora.py), real kills."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers_qlora import REPO, kill_at_drawn_state, run_script, script_env, tiny_config
from trainkit.checkpoints import checkpoints_to_delete, remove_partial_saves
from trainkit.loop import Checkpointer, is_better
from trainkit.runlog import iter_jsonl


def read_stream(run_dir: Path, name: str) -> list[dict]:
    return list(iter_jsonl(run_dir / "logs" / name))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- never a non-finite best
@pytest.mark.parametrize("override", ["optimization.learning_rate=.inf", "optimization.learning_rate=.nan",
                                      "optimization.max_grad_norm=.inf", "training.epochs=.inf"])
def test_infinite_or_nan_float_keys_fail_validation(tmp_path, override):
    """Before: learning_rate=.inf trained, the NaN first eval became `is_best` and best-adapter/ held
    only non-finite tensors. After: one config line, exit 2, nothing written."""
    cfg = tiny_config(tmp_path)
    line = one_line_error(run_script(["--config", str(cfg), override], timeout=120))
    assert line.startswith(f"config error: {override.split('=')[0]}: must be a finite number"), line
    assert not (tmp_path / "out").exists()


def test_infinite_hp_lr_fails_validation(tmp_path):
    """Before: HP_LR=inf passed validation (train_lora.py). After: one line naming the variable."""
    for value in ("inf", "nan", "-inf"):
        result = run_script(["--config", str(REPO / "configs" / "gla_lora_sst2.yaml")], script="train_lora.py",
                            timeout=120, HP_LR=value)
        line = one_line_error(result)
        assert "HP_LR" in line and "finite" in line, line


def test_nan_evaluation_never_becomes_best(tmp_path):
    """A finite but absurd learning rate (1e30) makes the step-4 evaluation NaN. Before: it was
    recorded is_best and best-adapter/ was saved from it. After: is_best false, no best adapter."""
    cfg = tiny_config(tmp_path, optimization={"learning_rate": 1e30})
    result = run_script(["--config", str(cfg)])
    run_dir = tmp_path / "out" / "tiny"
    evals = read_stream(run_dir, "eval_log.jsonl")
    assert evals and evals[0]["eval_loss"] is None, (evals, result.stderr[-2000:])  # NaN is written as null
    assert not any(e["is_best"] for e in evals if e["metric_value"] is None)
    assert "new_best" not in [e["event"] for e in read_stream(run_dir, "events.jsonl")]
    assert not (run_dir / "best-adapter").exists()


def test_non_finite_metric_never_ranks():
    assert not is_better(float("nan"), None, False) and not is_better(float("nan"), None, True)
    assert not is_better(float("inf"), None, True) and not is_better(float("-inf"), None, False)
    assert is_better(2.0, float("nan"), False)  # a non-finite best (an old run's) is beaten by any finite value
    for bad in (float("nan"), float("inf"), float("-inf"), None):
        # keep_top_k=1: the finite checkpoint 4 is kept over a non-finite one, whichever direction
        assert checkpoints_to_delete([(4, 1.0), (8, bad), (12, 3.0)], 1, False) == [8]
        assert checkpoints_to_delete([(4, 3.0), (8, bad), (12, 1.0)], 1, True) == [8]


def test_save_best_refuses_non_finite_weights(tmp_path):
    """Before: save_best skipped the finite-weights check that save has."""
    accelerator = SimpleNamespace(is_main_process=True)
    written = []
    checkpointer = Checkpointer(accelerator, tmp_path, None, {}, False, written.append,
                                params_to_check=[torch.tensor([1.0, float("nan")])])
    with pytest.raises(FloatingPointError, match="best adapter"):
        checkpointer.save_best(tmp_path / "best-adapter")
    assert not written and not (tmp_path / "best-adapter").exists()


# ---------------------------------------------------------------- best-adapter and a kill between two renames
HOLD_BETWEEN_RENAMES = r"""
import os, sys, time
from pathlib import Path
from trainkit import checkpoints
run_dir = Path(sys.argv[1])
real_rename = os.rename
def rename(src, dst):
    real_rename(src, dst)
    if Path(dst).name.startswith(checkpoints.OLD_PREFIX):  # the first of the two renames is done
        (run_dir / "held").write_text("")
        time.sleep(600)
os.rename = rename
staging = checkpoints.staging_dir(run_dir / "best-adapter")
staging.mkdir()
(staging / "adapter_model.safetensors").write_text("new")
checkpoints.commit_directory(staging, run_dir / "best-adapter")
"""


def test_kill_between_the_two_renames_keeps_best_adapter(tmp_path):
    """A real process is SIGKILLed between `best-adapter -> .tmp-old-best-adapter` and the rename of
    the new copy. Before: the next start deleted `.tmp-old-best-adapter`: no best adapter until that
    step came again. After: the old complete copy is put back."""
    best = tmp_path / "best-adapter"
    best.mkdir()
    (best / "adapter_model.safetensors").write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", HOLD_BETWEEN_RENAMES, str(tmp_path)], cwd=REPO, env=script_env())
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "held").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the save never reached the hold"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not best.exists()  # the moment the kill left behind
    remove_partial_saves(tmp_path)  # what every start does
    assert (best / "adapter_model.safetensors").read_text() == "old"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
