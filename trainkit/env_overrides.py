"""Environment-variable overrides (HP_*, LR_*, EVAL_GEN_*, GLA_*, ...) of the training scripts' configs.

Experiment launchers written for the earlier GLA fine-tuning scripts set these variables; they keep
working, in every script. Precedence: YAML < environment < command-line `section.key=value`. Every
error names the variable: a malformed value, a value out of range for its key, and a variable set
for a key the running script does not have (it would be silently ignored otherwise: unset it).
Each variable names a field of the running script's config model (trainkit/config/): its text is read
by the field's type (or by the variable's own parser: aliases such as HP_PREC=bf16) and checked by the
field itself. `env_overrides()` returns ("section.key", value) pairs that trainkit.config.load_config
applies before the command line's overrides, plus a record of what was applied for the logs.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Callable, Mapping, NamedTuple

from pydantic import TypeAdapter, ValidationError

from trainkit.config import REDACTED, ConfigError, config_error, is_secret_name, section_class
from trainkit.config.base import TrainConfig
from trainkit.config.fields import expected_types
from trainkit.config.lora import INITS, is_lora_init

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected 1/0, true/false, yes/no")


def _auto_or_bool(text: str) -> bool | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _bool(text)
    except ValueError:
        raise ValueError("expected auto, 1/0, true/false, yes/no") from None


def _int(text: str) -> int:
    return int(text.strip())


def _float(text: str) -> float:
    return float(text.strip())  # inf and nan are read here and refused by the field (fields.finite)


def _str(text: str) -> str:
    if not text.strip():
        raise ValueError("empty")
    return text.strip()


def _choice(*choices: str, mapping: dict[str, str] | None = None) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        value = (mapping or {}).get(value, value)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    return parse


def _init(text: str) -> str:
    """LoRA init in any case, with the earlier scripts' aliases of PEFT's default ('true', '1', 'lora',
    'kaiming'). Checked here, by lora.init's own rule, so that the error names the variable (the
    field's validator runs with the whole model, not on this one value)."""
    value = text.strip().lower()
    value = "default" if value in ("true", "1", "lora", "kaiming") else value
    if not is_lora_init(value):
        raise ValueError(f"expected one of {INITS}")
    return value


_PRECISION = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
              "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}

class EnvVar(NamedTuple):
    key: str                                    # section.key it sets
    doc: str
    parse: Callable[[str], Any] | None = None   # None: by the field's type (TEXT_PARSERS)


