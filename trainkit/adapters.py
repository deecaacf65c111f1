"""LoRA adapters through PEFT: target presets per model family, variants lora/dora/rslora.

Target names are resolved here into the explicit list of full module names of the
linear layers (``nn.Linear`` / bitsandbytes ``Linear4bit``) that PEFT should wrap, so:
- a fused MoE expert bank (``experts.down_proj``, a 3-D tensor / NF4ExpertBank) is never
  mistaken for the dense ``down_proj`` of a shared expert or dense layer;
- the output head and router gates are never adapted by a preset;
- a user-given name that matches no linear layer is a ConfigError naming
  ``lora.target_modules`` and listing the names that exist.
The adapter is saved by PEFT in its standard format (``PeftModel.from_pretrained`` loads it;
for qwen2_moe-style families with dense/shared-expert targets use ``load_adapter``, which
turns off PEFT's v4->v5 MoE target remap that would otherwise drop those adapters).

Module names checked against transformers 5.23 modeling code:
  llama / mistral / qwen2 / qwen3: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj
  mixtral: self_attn.{q,k,v,o}_proj; experts are fused 3-D tensors (mlp.experts.gate_up_proj/down_proj),
           router mlp.gate (MixtralTopKRouter)
  qwen2_moe: attention + mlp.shared_expert.{gate,up,down}_proj (+ dense mlp.* in mlp_only_layers);
           mlp.shared_expert_gate is a Linear(H, 1) gate, not adapted
  qwen3_moe: attention + dense mlp.{gate,up,down}_proj in mlp_only_layers (no shared expert)
  glm4_moe: attention + mlp.{gate,up,down}_proj of the first_k_dense_replace dense layers and
           mlp.shared_experts.{gate,up,down}_proj; router mlp.gate (Glm4MoeTopkRouter)
"""

from __future__ import annotations

import copy

from torch import nn

from trainkit.config import ConfigError
from trainkit.config.base import LoraSection
from trainkit.expert_lora import expert_rank_alpha, install_expert_lora, resolve_expert_targets
from trainkit.patches.peft import no_moe_target_remap, use_fused_lora_forward

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, list[str]] = {
    "attention": ATTENTION,
    "llama": ATTENTION + MLP,
    "mistral": ATTENTION + MLP,
    "qwen": ATTENTION + MLP,
    "qwen2": ATTENTION + MLP,
    "qwen3": ATTENTION + MLP,
    "qwen_moe": ATTENTION + MLP,      # MLP names match only the shared expert / dense layers
    "qwen2_moe": ATTENTION + MLP,
    "qwen3_moe": ATTENTION + MLP,
    "mixtral": ATTENTION,             # experts are fused 3-D tensors: no per-expert Linear to adapt
    "glm_moe": ATTENTION + MLP,
    "glm4_moe": ATTENTION + MLP,
    # GLA (flash-linear-attention): g_proj is the output gate, gk_proj the low-rank forget-gate
    # projection (a Sequential of two Linear layers, adapted as gk_proj.0 / gk_proj.1)
    "gla": ATTENTION + ["g_proj", "gk_proj.0", "gk_proj.1"] + MLP,
    "all_linear": ["*"],
}
FAMILY_PRESET = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "llama",
    "gemma2": "llama", "gemma3_text": "llama", "olmo2": "llama",
    "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "glm4_moe": "glm4_moe",
    "gla": "gla",
}
# last name components never adapted by a preset or the fallback
EXCLUDED_LEAVES = {"lm_head", "gate", "router", "shared_expert_gate", "score", "classifier"}


