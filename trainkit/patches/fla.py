"""Patches of flash-linear-attention (fla) internals. Checked on fla 0.6.0 with transformers 5.17-5.24.

Three patches, each checked before it acts (see ``trainkit.patches``):

``generation_cache_kwarg`` (``patch_generation()``, applied by ``trainkit.gla.import_fla``)
    transformers 5.24 renamed the cache argument of ``prepare_inputs_for_generation`` and of the
    model inputs it returns from ``past_key_values`` to ``cache``. fla 0.6's mixin still passes
    ``past_key_values=`` up (transformers renames it) and its models' ``forward`` only reads
    ``past_key_values``: the ``cache=`` it now receives lands in ``**kwargs`` unread, every
    decoding step starts from an empty recurrent state, and cached ``generate()`` emits other
    tokens than uncached generation from the second token on (CPU and GPU alike). The patch
    hands the cache back to fla's models under the name they read. Applied only when
    transformers passes ``cache`` and fla's ``forward`` does not take it.

``reference_backend`` (``use_reference_backend(model)``)
    fla 0.6 runs everything through Triton; without a GPU each kernel fails at launch. The
    forwards of its GLA layer, RMSNorm / FusedRMSNormGated, ShortConvolution and GatedMLP are
    rebound, per module instance, to the PyTorch versions below (fla itself is not edited, the
    parameters are untouched, so state dicts load both ways), and its fused losses are switched
    to ``nn.CrossEntropyLoss``. The replacements read fla's module attributes and
    ``fla.layers.utils``; the forward signatures and attributes they rely on are checked first.
    They matched the Triton path within 3e-7 on the logits (DESIGN.md).

``adapter_paths`` (``guard_adapter_paths(model)``, after PEFT)
    fla's ``GatedMLP(fuse_swiglu=True)`` calls ``swiglu_linear(gate, up, down_proj.weight, ...)``,
    reading the base weight around a LoRA on ``down_proj`` (it silently gets no gradient), and
    ``fuse_linear_cross_entropy`` reads ``lm_head.weight`` likewise. Such MLPs are switched
    (their ``fuse_swiglu`` flag) to fla's own unfused path ``down_proj(swiglu(gate, up))``, and the
    fused loss is turned off when ``lm_head`` is adapted.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from trainkit.linear_attention import reference_gla
from trainkit.patches import LOCK_HINT, Patch

__all__ = ["patch_generation", "use_reference_backend", "uses_reference_backend", "guard_adapter_paths",
           "use_autotune_table", "autotune_table_entries", "narrow_autotuning"]

GENERATION = Patch(
    "fla.generation_cache_kwarg", "flash-linear-attention",
    "transformers >= 5.24 passes the generation cache as `cache=`; fla's models read `past_key_values`, so cached "
    "generate() restarted from an empty state at every token", checked="0.6.0 (transformers 5.17, 5.23, 5.24)")
REFERENCE_BACKEND = Patch(
    "fla.reference_backend", "flash-linear-attention",
    "fla's Triton forwards (GLA op, norms, short conv, swiglu, fused losses) rebound to PyTorch on a CPU",
    checked="0.6.0")
ADAPTER_PATHS = Patch(
    "fla.adapter_paths", "flash-linear-attention",
    "fused swiglu_linear / fused linear cross-entropy read down_proj.weight / lm_head.weight around an adapter: "
    "switched to fla's unfused paths", checked="0.6.0")

_MARK = "_trainkit_reference"


# ---------------------------------------------------------------------------------------------
# generation: the cache under the name fla's models read


def _parameters(fn) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def patch_generation() -> bool:
    """Make fla's models receive the generation cache as ``past_key_values`` on transformers that
    pass ``cache``. Idempotent. Returns True when the patch is (now) in place, False when this
    transformers / fla pair does not need it."""
    from transformers.generation.utils import GenerationMixin

    if "cache" not in _parameters(GenerationMixin.prepare_inputs_for_generation):
        return False  # transformers < 5.24: the model inputs carry `past_key_values`, as fla reads
    try:
        from fla.models.generation_utils import FLAGenerationMixin
        from fla.models.modeling_utils import FLAForCausalLM
    except ImportError as e:
        raise GENERATION.error(f"fla.models.generation_utils.FLAGenerationMixin / FLAForCausalLM not found ({e})") from None
    if "cache" in _parameters(FLAForCausalLM.forward):
        return False  # an fla that takes `cache` itself
    if "past_key_values" not in _parameters(FLAForCausalLM.forward):
        raise GENERATION.error("FLAForCausalLM.forward takes neither `past_key_values` nor `cache`")
    original = FLAGenerationMixin.__dict__.get("prepare_inputs_for_generation")
    if original is None:
        raise GENERATION.error("FLAGenerationMixin.prepare_inputs_for_generation is gone")
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        with warnings.catch_warnings():
            # the rename this patch undoes: fla passes past_key_values=, transformers warns and calls it cache
            warnings.filterwarnings("ignore", message=r".*`past_key_values`.*(deprecated|ignoring)", category=FutureWarning)
            inputs = original(self, *args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    setattr(prepare_inputs_for_generation, _MARK, True)
    FLAGenerationMixin.prepare_inputs_for_generation = prepare_inputs_for_generation
    GENERATION.mark_applied()
    return True


# ---------------------------------------------------------------------------------------------
# PyTorch replacements for fla's Triton pieces (bound to module instances)


def _powglu(x: torch.Tensor, y: torch.Tensor, power: float) -> torch.Tensor:
    s = torch.sigmoid(x)
    xp = torch.where(x > 0, x, torch.ones_like(x))
    g = torch.where(x > 0, torch.exp(power / (xp.sqrt() + 1.0) * xp.log()) * s, x * s)
    return g * y


def _act_map() -> dict:
    """fla's ACT2FN functions -> PyTorch equivalents (by identity)."""
    from fla.modules.activations import ACT2FN
    torch_fns = {
        "relu": F.relu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "silu": F.silu, "swish": F.silu,
        "sqrelu": lambda x: F.relu(x).square(), "gelu": lambda x: F.gelu(x, approximate="tanh"),
    }
    return {fn: torch_fns[name] for name, fn in ACT2FN.items() if name in torch_fns}


