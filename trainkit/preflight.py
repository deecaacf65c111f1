"""Checks of the model a config names, made before any data or weights load.

``check_model_config(cfg, lengths=..., target_modules=...)`` reads the base model's (the teacher's
for distill.py) HF config without its weights and raises a one-line ConfigError when:

- a hub id cannot be resolved: with offline mode off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset,
  model.local_files_only false) and no config.json in the local cache, ONE request with a short
  timeout and no retries asks the hub for the id's config.json (huggingface_hub would otherwise
  retry for a minute); offline, the local cache alone is read, as the load itself does;
- ``lora.target_modules`` names modules the model does not have: resolved (trainkit.adapters) against
  the model built from its config on the meta device (accelerate.init_empty_weights: no weights);
- a sequence length exceeds the model's ``max_position_embeddings``. Families without positions
  (GLA and other linear-attention / state-space models) are not limited: they extrapolate by design.

The launcher does not call it (it would contact the hub and build the model once more per launch);
the scripts call it right after the config checks, before the run directory is touched.
"""

from __future__ import annotations

import os
from typing import Any

from trainkit.config import ConfigError
from trainkit.config.base import TrainConfig

HUB_CHECK_TIMEOUT = 10.0  # seconds for the one request that checks a hub id
# model_type of families whose token mixing has no position embeddings: no length limit to check
NO_POSITION_FAMILIES = {"gla", "mamba", "mamba2", "falcon_mamba", "rwkv", "linear_llama"}
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_OFFLINE_HINT = "give a local directory, or set HF_HUB_OFFLINE=1 to use the local cache"


def offline_mode() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE


def check_hub_model(repo_id: str, cache_dir: str | None = None) -> None:
    """One request, no retries: is `repo_id`'s config.json on the hub (HF_ENDPOINT)? ConfigError if not."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"paths.model_name_or_path: {repo_id!r}"
    try:
        url = hf_hub_url(repo_id, "config.json")
    except ValueError as e:  # HFValidationError: not a possible repo id
        raise ConfigError(f"{where} is neither a local directory nor a valid hub id ({e})") from None
    try:
        get_hf_file_metadata(url, timeout=HUB_CHECK_TIMEOUT, retry_on_errors=False)
    except GatedRepoError:
        raise ConfigError(f"{where} is a gated model: accept its terms on the hub and set HF_TOKEN, or {_OFFLINE_HINT}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}: no such model on {constants.ENDPOINT} (or a private one: set HF_TOKEN); "
                          f"{_OFFLINE_HINT}") from None
    except (EntryNotFoundError, RevisionNotFoundError):
        raise ConfigError(f"{where}: the hub model has no config.json (not a transformers model?)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise ConfigError(f"{where}: the hub at {constants.ENDPOINT} answered HTTP {status} (one attempt, "
                          f"no retries); {_OFFLINE_HINT}") from None
    except Exception as e:  # connection refused, DNS, timeout, proxy
        raise ConfigError(f"{where}: cannot reach the hub at {constants.ENDPOINT} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no answer'}; one attempt, no retries); "
                          f"{_OFFLINE_HINT}") from None


def _from_pretrained(source: str, **kwargs):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except ValueError as e:  # "gla" is unknown to transformers until fla registers it
        if "gla" not in str(e).lower():
            raise
        from trainkit.gla import import_fla
        import_fla()
        return AutoConfig.from_pretrained(source, **kwargs)


def load_model_config(cfg: TrainConfig):
    """The HF config of paths.model_name_or_path (local directory or hub id) or of model.config; no weights."""
    from transformers import AutoConfig

    paths, model_cfg = cfg.paths, cfg.model
    source = paths.model_name_or_path
    if not source:
        kwargs = dict(model_cfg.config)
        model_type = kwargs.pop("model_type")
        if model_type == "gla":
            from trainkit.gla import import_fla
            import_fla()  # registers model_type "gla"
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model.config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}") from None
    common: dict[str, Any] = dict(trust_remote_code=model_cfg.trust_remote_code, cache_dir=paths.cache_dir)
    if os.path.isdir(os.path.expanduser(source)):
        where = f"paths.model_name_or_path: {source}"
        kwargs = common
    else:
        offline = offline_mode() or model_cfg.local_files_only
        if not offline:
            from huggingface_hub import try_to_load_from_cache
            try:
                cached = try_to_load_from_cache(source, "config.json", cache_dir=paths.cache_dir)
            except ValueError:  # not a valid repo id: check_hub_model says so
                cached = None
            if not isinstance(cached, str):  # a cached config is used when the hub is unreachable: no check
                check_hub_model(source, paths.cache_dir)
        where = f"paths.model_name_or_path: {source!r}" + (" (offline mode: local cache only)" if offline else "")
        kwargs = {**common, "local_files_only": offline}
    try:
        return _from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: cannot read its config ({first})") from None


def position_limit(config) -> tuple[int | None, str | None, str | None]:
    """(the model's position limit, the config key holding it, its family); limit None for families
    without positions or configs that name none."""
    text = getattr(config, "get_text_config", lambda: config)()
    family = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    if family in NO_POSITION_FAMILIES:
        return None, None, family
    limit, limit_key = next(((v, k) for k in _POSITION_KEYS if isinstance(v := getattr(text, k, None), int) and v > 0),
                            (None, None))
    return limit, limit_key, family


def check_positions(config, lengths: dict[str, int]) -> None:
    """Each length (named by the config key(s) that set it) fits the model's position embeddings."""
    limit, limit_key, family = position_limit(config)
    if limit is None:
        return
    for key, length in lengths.items():
        if length > limit:
            raise ConfigError(f"{key}: {length} tokens exceed the {family} model's {limit_key} ({limit}); lower it, "
                              f"or use a model with more positions (model.config: raise {limit_key})")


def build_empty_model(config, trust_remote_code: bool = False):
    """The model of `config` with its parameters on the meta device (module names and shapes, no memory)."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if getattr(config, "model_type", None) == "gla":
        from trainkit.gla import prepare_gla_config
        prepare_gla_config(config, on_cuda=False)  # module names do not depend on the kernels
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_model_config(cfg: TrainConfig, lengths: dict[str, int] | None = None, target_modules=None):
    """The early model checks of the module docstring; ConfigError (one line) on the first problem.
    Returns the model's HF config."""
    config = load_model_config(cfg)
    if lengths:
        check_positions(config, lengths)
    if target_modules is not None:
        from trainkit.adapters import resolve_target_modules
        resolve_target_modules(build_empty_model(config, cfg.model.trust_remote_code), target_modules)
    return config
