"""Resume that checks the config: which keys may change between attempts of one run.

Every checkpoint stores the (redacted) config that produced it (trainer_state.json, `config`).
On resume the new config is compared with it key by key, nested mappings such as model.config
flattened to dotted names. A key listed as mutable by the script (learning rate, schedule length,
intervals, logging, memory knobs...) may change: the new value applies and a `config_changed`
event records old -> new. Any other key (model, adapter shape, data, seed, sequence length,
batch and accumulation, ...) must match, or the run stops before the model loads with one line
listing each changed key, unless `--allow-config-change` is given. Keys not listed anywhere
count as immutable, so a key added later is safe by default.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from trainkit.config import public_config
from trainkit.fileio import json_safe

UNSET = "<unset>"  # a key one of the two configs lacks (a schema of another version)

# Keys every script lets change on resume. A pattern ending in ".*" covers a whole section.
COMMON_MUTABLE = frozenset({
    "script", "run_dir",
    # where the run writes and reads from the cache (a checkpoint may be resumed into another run)
    "paths.output_dir", "paths.run_name", "paths.best_adapter_dir", "paths.cache_dir",
    # how the same model is loaded, not which model
    "model.local_files_only", "model.trust_remote_code", "model.attn_implementation",
    # schedule length and evaluation size
    "training.epochs", "training.max_steps", "training.max_eval_batches", "training.max_consecutive_nonfinite",
    # optimizer and schedule: applied over the state that accelerate.load_state restores
    "optimization.learning_rate", "optimization.lr_scheduler", "optimization.warmup_ratio",
    "optimization.warmup_steps", "optimization.min_lr_ratio", "optimization.decay_ratio",
    "optimization.adam_beta1", "optimization.adam_beta2", "optimization.adam_epsilon",
    "optimization.weight_decay", "optimization.max_grad_norm",
    # intervals, retention, trackers (metric_for_best and greater_is_better stay: the best so far
    # was ranked by them)
    "logging.log_interval", "logging.eval_interval", "logging.checkpoint_interval", "logging.keep_top_k",
    "logging.report_to", "logging.progress_bar",
    "memory.*",
})


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


def stored_config(cfg: dict) -> dict:
    """The config as a checkpoint stores it: secrets redacted, JSON values (what a reload gives)."""
    return json.loads(json.dumps(json_safe(public_config(cfg)), default=str))


def config_changes(saved: dict, cfg: dict) -> dict[str, list]:
    """{key: [old, new]} for every key whose value differs between a checkpoint's config and `cfg`."""
    old, new = flatten(saved), flatten(stored_config(cfg))
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


def immutable_changes(saved: dict | None, cfg: dict, mutable: Iterable[str]) -> dict[str, list]:
    """The changed keys that may not change on resume ({} for a checkpoint without a stored config)."""
    if not saved:
        return {}
    return {k: v for k, v in config_changes(saved, cfg).items() if not is_mutable(k, mutable)}
