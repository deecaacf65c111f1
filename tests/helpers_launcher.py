"""A launch_training.sh config around a stand-in trainer script, shared by the launcher and dashboard tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml


def launcher_env(**extra) -> dict:
    """The environment the launcher tests run launch_training.sh with: no venv set up (this
    interpreter's directory first on PATH), no inherited TRAINKIT_/ACCELERATE_ settings, and
    CUDA_VISIBLE_DEVICES="" so the CPU path is the same on every machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINKIT_", "ACCELERATE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", TRAINKIT_NO_VENV="1",
               CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def write_run_config(tmp_path: Path, script: Path, **sections) -> Path:
    """A config naming `script`, one line of data, a llama model config, paths under tmp_path/out/run,
    and any extra sections; return the config's path."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump({
        "script": str(script),
        "paths": {"data_path": str(data), "output_dir": str(tmp_path / "out"), "run_name": "run"},
        "model": {"config": {"model_type": "llama"}},
        **sections,
    }))
    return config


def write_fake_run_config(tmp_path: Path, script_text: str, **sections) -> Path:
    """write_run_config for a script made of script_text (written to tmp_path/fake_train.py)."""
    script = tmp_path / "fake_train.py"
    script.write_text(script_text)
    return write_run_config(tmp_path, script, **sections)
