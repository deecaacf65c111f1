"""YAML config + `section.key=value` overrides, validated before any model loads.

The keys are typed models (pydantic): the shared sections in trainkit/config/base.py, each
script's in qlora.py, lora.py, distill.py (`SCRIPT_CONFIGS` in trainkit/config/scripts.py maps an
entry point to its model). This module reads the YAML, applies the overrides (environment
variables, trainkit/env_overrides.py, then the command line) and turns every problem into a
`ConfigError` with one line naming the key; `cli.run_main` prints it as `config error: ...` and
exits with code 2.
"""

from __future__ import annotations

import copy
import difflib
import glob
import os
import re
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from trainkit.config.base import TrainConfig

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


def load_raw(path: str | os.PathLike) -> dict:
    """The YAML file as a dict; a missing file or a YAML error is a ConfigError naming the line."""
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` from the command line: (["section", "key"], the value read as YAML)."""
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


Override = Union[str, tuple[str, Any]]


def apply_overrides(raw: dict, overrides: list[Override], config_class: type[TrainConfig]) -> dict:
    """`raw` with each override set, in order (a later one wins). An override is a command-line
    `section.key=value` string, or a ("section.key", value) pair whose value is already parsed and
    checked (environment variables: trainkit.env_overrides)."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        if isinstance(override, str):
            (section, key), value = parse_override(override)
            what = f"override {override!r}"
        else:
            dotted, value = override
            section, key = dotted.split(".")
            what = f"override {dotted}"
        field = config_class.model_fields.get(section)
        if field is not None and not _is_section(field):
            raise ConfigError(f"{what}: {section} is a top-level key")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw[section][key] = value
    return raw


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def section_class(config_class: type[TrainConfig], section: str) -> type[BaseModel] | None:
    field = config_class.model_fields.get(section)
    return field.annotation if field is not None and _is_section(field) else None


def _did_you_mean(name: str, candidates, prefix: str = "") -> str:
    hint = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {prefix}{hint[0]}?)" if hint else ""


def config_error(error: ValidationError, config_class: type[TrainConfig], name: str | None = None) -> ConfigError:
    """pydantic's ValidationError as our one line: the key (or `name`, e.g. the environment variable
    that set it), then the problem. Unknown keys come first, as a user fixes those first."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(part) for part in first["loc"]]
    key = name or ".".join(loc) or "config"
    kind, value = first["type"], first.get("input")
    if kind == "extra_forbidden" and name is None:
        if len(loc) == 1:
            return ConfigError(f"{loc[0]}: unknown section" + _did_you_mean(loc[0], config_class.model_fields))
        section = section_class(config_class, loc[0])
        fields = section.model_fields if section is not None else ()
        return ConfigError(f"{key}: unknown key" + _did_you_mean(loc[-1], fields, f"{loc[0]}."))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        what = "sections" if not loc else "keys"
        return ConfigError(f"{key}: expected a mapping of {what}, got {type(value).__name__}")
    if kind in ("value_error", "assertion_error"):
        message = str(first["ctx"]["error"])
        return ConfigError(f"{key}: {message}" if loc or name else message)
    return ConfigError(f"{key}: {first['msg']}")


def validate(raw: dict, config_class: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """`raw` (a YAML mapping) checked against `config_class`; returns the model, defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return config_class.model_validate(raw)
    except ValidationError as e:
        raise config_error(e, config_class) from None


def load_config(path: str | os.PathLike, overrides: list[Override], config_class: type[TrainConfig]) -> TrainConfig:
    """Read YAML, apply overrides (environment pairs, then command-line strings), validate, name the run."""
    raw = apply_overrides(load_raw(path), overrides, config_class)
    return name_run(validate(raw, config_class), path)


def load_script_config(path: str | os.PathLike, overrides: list[str], config_class: type[TrainConfig],
                       script: str) -> tuple[TrainConfig, dict]:
    """A training script's config as the script (and the launcher, before it starts one) reads it:
    YAML < environment (HP_* and friends, trainkit.env_overrides) < command-line `section.key=value`,
    validated by `config_class`, local files and directories checked. Returns (cfg, what the
    environment set, for the logs)."""
    from trainkit.env_overrides import env_overrides

    env, applied = env_overrides(config_class, script=script)
    cfg = load_config(path, env + list(overrides), config_class)
    check_paths(cfg)
    return cfg, applied


def name_run(cfg: TrainConfig, path: str | os.PathLike) -> TrainConfig:
    """Fill in paths.run_name (default: the config file's name) and remember the file (cfg.config_path)."""
    run_name = cfg.paths.run_name or Path(path).stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_name) or run_name in (".", ".."):
        raise ConfigError(f"paths.run_name: {run_name!r} may hold only letters, digits, '.', '_' and '-'")
    cfg.paths.run_name = run_name
    cfg._config_path = str(path)
    return cfg


def looks_local(path: str) -> bool:
    """True for a path that must exist on disk; False for a hub id (`name` or `org/name`)."""
    return (path.startswith(("/", ".", "~")) or path.count("/") > 1
            or path.endswith((".jsonl", ".json", ".gz", ".txt", ".csv", ".parquet")))


def check_paths(cfg: TrainConfig) -> None:
    """Missing local files are config errors, found before any model loads: the paths.* data keys
    the script reads (cfg.DATA_PATH_KEYS; a local path may be a glob) and the model keys."""
    paths = cfg.paths
    for key in cfg.DATA_PATH_KEYS:
        value = getattr(paths, key)
        if value and looks_local(value):
            expanded = os.path.expanduser(value)
            if not os.path.exists(expanded) and not glob.glob(expanded):
                raise ConfigError(f"paths.{key}: no such file or directory: {value}")
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(paths, key)
        if value and looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"paths.{key}: no such directory: {value}")
    model_config = cfg.model.config
    if not paths.model_name_or_path and not model_config:
        raise ConfigError(f"paths.model_name_or_path: set {cfg.MODEL_HINT}, or give model.config to build a model")
    if paths.model_name_or_path and model_config:
        raise ConfigError("model.config: set either paths.model_name_or_path or model.config, not both")
    if model_config is not None and "model_type" not in model_config:
        raise ConfigError("model.config.model_type: missing (e.g. llama, gla, mixtral, qwen3_moe)")
    check_writable_dir("paths.output_dir", str(cfg.run_dir))
    if paths.best_adapter_dir:
        check_writable_dir("paths.best_adapter_dir", paths.best_adapter_dir)


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


def public_config(cfg: TrainConfig) -> dict:
    """What run.json, checkpoints and trackers store: cfg.as_dict() with secrets redacted."""
    return redact(cfg.as_dict())
