"""YAML config + `section.key=value` CLI overrides, validated before any model loads.

Each entry point declares its schema as a dict of sections -> keys -> `Key`. The shared
sections live in `BASE_SCHEMA`; scripts add or extend sections. A bad file, unknown
key, wrong type or impossible value raises `ConfigError` with one line naming the key;
`cli.run_main` turns it into that line on stderr and exit code 2.
"""

from __future__ import annotations

import copy
import difflib
import glob
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

SECRET_PATTERN = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
# Names that contain KEY or TOKEN but hold no secret: model shapes (num_key_value_heads),
# token ids and counts (pad_token_id, eval_tokens, max_new_tokens), tokenizers
# (tokenizer_name_or_path, TOKENIZERS_PARALLELISM). Redacting them would blank out
# config values the dashboard and run.json must show.
NOT_SECRET_PATTERN = re.compile(r"TOKENI[SZ]|TOKENS|TOKEN_IDS?$|KEY_VALUE|KV_HEADS", re.IGNORECASE)
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    """True when a value stored under `name` must not be printed or logged."""
    name = str(name)
    return bool(SECRET_PATTERN.search(name)) and not NOT_SECRET_PATTERN.search(name)


class ConfigError(ValueError):
    """A problem with the user's config: the message is one line naming the key."""


@dataclass
class Key:
    type: Any                      # int, float, bool, str, list, dict, or a tuple of them
    default: Any = None
    doc: str = ""
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None  # returns a problem description or None
    nullable: bool = False


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def positive_or_minus_one(v):
    return None if v > 0 or v == -1 else "must be > 0, or -1 to train by epochs"


BASE_SCHEMA: dict[str, dict[str, Key]] = {
    "paths": {
        "model_name_or_path": Key(str, None, "hub id or local directory of the base model; null builds a random-init model from `model.config`", nullable=True),
        "tokenizer_name_or_path": Key(str, None, "tokenizer hub id or path; null: the model's, or the built-in byte-level tokenizer for a model built from config", nullable=True),
        "data_path": Key(str, "data/tiny_corpus.jsonl", "JSONL file, directory of JSONL files, or HF datasets id"),
        "data_split": Key(str, "train", "split to read when data_path is an HF datasets id"),
        "output_dir": Key(str, "outputs", "root directory that holds the run directories"),
        "run_name": Key(str, None, "run directory name under output_dir; null: the config file's name", nullable=True),
        "best_adapter_dir": Key(str, None, "where the best adapter is copied; null: <run_dir>/best-adapter", nullable=True),
        "cache_dir": Key(str, None, "HF cache directory for hub downloads", nullable=True),
    },
    "model": {
        "config": Key(dict, None, "HF config kwargs (with model_type) to build a random-init model when paths.model_name_or_path is null", nullable=True),
        "trust_remote_code": Key(bool, False, "allow hub models that ship their own modeling code"),
        "attn_implementation": Key(str, "sdpa", "attention kernel", choices=("sdpa", "eager", "flash_attention_2", "flash_attention_3")),
        "local_files_only": Key(bool, False, "never contact the hub (offline machines)"),
    },
    "training": {
        "epochs": Key(float, 1.0, "passes over the training split (used when max_steps is -1)", check=positive),
        "max_steps": Key(int, -1, "optimizer steps to train; -1: derive from epochs", check=positive_or_minus_one),
        "seed": Key(int, 42, "seed for init, data order, dropout"),
        "max_seq_length": Key(int, 512, "tokens per sequence (packed windows or truncated rows)", check=positive),
        "val_split": Key(float, 0.05, "fraction of rows held out for validation (deterministic by seed)", check=fraction),
        "packing": Key(bool, True, "pack `text` rows into full max_seq_length windows"),
        "max_eval_batches": Key(int, None, "cap on validation batches per evaluation; null: all", nullable=True, check=positive),
        "max_consecutive_nonfinite": Key(int, 5, "stop after this many consecutive optimizer steps with NaN/inf loss or gradients", check=positive),
        "preemption_grace_seconds": Key(float, 25.0, "on SIGTERM/SIGINT: seconds to finish the current optimizer step and save a checkpoint before exiting anyway (keep it below the scheduler's kill delay: SLURM KillWait, Kubernetes terminationGracePeriodSeconds, both 30 s by default)", check=positive),
    },
    "optimization": {
        "micro_batch_size": Key(int, 4, "sequences per device per forward pass", check=positive),
        "gradient_accumulation_steps": Key(int, 1, "micro batches per optimizer step", check=positive),
        "learning_rate": Key(float, 2e-4, "peak learning rate", check=positive),
        "lr_scheduler": Key(str, "cosine", "schedule after warmup", choices=("cosine", "linear", "constant", "polynomial", "wsd")),
        "warmup_ratio": Key(float, 0.0, "warmup as a fraction of total steps (used when warmup_steps is 0)", check=fraction),
        "warmup_steps": Key(int, 0, "warmup steps (wins over warmup_ratio when > 0)", check=non_negative),
        "min_lr_ratio": Key(float, 0.0, "final lr as a fraction of the peak (cosine, polynomial, wsd)", check=fraction),
        "decay_ratio": Key(float, 0.1, "wsd: fraction of steps in the final decay", check=fraction),
        "adam_beta1": Key(float, 0.9, "AdamW beta1", check=fraction),
        "adam_beta2": Key(float, 0.999, "AdamW beta2", check=fraction),
        "adam_epsilon": Key(float, 1e-8, "AdamW epsilon", check=positive),
        "weight_decay": Key(float, 0.0, "AdamW weight decay", check=non_negative),
        "max_grad_norm": Key(float, 1.0, "gradient clipping norm; 0 disables", check=non_negative),
    },
    "logging": {
        "log_interval": Key(int, 10, "optimizer steps between training_log lines", check=positive),
        "eval_interval": Key(int, 100, "optimizer steps between evaluations", check=positive),
        "checkpoint_interval": Key(int, 100, "optimizer steps between checkpoints", check=positive),
        "keep_top_k": Key(int, 3, "checkpoints kept by metric_for_best (the latest is always kept too)", check=positive),
        "metric_for_best": Key(str, "eval_loss", "eval_log field that ranks checkpoints"),
        "greater_is_better": Key(bool, False, "true when a larger metric_for_best is better"),
        "report_to": Key(list, [], "accelerate trackers: tensorboard, wandb, ..."),
        "progress_bar": Key(bool, True, "tqdm progress bar on the main process"),
    },
    "memory": {
        "gradient_checkpointing": Key(bool, True, "recompute activations in backward (non-reentrant)"),
        "dataloader_num_workers": Key(int, 0, "DataLoader worker processes", check=non_negative),
        "save_optimizer_state": Key(bool, True, "store optimizer/scheduler/RNG in checkpoints (needed for exact resume)"),
    },
}

