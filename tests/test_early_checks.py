"""Config problems found before any data or model loads (issue 10, item 8), each a one-line error with exit
code 2 from a real run of the script; and the env overrides (HP_*) of every script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers_qlora import REPO, run_script, script_env, tiny_config
from trainkit.config import ConfigError
from trainkit.env_overrides import env_overrides


def assert_one_line_config_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- env overrides (HP_*)
@pytest.mark.parametrize("env,needles", [
    ({"HP_LR": "fast"}, ["environment variable HP_LR='fast'", "optimization.learning_rate"]),  # was silently ignored
    ({"HP_LR": "-1"}, ["environment variable HP_LR='-1'", "must be > 0"]),
    ({"HP_INIT": "pissa"}, ["environment variable HP_INIT='pissa'", "train_qlora.py has no lora.init", "unset HP_INIT"]),
])
def test_train_qlora_env_overrides_are_checked_and_named(tmp_path, env, needles):
    cfg = tiny_config(tmp_path, training={"max_steps": 1})
    result = run_script(["--config", str(cfg)], timeout=300, **env)
    assert_one_line_config_error(result, *needles)
    assert not (tmp_path / "out").exists()


def test_train_qlora_applies_env_overrides_and_records_them(tmp_path):
    import json
    cfg = tiny_config(tmp_path, training={"max_steps": 2, "val_split": 0.0}, logging={"log_interval": 1})
    result = run_script(["--config", str(cfg), "lora.r=2"], HP_LR="1e-3", HP_PEFT_R="4", HP_LOGGING_STEPS="2")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "tiny" / "run.json").read_text())
    assert info["config"]["optimization"]["learning_rate"] == 1e-3
    assert info["config"]["lora"]["r"] == 2              # the command line beats the environment
    assert info["config"]["logging"]["log_interval"] == 2
    assert info["env_overrides"]["HP_LR"] == {"key": "optimization.learning_rate", "value": 1e-3}
    assert "HP_LR -> optimization.learning_rate" in result.stdout


def test_launcher_checks_env_overrides_of_every_script(tmp_path):
    cfg = tiny_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "trainkit.launcher", "info", "--config", str(cfg)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=script_env(HP_LR="fast"))
    assert_one_line_config_error(result, "environment variable HP_LR='fast'")


def test_env_value_out_of_range_names_the_variable():
    import distill
    import train_lora
    import train_qlora
    for module, script in ((train_qlora, "train_qlora.py"), (train_lora, "train_lora.py"), (distill, "distill.py")):
        with pytest.raises(ConfigError, match=r"^environment variable HP_PEFT_DROPOUT='1.5' \(sets lora.dropout\): must be in|"
                                              r"^environment variable HP_PEFT_DROPOUT='1.5': distill.py has no lora.dropout"):
            env_overrides({"HP_PEFT_DROPOUT": "1.5"}, schema=module.SCHEMA, script=script)
        overrides, applied = env_overrides({"HP_LR": "3e-4", "HP_SEED": "3"}, schema=module.SCHEMA, script=script)
        assert overrides == ["optimization.learning_rate=0.0003", "training.seed=3"]


# ---------------------------------------------------------------- output directory
@pytest.mark.parametrize("output_dir,needles", [
    ("/etc/passwd", ["paths.output_dir", "/etc/passwd is a file, not a directory"]),
    ("/etc/passwd/runs", ["paths.output_dir", "/etc/passwd is a file, not a directory"]),
])
def test_unusable_output_dir_is_one_line_before_anything_loads(tmp_path, output_dir, needles):
    """Was a 19-line traceback (NotADirectoryError from prepare_run_dir)."""
    cfg = tiny_config(tmp_path, paths={"output_dir": output_dir})
    assert_one_line_config_error(run_script(["--config", str(cfg)], timeout=300), *needles)


def test_unwritable_output_dir_is_one_line_for_the_script_and_the_launcher(tmp_path):
    """A directory nobody may write into: read-only for a user; immutable (chattr +i) for root, who may
    write anywhere else. Was a PermissionError traceback when the run directory was created."""
    import os

    runs = tmp_path / "runs"
    runs.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(runs)], capture_output=True).returncode != 0:
            pytest.skip("root, and chattr +i is not supported here: no directory is unwritable")
    else:
        runs.chmod(0o555)
    try:
        cfg = tiny_config(tmp_path, paths={"output_dir": str(runs)})
        for command in ([sys.executable, str(REPO / "train_qlora.py"), "--config", str(cfg)],
                        [sys.executable, "-m", "trainkit.launcher", "info", "--config", str(cfg)]):
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=script_env())
            assert_one_line_config_error(result, "paths.output_dir", f"no permission to write in {runs}")
    finally:
        subprocess.run(["chattr", "-i", str(runs)], capture_output=True)
        runs.chmod(0o755)
