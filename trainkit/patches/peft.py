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

``peft.fused_lora_forward`` (``use_fused_lora_forward(model)``)
    PEFT's LoRA ``Linear`` / bitsandbytes ``Linear4bit`` layers get a forward that adds the update
    through ``trainkit.fused_lora`` (bf16 compute over the fp32 adapter weights, one autograd node)
    instead of PEFT's fp32 cast of every adapted layer's input. It reads the layer's ``lora_A``,
    ``lora_B``, ``lora_dropout``, ``scaling``, ``active_adapters``, ``merged``, ``disable_adapters``,
    ``lora_variant``; a PEFT whose layers lack one is an error (``lora.fused_forward: false`` turns
    the patch off). The layer's class becomes a subclass of PEFT's with only ``forward`` replaced, so
    ``isinstance``, ``state_dict`` keys, saving and merging are PEFT's; DoRA and other variants,
    merged or disabled adapters, several active adapters and ``adapter_names`` batches take PEFT's
    own forward, and so do adapters whose weights DeepSpeed ZeRO-3 partitions (it gathers a weight
    in a hook on its module's forward, which the fused forward does not call).

``peft.expert_lora_forward`` (``make_param_wrapper``, ``use_expert_lora_forward(wrappers)``)
    LoRA on fused MoE experts (trainkit.expert_lora): PEFT's ``ParamWrapper`` (what ``target_parameters``
    builds) is constructed by hand around the experts module, also over an NF4ExpertBank (the constructor
    reads only the target's ``.shape/.dtype/.device``; PEFT's own scan finds no Parameter there), and its
    class swapped for a subclass whose forward puts the adapter in scope and calls the wrapped module; the
    experts' grouped forward adds the update and marks it used, else PatchError (a forward that bypassed it).

``peft.gradient_checkpointing_warning`` (``quiet_known_warnings()``)
    PEFT reads ``model.is_gradient_checkpointing``, which transformers 5.2x renamed and now
    warns about (a FutureWarning on every run that users can do nothing about). That one
    message is filtered; no other warning is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

from trainkit.fused_lora import lora_update
from trainkit.patches import LOCK_HINT, Patch

__all__ = ["make_param_wrapper", "no_moe_target_remap", "quiet_known_warnings", "use_expert_lora_forward",
           "use_fused_lora_forward"]

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


# ---------------------------------------------------------------------------------------------
# the fused LoRA forward (trainkit.fused_lora)

FUSED_LORA_FORWARD = Patch(
    "peft.fused_lora_forward", "peft",
    "LoRA Linear layers add their update through one autograd function (trainkit.fused_lora): bf16 compute over "
    "fp32 adapter weights, no fp32 copies of the activations", checked="0.21")
# what the fused forward reads from a PEFT LoRA layer
_LORA_LAYER_ATTRIBUTES = ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters", "merged",
                          "disable_adapters", "lora_variant")
_FUSED_CLASSES: dict[type, type] = {}


def _fusable_adapter(layer) -> str | None:
    """The name of the one plain (or rsLoRA) adapter the fused forward can compute for `layer`, or None:
    adapters disabled or merged, several active adapters, DoRA and other variants, a LoRA bias, or weights
    DeepSpeed ZeRO-3 partitions (it gathers a weight in a hook on ITS module's forward, which reading
    lora_A.weight here would skip; PEFT's forward calls lora_A and lora_B as modules)."""
    active = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    return None if hasattr(layer.lora_A[name].weight, "ds_id") else name


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's LoRA forward through trainkit.fused_lora where _fusable_adapter allows it; PEFT's own forward
    otherwise, and for extra forward arguments such as adapter_names."""
    name = None if args or kwargs else _fusable_adapter(self)
    if name is None:
        return super(type(self), self).forward(x, *args, **kwargs)
    result = self.base_layer(x)
    cache = self.__dict__.setdefault("_trainkit_compute_copies", {}).setdefault(name, {})
    return lora_update(result, self.lora_dropout[name](x), self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], cache)


def _fused_class(cls: type) -> type:
    """A subclass of PEFT's layer class whose forward is _fused_forward (isinstance checks, state_dict keys,
    saving and merging are PEFT's own)."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _fused_forward, "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__,
                                                          "trainkit_fused_lora": True})
    return _FUSED_CLASSES[cls]


