"""Config validation: one line naming the key, before anything heavy happens."""

from __future__ import annotations

import json

import pytest
import yaml

from trainkit.config import ConfigError, load_config, public_config, redact, validate
from trainkit.config.base import TrainConfig
from trainkit.config.distill import DistillConfig
from trainkit.config.lora import LoRAConfig
from trainkit.config.qlora import QLoRAConfig
from trainkit.config.scripts import SCRIPT_CONFIGS

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
    ({"memory": {"gradient_checkpointing": "yes"}}, [], "memory.gradient_checkpointing: expected auto, true or false, got str 'yes'"),
    ({"memory": {"gradient_checkpointing": None}}, [], "memory.gradient_checkpointing: expected auto, true or false"),
    ({}, ["memory.gradient_checkpointing=1"], "memory.gradient_checkpointing: expected auto, true or false, got int 1"),
    ({"memory": {"activation_memory_budget_gib": 0}}, [], "memory.activation_memory_budget_gib: must be > 0 (got 0.0)"),
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
    cfg = load_config(REPO / "training_config.yaml", [], QLoRAConfig)
    assert cfg.script == "train_qlora.py" and cfg.model.config["model_type"] == "mixtral"


# ---------------------------------------------------------------- the typed models (trainkit/config/)
@pytest.mark.parametrize("text, overrides, message", [
    ("training:\n  epochs: .inf\n", [], "training.epochs: must be a finite number (got inf)"),
    ("training:\n  max_steps: 2.5\n", [], "training.max_steps: expected int, got float 2.5"),
    ("training:\n  max_steps: true\n", [], "training.max_steps: expected int, got bool True"),
    ("training:\n  seed: null\n", [], "training.seed: must not be null (expected int)"),
    ("training: 5\n", [], "training: expected a mapping of keys, got int"),
    ("paths:\n  output_dir: 3\n", [], "paths.output_dir: expected str, got int 3"),
    ("model:\n  config: [1]\n", [], "model.config: expected dict, got list [1]"),
    ("scrip: x.py\n", [], "scrip: unknown section (did you mean script?)"),
    ("", ["script.name=x"], "override 'script.name=x': script is a top-level key"),
    ("", ["logging.report_to=[no_such_tracker]"], "logging.report_to: unknown tracker 'no_such_tracker'"),
])
def test_type_errors_are_one_line_naming_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides, TrainConfig)
    assert str(err.value) == message or str(err.value).startswith(message), str(err.value)


def test_yaml_values_are_read_as_users_expect(tmp_path):
    """YAML 1.1 reads 2e-4 as a string: float keys take it; an int given to a float key becomes a
    float; comma strings fill list keys; an empty section is the defaults."""
    cfg = load_config(write(tmp_path, "optimization:\n  learning_rate: 2e-4\ntraining:\n  epochs: 2\nmemory:\n"),
                      ["logging.report_to=tensorboard,", "lora.modules_to_save=embed_tokens,lm_head"], QLoRAConfig)
    assert cfg.optimization.learning_rate == 2e-4 and cfg.training.epochs == 2.0
    assert isinstance(cfg.training.epochs, float)
    assert cfg.logging.report_to == ["tensorboard"] and cfg.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert cfg.memory.gradient_checkpointing == "auto" and cfg.memory.activation_memory_budget_gib is None
    # YAML booleans and the word auto, from the file or the command line
    for text, overrides, expected in [("memory:\n  gradient_checkpointing: true\n", [], True),
                                      ("memory:\n  gradient_checkpointing: off\n", [], False),
                                      ("", ["memory.gradient_checkpointing=auto"], "auto"),
                                      ("", ["memory.gradient_checkpointing=false"], False)]:
        value = load_config(write(tmp_path, text), overrides, QLoRAConfig).memory.gradient_checkpointing
        assert value == expected and type(value) is type(expected), (text, overrides, value)