def _rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    """fla.modules.RMSNorm (x [+ residual], normalize in fp32, output in x's dtype)."""
    dtype = x.dtype
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    rstd = torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
    y = h * rstd
    if self.weight is not None:
        y = y * self.weight.float()
    if self.bias is not None:
        y = y + self.bias.float()
    y = y.to(dtype)
    if not prenorm:
        return y
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else dtype)
    return y, h.to(res_dtype)


def _rms_norm_gated_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    """fla.modules.FusedRMSNormGated: rmsnorm(x) * w * act(g), act swish/silu: g * sigmoid(g)."""
    out = _rms_norm_forward(self, x, residual, prenorm, residual_in_fp32)
    y, res = out if prenorm else (out, None)
    gf = g.float()
    gate = F.silu(gf) if self.activation in ("swish", "silu") else torch.sigmoid(gf)
    y = (y.float() * gate).to(x.dtype)
    return (y, res) if prenorm else y


def _short_conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                        cu_seqlens=None, chunk_indices=None, **kwargs):
    """fla.modules.ShortConvolution: causal depthwise conv (+bias, silu, +residual) with an [N, D, W] cache
    holding each sequence's last W inputs (the newest last), as fla's kernels keep it."""
    batch, length, dim = x.shape
    width = self.kernel_size[0]
    if mask is not None:
        if cu_seqlens is not None:
            raise ValueError("`mask` and `cu_seqlens` cannot be provided at the same time")
        x = x * mask.unsqueeze(-1).to(x.dtype)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        segments = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    else:
        segments = [(b, 0, length) for b in range(batch)]
    weight = self.weight.float()
    bias = self.bias.float() if self.bias is not None else None
    y = x.new_zeros(batch, length, dim, dtype=torch.float32)
    finals = []
    for index, (b, start, end) in enumerate(segments):
        xs = x[b, start:end].float().transpose(0, 1)  # (D, L)
        past = cache[index].float() if cache is not None else xs.new_zeros(dim, width)
        full = torch.cat([past[:, 1:], xs], dim=-1)  # W-1 previous inputs, then this segment
        if end > start:
            ys = F.conv1d(full[None], weight, bias, groups=dim)[0]  # (D, L)
            if self.activation in ("silu", "swish"):
                ys = F.silu(ys)
            y[b, start:end] = ys.transpose(0, 1)
        finals.append(torch.cat([past, xs], dim=-1)[:, -width:])
    if residual is not None:
        y = y + residual.float()
    final = torch.stack(finals).to(cache.dtype if cache is not None else x.dtype) if output_final_state else None
    return y.to(x.dtype), final


