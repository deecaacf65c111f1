"""Environment-variable overrides (HP_*, LR_*, EVAL_GEN_*, GLA_*, ...) of the training scripts' configs.

Experiment launchers written for the earlier GLA fine-tuning scripts set these variables; they keep
working, in every script. Precedence: YAML < environment < command-line `section.key=value`. Every
error names the variable: a malformed value, a value out of range for its key, and a variable set
for a key the running script does not have (it would be silently ignored otherwise: unset it).
`env_overrides()` returns the overrides in the `section.key=value` form that
trainkit.config.load_config applies, plus a record of what was applied for the logs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

from trainkit.config import ConfigError, REDACTED, check_value, is_secret_name

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected 1/0, true/false, yes/no")


def _int(text: str) -> int:
    return int(text.strip())


def _float(text: str) -> float:
    value = float(text.strip())
    if not math.isfinite(value):  # float() accepts inf and nan; no overridden key has a meaning for them
        raise ValueError("expected a finite number")
    return value


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
    """LoRA init: default (PEFT's), gaussian, pissa, pissa_niter_N, olora; 'true' means default."""
    value = text.strip().lower()
    if value in ("true", "1", "default", "lora", "kaiming"):
        return "default"
    if value in ("gaussian", "pissa", "olora") or (value.startswith("pissa_niter_") and value[12:].isdigit()):
        return value
    raise ValueError("expected default, gaussian, pissa, pissa_niter_<N> or olora")


_PRECISION = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
              "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}

# variable -> (section.key, parser, description)
ENV_OVERRIDES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "HP_PEFT_R": ("lora.r", _int, "LoRA rank"),
    "HP_PEFT_ALPHA": ("lora.alpha", _float, "LoRA alpha"),
    "HP_PEFT_DROPOUT": ("lora.dropout", _float, "LoRA dropout"),
    "HP_INIT": ("lora.init", _init, "adapter init: default, gaussian, pissa, pissa_niter_N, olora"),
    "HP_PISSA_FAST": ("lora.pissa_fast", _bool, "PiSSA by fast randomized SVD (pissa_niter_<lora.pissa_niter>)"),
    "HP_BATCH_SIZE": ("optimization.micro_batch_size", _int, "sequences per device per forward pass"),
    "HP_LR": ("optimization.learning_rate", _float, "peak learning rate"),
    "HP_EPOCHS": ("training.epochs", _float, "epochs (also sets training.max_steps=-1)"),
    "HP_PREC": ("model.dtype", _choice("auto", "bfloat16", "float16", "float32", mapping=_PRECISION), "auto | bf16 | fp16 | fp32"),
    "HP_SEED": ("training.seed", _int, "seed"),
    "HP_DATA": ("task.name", _str, "task / dataset name (e.g. sst2, glue-tvt_mrpc, samsum, spider)"),
    "HP_EVAL_STEPS": ("logging.eval_interval", _int, "steps between evaluations"),
    "HP_SAVE_STEPS": ("logging.checkpoint_interval", _int, "steps between checkpoints"),
    "HP_LOGGING_STEPS": ("logging.log_interval", _int, "steps between training_log lines"),
    "LR_SCHEDULER_TYPE": ("optimization.lr_scheduler", _choice("constant", "linear", "cosine", "polynomial"), "lr schedule"),
    "LR_WARMUP_RATIO": ("optimization.warmup_ratio", _float, "warmup fraction of total steps"),
    "LR_WARMUP_STEPS": ("optimization.warmup_steps", _int, "warmup steps (wins over the ratio when > 0)"),
    "EVAL_GEN": ("generation.enabled", _bool, "evaluate by generation"),
    "EVAL_GEN_MAX_LENGTH": ("generation.max_length", _int, "generation length (new tokens, or total with GLA_USE_MAX_NEW_TOKENS=0)"),
    "EVAL_GEN_MIN_LENGTH": ("generation.min_length", _int, "minimum generation length (same meaning switch)"),
    "EVAL_GEN_NUM_BEAMS": ("generation.num_beams", _int, "beams"),
    "GLA_FORCE_LEFT_PAD": ("generation.force_left_pad", _bool, "left-pad prompts for generation"),
    "GLA_USE_MAX_NEW_TOKENS": ("generation.use_max_new_tokens", _bool, "1: lengths count new tokens; 0: legacy total length"),
    "GLA_VERBOSE": ("logging.verbose", _bool, "print more (shapes, backends, sample predictions)"),
    "GLA_USE_FUSED_SWIGLU": ("model.fused_swiglu", _bool, "fla fused SwiGLU in GLA MLPs (adapter-safe path)"),
    "GRADIENT_CHECKPOINTING": ("memory.gradient_checkpointing", _bool, "recompute activations in backward"),
    "NUM_DATA_WORKERS": ("memory.dataloader_num_workers", _int, "DataLoader workers"),
    "DATALOADER_PREFETCH_FACTOR": ("memory.dataloader_prefetch_factor", _int, "batches prefetched per worker"),
    "DATALOADER_PIN_MEMORY": ("memory.dataloader_pin_memory", _bool, "pinned host memory for batches"),
    "DATALOADER_PERSISTENT_WORKERS": ("memory.dataloader_persistent_workers", _bool, "keep workers between epochs"),
    "EVAL_ACCUMULATION_STEPS": ("memory.eval_accumulation_steps", _int, "generation batches between gathers of predictions"),
    "SAVE_OPTIMIZER_STATE": ("memory.save_optimizer_state", _bool, "optimizer state in checkpoints (exact resume)"),
}


def env_overrides(environ: Mapping[str, str] | None = None, schema: dict | None = None,
                  script: str = "this script") -> tuple[list[str], dict[str, dict]]:
    """Overrides from the environment: (["section.key=value", ...], {VAR: {key, value}}).

    With `schema` (the running script's), each value is checked against its key here, so the error
    names the variable, and a variable whose key `script` lacks is an error instead of being ignored."""
    import json

    environ = os.environ if environ is None else environ
    overrides: list[str] = []
    applied: dict[str, dict] = {}
    for var, (key, parse, doc) in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        raw = environ[var]
        shown = REDACTED if is_secret_name(var) else raw
        section, name = key.split(".")
        if schema is not None and name not in schema.get(section, {}):
            raise ConfigError(f"environment variable {var}={shown!r}: {script} has no {key} ({doc}); unset {var}")
        try:
            value = parse(raw)
        except ValueError as e:
            raise ConfigError(f"environment variable {var}={shown!r}: {e} ({doc}; sets {key})") from None
        if schema is not None:
            value = check_value(f"environment variable {var}={shown!r} (sets {key})", schema[section][name], value)
        # JSON is valid YAML: strings with ':' or '#' survive load_config's yaml parsing.
        overrides.append(f"{key}={json.dumps(value)}")
        applied[var] = {"key": key, "value": REDACTED if is_secret_name(var) else value}
        if var == "HP_EPOCHS":
            overrides.append("training.max_steps=-1")
    return overrides, applied


def describe(applied: dict[str, dict]) -> str:
    if not applied:
        return "no environment overrides"
    return "environment overrides: " + ", ".join(f"{var} -> {v['key']}={v['value']}" for var, v in applied.items())
