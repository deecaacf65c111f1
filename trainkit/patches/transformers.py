"""Patches of transformers internals. Checked on transformers 5.17, 5.23 and 5.24.

``transformers.expert_quantize_on_load`` (``quantize_experts_on_load()``)
    transformers 5 stores MoE experts as fused 3-D tensors, which the bitsandbytes 4-bit
    quantizer leaves in bf16. Within the block, ``AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"]``
    (a private table) maps to a subclass of ``Bnb4BitHfQuantizer`` that also claims the expert
    tensors and turns each one into an ``NF4ExpertBank`` as it loads, so a 100B MoE never sits
    on the GPU in bf16. The banks carry ``_is_hf_initialized`` (a private flag) so transformers'
    init functions leave them alone. It relies on the loading pipeline of
    ``core_model_loading`` described below; when that is gone it warns and the caller quantizes
    after loading (correct, but the experts pass through the device in bf16 first).

``transformers.experts_4bit_forward`` (``use_4bit_experts_forward(module)``)
    an ``*Experts`` module whose banks are 4-bit gets a grouped 4-bit forward
    (``trainkit.quantization.nf4_experts_forward``) bound to the instance: transformers' expert
    kernels read the 3-D tensors directly. It takes the forward's arguments by position, so the
    forward signature ``(hidden_states, top_k_index, top_k_weights)`` is checked first. For an
    unknown bank layout the model's own eager loop (which indexes ``bank[expert]``) is chosen
    through ``config._experts_implementation`` (a private key); without either, PatchError.
    ``use_grouped_experts_forward(module)`` binds the same forward to an ``*Experts`` module with bf16
    experts when expert LoRA (trainkit.expert_lora) adapts them.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import torch
from torch import nn

from trainkit.patches import Patch

__all__ = ["quantize_experts_on_load", "use_4bit_experts_forward", "use_grouped_experts_forward", "EXPERTS_FORWARD_ARGS"]

QUANTIZE_ON_LOAD = Patch(
    "transformers.expert_quantize_on_load", "transformers",
    "bitsandbytes leaves fused 3-D MoE experts in bf16: AUTO_QUANTIZER_MAPPING['bitsandbytes_4bit'] swapped for a "
    "quantizer that makes them NF4 banks while they load (banks marked _is_hf_initialized)",
    checked="5.17, 5.23, 5.24")
EXPERTS_FORWARD = Patch(
    "transformers.experts_4bit_forward", "transformers",
    "*Experts modules with NF4 banks: forward bound to a grouped 4-bit GEMM (or config._experts_implementation "
    "= 'eager' for an unknown bank layout)", checked="5.17, 5.23, 5.24")

EXPERTS_FORWARD_ARGS = ("hidden_states", "top_k_index", "top_k_weights")
_KNOWN_BANKS = ({"gate_up_proj", "down_proj"}, {"up_proj", "down_proj"})


def _forward_args(cls: type) -> tuple[str, ...]:
    params = inspect.signature(cls.forward).parameters.values()
    return tuple(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _check_forward_args(cls: type, fix: str) -> None:
    """The grouped forward takes (hidden_states, top_k_index, top_k_weights) by position: PatchError otherwise."""
    if _forward_args(cls) != EXPERTS_FORWARD_ARGS:
        raise EXPERTS_FORWARD.error(f"{cls.__name__}.forward takes ({', '.join(_forward_args(cls))}), not "
                                    f"({', '.join(EXPERTS_FORWARD_ARGS)})",
                                    f"{fix}, or install the tested versions: ./scripts/setup_env.sh (requirements.lock)")


def use_4bit_experts_forward(module: nn.Module) -> None:
    """Make an `*Experts` module whose banks are NF4ExpertBanks run on them (see the module docstring)."""
    from trainkit.quantization import BANK_MARKER, NF4ExpertBank, nf4_experts_forward

    banks = {name for name, child in module.named_children() if isinstance(child, NF4ExpertBank)}
    if not banks or getattr(module, BANK_MARKER, False):
        return
    cls = type(module)
    known_layout = any(known <= banks for known in _KNOWN_BANKS) and hasattr(module, "num_experts")
    if known_layout:
        _check_forward_args(cls, "set quantization.quantize_moe_experts=false")
        module.forward = types.MethodType(nf4_experts_forward, module)
    else:
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_experts_implementation"):
            raise EXPERTS_FORWARD.error(f"{cls.__name__} holds 4-bit banks {sorted(banks)} in a layout trainkit does not "
                                        "know, and its config has no _experts_implementation to choose the eager loop",
                                        "set quantization.quantize_moe_experts=false for this model")
        try:
            config._experts_implementation = "eager"  # the eager loop indexes bank[expert]
        except (AttributeError, TypeError, ValueError) as e:
            raise EXPERTS_FORWARD.error(f"{cls.__name__}: config._experts_implementation cannot be set ({e})",
                                        "set quantization.quantize_moe_experts=false for this model") from None
    setattr(module, BANK_MARKER, True)
    EXPERTS_FORWARD.mark_applied()


def use_grouped_experts_forward(module: nn.Module) -> None:
    """Bind trainkit's grouped forward (the one NF4 banks use; trainkit.expert_lora adds expert adapters in it)
    to an `*Experts` module whose experts are frozen float Parameters; banks get it from use_4bit_experts_forward."""
    from trainkit.quantization import BANK_MARKER, nf4_experts_forward

    if getattr(module, BANK_MARKER, False) or getattr(module, "_trainkit_grouped_forward", False):
        return
    cls = type(module)
    names = {n for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    if not (any(known <= names for known in _KNOWN_BANKS) and hasattr(module, "num_experts")):
        raise EXPERTS_FORWARD.error(f"{cls.__name__} has experts {sorted(names)} in a layout trainkit does not know",
                                    "set lora.expert_targets: none for this model")
    _check_forward_args(cls, "set lora.expert_targets: none")
    module.forward = types.MethodType(nf4_experts_forward, module)
    module._trainkit_grouped_forward = True
    EXPERTS_FORWARD.mark_applied()


# ----------------------------------------------------------------------------------------
# quantize-on-load: experts become NF4 banks layer by layer inside from_pretrained
# ----------------------------------------------------------------------------------------
#
# transformers 5 (checked: 5.17 and 5.23) loads weights in
# ``core_model_loading.convert_and_load_state_dict_in_model``: for each target parameter it
# asks ``hf_quantizer.param_needs_quantization(model, name)``; when True it attaches
# ``hf_quantizer.get_quantize_ops()`` to the parameter's WeightConverter/WeightRenaming, and
# after the conversion ops have fused the per-expert checkpoint tensors
# (``experts.N.gate_proj.weight`` ... -> ``experts.gate_up_proj``, MergeModulelist +
# Concatenate) it calls ``op.convert({name: fused_tensor}, model=..., missing_keys=...)``.
# On-the-fly quantization also makes loading synchronous (no thread pool) and lazy
# (tensors are read from the mmapped safetensors only when their parameter converts), so
# at any moment one parameter's high-precision tensor exists. The bitsandbytes 4-bit
# quantizer only claims ``Linear4bit`` weights; the subclass below also claims the 3-D
# expert parameters, and its op turns each fused tensor into an NF4ExpertBank on the
# loading device and installs it in the module at once (returning nothing for that
# name to ``set_param_for_module``). ``caching_allocator_warmup`` also sizes its
# pre-allocation from ``param_needs_quantization``: claimed experts count at 4 bit.


def _expert_param(model: nn.Module, name: str):
    """The 3-D float Parameter `name` of an `*Experts` module of `model`, else None."""
    module_path, _, pn = name.rpartition(".")
    try:
        module = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        return None
    if not type(module).__name__.endswith("Experts"):
        return None
    p = module._parameters.get(pn)
    if p is None or p.dim() != 3 or not p.is_floating_point():
        return None
    return p


def _streaming_quantizer_class():
    """A Bnb4BitHfQuantizer subclass claiming expert params, or (None, reason) if the hooks are missing."""
    try:
        from transformers import core_model_loading
        from transformers.integrations.bitsandbytes import Bnb4bitQuantize
        from transformers.quantizers import auto
        from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    except ImportError as e:
        return None, f"transformers has no quantize-on-load pipeline ({e})"
    missing = [what for what, ok in (
        ("AUTO_QUANTIZER_MAPPING['bitsandbytes_4bit']",
         auto.AUTO_QUANTIZER_MAPPING.get("bitsandbytes_4bit") is Bnb4BitHfQuantizer),
        ("Bnb4BitHfQuantizer.get_quantize_ops", hasattr(Bnb4BitHfQuantizer, "get_quantize_ops")),
        ("Bnb4BitHfQuantizer.param_needs_quantization", hasattr(Bnb4BitHfQuantizer, "param_needs_quantization")),
        ("WeightTransform.quantization_operation",
         "quantization_operation" in getattr(getattr(core_model_loading, "WeightTransform", None), "__slots__", ())),
    ) if not ok]
    if missing:
        return None, "transformers lacks " + ", ".join(missing)
    global _STREAMING_CLASS
    if _STREAMING_CLASS is not None:
        return _STREAMING_CLASS, None

    class ExpertBankQuantize(Bnb4bitQuantize):
        """Bitsandbytes' quantize op, plus: a fused 3-D expert tensor becomes an NF4ExpertBank."""

        def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
            hq = self.hf_quantizer
            experts = {k: v for k, v in input_dict.items() if _expert_param(model, k) is not None}
            rest = {k: v for k, v in input_dict.items() if k not in experts}
            result = super().convert(rest, full_layer_name=full_layer_name, model=model,
                                     missing_keys=missing_keys, **kwargs) if rest else {}
            for name in list(experts):
                value = experts.pop(name)
                value = value[0] if isinstance(value, list) else value
                input_dict.pop(name, None)
                try:
                    hq.quantize_expert_param(model, name, value)
                except Exception as e:  # transformers logs and skips; load_model raises on these
                    hq.stream_errors[name] = f"{type(e).__name__}: {e}"
                    raise
                del value
                if missing_keys is not None:
                    missing_keys.discard(name)
            return result

    class ExpertBankBnb4BitHfQuantizer(Bnb4BitHfQuantizer):
        """bitsandbytes 4-bit quantizer that also quantizes fused MoE experts while they load."""

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.streamed_banks: list[str] = []
            self.stream_errors: dict[str, str] = {}
            self.peak_live_expert_bytes = 0      # largest high-precision expert tensor quantized at once

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            if not self.pre_quantized and _expert_param(model, param_name) is not None:
                return True
            return super().param_needs_quantization(model, param_name, **kwargs)

        def get_quantize_ops(self):
            return ExpertBankQuantize(self)

        @torch.no_grad()
        def quantize_expert_param(self, model, name: str, value: torch.Tensor) -> None:
            module_path, _, pn = name.rpartition(".")
            module = model.get_submodule(module_path)
            expected = module._parameters[pn].shape
            if tuple(value.shape) != tuple(expected):
                raise ValueError(f"{name}: checkpoint tensor {tuple(value.shape)} != model {tuple(expected)}")
            qc = self.quantization_config
            self.peak_live_expert_bytes = max(self.peak_live_expert_bytes, value.numel() * value.element_size())
            from trainkit.quantization import NF4ExpertBank, install_bank

            bank = NF4ExpertBank.from_weight(value, device=value.device, compute_dtype=qc.bnb_4bit_compute_dtype,
                                             quant_type=qc.bnb_4bit_quant_type,
                                             double_quant=bool(qc.bnb_4bit_use_double_quant))
            bank._is_hf_initialized = True          # transformers' init functions skip it
            for p in bank.parameters():
                p._is_hf_initialized = True
            install_bank(module, pn, bank)
            self.streamed_banks.append(name)
            if not any(p.dim() == 3 and p.is_floating_point() for p in module.parameters(recurse=False)):
                use_4bit_experts_forward(module)

        def _process_model_after_weight_loading(self, model, **kwargs):
            from trainkit.quantization import iter_expert_modules

            model = super()._process_model_after_weight_loading(model, **kwargs)
            for _, module in iter_expert_modules(model):
                use_4bit_experts_forward(module)
            return model

    _STREAMING_CLASS = ExpertBankBnb4BitHfQuantizer
    return _STREAMING_CLASS, None


_STREAMING_CLASS = None


@contextlib.contextmanager
def quantize_experts_on_load(enabled: bool = True):
    """Within the block, bitsandbytes 4-bit ``from_pretrained`` also quantizes MoE experts as they load.

    Yields True when the hook is active, False when this transformers lacks it (a warning
    says so; the caller then quantizes after loading with :func:`quantize_moe_experts`,
    which needs the whole model's experts in high precision on the device first).
    The quantizer used is ``model.hf_quantizer`` (``streamed_banks``, ``stream_errors``).
    """
    if not enabled:
        yield False
        return
    cls, reason = _streaming_quantizer_class()
    if cls is None:
        QUANTIZE_ON_LOAD.warn(reason, "MoE experts are quantized after loading instead: every expert is first "
                                      "loaded in bf16 onto the device (a 100B MoE needs ~200 GB there)")
        yield False
        return
    from transformers.quantizers import auto
    mapping = auto.AUTO_QUANTIZER_MAPPING
    previous = mapping["bitsandbytes_4bit"]
    mapping["bitsandbytes_4bit"] = cls
    QUANTIZE_ON_LOAD.mark_applied()
    try:
        yield True
    finally:
        mapping["bitsandbytes_4bit"] = previous