def _mlp_forward(self, x, **kwargs):
    """fla.modules.GatedMLP unfused: down_proj(act(gate) * up), the activation in fp32."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    if self.hidden_act == "powlu":
        hidden = _powglu(gate.float(), up.float(), self.powglu_power)
    else:
        hidden = F.silu(gate.float()) * up.float()
    return self.down_proj(hidden.to(gate.dtype))


@functools.cache
def _layer_utils():
    """fla.layers.utils' padding and cache helpers (plain PyTorch), which the GLA replacement calls."""
    try:
        from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache
    except ImportError as e:
        raise REFERENCE_BACKEND.error(f"fla.layers.utils changed ({e})", "run on a CUDA GPU, or " + LOCK_HINT) from None
    return get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache


def _gla_attention_forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                           output_attentions=False, **kwargs):
    """fla.layers.GatedLinearAttention.forward (fla 0.6) with the GLA op as trainkit's fp32 reference.

    Same projections, padding (unpad_hidden_states -> cu_seqlens; fla/layers/utils.py is plain
    PyTorch), cache updates and state layout (state_v_first=True, as fla's chunk and
    fused_recurrent modes use; fla's kernel for short inputs is fused_recurrent: the same recurrence).
    """
    from einops import rearrange, repeat

    get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache = _layer_utils()

    if attention_mask is not None:
        assert attention_mask.dim() == 2, "GLA takes a [batch, seq_len] 0/1 padding mask"
    batch_size, q_len, _ = hidden_states.shape
    acts = self._trainkit_acts
    last_state = get_layer_cache(self, past_key_values)

    cu_seqlens = kwargs.get("cu_seqlens")
    hidden_states, indices, cu_seqlens = unpad_hidden_states(hidden_states, cu_seqlens, attention_mask, q_len)

    conv_state_q = conv_state_k = conv_state_v = None
    if self.use_short_conv:
        if last_state is not None:
            conv_state_q, conv_state_k, conv_state_v = last_state["conv_state"]
        q, conv_state_q = self.q_conv1d(x=self.q_proj(hidden_states), cache=conv_state_q,
                                        output_final_state=use_cache, cu_seqlens=cu_seqlens)
        k, conv_state_k = self.k_conv1d(x=self.k_proj(hidden_states), cache=conv_state_k,
                                        output_final_state=use_cache, cu_seqlens=cu_seqlens)
        v, conv_state_v = self.v_conv1d(x=self.v_proj(hidden_states), cache=conv_state_v,
                                        output_final_state=use_cache, cu_seqlens=cu_seqlens)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    gk = self.gk_proj(hidden_states)

    q = rearrange(q, "... (h d) -> ... h d", d=self.head_k_dim)
    if self.num_kv_groups > 1:
        k, gk = (repeat(x, "... (h d) -> ... (h g) d", g=self.num_kv_groups, d=self.head_k_dim) for x in (k, gk))
        v = repeat(v, "... (h d) -> ... (h g) d", g=self.num_kv_groups, d=self.head_v_dim)
    else:
        k, gk = (rearrange(x, "... (h d) -> ... h d", d=self.head_k_dim) for x in (k, gk))
        v = rearrange(v, "... (h d) -> ... h d", d=self.head_v_dim)

    gk = F.logsigmoid(gk) / self.gate_logit_normalizer
    if self.clamp_min is not None:
        gk = torch.clamp_min(gk, self.clamp_min)
    if self.feature_map_fn is not None:
        fmap = acts.get(self.feature_map_fn, self.feature_map_fn)
        q, k = fmap(q), fmap(k)

    recurrent_state = last_state["recurrent_state"] if last_state is not None else None
    # fla's fused_chunk kernel kept the state as [K, V]; chunk / fused_recurrent as [V, K]
    o, recurrent_state = reference_gla(q, k, v, gk, scale=None, initial_state=recurrent_state,
                                       output_final_state=use_cache, cu_seqlens=cu_seqlens,
                                       state_v_first=self.mode != "fused_chunk")

    update_layer_cache(self, past_key_values, recurrent_state=recurrent_state,
                       conv_state=(conv_state_q, conv_state_k, conv_state_v) if self.use_short_conv else None,
                       offset=q_len)

    if self.use_output_gate:
        g = self.g_proj(hidden_states)
        if self.fuse_norm_and_gate:
            g = rearrange(g, "... (h d) -> ... h d", d=self.head_v_dim)
            o = rearrange(self.g_norm_swish_gate(o, g), "... h d -> ... (h d)")
        else:
            gate_fn = acts.get(self.gate_fn, self.gate_fn)
            o = rearrange(self.g_norm(o), "... h d -> ... (h d)") * gate_fn(g)
    else:
        o = rearrange(self.g_norm(o), "... h d -> ... (h d)")
    o = self.o_proj(o)
    o = repad_hidden_states(o, indices, batch_size, q_len)
    return o, None, past_key_values