TOP_LEVEL_KEYS = {"script": Key(str, None, "entry point that trains this config (launch_training.sh reads it)", nullable=True)}


def merge_schema(*schemas: dict) -> dict:
    out: dict = {}
    for schema in schemas:
        for section, keys in schema.items():
            out.setdefault(section, {}).update(keys)
    return out


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def _finite(name: str, value: float) -> float:
    """No float key of any schema has a meaning for inf or NaN (an infinite learning rate makes
    every weight non-finite at the first step): reject them with the key's name."""
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number (got {value!r})")
    return value


def _coerce(name: str, spec: Key, value: Any) -> Any:
    if value is None:
        if spec.nullable or spec.default is None:
            return None
        raise ConfigError(f"{name}: must not be null (expected {_type_name(spec.type)})")
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    if bool in types and isinstance(value, bool):
        return value
    if float in types and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(name, float(value))
    if float in types and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-4 as a string
            number = float(value)
        except ValueError:
            pass
        else:
            return _finite(name, number)
    if int in types and isinstance(value, int) and not isinstance(value, bool):
        return value
    if list in types and isinstance(value, str) and spec.type is list:
        return [v.strip() for v in value.split(",") if v.strip()]
    for t in types:
        if t not in (int, float, bool) and isinstance(value, t):
            return value
    raise ConfigError(f"{name}: expected {_type_name(spec.type)}, got {type(value).__name__} {value!r}")


