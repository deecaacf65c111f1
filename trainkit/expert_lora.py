"""LoRA on the routed experts' fused tensors (gate_up_proj, down_proj), over NF4 banks or frozen bf16 Parameters.

The adapters are PEFT's own ``ParamWrapper`` modules, nested as PEFT nests them for ``target_parameters``
(inner wrapper = ``gate_up_proj``, outer = ``down_proj``), so state-dict keys, ``adapter_config.json``,
``save_pretrained`` and ``PeftModel.from_pretrained`` on a bf16 model are PEFT's. Only the forward differs
(trainkit.patches.peft.expert_wrapper_forward): a wrapper puts its adapter into a scope and calls the experts
module, whose grouped forward (trainkit.quantization.nf4_experts_forward) adds, per projection and per expert e,

    y_e += s * (x_e A_e^T) B_e^T        A_e = A.view(E, r, in)[e],  B_e = B.view(out, r, E)[:, :, e]

(PEFT's layout: ``lora_A.weight [r*E, in]``, ``lora_B.weight [out, r*E]``) through ``ExpertLoRA``: GEMMs in the
compute dtype over fp32 masters, an explicit backward, no gradient to the frozen experts. PEFT's ParamWrapper
forward instead folds W + s*B A into a bank-sized tensor per forward (and cannot run over a 4-bit bank).

Cost per expert per layer: r*(2H + 3I) parameters (fp32 master + grad + AdamW = 16 bytes each); forward FLOPs
r*(2H + 3I)/(3*H*I) of the expert GEMMs (0.5 % on Mixtral 8x7B at r=16).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from trainkit.config import ConfigError
from trainkit.quantization import NF4ExpertBank, _grouped_mm, _grouped_mm_ok, iter_expert_modules

# per MoE family: the expert parameters `lora.expert_targets: auto` adapts (transformers 5 fused layouts)
EXPERT_PRESETS: dict[str, list[str]] = {
    "mixtral": ["gate_up_proj", "down_proj"],
    "qwen2_moe": ["gate_up_proj", "down_proj"],
    "qwen3_moe": ["gate_up_proj", "down_proj"],
    "glm4_moe": ["gate_up_proj", "down_proj"],
}
# registration order inside a transformers 5 *Experts module = PEFT's nesting order (first = innermost wrapper)
EXPERT_PARAM_ORDER = ("gate_up_proj", "up_proj", "down_proj")
_RANK_ALIGN = 8   # bf16 grouped_mm wants 16-byte strides: the rank is zero-padded to a multiple of 8

# (id(experts module), parameter name) -> (A, B, scaling, consumed flag list) while a wrapper's forward runs
_SCOPE: contextvars.ContextVar[dict] = contextvars.ContextVar("trainkit_expert_lora_scope", default={})


@contextlib.contextmanager
def expert_adapter_scope(experts: nn.Module, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scaling: float):
    """Within the block, `experts`' grouped forward adds this adapter to projection `name`; yields a one-item
    list that reads [True] once the forward has used it (so a forward that bypasses it is caught)."""
    used = [False]
    scope = dict(_SCOPE.get())
    scope[(id(experts), name)] = (lora_A, lora_B, float(scaling), used)
    token = _SCOPE.set(scope)
    try:
        yield used
    finally:
        _SCOPE.reset(token)


def scoped_expert_adapters(experts: nn.Module) -> dict[str, tuple]:
    """{projection name: (lora_A, lora_B, scaling)} of the adapters in scope for `experts`; marks them used."""
    out = {}
    for (owner, name), (a, b, s, used) in _SCOPE.get().items():
        if owner == id(experts):
            used[0] = True
            out[name] = (a, b, s)
    return out


# ----------------------------------------------------------------------------------------
# the autograd function
# ----------------------------------------------------------------------------------------

def _compute_copies(lora_A, lora_B, scaling, num_experts, dtype):
    """a_c [E, in, r_p] and b_c = s*B_e^T [E, r_p, out] in the compute dtype, rank zero-padded (exact)."""
    rank = lora_A.shape[0] // num_experts
    pad = -rank % _RANK_ALIGN
    a_c = lora_A.view(num_experts, rank, -1).transpose(1, 2).to(dtype)
    b_c = (lora_B.view(lora_B.shape[0], rank, num_experts).permute(2, 1, 0) * scaling).to(dtype)
    if pad:
        a_c, b_c = F.pad(a_c, (0, pad)), F.pad(b_c, (0, 0, 0, pad))
    return a_c.contiguous(), b_c.contiguous(), rank


class ExpertLoRA(torch.autograd.Function):
    """y = y_base + grouped (x_g A_e^T) s B_e^T for rows sorted by expert (`offs`: cumulative row counts).

    x_g = x_src[gather_idx] (gate_up: x_src is the [T, H] hidden states and gather_idx the token of each sorted
    row, so only [T, H] is saved) or x_src itself (down: gather_idx None). Gradients go to y_base, x_src and the
    fp32 masters A [r*E, in], B [out, r*E]; an expert without rows gets exactly zero."""

    @staticmethod
    def forward(ctx, y_base, x_src, gather_idx, offs, lora_A, lora_B, scaling):
        num_experts = offs.numel()
        a_c, b_c, rank = _compute_copies(lora_A, lora_B, scaling, num_experts, x_src.dtype)
        x_g = x_src[gather_idx] if gather_idx is not None else x_src
        xa = _grouped_mm(x_g.contiguous(), a_c, offs)
        y = y_base + _grouped_mm(xa, b_c, offs).to(y_base.dtype)
        ctx.save_for_backward(x_src, gather_idx, offs, xa, lora_A, lora_B)
        ctx.scaling, ctx.rank = scaling, rank
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_src, gather_idx, offs, xa, lora_A, lora_B = ctx.saved_tensors
        num_experts, rank, s = offs.numel(), ctx.rank, ctx.scaling
        dtype = x_src.dtype
        a_c, b_c, _ = _compute_copies(lora_A, lora_B, s, num_experts, dtype)
        dy = grad_y.to(dtype).contiguous()
        g = _grouped_mm(dy, b_c.transpose(1, 2).contiguous(), offs)          # [S, r_p] = dy B_e s
        grad_x = None
        if ctx.needs_input_grad[1]:
            dx_g = _grouped_mm(g, a_c.transpose(1, 2).contiguous(), offs)     # [S, in]
            if gather_idx is not None:
                grad_x = torch.zeros_like(x_src).index_add_(0, gather_idx, dx_g.to(x_src.dtype))
            else:
                grad_x = dx_g.to(x_src.dtype)
        x_g = x_src[gather_idx] if gather_idx is not None else x_src
        grad_A, grad_B = _weight_grads(g, x_g, dy, xa, offs, rank, s)
        return (grad_y, grad_x, None, None, grad_A.reshape(lora_A.shape).to(lora_A.dtype),
                grad_B.reshape(lora_B.shape).to(lora_B.dtype), None)


def _weight_grads(g, x_g, dy, xa, offs, rank: int, s: float):
    """dA_e = g_e^T x_e ([E, r, in]) and dB_e = s dy_e^T xa_e (returned as [out, r, E], PEFT's column order), in
    fp32. Grouped GEMMs over the rows (offsets on K) where torch has them, else expert by expert; an expert
    without rows gets exactly zero either way (grouped_mm leaves empty groups unspecified on some GPUs)."""
    num_experts = offs.numel()
    if _grouped_mm_ok(dy):
        fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
        grad_A = fn(g.t(), x_g, offs=offs)[:, :rank].float()                   # [E, r, in]
        grad_B = (s * fn(dy.t(), xa, offs=offs)[:, :, :rank].float()).permute(1, 2, 0)   # [out, r, E]
        counts = torch.diff(offs, prepend=offs.new_zeros(1))
        empty = counts == 0
        grad_A = grad_A.masked_fill(empty.view(-1, 1, 1), 0.0)
        grad_B = grad_B.masked_fill(empty.view(1, 1, -1), 0.0)
        return grad_A.contiguous(), grad_B.contiguous()
    grad_A = torch.zeros(num_experts, rank, x_g.shape[1], dtype=torch.float32, device=x_g.device)
    grad_B = torch.zeros(dy.shape[1], rank, num_experts, dtype=torch.float32, device=dy.device)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync per call
        if end > start:
            grad_A[e] = (g[start:end, :rank].t() @ x_g[start:end]).float()
            grad_B[:, :, e] = s * (dy[start:end].t() @ xa[start:end, :rank]).float()
        start = end
    return grad_A, grad_B


# ----------------------------------------------------------------------------------------
# installing the adapters
# ----------------------------------------------------------------------------------------

def _expert_param_names(experts: nn.Module) -> list[str]:
    """The fused expert tensors of an *Experts module (3-D float Parameters or NF4 banks), registration order."""
    names = [n for n, p in experts.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]
    names += [n for n, m in experts.named_children() if isinstance(m, NF4ExpertBank)]
    return sorted(names, key=lambda n: EXPERT_PARAM_ORDER.index(n) if n in EXPERT_PARAM_ORDER else len(names))


def resolve_expert_targets(model: nn.Module, expert_targets) -> list[str]:
    """'none' | 'auto' | list of names -> the expert parameter names to adapt (in PEFT's nesting order)."""
    if expert_targets in (None, "none"):
        return []
    found = [m for _, m in iter_expert_modules(model)]
    family = getattr(getattr(model, "config", None), "model_type", None)
    available = sorted({n for m in found for n in _expert_param_names(m)})
    if not found:
        raise ConfigError(f"lora.expert_targets: the {family or 'model'} model has no fused MoE experts "
                          "(set lora.expert_targets: none)")
    if expert_targets == "auto":
        if family not in EXPERT_PRESETS:
            raise ConfigError(f"lora.expert_targets: no preset for model type {family!r} (presets: "
                              f"{', '.join(sorted(EXPERT_PRESETS))}); list the expert tensors to adapt, available: "
                              f"{', '.join(available)}")
        names = EXPERT_PRESETS[family]
    else:
        names = list(expert_targets)
    unknown = [n for n in names if not all(n in _expert_param_names(m) for m in found)]
    if unknown:
        raise ConfigError(f"lora.expert_targets: {', '.join(map(repr, unknown))} is not a fused expert tensor of "
                          f"every experts module of this {family or 'model'} model; available: {', '.join(available)}")
    return list(dict.fromkeys(names))


def install_expert_lora(peft_model, names: list[str], r: int, alpha: float, impl: str = "trainkit",
                        adapter_name: str = "default") -> dict:
    """Put PEFT ParamWrapper adapters (rank `r` per expert, `alpha`) on `names` of every experts module of the
    PeftModel `peft_model`, record them in its PeftConfig (target_parameters, rank/alpha patterns, dropout 0),
    and switch their forward to trainkit's grouped one (impl 'trainkit') or keep PEFT's ('peft', bf16 only).
    Returns {expert_targets, expert_r, expert_alpha, expert_trainable, expert_modules}."""
    from trainkit.patches.peft import make_param_wrapper, use_expert_lora_forward
    from trainkit.patches.transformers import use_grouped_experts_forward

    # nesting order = registration order in the experts module (gate_up innermost), as PEFT builds it
    names = sorted(dict.fromkeys(names), key=lambda n: EXPERT_PARAM_ORDER.index(n) if n in EXPERT_PARAM_ORDER
                   else len(EXPERT_PARAM_ORDER))
    config = peft_model.peft_config[adapter_name]
    base = peft_model.get_base_model()
    modules = list(iter_expert_modules(base))
    banks = any(isinstance(m, NF4ExpertBank) for _, e in modules for m in e.children())
    if impl == "peft" and banks:
        raise ConfigError("lora.expert_impl: peft needs bf16 experts (PEFT's forward cannot run over NF4 banks): "
                          "set quantization.quantize_moe_experts: false, or lora.expert_impl: trainkit")
    trainable = 0
    wrappers = []
    for name, experts in modules:
        if getattr(experts, "_is_expert_parallel", False):
            raise ConfigError(f"lora.expert_targets: {name} is expert-parallel; expert LoRA supports replicated "
                              "experts only")
        # the experts module's place in the model (PEFT names a wrapper by the experts module's path)
        path = name.replace(".base_layer", "")
        parent_name, _, child = path.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        current = getattr(parent, child)
        for pn in names:
            wrapper = make_param_wrapper(current, adapter_name, pn, config, r=r, lora_alpha=alpha)
            for layer in (wrapper.lora_A[adapter_name], wrapper.lora_B[adapter_name]):
                layer.to(torch.float32).requires_grad_(True)
                trainable += layer.weight.numel()
            setattr(parent, child, wrapper)
            wrappers.append(wrapper)
            current = wrapper
        if impl == "trainkit":
            use_grouped_experts_forward(experts)
    if impl == "trainkit":
        use_expert_lora_forward(wrappers)
    suffixes = sorted({f"{_module_suffix(n)}.{pn}" for n, _ in modules for pn in names})
    config.target_parameters = suffixes
    config.lora_dropout = 0.0   # PEFT refuses to load target_parameters with dropout (module adapters keep theirs live)
    if r != config.r:
        config.rank_pattern = {**(config.rank_pattern or {}), **{s: r for s in suffixes}}
    if alpha != config.lora_alpha:
        config.alpha_pattern = {**(config.alpha_pattern or {}), **{s: alpha for s in suffixes}}
    return {"expert_targets": list(names), "expert_r": r, "expert_alpha": alpha, "expert_trainable": trainable,
            "expert_modules": len(modules)}


def _module_suffix(name: str) -> str:
    """'model.layers.3.mlp.experts' -> 'mlp.experts' (the part PEFT matches in every layer)."""
    parts = name.replace(".base_layer", "").split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:])
    return ".".join(parts[-2:])