# What each replacement reads of fla's module instances (checked before binding).
_NEEDS = {
    "GatedLinearAttention": ("q_proj", "k_proj", "v_proj", "gk_proj", "o_proj", "head_k_dim", "head_v_dim",
                             "num_kv_groups", "gate_logit_normalizer", "clamp_min", "feature_map_fn",
                             "use_short_conv", "use_output_gate", "mode", "layer_idx"),
    "FusedRMSNormGated": ("eps", "weight", "bias", "activation"),
    "RMSNorm": ("eps", "weight", "bias"),
    "ShortConvolution": ("kernel_size", "weight", "bias", "activation"),
    "GatedMLP": ("gate_proj", "up_proj", "down_proj", "hidden_act"),
}
_SIGNATURES_CHECKED: set[type] = set()


def _check_replacement(module: nn.Module, fn) -> None:
    """PatchError unless fla's forward takes nothing the replacement ignores and the module has
    every attribute the replacement reads."""
    cls = type(module)
    if cls not in _SIGNATURES_CHECKED:
        unknown = sorted(_parameters(cls.forward) - _parameters(fn) - {"self"})
        if unknown:
            raise REFERENCE_BACKEND.error(f"{cls.__name__}.forward takes {', '.join(unknown)}, which the CPU "
                                          "reference backend does not handle", "run on a CUDA GPU, or " + LOCK_HINT)
        _SIGNATURES_CHECKED.add(cls)
    lineage = {base.__name__ for base in cls.__mro__}
    needs = [a for name, attrs in _NEEDS.items() if name in lineage for a in attrs]
    missing = [a for a in needs if not hasattr(module, a)]
    if missing:
        raise REFERENCE_BACKEND.error(f"{cls.__name__} has no attribute {', '.join(missing)}",
                                      "run on a CUDA GPU, or " + LOCK_HINT)


