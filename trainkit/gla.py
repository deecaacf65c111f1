"""Gated Linear Attention models (flash-linear-attention's ``GLAForCausalLM``) for LoRA training.

fla 0.6 runs everything through Triton: the GLA kernels, its RMSNorm / gated RMSNorm, the short
convolution, swiglu and the fused cross-entropy. Without a GPU each of them fails at launch
("0 active drivers"). This module makes a GLA model trainable anywhere and its adapters correct:

``import_fla()``
    imports ``fla.models`` (which registers model_type "gla" with the transformers Auto classes);
    a one-line RuntimeError names what to install when fla or triton is missing.
``prepare_gla_config(config, on_cuda=..., fused_swiglu=..., adapter_targets=..., modules_to_save=...)``
    edits the config BEFORE the model is built: ``attn_mode: fused_chunk`` (removed upstream) ->
    ``chunk``; fused SwiGLU only when asked for (GLA_USE_FUSED_SWIGLU) and never fused with
    ``down_proj`` when ``down_proj`` carries an adapter; ``fuse_linear_cross_entropy`` off when
    ``lm_head`` is adapted or saved; on CPU every fused kernel off. Returns readable notes.
``use_reference_backend(model)`` / ``guard_adapter_paths(model)``
    live with the other patches of fla's internals in ``trainkit.patches.fla`` (re-exported
    here): the PyTorch backend that runs GLA without a GPU, and the guard that keeps every
    adapter on the path the forward takes (fused kernels that read ``down_proj.weight`` or
    ``lm_head.weight`` directly are switched off around an adapter).

fuse_norm is kept as configured on every device: it changes parameter NAMES (the gated output
norm is ``attn.g_norm_swish_gate`` with it, ``attn.g_norm`` without), so turning it off would
leave a pretrained checkpoint's norm weights unloaded. The reference backend runs both variants.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainkit.adapters import PRESETS
from trainkit.patches.fla import (guard_adapter_paths, narrow_autotuning, patch_generation, use_autotune_table,
                                  use_reference_backend, uses_reference_backend)

__all__ = [
    "GLA_TARGET_MODULES", "FLA_INSTALL_HINT", "is_gla_config", "import_fla", "prepare_gla_config",
    "use_reference_backend", "guard_adapter_paths", "tiny_gla_config", "uses_reference_backend",
]

# Leaf names of GLA's linear layers in the form PEFT's target_modules (and
# trainkit.adapters.resolve_target_modules) match: a module matches when its full name equals the
# entry or ends with "." + entry. gk_proj is nn.Sequential(Linear(H, 16), Linear(16, K)).
# The list lives with the other family presets in trainkit.adapters.
GLA_TARGET_MODULES: list[str] = PRESETS["gla"]

FLA_INSTALL_HINT = ("pip install 'flash-linear-attention>=0.6' triton "
                    "(the CPU build of torch does not pull triton; fla 0.6 needs transformers>=5.6.2)")

_FUSED_FLAGS_CPU = ("fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy")
_ALL_TARGETS = {"*", "all", "all-linear", "all_linear"}


def is_gla_config(config) -> bool:
    """True for a GLA config (object with .model_type or a dict with "model_type")."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return model_type == "gla"


def import_fla():
    """Import ``fla.models`` (registers "gla" with AutoConfig / AutoModelForCausalLM); returns it.

    Raises a one-line RuntimeError naming what to install when fla or triton is missing. Without
    triton, ``import fla`` succeeds but exports nothing, so the check is on the model classes.
    """
    try:
        import fla  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"GLA models need flash-linear-attention ({e}): {FLA_INSTALL_HINT}") from None
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RuntimeError(f"GLA models need triton, which flash-linear-attention imports but does not "
                           f"install: {FLA_INSTALL_HINT}") from None
    try:
        import fla.models as fla_models
        fla_models.GLAForCausalLM  # noqa: B018 (an empty fla package has no model classes)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"flash-linear-attention is installed but fla.models does not load "
                           f"({type(e).__name__}: {e}): {FLA_INSTALL_HINT}") from None
    patch_generation()  # cached generate() on transformers >= 5.24 (trainkit.patches.fla)
    table = autotune_table_dir()
    if table is not None:  # tuned kernel configs for this GPU: no autotuning at the first step
        use_autotune_table(table)
    if autotune_configs() == "narrow":
        narrow_autotuning()  # a few configs to benchmark where the table has none, not minutes of them
    return fla_models


def autotune_configs() -> str:
    """TRAINKIT_FLA_AUTOTUNE_CONFIGS: "narrow" (default: fla's autotuners benchmark only their 4-warp, 2-3 stage
    configs, after the kernel's own pruning) or "all" (fla's full autotuning: minutes per new shape)."""
    value = os.environ.get("TRAINKIT_FLA_AUTOTUNE_CONFIGS", "narrow").strip().lower() or "narrow"
    if value not in ("narrow", "all"):
        raise ValueError(f"TRAINKIT_FLA_AUTOTUNE_CONFIGS={value!r}: expected narrow or all")
    return value


# fla kernel configs tuned on a GPU, one folder per GPU name as fla spells it (fla.ops.utils.cache.get_gpu_info)
AUTOTUNE_TABLES = Path(__file__).resolve().parent / "fla_autotune"


def autotune_table_dir() -> Path | None:
    """The tuned-config folder for this GPU: TRAINKIT_FLA_AUTOTUNE_TABLE (a folder, or "off"), else
    trainkit/fla_autotune/<GPU name> when it exists; None on CPU or without a table (fla autotunes)."""
    import torch

    setting = os.environ.get("TRAINKIT_FLA_AUTOTUNE_TABLE", "").strip()
    if setting.lower() in ("off", "0", "false", "none") or not torch.cuda.is_available():
        return None
    if setting:
        return Path(setting)
    from fla.ops.utils.cache import get_gpu_info
    folder = AUTOTUNE_TABLES / get_gpu_info()
    return folder if folder.is_dir() else None


