"""Config problems found before any data or model loads (issue 10, item 8), each a one-line error with exit
code 2 from a real run of the script; and the env overrides (HP_*) of every script."""

from __future__ import annotations

import subprocess
import sys

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