def expert_rank_alpha(lora) -> tuple[int, float]:
    """lora.expert_r / expert_alpha with their defaults: lora.r, and the module adapters' scale (alpha / r, or
    alpha / sqrt(r) for rslora)."""
    r, alpha = lora.r, lora.alpha
    er = lora.expert_r or r
    if lora.expert_alpha is not None:
        return er, lora.expert_alpha
    return er, (alpha * math.sqrt(er) / math.sqrt(r) if lora.variant == "rslora" else alpha * er / r)


def refuse_sharded_experts(accelerator, info: dict) -> None:
    """Expert adapters under DeepSpeed ZeRO-3: ConfigError (ZeRO-3 partitions the fp32 masters into its own flat
    buffers, which the grouped forward does not gather). FSDP gathers each decoder layer's weights, expert
    adapters included, before the layer runs; DDP and ZeRO-2 keep them whole."""
    if not info.get("expert_targets"):
        return
    from trainkit.loop import is_zero3
    if is_zero3(accelerator):
        raise ConfigError("lora.expert_targets: not supported under DeepSpeed ZeRO-3 (it partitions the expert "
                          "adapters' weights outside the experts' forward); use FSDP (--accelerate-config fsdp), DDP "
                          "or ZeRO-2, or lora.expert_targets: none")


def describe_expert_lora(info: dict) -> str | None:
    """The run.say line for expert adapters (apply_lora's trainkit_lora_info), None without them."""
    if not info.get("expert_targets"):
        return None
    n = info["expert_trainable"]
    return (f"expert adapters: {', '.join(info['expert_targets'])} of {info['expert_modules']} experts modules, "
            f"r={info['expert_r']} per expert, alpha={info['expert_alpha']:g}: {n:,} parameters "
            f"({16 * n / 2**30:.2f} GiB with fp32 grads and AdamW states); no dropout on experts, and the saved "
            "adapter_config says lora_dropout 0 (PEFT cannot load target_parameters with dropout)")