# ---------------------------------------------------------------------------------------------
# config


def _expand_targets(targets) -> list[str]:
    if targets is None:
        return []
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        t = str(t)
        if t == "auto":
            out += GLA_TARGET_MODULES
        elif t in PRESETS:  # a preset name of trainkit.adapters ("gla", "attention", "llama", ...)
            out += PRESETS[t]
        else:
            out.append(t)
    return out


def _names(targets, name: str) -> bool:
    """Does a target list (names, suffixes, presets, "*"/all-linear, or a PEFT regex) cover `name`?"""
    for t in _expand_targets(targets):
        if t in _ALL_TARGETS and name != "lm_head":  # all-linear presets exclude the output head
            return True
        if t == name or t.endswith("." + name) or t.rsplit(".", 1)[-1] == name:
            return True
        if any(c in t for c in "*[]()|\\^$?+") and name in t:  # a regex spelling the name
            return True
    return False


def prepare_gla_config(config, *, on_cuda: bool, fused_swiglu: bool = False, adapter_targets=None,
                       modules_to_save=None, attn_mode: str | None = None,
                       fused_linear_cross_entropy: bool = False) -> list[str]:
    """Edit a GLA config in place before the model is built; returns notes of what changed.

    on_cuda: the model will run on a CUDA device (fla's Triton kernels); otherwise every fused
    kernel is turned off (the reference backend replaces the rest, see use_reference_backend).
    fused_swiglu: fla's fused SwiGLU MLP (GLA_USE_FUSED_SWIGLU, default off). When adapters
    target down_proj, the fused swiglu+linear is not used (it reads down_proj.weight and skips
    the adapter); the swiglu activation alone stays a fused Triton kernel on GPU.
    adapter_targets / modules_to_save: the LoRA target names (as in lora.target_modules, presets
    and "all_linear" included) and PEFT modules_to_save.
    attn_mode: overrides config.attn_mode when given.
    fused_linear_cross_entropy: on CUDA, switch fla's fused linear cross-entropy on (model.fused_linear_cross_entropy)
    unless lm_head is adapted or saved: the training loss is computed from the hidden states in chunks, without
    the (tokens x vocab) logits (the forward then returns no logits when it gets labels; evaluation and generation
    call it without labels and get them). False: the config's own flags stay.
    """
    notes: list[str] = []

    def setflag(key: str, value, why: str) -> None:
        old = getattr(config, key, None)
        if old != value:
            setattr(config, key, value)
            notes.append(f"GLA config: {key} {old} -> {value} ({why})")

    if attn_mode:
        if getattr(config, "attn_mode", None) != attn_mode:
            config.attn_mode = attn_mode
    mode = getattr(config, "attn_mode", "chunk")
    if mode == "fused_chunk":
        setflag("attn_mode", "chunk", "fused_chunk was removed from flash-linear-attention; chunk computes the same")
    elif mode not in ("chunk", "fused_recurrent"):
        raise ValueError(f"model.attn_mode: {mode!r} is not one of chunk, fused_recurrent (fused_chunk maps to chunk)")

    down_adapted = _names(adapter_targets, "down_proj")
    head_adapted = _names(adapter_targets, "lm_head") or _names(modules_to_save, "lm_head")

    if not on_cuda:
        if getattr(config, "attnres_block_size", None) is not None:
            raise RuntimeError("GLA with attnres_block_size needs fla's Triton attnres kernel (a CUDA GPU); "
                               "the CPU reference backend does not implement it")
        for key in _FUSED_FLAGS_CPU:
            setflag(key, False, "Triton kernel, no GPU: PyTorch path")
        if getattr(config, "fuse_norm", False):
            notes.append("GLA config: fuse_norm kept (it names the norm parameters); its Triton norms run "
                         "in PyTorch through the reference backend")
    else:
        if bool(fused_swiglu) and down_adapted:
            setflag("fuse_swiglu", False, "fused swiglu_linear reads down_proj.weight and would skip the down_proj "
                                          "adapter: fla's fused swiglu activation, then down_proj as a module")
        else:
            setflag("fuse_swiglu", bool(fused_swiglu), "GLA_USE_FUSED_SWIGLU / model.fused_swiglu")
        if head_adapted and getattr(config, "fuse_linear_cross_entropy", False):
            setflag("fuse_linear_cross_entropy", False, "it reads lm_head.weight and would skip the lm_head "
                                                        "adapter / modules_to_save copy")
        elif fused_linear_cross_entropy and not head_adapted:
            setflag("fuse_linear_cross_entropy", True, "model.fused_linear_cross_entropy: no tokens x vocab logits "
                                                       "in the training loss")
    if getattr(config, "fuse_linear_cross_entropy", False) and getattr(config, "fuse_cross_entropy", False):
        setflag("fuse_cross_entropy", False, "fla allows only one of the fused losses")
    return notes


def tiny_gla_config(**overrides) -> dict[str, Any]:
    """A tiny random-init GLA (2 layers, hidden 64, 4 heads, vocab 261 = trainkit's byte tokenizer)."""
    cfg: dict[str, Any] = {
        "model_type": "gla",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_heads": 4,
        "expand_k": 0.5,
        "expand_v": 1.0,
        "hidden_ratio": 4,
        "attn_mode": "chunk",
        "use_short_conv": False,
        "max_position_embeddings": 512,
        "vocab_size": 261,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "norm_eps": 1e-6,
    }
    cfg.update(overrides)
    return cfg