def validate(raw: dict, schema: dict) -> dict:
    """Check `raw` against `schema`; return the full config with defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    cfg: dict = {}
    for key in raw:
        if key not in schema and key not in TOP_LEVEL_KEYS:
            hint = difflib.get_close_matches(key, list(schema) + list(TOP_LEVEL_KEYS), n=1)
            raise ConfigError(f"{key}: unknown section" + (f" (did you mean {hint[0]}?)" if hint else ""))
    for key, spec in TOP_LEVEL_KEYS.items():
        cfg[key] = _coerce(key, spec, raw.get(key, spec.default))
    for section, keys in schema.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {type(given).__name__}")
        for key in given:
            if key not in keys:
                hint = difflib.get_close_matches(key, list(keys), n=1)
                raise ConfigError(f"{section}.{key}: unknown key" + (f" (did you mean {section}.{hint[0]}?)" if hint else ""))
        out = {}
        for key, spec in keys.items():
            out[key] = check_value(f"{section}.{key}", spec, copy.deepcopy(given.get(key, spec.default)))
        cfg[section] = out
    return cfg


def check_value(name: str, spec: Key, value: Any) -> Any:
    """One value checked against its Key (type, choices, range); returns it coerced. `name` starts
    the error line: the key, or what set it (an environment variable, see trainkit.env_overrides)."""
    value = _coerce(name, spec, value)
    if value is not None:
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, spec.choices))}")
        if spec.check:
            problem = spec.check(value)
            if problem:
                raise ConfigError(f"{name}: {problem} (got {value!r})")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def load_raw(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config: {path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return raw


def load_config(path: str | os.PathLike, overrides: list[str], schema: dict) -> dict:
    """Read YAML, apply overrides, validate; add `_config_path` and `run_dir`."""
    raw = load_raw(path)
    for text in overrides:
        (section, key), value = parse_override(text)
        if section in TOP_LEVEL_KEYS:
            raise ConfigError(f"override {text!r}: {section} is a top-level key")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw[section][key] = value
    cfg = validate(raw, schema)
    cfg["_config_path"] = str(path)
    run_name = cfg["paths"]["run_name"] or Path(path).stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_name) or run_name in (".", ".."):
        raise ConfigError(f"paths.run_name: {run_name!r} may hold only letters, digits, '.', '_' and '-'")
    cfg["paths"]["run_name"] = run_name
    cfg["run_dir"] = str(Path(cfg["paths"]["output_dir"]) / run_name)
    return cfg


def looks_local(path: str) -> bool:
    """True for a path that must exist on disk; False for a hub id (`name` or `org/name`)."""
    return (path.startswith(("/", ".", "~")) or path.count("/") > 1
            or path.endswith((".jsonl", ".json", ".gz", ".txt", ".csv", ".parquet")))


def check_paths(cfg: dict, path_keys=("data_path",), model_hint: str = "a hub id or local path") -> None:
    """Missing local files are config errors, found before any model loads. `path_keys`: the
    paths.* data keys this script reads (a local path may be a glob); the model keys always count."""
    paths = cfg["paths"]
    for key in path_keys:
        value = paths.get(key)
        if value and looks_local(value):
            expanded = os.path.expanduser(value)
            if not os.path.exists(expanded) and not glob.glob(expanded):
                raise ConfigError(f"paths.{key}: no such file or directory: {value}")
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        value = paths.get(key)
        if value and looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"paths.{key}: no such directory: {value}")
    if not paths["model_name_or_path"] and not cfg["model"]["config"]:
        raise ConfigError(f"paths.model_name_or_path: set {model_hint}, or give model.config to build a model")
    if paths["model_name_or_path"] and cfg["model"]["config"]:
        raise ConfigError("model.config: set either paths.model_name_or_path or model.config, not both")
    if cfg["model"]["config"] is not None and "model_type" not in cfg["model"]["config"]:
        raise ConfigError("model.config.model_type: missing (e.g. llama, gla, mixtral, qwen3_moe)")
    check_writable_dir("paths.output_dir", cfg.get("run_dir") or paths["output_dir"])
    if paths.get("best_adapter_dir"):
        check_writable_dir("paths.best_adapter_dir", paths["best_adapter_dir"])


def check_writable_dir(key: str, path: str) -> None:
    """`path` is a directory the run can create or write into: it, or its nearest existing parent,
    is a directory with write permission. Checked without writing anything."""
    target = Path(os.path.expanduser(path)).absolute()
    existing = target
    while not os.path.exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{key}: {target} {what}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {target}: no permission to write in {existing}")


def redact(obj: Any, whole: bool = False) -> Any:
    """Copy of `obj` with the values under secret names (is_secret_name: KEY/TOKEN/SECRET/PASSWORD)
    replaced by ***. A dict or list under such a name is searched on by its own names; with `whole`,
    everything in it is replaced (the dashboard's view of run.json files that other tools wrote)."""
    def walk(value, secret: bool):
        if isinstance(value, dict):
            return {k: walk(v, (secret and whole) or is_secret_name(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, secret and whole) for v in value]
        return REDACTED if secret and value not in (None, "") else value

    return walk(obj, False)


def public_config(cfg: dict) -> dict:
    return redact({k: v for k, v in cfg.items() if not k.startswith("_")})
