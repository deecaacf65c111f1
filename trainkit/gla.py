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
``use_reference_backend(model)``
    AFTER the model is built (and on its device): when it is not on CUDA, swaps fla's Triton
    pieces for PyTorch, per module instance (fla itself is not edited, parameters are untouched
    so state dicts load both ways): the GLA op -> ``trainkit.linear_attention.reference_gla``
    (varlen ``cu_seqlens`` from padded batches, fla's recurrent cache for ``generate()``),
    RMSNorm / FusedRMSNormGated -> torch, ShortConvolution -> a causal depthwise conv,
    swiglu -> ``F.silu(gate) * up``, fused cross-entropy -> ``nn.CrossEntropyLoss``.
``guard_adapter_paths(model)``
    AFTER PEFT: the guarantee that every adapter is on the path the forward takes. fla's
    ``GatedMLP(fuse_swiglu=True)`` calls ``swiglu_linear(gate, up, down_proj.weight, ...)``, which
    reads the base weight and skips a LoRA on ``down_proj`` (it would silently get no gradient);
    such MLPs are switched to fla's own unfused path, ``down_proj(swiglu(gate, up))``: the swiglu
    activation stays a fused Triton kernel on GPU, and ``down_proj`` is called as a module, so the
    adapter is in the graph. ``fuse_linear_cross_entropy`` (reads ``lm_head.weight``) likewise.

fuse_norm is kept as configured on every device: it changes parameter NAMES (the gated output
norm is ``attn.g_norm_swish_gate`` with it, ``attn.g_norm`` without), so turning it off would
leave a pretrained checkpoint's norm weights unloaded. The reference backend runs both variants.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainkit.adapters import PRESETS
from trainkit.linear_attention import reference_gla

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
_MARK = "_trainkit_reference"


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
    return fla_models


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
                       modules_to_save=None, attn_mode: str | None = None) -> list[str]:
    """Edit a GLA config in place before the model is built; returns notes of what changed.

    on_cuda: the model will run on a CUDA device (fla's Triton kernels); otherwise every fused
    kernel is turned off (the reference backend replaces the rest, see use_reference_backend).
    fused_swiglu: fla's fused SwiGLU MLP (GLA_USE_FUSED_SWIGLU, default off). When adapters
    target down_proj, the fused swiglu+linear is not used (it reads down_proj.weight and skips
    the adapter); the swiglu activation alone stays a fused Triton kernel on GPU.
    adapter_targets / modules_to_save: the LoRA target names (as in lora.target_modules, presets
    and "all_linear" included) and PEFT modules_to_save.
    attn_mode: overrides config.attn_mode when given.
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


def _gla_attention_forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                           output_attentions=False, **kwargs):
    """fla.layers.GatedLinearAttention.forward (fla 0.6) with the GLA op as trainkit's fp32 reference.

    Same projections, padding (unpad_hidden_states -> cu_seqlens; fla/layers/utils.py is plain
    PyTorch), cache updates and state layout (state_v_first=True, as fla's chunk and
    fused_recurrent modes use; fla's kernel for short inputs is fused_recurrent: the same recurrence).
    """
    from einops import rearrange, repeat
    from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache

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


def _bind(module: nn.Module, fn) -> None:
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
    return swapped


def _torch_loss(model: nn.Module) -> list[str]:
    """fla's fused (linear) cross-entropy -> nn.CrossEntropyLoss (fla picks the loss from the config)."""
    out = []
    config = getattr(model, "config", None)
    if config is not None and is_gla_config(config):
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
    except Exception:
        return notes
    fixed = 0
    for name, module in model.named_modules():
        if isinstance(module, GatedMLP) and getattr(module, "fuse_swiglu", False) and _adapted(module.down_proj):
            module.fuse_swiglu = False  # forward: self.down_proj(swiglu(gate, y))
            fixed += 1
    if fixed:
        notes.append(f"GLA: {fixed} MLPs with an adapter on down_proj run swiglu (fused activation) then down_proj, "
                     "not the fused swiglu_linear that would skip the adapter")
    base = _base(model)
    config = getattr(base, "config", None)
    head = getattr(base, "lm_head", None)
    if config is not None and getattr(config, "fuse_linear_cross_entropy", False) and head is not None and _adapted(head):
        config.fuse_linear_cross_entropy = False
        notes.append("GLA: fuse_linear_cross_entropy off (lm_head is adapted / saved; the fused loss reads lm_head.weight)")
    return notes