def _bind(module: nn.Module, fn) -> None:
    _check_replacement(module, fn)
    module.forward = types.MethodType(fn, module)
    setattr(module, _MARK, True)


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _on_cuda(model: nn.Module) -> bool:
    for p in model.parameters():
        return p.is_cuda
    return False


def uses_reference_backend(model: nn.Module) -> bool:
    """True when use_reference_backend has swapped this model's GLA layers."""
    from fla.layers.gla import GatedLinearAttention
    return any(getattr(m, _MARK, False) for m in model.modules() if isinstance(m, GatedLinearAttention))


def use_reference_backend(model: nn.Module, *, force: bool = False) -> list[str]:
    """Swap fla's Triton pieces for PyTorch when `model` is not on CUDA (or always with force=True).

    Per module instance (forwards rebound, parameters untouched; fla is not edited), so CUDA
    models in the same process keep the kernels. Works before or after PEFT wrapping (LoRA
    layers inside a swapped module are called as modules). Idempotent. Returns the names of what
    was swapped in this call ([] when on CUDA or already done), plus "loss: ..." for the loss.
    """
    if _on_cuda(model) and not force:
        return []
    from trainkit.gla import import_fla
    import_fla()
    from fla.layers.gla import GatedLinearAttention
    from fla.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution

    acts = _act_map()
    swapped: list[str] = []
    for name, module in model.named_modules():
        if getattr(module, _MARK, False):
            continue
        if isinstance(module, GatedLinearAttention):
            module._trainkit_acts = acts
            _bind(module, _gla_attention_forward)
        elif isinstance(module, FusedRMSNormGated):
            _bind(module, _rms_norm_gated_forward)
        elif isinstance(module, RMSNorm):
            _bind(module, _rms_norm_forward)
        elif isinstance(module, ShortConvolution):
            _bind(module, _short_conv_forward)
        elif isinstance(module, GatedMLP):
            _bind(module, _mlp_forward)
        else:
            continue
        swapped.append(f"{name} ({type(module).__name__})")
    for m in {id(model): model, id(_base(model)): _base(model)}.values():
        swapped += _torch_loss(m)
    unknown = [n for n, m in model.named_modules() if _is_unhandled_fla(m)]
    if unknown:
        raise RuntimeError(f"GLA reference backend: no PyTorch path for {unknown[0]} "
                           f"({type(dict(model.named_modules())[unknown[0]]).__name__}); run it on a CUDA GPU")
    if swapped:
        REFERENCE_BACKEND.mark_applied()
    return swapped


def _torch_loss(model: nn.Module) -> list[str]:
    """fla's fused (linear) cross-entropy -> nn.CrossEntropyLoss (fla picks the loss from the config)."""
    out = []
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) == "gla":
        for key in ("fuse_linear_cross_entropy", "fuse_cross_entropy"):
            if getattr(config, key, False):
                setattr(config, key, False)
                out.append(f"loss: config.{key} -> False (nn.CrossEntropyLoss)")
    criterion = getattr(model, "criterion", None)
    if criterion is not None and type(criterion).__module__.startswith("fla."):
        model.criterion = None
        out.append(f"loss: criterion {type(criterion).__name__} -> nn.CrossEntropyLoss")
    return out


def _is_unhandled_fla(module: nn.Module) -> bool:
    """An fla module with Triton inside that the reference backend does not replace."""
    cls = type(module)
    if not cls.__module__.startswith("fla.") or getattr(module, _MARK, False):
        return False
    # containers and pure-PyTorch fla modules
    return cls.__name__ in {"FusedLinearCrossEntropyLoss", "FusedCrossEntropyLoss", "LayerNorm", "GroupNorm",
                            "FusedLayerNormGated", "FusedRMSNormGatedLinear", "RMSNormLinear", "LayerNormLinear"}


# ---------------------------------------------------------------------------------------------
# after PEFT


