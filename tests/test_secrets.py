"""No secret in any file a run writes, checkpoints and binary files included: each script runs with
secret-valued keys in `model.config` (copied into the model's own config by HF) and secret env vars,
then every file under the run directory is searched for the values."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_qlora import run_script, tiny_config
from test_distill import distill_config
from test_train_lora import lora_config

SECRETS = {"api_token": "sk-trainkit-model-api-token-7731", "hf_token": "hf_trainkitHubTokenValue5521"}
ENV_SECRETS = {"WANDB_API_KEY": "wandb-trainkit-secret-key-9034", "HF_TOKEN": "hf_trainkitEnvTokenValue6610",
               "OPENAI_API_KEY": "sk-trainkit-env-openai-2207"}


def with_secrets(model_config: dict) -> dict:
    return {**model_config, **SECRETS}


def qlora(tmp_path: Path) -> tuple[Path, Path]:
    from helpers_qlora import TINY_MOE
    cfg = tiny_config(tmp_path, model={"config": with_secrets(TINY_MOE)}, training={"max_steps": 4},
                      logging={"eval_interval": 2, "checkpoint_interval": 2})
    return cfg, tmp_path / "out" / "tiny"


def distill(tmp_path: Path) -> tuple[Path, Path]:
    import yaml
    teacher = yaml.safe_load((Path(__file__).parents[1] / "configs" / "distill_tiny_mamba2.yaml").read_text())["model"]["config"]
    cfg = distill_config(tmp_path, model={"config": with_secrets(teacher)}, training={"max_steps": 4},
                         logging={"eval_interval": 2, "checkpoint_interval": 2})
    return cfg, tmp_path / "out" / "kd"


def lora(tmp_path: Path) -> tuple[Path, Path]:
    import yaml
    base = yaml.safe_load((Path(__file__).parents[1] / "configs" / "gla_lora_sst2.yaml").read_text())["model"]["config"]
    cfg = lora_config(tmp_path, model={"config": with_secrets(base)}, training={"max_steps": 4},
                      logging={"eval_interval": 2, "checkpoint_interval": 2})
    return cfg, tmp_path / "out" / "gla"


@pytest.mark.parametrize("script,make", [("train_qlora.py", qlora), ("distill.py", distill), ("train_lora.py", lora)],
                         ids=["qlora", "distill", "lora"])
def test_no_secret_in_any_written_file(tmp_path, script, make):
    config, run_dir = make(tmp_path)
    result = run_script(["--config", str(config)], script=script, **ENV_SECRETS)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.parent.name.startswith("checkpoint-") for p in files) and any("final-" in str(p) for p in files)
    found = [f"{p.relative_to(run_dir)}: {name}" for p in files for name, value in {**SECRETS, **ENV_SECRETS}.items()
             if value.encode() in p.read_bytes()]
    assert not found, f"secrets written: {found}"
    for name, value in {**SECRETS, **ENV_SECRETS}.items():
        assert value not in result.stdout + result.stderr, name
