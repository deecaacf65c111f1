"""Resume that checks the config: which keys may change between attempts of one run.

Every checkpoint stores the (redacted) config that produced it (trainer_state.json, `config`).
On resume the new config is compared with it key by key, nested mappings such as model.config
flattened to dotted names. A key listed as mutable by the script (learning rate, schedule length,
intervals, logging, memory knobs...) may change: the new value applies and a `config_changed`
event records old -> new. Any other key (model, adapter shape, data, seed, sequence length,
batch and accumulation, ...) must match, or the run stops before the model loads with one line
listing each changed key, unless `--allow-config-change` is given. Which keys may change is
stated beside the config models (`RESUME_MUTABLE` of trainkit.config.base.TrainConfig and of
each script's model); keys not listed count as immutable, so a key added later is safe by default.
A key that the checkpoint's config lacks (written by a version without it) and that holds its
default now is no change: that version behaved as the default does, so older checkpoints resume.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from trainkit.config import public_config
from trainkit.config.base import TrainConfig
from trainkit.fileio import json_safe

UNSET = "<unset>"  # a key one of the two configs lacks (a config of another version)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"section.key": value}; nested mappings become longer dotted names, lists stay whole."""
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def stored_config(cfg: TrainConfig) -> dict:
    """The config as a checkpoint stores it: secrets redacted, JSON values (what a reload gives)."""
    return json.loads(json.dumps(json_safe(public_config(cfg)), default=str))


def config_changes(saved: dict, current: dict) -> dict[str, list]:
    """{key: [old, new]} for every key whose value differs between a checkpoint's config and `current`
    (both as stored_config gives them)."""
    old, new = flatten(saved), flatten(current)
    return {key: [old.get(key, UNSET), new.get(key, UNSET)]
            for key in sorted(old.keys() | new.keys()) if old.get(key, UNSET) != new.get(key, UNSET)}


def is_mutable(key: str, mutable: Iterable[str]) -> bool:
    for pattern in mutable:
        if key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1])):
            return True
    return False


def describe_changes(changes: dict[str, list]) -> str:
    def short(value):
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        return text if len(text) <= 60 else text[:57] + "..."
    return ", ".join(f"{key} {short(old)} -> {short(new)}" for key, (old, new) in changes.items())


def added_at_default(cfg: TrainConfig, key: str, old: Any, new: Any) -> bool:
    """True when the checkpoint lacks `key` (section.key) and its value now is the field's default."""
    if old != UNSET:
        return False
    *path, name = key.split(".")
    section: Any = cfg
    for part in path:
        section = getattr(section, part, None)
    field = getattr(type(section), "model_fields", {}).get(name)
    return field is not None and not field.is_required() and json_safe(field.get_default(call_default_factory=True)) == new


def immutable_changes(saved: dict | None, cfg: TrainConfig, mutable: Iterable[str]) -> dict[str, list]:
    """The changed keys that may not change on resume ({} for a checkpoint without a stored config);
    a key added since the checkpoint, at its default, is not one."""
    if not saved:
        return {}
    return {k: v for k, v in config_changes(saved, stored_config(cfg)).items()
            if not is_mutable(k, mutable) and not added_at_default(cfg, k, *v)}