def _adapted(module: nn.Module) -> bool:
    """Is this module PEFT-wrapped (a LoRA layer or a modules_to_save copy)?"""
    names = {type(module).__name__}
    return bool(names & {"ModulesToSaveWrapper"}) or hasattr(module, "lora_A") or hasattr(module, "base_layer")


def guard_adapter_paths(model: nn.Module) -> list[str]:
    """After PEFT: make sure no fused kernel reads a base weight around an adapter. Returns notes.

    - GatedMLP with fuse_swiglu and an adapted down_proj: switched (per instance) to fla's own
      unfused path down_proj(swiglu(gate, up)): the fused Triton swiglu activation, then the
      (adapted) down_proj module. On the reference backend the MLP already calls down_proj.
    - fuse_linear_cross_entropy with an adapted lm_head (LoRA or modules_to_save): turned off.
    Idempotent; safe on any model (no-op without fla modules).
    """
    notes: list[str] = []
    try:
        from fla.modules import GatedMLP
    except ImportError:  # no fla: no fla module to guard
        return notes
    fixed = 0
    for name, module in model.named_modules():
        if isinstance(module, GatedMLP) and not hasattr(module, "fuse_swiglu"):
            raise ADAPTER_PATHS.error(f"GatedMLP ({name}) has no fuse_swiglu flag: cannot tell whether its fused "
                                      "kernel would skip a down_proj adapter")
        if isinstance(module, GatedMLP) and getattr(module, "fuse_swiglu", False) and _adapted(module.down_proj):
            module.fuse_swiglu = False  # forward: self.down_proj(swiglu(gate, y))
            fixed += 1
    if fixed:
        ADAPTER_PATHS.mark_applied()
        notes.append(f"GLA: {fixed} MLPs with an adapter on down_proj run swiglu (fused activation) then down_proj, "
                     "not the fused swiglu_linear that would skip the adapter")
    base = _base(model)
    config = getattr(base, "config", None)
    head = getattr(base, "lm_head", None)
    if config is not None and getattr(config, "fuse_linear_cross_entropy", False) and head is not None and _adapted(head):
        config.fuse_linear_cross_entropy = False
        ADAPTER_PATHS.mark_applied()
        notes.append("GLA: fuse_linear_cross_entropy off (lm_head is adapted / saved; the fused loss reads lm_head.weight)")
    return notes


# ---------------------------------------------------------------------------------------------
# autotuning: tuned kernel configs shipped per GPU instead of benchmarking every config at the first step

AUTOTUNE_TABLE = Patch(
    "fla.autotune_table", "flash-linear-attention",
    "fla's Triton autotuners read tuned configs from trainkit's table for this GPU (fla's CachedAutotuner, fuzzy "
    "key match, early pruning kept) instead of benchmarking every config at the first step of a new shape",
    checked="0.6.0 (triton 3.6, 3.9)")


def _fla_autotuners() -> list:
    """Every Triton Autotuner object defined in an imported fla module (under triton.heuristics / jit wrappers)."""
    import sys

    from triton.runtime.autotuner import Autotuner
    found, seen = [], set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for value in list(vars(module).values()):
            obj = value
            for _ in range(4):  # Heuristics(Autotuner(JITFunction)): walk the .fn chain down to the autotuner
                if isinstance(obj, Autotuner) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, Autotuner) and id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
    return found


def _kernel_name(autotuner) -> str:
    """module.function of the kernel: fla reuses function names across ops, so the bare name is not unique."""
    fn = autotuner.fn
    for _ in range(4):  # Heuristics / JITFunction wrappers down to the Python function
        if inspect.isfunction(fn):
            break
        fn = fn.fn
    return f"{fn.__module__}.{fn.__name__}"


