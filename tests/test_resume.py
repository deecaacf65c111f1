"""Never a non-finite best; resume that checks the config; no resume over a gap; best-adapter
survives a kill between the two renames of its commit (issue 10, items 2, 3 and 9).

Real runs of the scripts as subprocesses (tiny configs of tests/helpers_qlora.py), real kills."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers_qlora import REPO, run_script, script_env, tiny_config
from trainkit.checkpoints import checkpoints_to_delete, remove_partial_saves
from trainkit.loop import Checkpointer, is_better
from trainkit.fileio import iter_jsonl


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
    from accelerate.utils import DistributedType
    accelerator = SimpleNamespace(is_main_process=True, distributed_type=DistributedType.NO)
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
    if Path(dst).name.startswith(".tmp-old-"):  # the first of the two renames is done
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


# ---------------------------------------------------------------- resume that checks the config
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A finished tiny train_qlora run with checkpoint-4, -8 and -12 kept (16 steps)."""
    tmp = tmp_path_factory.mktemp("qlora")
    cfg = tiny_config(tmp, training={"max_steps": 16}, logging={"keep_top_k": 5})
    result = run_script(["--config", str(cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp / "out" / "tiny"
    assert (run_dir / "checkpoint-12").is_dir()
    return cfg, run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of a finished run (same run name) and a config that writes there."""
    import shutil
    import yaml

    target = tmp_path / "out" / run_dir.name
    shutil.copytree(run_dir, target)
    cfg = yaml.safe_load((run_dir.parent.parent / "config.yaml").read_text())
    cfg["paths"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, target


def recorded_changes(run_dir: Path) -> list[dict]:
    """The config_changed events' changes, without the move of the run directory that copy_run made."""
    moved = ("run_dir", "paths.output_dir")
    return [{k: v for k, v in e["changes"].items() if k not in moved}
            for e in read_stream(run_dir, "events.jsonl") if e["event"] == "config_changed"]


def test_changed_immutable_keys_stop_before_model_load(qlora_run, tmp_path):
    """Before: a changed LoRA rank died after model load with dozens of `size mismatch` lines, and a
    changed seed (which re-splits train/validation) or sequence length was accepted without a word.
    After: one line listing each changed key old -> new, exit 2, nothing written; the explicit flag
    resumes anyway and records the change."""
    cfg, run_dir = copy_run(qlora_run[1], tmp_path)
    before = (run_dir / "logs" / "events.jsonl").read_text()
    checkpoint = run_dir / "checkpoint-4"
    result = run_script(["--config", str(cfg), "--resume_from", str(checkpoint), "lora.r=4", "training.seed=8",
                         "training.max_seq_length=32"], timeout=120)
    line = one_line_error(result)
    assert line.startswith(f"config error: --resume_from: {checkpoint} was trained with another config"), line
    for change in ("lora.r 8 -> 4", "training.seed 7 -> 8", "training.max_seq_length 64 -> 32"):
        assert change in line, line
    assert "--allow-config-change" in line
    assert (run_dir / "logs" / "events.jsonl").read_text() == before  # stopped before anything was written

    result = run_script(["--config", str(cfg), "--resume_from", str(checkpoint), "training.seed=8",
                         "--allow-config-change"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert recorded_changes(run_dir) == [{"training.seed": [7, 8]}]
    assert [e["step"] for e in read_stream(run_dir, "events.jsonl") if e["event"] == "config_changed"] == [4]


def test_changed_learning_rate_takes_effect_and_is_recorded(qlora_run, tmp_path):
    """Before: a new learning rate on resume was silently ignored (accelerate.load_state restored the
    old one) while run.json showed the new value. After: the lr logged after the resume is the new
    peak times the same schedule, and one config_changed event lists old -> new."""
    cfg, run_dir = copy_run(qlora_run[1], tmp_path)
    old_lrs = {r["step"]: r["lr"] for r in read_stream(run_dir, "training_log.jsonl")}
    result = run_script(["--config", str(cfg), "--resume_from", str(run_dir / "checkpoint-4"),
                         "optimization.learning_rate=1e-3", "logging.log_interval=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    new_lrs = {r["step"]: r["lr"] for r in read_stream(run_dir, "training_log.jsonl")}
    assert sorted(new_lrs) == [2, 4, *range(5, 17)]  # the interval change applies too
    for step in (6, 8, 10, 12, 14):
        assert math.isclose(new_lrs[step], old_lrs[step] / 2, rel_tol=1e-9), (step, new_lrs[step], old_lrs[step])
    assert recorded_changes(run_dir) == [{"optimization.learning_rate": [0.002, 0.001], "logging.log_interval": [2, 1]}]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["config"]["optimization"]["learning_rate"] == 0.001


def test_train_lora_changed_rank_is_one_line(tmp_path):
    """train_lora.py: HP_PEFT_R on resume differs from the checkpoint's rank. Before: the adapter
    load failed after model load with `size mismatch` lines. After: one line, exit 2."""
    from test_train_lora import lora_config

    cfg = lora_config(tmp_path, training={"max_steps": 3}, generation={"enabled": False},
                      task={"evaluate_test": False, "max_eval_samples": 4},
                      logging={"metric_for_best": "eval_loss", "greater_is_better": False, "eval_interval": 100,
                               "checkpoint_interval": 2})
    result = run_script(["--config", str(cfg)], script="train_lora.py", HP_PEFT_R="4")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "gla" / "checkpoint-2"
    result = run_script(["--config", str(cfg), "--resume_from", str(checkpoint)], script="train_lora.py",
                        timeout=120, HP_PEFT_R="8")
    line = one_line_error(result)
    assert "lora.r 4 -> 8" in line and "cannot change on resume" in line, line


def test_distill_changed_student_layout_is_one_line(tmp_path):
    """distill.py: a resume with another student layout. Before: the student weights failed to load
    after the teacher and student were built. After: one line, exit 2."""
    from test_distill import distill_config

    cfg = distill_config(tmp_path, training={"max_steps": 3}, logging={"checkpoint_interval": 2, "eval_interval": 100})
    result = run_script(["--config", str(cfg)], script="distill.py")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "kd" / "checkpoint-2"
    result = run_script(["--config", str(cfg), "--resume_from", str(checkpoint), "student.attention_layers=[0]",
                         "training.max_steps=6"], script="distill.py", timeout=120)
    line = one_line_error(result)
    assert "student.attention_layers [1] -> [0]" in line and "training.max_steps 3 -> 6" in line, line


# ---------------------------------------------------------------- no resume over a gap
def run_until_logged(args: list[str], run_dir: Path, step: int, timeout: float = 300) -> int:
    """Start train_qlora.py with `args` and SIGKILL it once the training log has the line of `step`."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train_qlora.py"), *args], cwd=REPO, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            steps = [r["step"] for r in read_stream(run_dir, "training_log.jsonl")]
            if step in steps and steps[-1] == step:
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, f"no training log line of step {step} in {timeout} s"
            time.sleep(0.002)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_resume_after_killed_resume_from_takes_the_latest_line(qlora_run, tmp_path):
    """`--resume_from checkpoint-4` is killed at step 6; then a plain relaunch. Before: `--resume`
    (and the launcher's auto-resume) took the abandoned line's checkpoint-12: steps 7-12 missing from
    the log. After: checkpoint-4 again, every step logged once."""
    cfg, run_dir = copy_run(qlora_run[1], tmp_path)
    code = run_until_logged(["--config", str(cfg), "--resume_from", str(run_dir / "checkpoint-4")], run_dir, 6)
    assert code == -signal.SIGKILL
    info = subprocess.run([sys.executable, "-m", "trainkit.launcher", "info", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, env=script_env())
    assert info.returncode == 0, info.stderr
    assert f"checkpoint:  {run_dir / 'checkpoint-4'} (step 4)" in info.stdout, info.stdout

    result = run_script(["--config", str(cfg), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_stream(run_dir, "training_log.jsonl")] == list(range(2, 17, 2))
    resumes = [e["path"] for e in read_stream(run_dir, "events.jsonl") if e["event"] == "resume"]
    assert resumes == [str(run_dir / "checkpoint-4")] * 2


def test_checkpoints_without_lineage_still_resume(tmp_path):
    """Runs written before lineages were recorded: the newest complete checkpoint, as before."""
    for step in (4, 8):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed"}))
    from trainkit.checkpoints import continue_lineage, find_latest_checkpoint, on_lineage

    assert find_latest_checkpoint(tmp_path).name == "checkpoint-8"
    # a resume from the old checkpoint-4 continues its line; the old checkpoint-8 is off it
    lineage = continue_lineage("new", {"step": 4})
    (tmp_path / "run.json").write_text(json.dumps({"lineage": lineage}))
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert on_lineage({"attempt": "new"}, 12, lineage) and not on_lineage({"attempt": "other"}, 2, lineage)


def test_launcher_passes_allow_config_change(qlora_run, tmp_path):
    """launch_training.sh --allow-config-change reaches the script with the resume it passes."""
    from test_launcher import command_line, launch

    cfg, run_dir = copy_run(qlora_run[1], tmp_path)
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "failed"}))  # a finished run is not resumed
    result = launch("--config", cfg, "--dry-run", "--allow-config-change", "training.max_steps=20")
    assert result.returncode == 0, result.stderr
    assert "--resume --allow_config_change training.max_steps=20" in command_line(result.stdout)


# the values the demo config had when data/stored_configs_before_typed_models.json was recorded
# (issue 12 changed its data, length and steps)
DEMO_CONFIG_THEN = ["optimization.learning_rate=2e-4", "lora.target_modules=[q_proj]", "task.local_dir=data/tasks/glue",
                    "generation.max_length=12", "training.max_steps=60", "logging.eval_interval=30",
                    "logging.checkpoint_interval=30"]


@pytest.mark.parametrize("script, config, overrides", [
    # issue 13 changed training_config.yaml's checkpointing from true to auto
    ("train_qlora.py", "training_config.yaml", ["memory.gradient_checkpointing=true"]),
    ("train_lora.py", "configs/gla_lora_sst2.yaml", DEMO_CONFIG_THEN),
    ("distill.py", "configs/distill_tiny_mamba2.yaml", ["training.epochs=2", "student.attention_layers=[1]"]),
])
def test_typed_config_is_stored_as_checkpoints_stored_it_before(script, config, overrides):
    """Checkpoints store the config as JSON and resume compares it key by key: the typed models
    (trainkit/config/) must store exactly what the dict-based schema stored (data/ holds what it
    stored for these configs at commit ab68e75), so that older checkpoints resume."""
    from trainkit.config import load_config
    from trainkit.config.scripts import SCRIPT_CONFIGS
    from trainkit.resume_check import config_changes, immutable_changes, stored_config

    before = json.loads((REPO / "data" / "stored_configs_before_typed_models.json").read_text())[script]
    cfg = load_config(REPO / config, overrides, SCRIPT_CONFIGS[script])
    # keys added since hold their defaults (which is how that version behaved): no change on resume
    assert immutable_changes(before, cfg, mutable=()) == {}
    assert all(old == "<unset>" for old, _ in config_changes(before, stored_config(cfg)).values())


def test_a_key_added_since_the_checkpoint_counts_as_a_change_only_off_its_default():
    from trainkit.config import load_config
    from trainkit.config.scripts import SCRIPT_CONFIGS
    from trainkit.resume_check import immutable_changes

    before = json.loads((REPO / "data" / "stored_configs_before_typed_models.json").read_text())["train_lora.py"]
    cfg = load_config(REPO / "configs/gla_lora_sst2.yaml", [*DEMO_CONFIG_THEN, "task.label_likelihood_normalization=mean"],
                      SCRIPT_CONFIGS["train_lora.py"])
    assert immutable_changes(before, cfg, mutable=()) == {"task.label_likelihood_normalization": ["<unset>", "mean"]}
