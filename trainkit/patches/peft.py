"""Patches of PEFT internals. Checked on PEFT 0.19-0.21.

``peft.no_moe_target_remap`` (``no_moe_target_remap(model_type)``)
    PEFT >= 0.19 on transformers 5 rewrites ``*.gate_proj/up_proj/down_proj`` targets of
    qwen2_moe-style families (qwen3_moe, glm4_moe, ...) into the fused expert parameters
    ``gate_up_proj`` / ``down_proj`` (``transformers_weight_conversion._MODEL_TO_CONVERSION_PATTERN``,
    a private table). That v4 -> v5 compatibility remap assumes every such name is an expert;
    for the shared-expert and dense-layer Linears trainkit's presets target it silently drops
    the adapters (and moves them onto the frozen expert banks). The model type's entry is taken
    out of the table for the duration of ``get_peft_model`` / ``PeftModel.from_pretrained``. A
    PEFT that has the conversion module but not the table is an error: the remap may still
    happen somewhere else.

``peft.gradient_checkpointing_warning`` (``quiet_known_warnings()``)
    PEFT reads ``model.is_gradient_checkpointing``, which transformers 5.2x renamed and now
    warns about (a FutureWarning on every run that users can do nothing about). That one
    message is filtered; no other warning is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

from trainkit.patches import Patch

__all__ = ["no_moe_target_remap", "quiet_known_warnings"]

MOE_TARGET_REMAP = Patch(
    "peft.no_moe_target_remap", "peft",
    "PEFT's v4->v5 MoE remap (_MODEL_TO_CONVERSION_PATTERN) would move shared-expert / dense-MLP adapters onto "
    "the fused expert banks: held off for the model's type", checked="0.19, 0.21")
GRADIENT_CHECKPOINTING_WARNING = Patch(
    "peft.gradient_checkpointing_warning", "peft",
    "FutureWarning 'is_gradient_checkpointing is deprecated' (PEFT reads the old transformers name) filtered",
    checked="0.21 (transformers 5.2x)")


@contextlib.contextmanager
def no_moe_target_remap(model_type: str | None):
    """Within the block, PEFT does not remap `model_type`'s MLP targets onto fused expert tensors."""
    if importlib.util.find_spec("peft.utils.transformers_weight_conversion") is None:
        yield  # PEFT < 0.19: no remap exists
        return
    from peft.utils import transformers_weight_conversion as conversion

    table = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", None)
    if not isinstance(table, dict):
        raise MOE_TARGET_REMAP.error("peft.utils.transformers_weight_conversion has no _MODEL_TO_CONVERSION_PATTERN "
                                     "table: cannot stop its MoE target remap, which would misplace adapters")
    saved = table.pop(model_type, None) if model_type else None
    if saved is not None:
        MOE_TARGET_REMAP.mark_applied()
    try:
        yield
    finally:
        if saved is not None:
            table[model_type] = saved


def quiet_known_warnings() -> None:
    """Filter the one warning users cannot act on (see the module docstring)."""
    warnings.filterwarnings("ignore", message=r"`?is_gradient_checkpointing`? is deprecated", category=FutureWarning)
    GRADIENT_CHECKPOINTING_WARNING.mark_applied()