def _inner(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every nn.Linear (Linear4bit included) of the model, in order."""
    return [name for name, m in _inner(model).named_modules() if isinstance(m, nn.Linear)]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _excluded(name: str) -> bool:
    leaf = _leaf(name)
    return leaf in EXCLUDED_LEAVES or "router" in leaf


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_target_modules(model: nn.Module, target_modules) -> list[str]:
    """Turn 'auto' | preset name | list of names into full module names of linear layers."""
    linears = linear_module_names(model)
    family = getattr(getattr(_inner(model), "config", None), "model_type", None)
    user_list = False
    if target_modules in (None, "auto"):
        preset = FAMILY_PRESET.get(family)
        targets = PRESETS[preset] if preset else ["*"]
    elif isinstance(target_modules, str):
        if target_modules in PRESETS:
            targets = PRESETS[target_modules]
        elif target_modules in ("all-linear", "all_linear"):
            targets = ["*"]
        else:
            targets, user_list = [t.strip() for t in target_modules.split(",") if t.strip()], True
    else:
        targets, user_list = [str(t) for t in target_modules], True
    if not targets:
        raise ConfigError("lora.target_modules: empty list")

    if targets == ["*"]:
        chosen = [n for n in linears if not _excluded(n)]
        if not chosen:
            raise ConfigError("lora.target_modules: the model has no linear layer to adapt")
        return chosen

    # leaf names, with their parent where the leaf is an index (gk_proj.0)
    available = sorted({n.rsplit(".", 2)[-2] + "." + _leaf(n) if _leaf(n).isdigit() and n.count(".") else _leaf(n)
                        for n in linears})
    chosen: list[str] = []
    unknown: list[str] = []
    for target in targets:
        hits = [n for n in linears if _matches(n, target) and (user_list or not _excluded(n))]
        if not hits:
            if user_list or not any(True for _ in linears):
                unknown.append(target)
            continue  # a preset name absent in this architecture variant (e.g. no dense layers)
        chosen.extend(h for h in hits if h not in chosen)
    if unknown:
        raise ConfigError(f"lora.target_modules: {', '.join(map(repr, unknown))} "
                          f"match{'es' if len(unknown) == 1 else ''} no linear layer of this "
                          f"{family or 'model'} model; available: {', '.join(available)}")
    if not chosen:
        raise ConfigError(f"lora.target_modules: {target_modules!r} matches no linear layer; "
                          f"available: {', '.join(available)}")
    return [n for n in linears if n in set(chosen)]


def load_adapter(model: nn.Module, path, is_trainable: bool = False, fused_forward: bool = True, **kwargs):
    """``PeftModel.from_pretrained`` with PEFT's MoE target remap held off (trainkit.patches.peft), and the
    fused LoRA forward the training used (``fused_forward``; trainkit.fused_lora), so the loaded adapter
    computes what it computed in training, bit for bit. An adapter with expert adapters (``target_parameters``)
    is rebuilt by trainkit.expert_lora (PEFT matches nothing on NF4 banks and would drop them with a warning)
    and its weights loaded with every adapter key checked: a missing or unexpected key is an error."""
    from peft import PeftConfig, PeftModel
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    config = PeftConfig.from_pretrained(path)
    if getattr(config, "target_parameters", None):
        peft_model = _load_expert_adapter(model, path, config, is_trainable, model_type)
        if fused_forward:
            use_fused_lora_forward(peft_model)
        return peft_model
    with no_moe_target_remap(model_type):
        peft_model = PeftModel.from_pretrained(model, path, is_trainable=is_trainable, **kwargs)
    if fused_forward:
        use_fused_lora_forward(peft_model)
    return peft_model


def _load_expert_adapter(model: nn.Module, path, config, is_trainable: bool, model_type):
    from peft import PeftModel
    from peft.utils import load_peft_weights

    names = [t.rsplit(".", 1)[-1] for t in config.target_parameters]
    names = list(dict.fromkeys(names))
    suffixes = list(config.target_parameters)
    r = next((v for k, v in (config.rank_pattern or {}).items() if k in suffixes), config.r)
    alpha = next((v for k, v in (config.alpha_pattern or {}).items() if k in suffixes), config.lora_alpha)
    module_config = copy.copy(config)
    module_config.target_parameters = None
    module_config.rank_pattern = {k: v for k, v in (config.rank_pattern or {}).items() if k not in suffixes}
    module_config.alpha_pattern = {k: v for k, v in (config.alpha_pattern or {}).items() if k not in suffixes}
    module_config.inference_mode = not is_trainable
    with no_moe_target_remap(model_type):
        peft_model = PeftModel(model, module_config)
    install_expert_lora(peft_model, names, r, alpha)
    load_adapter_weights(peft_model, load_peft_weights(str(path)), str(path))
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
    return peft_model


def load_adapter_weights(peft_model, state: dict, source: str) -> None:
    """set_peft_model_state_dict, with every adapter key of the model filled and no key left over (PEFT's
    loader only warns, and drops keys that match no module)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if (error := adapter_mismatch(source, missing, unexpected)) is not None:
        raise ValueError(error)


def adapter_mismatch(source, missing: list[str], unexpected: list[str]) -> str | None:
    """The one-line error for adapter keys the model lacks or has in excess; None when both lists are empty."""
    if not missing and not unexpected:
        return None
    what = "; ".join(f"{len(keys)} {kind} (e.g. {keys[0]})" for keys, kind in
                     ((missing, "adapter weights missing"), (unexpected, "unexpected keys")) if keys)
    return f"adapter {source} does not match the model: {what}"


def apply_lora(model: nn.Module, lora: LoraSection):
    """Wrap `model` with PEFT LoRA adapters; returns the PeftModel.

    lora: the config's lora section: r, alpha, dropout, target_modules ('auto' | preset | list),
    variant (lora | dora | rslora), bias (none | all | lora_only), modules_to_save, and
    init_lora_weights (PEFT's: True, "gaussian", "pissa", "pissa_niter_N", "olora"; PiSSA/OLoRA
    move the principal part of each target weight into the adapter and leave the residual in the
    base). With ``lora.fused_forward`` (default) the LoRA layers add their update through
    trainkit.fused_lora (bf16 compute over fp32 adapter weights). The returned model carries
    ``trainkit_lora_info`` = {target_modules, num_targets, trainable, variant, fused_forward_layers}.
    """
    from peft import LoraConfig, get_peft_model

    targets = resolve_target_modules(model, lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        use_dora=lora.variant == "dora",
        use_rslora=lora.variant == "rslora",
        modules_to_save=list(lora.modules_to_save) or None,
        init_lora_weights=lora.init_lora_weights,
        task_type="CAUSAL_LM",
    )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    expert_names = resolve_expert_targets(model, lora.expert_targets)
    with no_moe_target_remap(model_type):
        peft_model = get_peft_model(model, config)
    experts = {}
    if expert_names:
        r, alpha = expert_rank_alpha(lora)
        experts = install_expert_lora(peft_model, expert_names, r, alpha, impl=lora.expert_impl)
    fused = use_fused_lora_forward(peft_model) if lora.fused_forward else 0
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model.trainkit_lora_info = {"target_modules": sorted({_leaf(t) for t in targets}),
                                     "num_targets": len(targets), "trainable": trainable, "variant": lora.variant,
                                     "fused_forward_layers": fused,
                                     "expert_targets": experts.get("expert_targets", []),
                                     "expert_r": experts.get("expert_r"), "expert_alpha": experts.get("expert_alpha"),
                                     "expert_modules": experts.get("expert_modules", 0),
                                     "expert_trainable": experts.get("expert_trainable", 0)}
    return peft_model
