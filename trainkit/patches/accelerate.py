"""Patches of accelerate internals. Checked on accelerate 1.15.

``accelerate.state_without_model`` (``hide_models_and_optimizers(accelerator)``)
    Under FSDP, ``Accelerator.save_state`` writes every prepared model with ``save_fsdp_model`` (the whole
    sharded model: a QLoRA run's 4-bit base in every checkpoint) and the optimizer with
    ``save_fsdp_optimizer`` before it calls any save hook, so a hook cannot drop them as it does for DDP
    (trainkit.loop.register_weight_hooks). For the length of a save_state / load_state call the accelerator's
    private lists of prepared models and optimizers are emptied; accelerate then saves and restores the RNG
    states, registered objects (the scheduler) and the data position only, and trainkit.loop's Checkpointer
    writes the adapter and a full optimizer state itself. If the lists are gone, this raises.
"""

from __future__ import annotations

import contextlib

from trainkit.patches import LOCK_HINT, Patch

__all__ = ["hide_models_and_optimizers"]

STATE_WITHOUT_MODEL = Patch(
    "accelerate.state_without_model", "accelerate",
    "Accelerator._models/_optimizers emptied during save_state/load_state under FSDP: RNG, scheduler and data "
    "position through accelerate, the adapter and optimizer state through trainkit's Checkpointer",
    checked="1.15")


@contextlib.contextmanager
def hide_models_and_optimizers(accelerator):
    lists = {name: getattr(accelerator, name, None) for name in ("_models", "_optimizers")}
    if not all(isinstance(value, list) for value in lists.values()):
        raise STATE_WITHOUT_MODEL.error("Accelerator has no _models / _optimizers lists",
                                        "FSDP checkpoints cannot leave the base model out with this version: use DDP, "
                                        "or " + LOCK_HINT)
    saved = {name: list(value) for name, value in lists.items()}
    for value in lists.values():
        value.clear()
    STATE_WITHOUT_MODEL.mark_applied()
    try:
        yield
    finally:
        for name, value in lists.items():
            value.extend(saved[name])
