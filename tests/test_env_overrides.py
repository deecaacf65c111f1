"""HP_* / LR_* / EVAL_GEN_* / GLA_* environment overrides of train_lora.py configs."""

from __future__ import annotations

import pytest

from trainkit.config import ConfigError, load_config
from trainkit.config.lora import LoRAConfig
from trainkit.env_overrides import ENV_OVERRIDES, describe, env_overrides, field_of

REPO_CONFIG = "configs/gla_lora_sst2.yaml"


def test_every_variable_of_the_issue_is_mapped_to_a_schema_key():
    wanted = ("HP_PEFT_R HP_PEFT_ALPHA HP_PEFT_DROPOUT HP_INIT HP_PISSA_FAST HP_BATCH_SIZE HP_LR HP_EPOCHS HP_PREC "
              "HP_SEED HP_DATA HP_EVAL_STEPS HP_SAVE_STEPS HP_LOGGING_STEPS LR_SCHEDULER_TYPE LR_WARMUP_RATIO "
              "LR_WARMUP_STEPS EVAL_GEN EVAL_GEN_MAX_LENGTH EVAL_GEN_MIN_LENGTH EVAL_GEN_NUM_BEAMS GLA_FORCE_LEFT_PAD "
              "GLA_USE_MAX_NEW_TOKENS GLA_VERBOSE GRADIENT_CHECKPOINTING NUM_DATA_WORKERS DATALOADER_PREFETCH_FACTOR "
              "DATALOADER_PIN_MEMORY DATALOADER_PERSISTENT_WORKERS EVAL_ACCUMULATION_STEPS SAVE_OPTIMIZER_STATE "
              "GLA_USE_FUSED_SWIGLU").split()
    wanted.append("HP_EXPERT_LORA")   # issue 14: LoRA on the MoE experts
    assert set(wanted) == set(ENV_OVERRIDES)
    for var, spec in ENV_OVERRIDES.items():
        assert field_of(LoRAConfig, spec.key) is not None, f"{var} -> {spec.key} is not a train_lora.py config key"


def test_environment_beats_yaml_and_command_line_beats_environment():
    env = {"HP_PEFT_R": "4", "HP_LR": "1e-4", "HP_PREC": "fp32", "HP_EPOCHS": "2", "HP_DATA": "glue-tvt_mrpc",
           "LR_SCHEDULER_TYPE": "Linear", "GLA_USE_MAX_NEW_TOKENS": "0", "HP_INIT": "pissa_niter_4",
           "EVAL_GEN": "false", "UNRELATED": "x"}
    overrides, applied = env_overrides(LoRAConfig, env)
    # (EVAL_GEN=false: task_score then needs label likelihood, a rule the model checks while loading)
    cfg = load_config(REPO_CONFIG, overrides + ["lora.r=2", "task.label_likelihood=true"], LoRAConfig)
    assert cfg.lora.r == 2                     # command line wins
    assert cfg.optimization.learning_rate == 1e-4
    assert cfg.model.dtype == "float32"
    assert cfg.training.epochs == 2.0 and cfg.training.max_steps == -1
    assert cfg.task.name == "glue-tvt_mrpc"
    assert cfg.optimization.lr_scheduler == "linear"
    assert cfg.generation.use_max_new_tokens is False and cfg.generation.enabled is False
    assert cfg.lora.init == "pissa_niter_4"
    assert applied["HP_PEFT_R"] == {"key": "lora.r", "value": 4}
    assert "UNRELATED" not in applied
    assert "HP_LR -> optimization.learning_rate=0.0001" in describe(applied)


@pytest.mark.parametrize("var,value,needle", [
    ("HP_PEFT_R", "sixteen", "HP_PEFT_R='sixteen'"),
    ("HP_PREC", "int8", "bf16 | fp16 | fp32"),
    ("HP_PISSA_FAST", "maybe", "HP_PISSA_FAST"),
    ("LR_SCHEDULER_TYPE", "step", "constant, linear, cosine, polynomial"),
    ("HP_INIT", "xavier", "pissa_niter_<N>"),
    ("GRADIENT_CHECKPOINTING", "sometimes", "expected auto, 1/0, true/false, yes/no"),
])
def test_malformed_value_names_the_variable(var, value, needle):
    with pytest.raises(ConfigError) as info:
        env_overrides(LoRAConfig, {var: value})
    message = str(info.value)
    assert var in message and needle in message and "\n" not in message


def test_gradient_checkpointing_takes_auto_and_booleans():
    for text, expected in (("auto", "auto"), ("AUTO", "auto"), ("1", True), ("off", False)):
        overrides, applied = env_overrides(LoRAConfig, {"GRADIENT_CHECKPOINTING": text})
        assert overrides == [("memory.gradient_checkpointing", expected)], text
        assert load_config(REPO_CONFIG, overrides, LoRAConfig).memory.gradient_checkpointing == expected


def test_out_of_range_value_is_reported_with_its_key():
    with pytest.raises(ConfigError, match=r"HP_PEFT_DROPOUT='1.5' \(sets lora.dropout\): must be in \[0, 1\)"):
        env_overrides(LoRAConfig, {"HP_PEFT_DROPOUT": "1.5"})


def test_expert_lora_from_the_environment():
    from trainkit.config import apply_overrides, validate
    from trainkit.config.qlora import QLoRAConfig
    for value, expected in (("auto", "auto"), ("gate_up_proj,down_proj", ["gate_up_proj", "down_proj"])):
        overrides, _ = env_overrides(QLoRAConfig, {"HP_EXPERT_LORA": value})
        cfg = validate(apply_overrides({}, overrides, QLoRAConfig), QLoRAConfig)
        assert cfg.lora.expert_targets == expected