def use_fused_lora_forward(model) -> int:
    """Switch every PEFT LoRA layer over an nn.Linear or a bitsandbytes Linear4bit base to the fused forward,
    except layers whose adapters are all variants (DoRA: its magnitude vector needs the full weight norm, so
    it keeps PEFT's forward); returns how many layers were switched. Raises PatchError when PEFT's layers no
    longer have the attributes the fused forward reads (a PEFT newer than the checked one)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    classes = [LoraLinear]
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        classes.append(LoraLinear4bit)
    except ImportError:  # PEFT without bitsandbytes support installed
        pass
    switched = 0
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "trainkit_fused_lora", False) or cls not in classes:
            continue
        missing = [a for a in _LORA_LAYER_ATTRIBUTES if not hasattr(module, a)]
        if missing:
            raise FUSED_LORA_FORWARD.error(f"LoRA layer {cls.__qualname__} has no {', '.join(missing)}",
                                           "set lora.fused_forward: false, or " + LOCK_HINT)
        if module.lora_A and all(name in module.lora_variant for name in module.lora_A):
            continue
        module.__class__ = _fused_class(cls)
        switched += 1
    if switched:
        FUSED_LORA_FORWARD.mark_applied()
    return switched


# ---------------------------------------------------------------------------------------------
# expert LoRA (trainkit.expert_lora): PEFT ParamWrapper adapters over fused experts, trainkit's forward

EXPERT_LORA_FORWARD = Patch(
    "peft.expert_lora_forward", "peft",
    "ParamWrapper adapters on fused MoE experts (built by hand, also over NF4 banks) add their update inside "
    "trainkit's grouped experts forward (trainkit.expert_lora) instead of PEFT's per-forward W + BA fold",
    checked="0.21")
_EXPERT_CLASSES: dict[type, type] = {}


def make_param_wrapper(base_layer, adapter_name: str, parameter_name: str, config, r: int, lora_alpha: float):
    """PEFT's ParamWrapper around `base_layer`'s `parameter_name` (a 3-D Parameter or an NF4ExpertBank, which
    mimics .shape/.dtype/.device: all the constructor reads), with dropout 0 (ParamWrapper refuses dropout)."""
    import copy

    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        raise EXPERT_LORA_FORWARD.error("peft.tuners.lora.layer has no ParamWrapper (target_parameters)",
                                        "set lora.expert_targets: none, or " + LOCK_HINT) from None
    config = copy.copy(config)
    config.lora_dropout = 0.0
    return ParamWrapper(base_layer, adapter_name, parameter_name=parameter_name, config=config, r=r,
                        lora_alpha=lora_alpha)


def _expert_forward(self, x, *args, **kwargs):
    """Put this wrapper's adapter in scope and run the wrapped module (inner wrappers, then the experts module
    through __call__, so its hooks fire); the experts' grouped forward adds the update."""
    from trainkit.expert_lora import expert_adapter_scope
    from trainkit.quantization import NF4ExpertBank

    if self.disable_adapters or not self.active_adapters:
        return self.base_layer(x, *args, **kwargs)
    name = _fusable_adapter(self)
    experts = self.get_base_layer()
    if name is None:
        if isinstance(self.get_param(), NF4ExpertBank):
            raise EXPERT_LORA_FORWARD.error(f"expert adapter on {self.parameter_name}: merged or several active "
                                            "adapters are not supported over NF4 banks",
                                            "use one adapter; merge with python -m trainkit.export")
        return super(type(self), self).forward(x, *args, **kwargs)
    with expert_adapter_scope(experts, self.parameter_name, self.lora_A[name].weight, self.lora_B[name].weight,
                              self.scaling[name]) as used:
        result = self.base_layer(x, *args, **kwargs)
    if not used[0]:
        raise EXPERT_LORA_FORWARD.error(f"{type(experts).__name__}.forward did not apply the expert adapter on "
                                        f"{self.parameter_name} (its grouped forward was bypassed)", LOCK_HINT)
    return result


def _expert_merge(self, *args, **kwargs):
    """PEFT's merge, except over an NF4 bank (no float weight to add the update to): a clear error."""
    from trainkit.quantization import NF4ExpertBank
    if isinstance(self.get_param(), NF4ExpertBank):
        raise ValueError(f"expert adapter on {self.parameter_name}: merging into a 4-bit expert bank in place is not "
                         "supported; write a merged model with python -m trainkit.export")
    return super(type(self), self).merge(*args, **kwargs)


def use_expert_lora_forward(wrappers) -> int:
    """Switch PEFT ParamWrapper modules to _expert_forward (a subclass with only forward and merge replaced)."""
    for w in wrappers:
        cls = type(w)
        if not getattr(cls, "trainkit_expert_lora", False):
            if cls not in _EXPERT_CLASSES:
                _EXPERT_CLASSES[cls] = type(cls.__name__, (cls,), {
                    "forward": _expert_forward, "merge": _expert_merge, "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__, "trainkit_expert_lora": True})
            w.__class__ = _EXPERT_CLASSES[cls]
    if wrappers:
        EXPERT_LORA_FORWARD.mark_applied()
    return len(wrappers)