def test_dump_is_plain_json_with_run_dir_and_secrets_redacted(tmp_path):
    cfg = load_config(write(tmp_path, {"model": {"config": {"model_type": "llama", "hf_token": "hf_x"}}}),
                      ["paths.run_name=r1"], QLoRAConfig)
    dumped = public_config(cfg)
    assert list(dumped) == ["script", "paths", "model", "training", "optimization", "logging", "memory", "lora",
                            "quantization", "run_dir"]
    assert dumped["run_dir"] == str(cfg.run_dir) == "outputs/r1" and cfg.config_path.endswith("c.yaml")
    assert dumped["model"]["config"] == {"model_type": "llama", "hf_token": "***"}
    assert cfg.model.config["hf_token"] == "hf_x"  # redacted in what is stored, not in the config itself
    assert json.loads(json.dumps(dumped)) == dumped


@pytest.mark.parametrize("config_class, data, message", [
    (QLoRAConfig, {"logging": {"metric_for_best": "accuracy"}}, "logging.metric_for_best: 'accuracy' is not one of eval_loss, perplexity"),
    (LoRAConfig, {"lora": {"init": "xavier"}}, "lora.init: 'xavier' is not one of default, gaussian, pissa, pissa_niter_<N>, olora"),
    (LoRAConfig, {"lora": {"init": "pissa", "variant": "dora"}}, "lora.init: PiSSA init cannot be combined with lora.variant dora"),
    (LoRAConfig, {"generation": {"enabled": False}}, "logging.metric_for_best: task_score needs generation.enabled or task.label_likelihood"),
    (LoRAConfig, {"logging": {"metric_for_best": "eval_loss"}}, "logging.greater_is_better: must be false when metric_for_best is eval_loss"),
    (LoRAConfig, {"logging": {"metric_for_best": "bleu"}}, "logging.metric_for_best: 'bleu' is not task_score, eval_loss or one of"),
    (LoRAConfig, {"task": {"name": "dart"}, "logging": {"metric_for_best": "ter"}}, "logging.greater_is_better: must be false when metric_for_best is ter (lower is better)"),
    (LoRAConfig, {"task": {"name": "sst3"}}, "task.name: unknown task 'sst3'; known: cola, sst2"),
    (LoRAConfig, {"task": {"name": "samsum", "label_likelihood": True}}, "task.label_likelihood: samsum is not a classification task"),
    (DistillConfig, {"stage2": {"enabled": True}}, "stage2.data_path: required when stage2.enabled is true"),
    (DistillConfig, {"student": {"attention_layers": [1, -2]}}, "student.attention_layers: expected non-negative layer indices, got [1, -2]"),
    (DistillConfig, {"logging": {"metric_for_best": "eval_top1_agreement"}}, "logging.greater_is_better: must be true for eval_top1_agreement"),
    (DistillConfig, {"optimization": {"warmup_ratio": 0.5, "decay_ratio": 0.6}}, "optimization.decay_ratio: warmup_ratio + decay_ratio must be <= 1"),
    (DistillConfig, {"optimization": {"lr_scheduler": "polynomial"}}, "optimization.lr_scheduler: 'polynomial' is not one of wsd, cosine, linear, constant"),
    (DistillConfig, {"lora": {"r": 4}}, "lora: unknown section"),
])
def test_rules_between_keys_are_checked_while_loading(config_class, data, message):
    with pytest.raises(ConfigError) as err:
        validate(data, config_class)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_every_script_has_a_config_model_and_its_configs_are_valid():
    """The launcher validates against SCRIPT_CONFIGS: each entry is an entry point, and every config
    in the repository validates against the model of the script it names."""
    for script in SCRIPT_CONFIGS:
        assert (REPO / script).is_file(), script
    configs = [REPO / "training_config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
    for path in configs:
        data = yaml.safe_load(path.read_text())
        load_config(path, [], SCRIPT_CONFIGS[data.get("script") or "train_qlora.py"])


def test_null_max_eval_batches_means_all_batches_and_distill_caps_at_eight_by_default():
    """One meaning of null everywhere ("all"); distill.py's default cap of 8 is its stated default."""
    assert validate({}, QLoRAConfig).training.max_eval_batches is None
    assert validate({}, LoRAConfig).training.max_eval_batches is None
    assert validate({}, DistillConfig).training.max_eval_batches == 8
    assert validate({"training": {"max_eval_batches": None}}, DistillConfig).training.max_eval_batches is None
