"""A launch_training.sh config around a stand-in trainer script, shared by the launcher and dashboard tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_fake_run_config(tmp_path: Path, script_text: str, **sections) -> Path:
    """Write script_text as the config's script, one line of data, and a config with a llama model
    config, paths under tmp_path/out/run, and any extra sections; return the config's path."""
    script = tmp_path / "fake_train.py"
    script.write_text(script_text)
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
