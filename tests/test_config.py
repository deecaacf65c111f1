"""Config validation: one line naming the key, before anything heavy happens."""

from __future__ import annotations

import pytest
import yaml

from trainkit.config import ConfigError, load_config, public_config, redact
from trainkit.config.base import TrainConfig

from helpers_qlora import REPO


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, {"training": {"max_steps": 5}}),
                      ["optimization.learning_rate=1e-4", "logging.report_to=tensorboard"], TrainConfig)
    assert cfg.training.max_steps == 5 and cfg.training.seed == 42
    assert cfg.optimization.learning_rate == 1e-4
    assert cfg.logging.report_to == ["tensorboard"]
    assert str(cfg.run_dir).endswith("outputs/c") and public_config(cfg)["run_dir"].endswith("outputs/c")


@pytest.mark.parametrize("data, overrides, message", [
    ({"trainig": {}}, [], "trainig: unknown section (did you mean training?)"),
    ({"training": {"max_step": 3}}, [], "training.max_step: unknown key (did you mean training.max_steps?)"),
    ({"training": {"max_steps": "ten"}}, [], "training.max_steps: expected int, got str 'ten'"),
    ({"training": {"max_steps": 0}}, [], "training.max_steps: must be > 0, or -1 to train by epochs (got 0)"),
    ({"training": {"val_split": 1.5}}, [], "training.val_split: must be in [0, 1) (got 1.5)"),
    ({"optimization": {"lr_scheduler": "cosine_restarts"}}, [], "optimization.lr_scheduler: 'cosine_restarts' is not one of"),
    ({"memory": {"gradient_checkpointing": "yes"}}, [], "memory.gradient_checkpointing: expected bool"),
    ({}, ["training.max_steps"], "expected section.key=value"),
    ({}, ["paths.run_name=../escape"], "paths.run_name: '../escape' may hold only"),
])
def test_errors_name_the_key(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data), overrides, TrainConfig)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: line \d+ is not valid YAML"):
        load_config(write(tmp_path, "training:\n  max_steps: [1\n"), [], TrainConfig)


def test_redaction():
    cfg = {"paths": {"hf_token": "hf_abc", "data_path": "x"}, "env": {"WANDB_API_KEY": "k", "MY_PASSWORD": "p",
                                                                     "AWS_SECRET_ACCESS_KEY": "s", "HOME": "/root"}}
    out = redact(cfg)
    assert out["paths"] == {"hf_token": "***", "data_path": "x"}
    assert out["env"] == {"WANDB_API_KEY": "***", "MY_PASSWORD": "***", "AWS_SECRET_ACCESS_KEY": "***", "HOME": "/root"}
    # a dict or list under a secret name: searched on by its own names, or (whole=True, the dashboard's
    # view of run.json files from other tools) replaced entirely
    nested = {"api_keys": {"openai": "sk-1", "hf_token": "hf_2"}, "tokens_list": ["a"], "secret_list": ["s", ""],
              "tokenizer": {"pad_token_id": 0}}
    assert redact(nested) == {"api_keys": {"openai": "sk-1", "hf_token": "***"}, "tokens_list": ["a"],
                              "secret_list": ["s", ""], "tokenizer": {"pad_token_id": 0}}
    assert redact(nested, whole=True) == {"api_keys": {"openai": "***", "hf_token": "***"}, "tokens_list": ["a"],
                                          "secret_list": ["***", ""], "tokenizer": {"pad_token_id": 0}}


def test_default_config_is_valid():
    from trainkit.config.qlora import QLoRAConfig
    cfg = load_config(REPO / "training_config.yaml", [], QLoRAConfig)
    assert cfg.script == "train_qlora.py" and cfg.model.config["model_type"] == "mixtral"
