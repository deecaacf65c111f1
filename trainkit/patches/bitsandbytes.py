"""Patches of bitsandbytes internals. Checked on bitsandbytes 0.48-0.50.

``bitsandbytes.cpu_4bit_layout`` (``keep_cpu_4bit_layout(model)``)
    On a CPU with AVX512-bf16, ``Linear4bit.forward`` repacks its weight for a faster kernel on
    the first no-grad eval-mode call (``support_avx512bf16_for_cpu``, an instance attribute set
    in ``__init__``) and keeps it repacked. Training after an evaluation would then run other
    numerics than before it, and a resumed run would not match an uninterrupted one bitwise.
    The flag is turned off on every ``Linear4bit`` so there is one path. If a later bitsandbytes
    repacks without the flag, this warns: training stays correct, exact resume may not.
"""

from __future__ import annotations

from torch import nn

from trainkit.patches import LOCK_HINT, Patch

__all__ = ["keep_cpu_4bit_layout", "shardable_4bit_weights"]

CPU_4BIT_LAYOUT = Patch(
    "bitsandbytes.cpu_4bit_layout", "bitsandbytes",
    "Linear4bit.support_avx512bf16_for_cpu = False: no repacking of CPU 4-bit weights after an evaluation "
    "(one numeric path, exact resume)", checked="0.48, 0.50")


def keep_cpu_4bit_layout(model: nn.Module) -> int:
    """Turn off the CPU repacking of every bitsandbytes Linear4bit in `model`; returns how many."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.nn import modules as bnb_modules
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    flagged = [m for m in layers if hasattr(m, "support_avx512bf16_for_cpu")]
    for module in flagged:
        module.support_avx512bf16_for_cpu = False
    if flagged:
        CPU_4BIT_LAYOUT.mark_applied()
    elif layers and hasattr(bnb_modules, "_convert_weight_packed_for_cpu"):
        CPU_4BIT_LAYOUT.warn("Linear4bit has no support_avx512bf16_for_cpu flag but still repacks CPU weights",
                             "on a CPU with AVX512-bf16 an evaluation may change the weights' layout, and a resumed "
                             "run may then differ from an uninterrupted one in the last bits")
    return len(flagged)


SHARDABLE_4BIT_WEIGHTS = Patch(
    "bitsandbytes.shardable_4bit_weights", "bitsandbytes",
    "Linear4bit weights as plain frozen uint8 Parameters under FSDP2, so fully_shard shards them; Linear4bit.forward "
    "re-wraps the gathered weight with the layer's quant_state (fix_4bit_weight_quant_state_from_module)",
    checked="0.50")


def shardable_4bit_weights(model: nn.Module) -> int:
    """Make every bitsandbytes Linear4bit weight of `model` a plain frozen Parameter over the same packed
    bytes; returns how many. For FSDP2 (accelerate's fsdp_version 2), before `accelerator.prepare`.

    Why: a ``Params4bit`` keeps its quantization statistics (``quant_state``) on the tensor object. FSDP2
    turns every parameter into a DTensor shard and, at each forward, into a new plain Parameter, so the
    subclass and its statistics are lost; accelerate therefore leaves uint8 ``Params4bit`` out of sharding
    (every GPU would hold the whole 4-bit base), and bf16 quant storage is corrupted by FSDP2 (bitsandbytes
    issue 1945: NaN bit patterns canonicalised). As plain uint8 Parameters the bytes are sharded and
    all-gathered byte for byte, and ``Linear4bit.forward`` re-wraps the gathered weight with the statistics
    the layer keeps (``module.quant_state``, replicated: about 3 % of the 4-bit bytes with double quant).
    Relies on ``fix_4bit_weight_quant_state_from_module`` being called by ``Linear4bit.forward``: PatchError
    when it is not (the weights would be used without their statistics).
    """
    import inspect

    import bitsandbytes as bnb
    from bitsandbytes.nn import modules as bnb_modules

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return 0
    recover = getattr(bnb_modules, "fix_4bit_weight_quant_state_from_module", None)
    if recover is None or "fix_4bit_weight_quant_state_from_module" not in inspect.getsource(bnb.nn.Linear4bit.forward):
        raise SHARDABLE_4BIT_WEIGHTS.error(
            "Linear4bit.forward no longer restores a weight's quant_state from its module",
            "4-bit weights cannot be sharded by FSDP with this version: use DDP (--accelerate-config ddp), or " + LOCK_HINT)
    for module in layers:
        if getattr(module, "quant_state", None) is None or not getattr(module.weight, "bnb_quantized", True):
            raise SHARDABLE_4BIT_WEIGHTS.error("a Linear4bit layer has no module-level quant_state after quantization",
                                               LOCK_HINT)
        module.weight = nn.Parameter(module.weight.data, requires_grad=False)
    SHARDABLE_4BIT_WEIGHTS.mark_applied()
    return len(layers)