def use_autotune_table(table_dir) -> int:
    """Make fla's autotuners look up `table_dir`/<module.kernel>.json (fla's own config-file format) before
    benchmarking: exact key first, then a key that differs only in numbers (fla's FUZZY mode); a table
    config that the kernel's own pruning rejects for this shape falls back to autotuning. Returns the number
    of autotuners switched. Call after fla's kernels are imported (trainkit.gla.import_fla does)."""
    import os

    from fla.ops.utils import cache as fla_cache
    needed = ("CachedAutotuner", "FlaCacheMode", "load_cached_config", "get_fla_config_dir")
    missing = [n for n in needed if not hasattr(fla_cache, n)]
    if missing or not hasattr(fla_cache.CachedAutotuner, "maybe_load_cached_config"):
        raise AUTOTUNE_TABLE.error(f"fla.ops.utils.cache has no {', '.join(missing) or 'CachedAutotuner.maybe_load_cached_config'}",
                                   "set TRAINKIT_FLA_AUTOTUNE_TABLE=off, or " + LOCK_HINT)
    os.environ["FLA_CONFIG_DIR"] = str(table_dir)
    if fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.DISABLED:  # the user's FLA_CACHE_MODE wins otherwise
        fla_cache.FLA_CACHE_MODE = fla_cache.FlaCacheMode.FUZZY
    switched = 0
    for autotuner in _fla_autotuners():
        for attribute in ("cache", "configs", "keys", "arg_names", "early_config_prune"):
            if not hasattr(autotuner, attribute):
                raise AUTOTUNE_TABLE.error(f"triton Autotuner has no {attribute!r}", "set TRAINKIT_FLA_AUTOTUNE_TABLE=off")
        autotuner.kernel_name = _kernel_name(autotuner)
        if type(autotuner) is not fla_cache.CachedAutotuner:
            autotuner.__class__ = fla_cache.CachedAutotuner
        switched += 1
    if switched:
        AUTOTUNE_TABLE.mark_applied()
    return switched


def autotune_table_entries() -> dict[str, dict]:
    """The configs fla's autotuners chose in this process, as fla config files: {module.kernel: file content}."""
    import triton

    from fla.ops.utils.cache import AutotuneKey
    tables: dict[str, dict] = {}
    for autotuner in _fla_autotuners():
        if not autotuner.cache:
            continue
        entries = {}
        for key, config in autotuner.cache.items():
            entries[AutotuneKey.key_hash(key)] = {"autotune_key": AutotuneKey.normalize_autotune_key(key), "config": {
                "kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
                "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}}
        tables[_kernel_name(autotuner)] = {"kernel_name": _kernel_name(autotuner), "triton_version": triton.__version__,
                                           "autotune_entries": entries}
    return tables


def _preferred_configs(configs: list) -> list:
    """Of the configs a kernel's own pruning kept, those with 4 warps and 2 or 3 pipeline stages (every tile size
    kept); all of them when none is such."""
    return ([c for c in configs if c.num_warps == 4 and c.num_stages in (2, 3)]
            or [c for c in configs if c.num_warps == 4] or list(configs))


def narrow_autotuning() -> int:
    """Let fla's autotuners benchmark only the configs with 4 warps and 2 or 3 pipeline stages, chosen AFTER the
    kernel's own pruning (which drops tiles too big for the shape and configs Triton miscompiles), so the
    first step of a new shape compiles a handful of configs per kernel instead of up to ~24. Returns the number
    of autotuners narrowed."""
    narrowed = 0
    for autotuner in _fla_autotuners():
        if getattr(autotuner, "_trainkit_narrowed", False) or len(autotuner.configs) < 2:
            continue
        own_prune = autotuner.early_config_prune

        def early_config_prune(configs, named_args, _own=own_prune, **kwargs):
            kept = _own(configs, named_args, **kwargs) if _own else list(configs)
            return _preferred_configs(kept)

        autotuner.early_config_prune = early_config_prune
        autotuner._trainkit_narrowed = True
        narrowed += 1
    if narrowed:
        AUTOTUNE_TABLE.mark_applied()
    return narrowed
