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

from trainkit.patches import Patch

__all__ = ["keep_cpu_4bit_layout"]

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