ENV_OVERRIDES: dict[str, EnvVar] = {
    "HP_PEFT_R": EnvVar("lora.r", "LoRA rank"),
    "HP_PEFT_ALPHA": EnvVar("lora.alpha", "LoRA alpha"),
    "HP_PEFT_DROPOUT": EnvVar("lora.dropout", "LoRA dropout"),
    "HP_EXPERT_LORA": EnvVar("lora.expert_targets", "LoRA on the routed MoE experts: none, auto (family preset) or comma-separated expert tensor names"),
    "HP_INIT": EnvVar("lora.init", "adapter init: default, gaussian, pissa, pissa_niter_N, olora", _init),
    "HP_PISSA_FAST": EnvVar("lora.pissa_fast", "PiSSA by fast randomized SVD (pissa_niter_<lora.pissa_niter>)"),
    "HP_BATCH_SIZE": EnvVar("optimization.micro_batch_size", "sequences per device per forward pass"),
    "HP_LR": EnvVar("optimization.learning_rate", "peak learning rate"),
    "HP_EPOCHS": EnvVar("training.epochs", "epochs (also sets training.max_steps=-1)"),
    "HP_PREC": EnvVar("model.dtype", "auto | bf16 | fp16 | fp32", _choice("auto", "bfloat16", "float16", "float32", mapping=_PRECISION)),
    "HP_SEED": EnvVar("training.seed", "seed"),
    "HP_DATA": EnvVar("task.name", "task / dataset name (e.g. sst2, glue-tvt_mrpc, samsum, spider)"),
    "HP_EVAL_STEPS": EnvVar("logging.eval_interval", "steps between evaluations"),
    "HP_SAVE_STEPS": EnvVar("logging.checkpoint_interval", "steps between checkpoints"),
    "HP_LOGGING_STEPS": EnvVar("logging.log_interval", "steps between training_log lines"),
    "LR_SCHEDULER_TYPE": EnvVar("optimization.lr_scheduler", "lr schedule", _choice("constant", "linear", "cosine", "polynomial")),
    "LR_WARMUP_RATIO": EnvVar("optimization.warmup_ratio", "warmup fraction of total steps"),
    "LR_WARMUP_STEPS": EnvVar("optimization.warmup_steps", "warmup steps (wins over the ratio when > 0)"),
    "EVAL_GEN": EnvVar("generation.enabled", "evaluate by generation"),
    "EVAL_GEN_MAX_LENGTH": EnvVar("generation.max_length", "generation length (new tokens, or total with GLA_USE_MAX_NEW_TOKENS=0)"),
    "EVAL_GEN_MIN_LENGTH": EnvVar("generation.min_length", "minimum generation length (same meaning switch)"),
    "EVAL_GEN_NUM_BEAMS": EnvVar("generation.num_beams", "beams"),
    "GLA_FORCE_LEFT_PAD": EnvVar("generation.force_left_pad", "left-pad prompts for generation"),
    "GLA_USE_MAX_NEW_TOKENS": EnvVar("generation.use_max_new_tokens", "1: lengths count new tokens; 0: legacy total length"),
    "GLA_VERBOSE": EnvVar("logging.verbose", "print more (shapes, backends, sample predictions)"),
    "GLA_USE_FUSED_SWIGLU": EnvVar("model.fused_swiglu", "fla fused SwiGLU in GLA MLPs (adapter-safe path)"),
    "GRADIENT_CHECKPOINTING": EnvVar("memory.gradient_checkpointing", "activation checkpointing: auto | 1 (every layer) | 0 (none)", _auto_or_bool),
    "NUM_DATA_WORKERS": EnvVar("memory.dataloader_num_workers", "DataLoader workers"),
    "DATALOADER_PREFETCH_FACTOR": EnvVar("memory.dataloader_prefetch_factor", "batches prefetched per worker"),
    "DATALOADER_PIN_MEMORY": EnvVar("memory.dataloader_pin_memory", "pinned host memory for batches"),
    "DATALOADER_PERSISTENT_WORKERS": EnvVar("memory.dataloader_persistent_workers", "keep workers between epochs"),
    "EVAL_ACCUMULATION_STEPS": EnvVar("memory.eval_accumulation_steps", "generation batches between gathers of predictions"),
    "SAVE_OPTIMIZER_STATE": EnvVar("memory.save_optimizer_state", "optimizer state in checkpoints (exact resume)"),
}


TEXT_PARSERS: dict[type, Callable[[str], Any]] = {bool: _bool, int: _int, float: _float, str: _str}


def field_of(config_class: type[TrainConfig], key: str):
    """The pydantic field `section.key` of `config_class`, or None when the script has no such key."""
    section, name = key.split(".")
    model = section_class(config_class, section)
    return model.model_fields.get(name) if model is not None else None


def env_overrides(config_class: type[TrainConfig], environ: Mapping[str, str] | None = None,
                  script: str = "this script") -> tuple[list[tuple[str, Any]], dict[str, dict]]:
    """Overrides from the environment: ([("section.key", value), ...], {VAR: {key, value}}).

    Each value is read and checked by its field of `config_class` (the running script's model), so the
    error names the variable; a variable whose key `script` lacks is an error instead of being ignored."""
    environ = os.environ if environ is None else environ
    overrides: list[tuple[str, Any]] = []
    applied: dict[str, dict] = {}
    for var, (key, doc, parse) in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        raw = environ[var]
        shown = REDACTED if is_secret_name(var) else raw
        field = field_of(config_class, key)
        if field is None:
            raise ConfigError(f"environment variable {var}={shown!r}: {script} has no {key} ({doc}); unset {var}")
        expect = expected_types(field)
        parse = parse or TEXT_PARSERS[expect.types[0] if expect else str]
        try:
            value = parse(raw)
        except ValueError as e:
            raise ConfigError(f"environment variable {var}={shown!r}: {e} ({doc}; sets {key})") from None
        try:
            checked = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            value = TypeAdapter(checked).validate_python(value)
        except ValidationError as e:
            raise config_error(e, config_class, name=f"environment variable {var}={shown!r} (sets {key})") from None
        overrides.append((key, value))
        applied[var] = {"key": key, "value": REDACTED if is_secret_name(var) else value}
        if var == "HP_EPOCHS":
            overrides.append(("training.max_steps", -1))
    return overrides, applied


def describe(applied: dict[str, dict]) -> str:
    if not applied:
        return "no environment overrides"
    return "environment overrides: " + ", ".join(f"{var} -> {v['key']}={v['value']}" for var, v in applied.items())
