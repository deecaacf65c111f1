"""Every patch of another library's internals, in one place: one module per patched library.

A patch here relies on, or changes, something a library does not promise: a private table, a
module's forward, an attribute its kernels read. Each patch says why it exists and on which
versions it was checked, and before it acts it checks that what it relies on is still there.
When it is not, the patch raises :class:`PatchError` (one line: the package, its installed
version, what changed and what to do), or, where running on without it is safe, warns loudly
with :class:`PatchWarning`. Never a silent no-op.

Every patch that acted in this process is recorded; ``applied()`` lists them and run.json
keeps that list (``patches``) beside the library versions.

| module | patches |
| --- | --- |
| ``trainkit.patches.fla`` | transformers >= 5.24 hands fla's models their cache as ``cache=`` (they read ``past_key_values``); the CPU reference backend (fla's Triton forwards -> PyTorch); fused-kernel flags that would bypass an adapter |
| ``trainkit.patches.transformers`` | the bitsandbytes quantizer swapped in ``AUTO_QUANTIZER_MAPPING`` so MoE experts quantize while loading (``_is_hf_initialized`` on the banks); the 4-bit grouped forward of ``*Experts`` modules and the ``_experts_implementation`` fallback; the gradient-checkpointing rename warning |
| ``trainkit.patches.bitsandbytes`` | no AVX512-bf16 repacking of CPU ``Linear4bit`` weights (exact resume); ``Linear4bit`` weights FSDP2 can shard |
| ``trainkit.patches.torch`` | FSDP2 shards frozen uint8 parameters, uncast (torch before 2.13) |
| ``trainkit.patches.accelerate`` | ``save_state`` / ``load_state`` without the model and optimizer under FSDP (trainkit writes the adapter) |
| ``trainkit.patches.peft`` | PEFT's v4 -> v5 MoE target remap (``_MODEL_TO_CONVERSION_PATTERN``) held off; LoRA layers' forward through ``trainkit.fused_lora``; the ``is_gradient_checkpointing`` warning |
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass

__all__ = ["Patch", "PatchError", "PatchWarning", "applied", "installed_version"]

LOCK_HINT = "install the tested versions: ./scripts/setup_env.sh (requirements.lock)"


class PatchError(RuntimeError):
    """A library's internal that a patch needs is missing or changed (one-line message)."""


class PatchWarning(RuntimeWarning):
    """A patch could not act, and running on without it is safe (but something is lost)."""


def installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Patch:
    """One patch: its name (as recorded in run.json), the distribution it patches, why, checked versions."""

    name: str
    distribution: str
    why: str
    checked: str

    @property
    def version(self) -> str:
        return installed_version(self.distribution)

    def error(self, what_changed: str, todo: str = LOCK_HINT) -> PatchError:
        return PatchError(f"{self.distribution} {self.version}: {what_changed} (trainkit patch {self.name!r}, "
                          f"checked on {self.distribution} {self.checked}); {todo}")

    def warn(self, what_changed: str, consequence: str) -> None:
        warnings.warn(f"{self.distribution} {self.version}: {what_changed} (trainkit patch {self.name!r}, checked on "
                      f"{self.distribution} {self.checked}); {consequence}", PatchWarning, stacklevel=3)

    def mark_applied(self) -> None:
        _APPLIED.setdefault(self.name, {"name": self.name, "library": self.distribution,
                                        "version": self.version, "why": self.why})


_APPLIED: dict[str, dict] = {}


def applied() -> list[dict]:
    """The patches that acted in this process, in the order they first did."""
    return list(_APPLIED.values())

