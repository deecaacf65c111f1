"""Loading the base model for QLoRA: NF4 4-bit (experts too), bf16 compute; activation checkpointing.

``load_model(cfg, device, tokenizer, dtype, quantization) -> (model, info)`` is the one entry point. A model
given by ``paths.model_name_or_path`` (hub id or local directory) and a model built from
``model.config`` (random init, seeded by ``training.seed``) go through the same
``from_pretrained`` call: the built one is saved to a temp directory first, so the tests
exercise the real loading path. ``apply_activation_checkpointing`` applies memory.gradient_checkpointing
once the adapters are placed (its `auto` budget counts their gradients and optimizer state).

Deliberately NOT used: ``peft.prepare_model_for_kbit_training``. It upcasts every
non-quantized weight (norms, embeddings, lm_head) to fp32, which makes the whole
residual stream fp32 and the step several times slower (DESIGN.md, Known traps).
Norms and embeddings stay in the compute dtype; LoRA weights are fp32 (PEFT's default),
so optimizer updates are not rounded away, while the base matmuls run in bf16.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from trainkit.config.base import TrainConfig
from trainkit.config.qlora import QuantizationSection
from trainkit.patches.bitsandbytes import keep_cpu_4bit_layout
from trainkit.patches.transformers import quantize_experts_on_load
from trainkit.quantization import (NF4ExpertBank, count_parameters, float_expert_params, iter_expert_modules,
                                   non_embedding_parameters, quantize_moe_experts)
from trainkit.runtime import resolve_dtype

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# modules never quantized: the output head and router/gate projections (tiny, and routing
# decisions are sensitive to quantization error)
SKIP_QUANT_MODULES = ["lm_head", "gate", "router", "shared_expert_gate"]
_MOE_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_MOE_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")

_TEMP_DIRS: list[str] = []


@atexit.register
def _cleanup_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def moe_fields(config) -> tuple[int, int]:
    """(num_experts, top_k) from an HF config; (0, 0) for a dense model."""
    cfg = getattr(config, "get_text_config", lambda: config)()
    num = next((int(v) for k in _MOE_EXPERT_KEYS if isinstance(v := getattr(cfg, k, None), int) and v > 0), 0)
    top_k = next((int(v) for k in _MOE_TOPK_KEYS if isinstance(v := getattr(cfg, k, None), int) and v > 0), 0)
    return num, (top_k if num else 0)


def is_moe(model: nn.Module) -> bool:
    """True when the model holds fused `*Experts` modules (quantized or not) or MoE blocks."""
    if any(True for _ in iter_expert_modules(model)):
        return True
    return any(type(m).__name__.endswith(("SparseMoeBlock", "MoE", "MoeBlock")) for m in model.modules())


def _quantization_config(quantization: QuantizationSection, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=list(SKIP_QUANT_MODULES),
    )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing of every decoder layer, by the name this
    transformers uses (``activation_checkpointing_enable`` since 5.2x; the old name warns)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing as a policy (memory.gradient_checkpointing: auto | true | false)
#
# auto: a probe forward (train mode, grad on, no checkpointing, no backward) counts the bytes autograd saves
# for backward in each decoder layer and outside them; scaled linearly to the run's micro-batch tokens, that
# says how many layers must be checkpointed for the activations to fit the budget. The first k layers are
# checkpointed: a checkpointed layer keeps only its input hidden state, the others keep everything.

GIB = 2 ** 30
PROBE_TOKENS = 256                 # tokens of the probe forward (one sequence)
CUDA_MARGIN_FRACTION = 0.10        # of the device's memory left free: allocator fragmentation, temporaries
CPU_BUDGET_FRACTION = 0.5          # of the available RAM the activations may take on CPU
ADAMW_STATE_BYTES = 8              # per trainable element: exp_avg and exp_avg_sq in fp32


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks in order: the outermost transformers ``GradientCheckpointingLayer``s
    (HF Llama / Mixtral / Qwen MoE layers, fla's GLABlock, trainkit.students' layers), each of which
    has its own ``gradient_checkpointing`` flag."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers, inside = [], ()
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not name.startswith(inside):
            layers.append(module)
            inside = (*inside, name + ".")
    return layers


@dataclass
class ActivationProbe:
    """Bytes autograd saved for backward in one probe forward of `tokens` tokens."""

    tokens: int
    layer_bytes: list[int]     # saved inside each decoder layer (its input included, when an op saves it)
    input_bytes: list[int]     # each layer's input hidden state: what the layer keeps when checkpointed
    outside_bytes: int         # saved outside the layers: embeddings, final norm, lm_head, loss

    def estimate(self, tokens: int, checkpointed: int) -> float:
        """Activation bytes of a forward of `tokens` tokens with the first `checkpointed` layers checkpointed."""
        kept = sum(self.input_bytes[:checkpointed]) + sum(self.layer_bytes[checkpointed:]) + self.outside_bytes
        return kept * tokens / self.tokens


def probe_activations(model: nn.Module, device, tokens: int = PROBE_TOKENS,
                      loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ActivationProbe:
    """One forward of `loss_fn(input_ids)` (default: the causal LM loss of `model`) on a (1, tokens) batch
    of random token ids in train mode with grad on and checkpointing switched off, counting the bytes of
    the tensors saved for backward (``saved_tensors_hooks``; tensors sharing a storage count once,
    parameters and buffers not at all), attributed to the decoder layer that runs when they are saved.
    No backward; the RNG is left as it was."""
    layers = decoder_layers(model)
    index = {id(layer): i for i, layer in enumerate(layers)}
    layer_bytes, input_bytes, outside = [0] * len(layers), [0] * len(layers), [0]
    current: list[int | None] = [None]
    weights = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: set[int] = set()
    alive = []  # the storages counted, held until the end so that no address is reused and counted again

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in weights and ptr not in seen:
            seen.add(ptr)
            alive.append(storage)
            if current[0] is None:
                outside[0] += storage.nbytes()
            else:
                layer_bytes[current[0]] += storage.nbytes()
        # not the tensor itself: a saved OUTPUT of a node would then hold that node (its grad_fn), which holds the
        # packed object, a reference cycle through C++ that no garbage collection frees: the whole probe graph
        # leaked on every call. The probe never runs backward; a detached view keeps the data for a caller that would.
        return tensor.detach()

    def before(layer, args, kwargs):
        i = index[id(layer)]
        current[0] = i
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            input_bytes[i] = hidden.numel() * hidden.element_size()

    def after(layer, args, kwargs, output):
        current[0] = None

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(before, with_kwargs=True),
                                             layer.register_forward_hook(after, with_kwargs=True))]
    # as under checkpointing (transformers' enable_input_require_grads): the embeddings' output requires
    # grad, so the frozen ops of the first layers save their inputs too; measured the same way every time
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True)))
    flags = [layer.gradient_checkpointing for layer in layers]
    device = torch.device(device)
    was_training = model.training
    vocab_size = model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        model.train()
        for layer in layers:
            layer.gradient_checkpointing = False
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_fn(input_ids) if loss_fn else model(input_ids=input_ids, labels=input_ids).loss
        del loss
    finally:
        for h in hooks:
            h.remove()
        for layer, flag in zip(layers, flags):
            layer.gradient_checkpointing = flag
        model.train(was_training)
        alive.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ActivationProbe(tokens, layer_bytes, input_bytes, outside[0])


def derived_activation_budget(device, trainable: list[torch.Tensor]) -> tuple[float, str]:
    """(bytes the activations may take, how that was derived) on `device`, with the model and adapters
    already placed: CUDA free memory minus the gradients and AdamW state of `trainable`, minus 10% of the
    device's memory; CPU: half the available RAM minus the same. Each process reads its own device."""
    device = torch.device(device)
    states = sum(p.numel() * (p.element_size() + ADAMW_STATE_BYTES) for p in trainable)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        margin = CUDA_MARGIN_FRACTION * total
        return free - states - margin, (f"{free / GIB:.1f} GiB free on {device} - {states / GIB:.2f} GiB gradients and "
                                        f"optimizer state - {margin / GIB:.1f} GiB margin")
    import psutil  # accelerate's dependency
    available = psutil.virtual_memory().available
    return CPU_BUDGET_FRACTION * available - states, (f"{CPU_BUDGET_FRACTION:.0%} of {available / GIB:.1f} GiB available "
                                                      f"RAM - {states / GIB:.2f} GiB gradients and optimizer state")


def layers_to_checkpoint(probe: ActivationProbe, tokens: int, budget_bytes: float) -> int:
    """The fewest layers k whose checkpointing (the first k) brings the estimate within the budget; all
    layers when even that does not fit."""
    n = len(probe.layer_bytes)
    return next((k for k in range(n + 1) if probe.estimate(tokens, k) <= budget_bytes), n)


def checkpoint_layers(model: nn.Module, count: int) -> None:
    """Checkpoint the first `count` decoder layers (non-reentrant) and no others: checkpointing is enabled
    model-wide (the checkpoint function is set on every layer), then switched off layer by layer."""
    if count:
        enable_activation_checkpointing(model)
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = i < count


def apply_activation_checkpointing(model: nn.Module, policy: bool | str, *, device, tokens: int,
                                   trainable: list[torch.Tensor], budget_gib: float | None = None,
                                   loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """memory.gradient_checkpointing on `model` (adapters already placed, not yet wrapped for DDP):
    true: every decoder layer, false: none, "auto": the fewest first layers that let one micro batch of
    `tokens` tokens fit `budget_gib` (memory.activation_memory_budget_gib; None: derived_activation_budget),
    measured by probe_activations with `loss_fn(input_ids)` (the script's loss; default: the causal LM
    loss). Under DDP each process decides from its own device; the same shapes and free memory give the same decision. Weights
    not on this process before `accelerate.prepare` (DeepSpeed ZeRO-3 partitions, FSDP's meta tensors)
    cannot run a probe: auto then checkpoints every layer and says so in budget_from.

    Returns run.json's model.activation_checkpointing: policy, layers (checkpointed: the first ones),
    of, tokens, estimated_gib_per_layer (saved activations of one layer at `tokens`, not checkpointed),
    estimated_gib (all activations with this choice), budget_gib, budget_from; the estimates and budget
    are null for true and false, which measure nothing."""
    policy = policy if policy == "auto" else ("true" if policy else "false")
    record: dict[str, Any] = {"policy": policy, "layers": 0, "of": 0, "tokens": tokens, "estimated_gib_per_layer": None,
                              "estimated_gib": None, "budget_gib": None, "budget_from": None}
    of = len(decoder_layers(model))
    count = {"true": of, "false": 0}.get(policy)
    sharded = any(p.is_meta or hasattr(p, "ds_id") for p in model.parameters())
    if policy == "auto" and sharded:
        count = of
        record["budget_from"] = "not measured: the weights are sharded or not loaded here (ZeRO-3, FSDP); every layer"
    elif policy == "auto":
        probe = probe_activations(model, device, tokens=min(tokens, PROBE_TOKENS), loss_fn=loss_fn)
        if budget_gib is not None:
            budget, source = budget_gib * GIB, "memory.activation_memory_budget_gib"
        else:
            budget, source = derived_activation_budget(device, trainable)
        count = layers_to_checkpoint(probe, tokens, budget)
        per_layer = sum(probe.layer_bytes) / max(len(probe.layer_bytes), 1) * tokens / probe.tokens
        record.update(estimated_gib_per_layer=per_layer / GIB, estimated_gib=probe.estimate(tokens, count) / GIB,
                      budget_gib=budget / GIB, budget_from=source)
    checkpoint_layers(model, count)
    record.update(layers=count, of=of)
    return record


def describe_activation_checkpointing(record: dict[str, Any]) -> str:
    """The start-of-run line: 'activation checkpointing: auto -> 6 of 24 layers (...)'."""
    head = f"activation checkpointing: {record['policy']} -> {record['layers']} of {record['of']} layers"
    if record["budget_gib"] is None:
        return f"{head} ({record['budget_from']})" if record["budget_from"] else head
    return (f"{head} (estimated {record['estimated_gib_per_layer']:.3g} GiB per layer, {record['estimated_gib']:.3g} GiB "
            f"in all at {record['tokens']:,} tokens per micro batch; budget {record['budget_gib']:.3g} GiB: "
            f"{record['budget_from']})")


def build_random_model_dir(model_config: dict, vocab_size: int, seed: int, dtype: torch.dtype,
                           tokenizer=None) -> str:
    """Random-init model from an HF config dict, saved with save_pretrained; returns the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kwargs = dict(model_config)
    model_type = kwargs.pop("model_type")
    kwargs["vocab_size"] = vocab_size
    if tokenizer is not None:
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, attr, None)
            if value is not None and attr not in kwargs:
                kwargs[attr] = value
    config = AutoConfig.for_model(model_type, **kwargs)
    fork_devices = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out = tempfile.mkdtemp(prefix="trainkit-model-")
    _TEMP_DIRS.append(out)
    # Written by hand, not save_pretrained: under torch.distributed that writes on rank 0 only,
    # and every process needs its own copy (other nodes share no disk with rank 0).
    from safetensors.torch import save_model
    config.to_json_file(os.path.join(out, "config.json"))
    save_model(model, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    del model
    return out


def model_source(cfg: TrainConfig, tokenizer, dtype: torch.dtype) -> tuple[str, str, dict]:
    """(what from_pretrained loads, a display name, its hub/trust kwargs): paths.model_name_or_path,
    or a random-init model built from model.config (seeded by training.seed) in a temp directory."""
    paths, model_cfg = cfg.paths, cfg.model
    source = paths.model_name_or_path
    common = dict(trust_remote_code=model_cfg.trust_remote_code, cache_dir=paths.cache_dir,
                  local_files_only=model_cfg.local_files_only)
    if source:
        return source, source, common
    if not model_cfg.config:
        raise ValueError("load_model: paths.model_name_or_path or model.config is required")
    if model_cfg.config.get("model_type") == "gla":
        from trainkit.gla import import_fla
        import_fla()  # registers model_type "gla" with the Auto classes
    source = build_random_model_dir(model_cfg.config, len(tokenizer), cfg.training.seed, dtype, tokenizer)
    return source, f"random-init {model_cfg.config['model_type']}", {**common, "local_files_only": True, "cache_dir": None}


def load_model(cfg: TrainConfig, device, tokenizer, dtype: str,
               quantization: QuantizationSection | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load (or build) the base model on `device`, frozen; returns (model, info).

    dtype: of the matmuls and of the weights that stay unquantized ("auto": trainkit.runtime.resolve_dtype).
    quantization: train_qlora.py's section: the linear layers in 4 bit (load_in_4bit), fused MoE
    experts too (quantize_moe_experts, only with load_in_4bit); None: no quantization (train_lora.py).
    The model section (and, for GLA models, lora.target_modules / modules_to_save) come from `cfg`.

    info: name, family, is_moe, num_experts, top_k, parameters (count_parameters),
    fraction_4bit, non_embedding_parameters, quantized_expert_banks, summary (the
    "4-bit base parameters: X of Y (Z%)" line for the caller to print).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_cfg = cfg.model
    load_4bit = quantization is not None and quantization.load_in_4bit
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype_name, dtype_reason = resolve_dtype(dtype, device)
    compute_dtype = DTYPES[dtype_name]

    source, name, common = model_source(cfg, tokenizer, compute_dtype)

    try:
        config = AutoConfig.from_pretrained(source, **common)
    except ValueError as e:  # "gla" is unknown to transformers until fla registers it
        if "gla" not in str(e).lower():
            raise
        from trainkit.gla import import_fla
        import_fla()
        config = AutoConfig.from_pretrained(source, **common)
    notes: list[str] = []
    gla = getattr(config, "model_type", None) == "gla"
    if gla:
        from trainkit.gla import prepare_gla_config, use_reference_backend
        # model.fused_swiglu, model.attn_mode and model.fused_linear_cross_entropy are train_lora.py's keys (the
        # GLA script); other
        # scripts have no such keys and get fla's defaults
        notes += prepare_gla_config(config, on_cuda=device.type == "cuda",
                                    fused_swiglu=getattr(model_cfg, "fused_swiglu", False),
                                    adapter_targets=cfg.lora.target_modules,  # names, presets, "auto"
                                    modules_to_save=list(cfg.lora.modules_to_save),
                                    attn_mode=getattr(model_cfg, "attn_mode", None),
                                    fused_linear_cross_entropy=getattr(model_cfg, "fused_linear_cross_entropy", False))
    num_experts, top_k = moe_fields(config)
    if num_experts:
        config.output_router_logits = True      # outputs carry aux_loss (added to loss by the model)
        text = getattr(config, "get_text_config", lambda: config)()
        text.output_router_logits = True
    config.use_cache = False

    kwargs: dict[str, Any] = dict(config=config, dtype=compute_dtype, device_map={"": device}, **common)
    if not gla:  # GLA has no softmax attention: transformers refuses an attn_implementation for it
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if load_4bit:
        kwargs["quantization_config"] = _quantization_config(quantization, compute_dtype)
    # quantize_moe_experts quantizes to 4 bit: without load_in_4bit every weight stays in the compute dtype
    quantize_experts = load_4bit and quantization.quantize_moe_experts
    if quantization is not None and not load_4bit and quantization.quantize_moe_experts and num_experts:
        notes.append("quantization.quantize_moe_experts applies only with load_in_4bit: the experts stay in "
                     f"{dtype_name} like every other weight")
    # experts quantize while they load (one parameter's bf16 tensor at a time), not after
    stream = quantize_experts and quantization.quantize_experts_on_load and bool(num_experts)
    with quantize_experts_on_load(enabled=stream) as streaming:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)

    banks = streamed = 0
    if streaming:
        quantizer = getattr(model, "hf_quantizer", None)
        errors = getattr(quantizer, "stream_errors", None) or {}
        if errors:
            raise RuntimeError("load_model: quantizing MoE experts while loading failed: "
                               + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        streamed = len(getattr(quantizer, "streamed_banks", ()))
        leftover = float_expert_params(model)
        if leftover:
            warnings.warn(f"load_model: {len(leftover)} expert tensors (e.g. {leftover[0]}) were not quantized while "
                          "loading; quantizing them after loading", RuntimeWarning, stacklevel=2)
    if quantize_experts:
        banks = streamed + quantize_moe_experts(model, device=device, compute_dtype=compute_dtype,
                                                quant_type=quantization.quant_type,
                                                double_quant=quantization.double_quant)

    if gla and device.type != "cuda":
        swapped = use_reference_backend(model)  # fla's Triton kernels need a GPU
        notes.append(f"GLA on {device.type}: pure-PyTorch reference backend ({len(swapped)} modules swapped)")
    for p in model.parameters():
        p.requires_grad_(False)
    keep_cpu_4bit_layout(model)  # no repacking after an evaluation: one numeric path (trainkit.patches.bitsandbytes)
    # norms / embeddings / head stay in the compute dtype (no fp32 upcast); 4-bit weights and the NF4 expert
    # banks' quantization statistics (absmax, the double-quant code and offset) keep their own dtypes, as
    # bitsandbytes keeps Linear4bit's: in bf16 they would shift every dequantized expert weight
    bank_stats = {id(p) for m in model.modules() if isinstance(m, NF4ExpertBank) for p in m.parameters()}
    for p in model.parameters():
        if (p.is_floating_point() and p.dtype != compute_dtype and type(p).__name__ != "Params4bit"
                and id(p) not in bank_stats):
            p.data = p.data.to(compute_dtype)

    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode; checkpointing (apply_activation_checkpointing) acts only in train mode

    counts = count_parameters(model)
    non_emb = non_embedding_parameters(model)
    if load_4bit:
        summary = (f"4-bit base parameters: {counts['quantized_4bit']:,} of {counts['total']:,} "
                   f"({100 * counts['fraction_4bit']:.1f}%; {100 * counts['quantized_4bit'] / max(non_emb, 1):.1f}% "
                   f"of non-embedding parameters); compute dtype {dtype_name} ({dtype_reason})")
    else:
        summary = (f"base model {name} ({getattr(config, 'model_type', '?')}): {counts['total']:,} parameters in "
                   f"{dtype_name} ({dtype_reason}), frozen")
    info = {
        "name": name,
        "family": getattr(config, "model_type", type(model).__name__),
        "is_moe": bool(num_experts) or is_moe(model),
        "num_experts": num_experts,
        "top_k": top_k,
        "parameters": counts,
        "fraction_4bit": counts["fraction_4bit"],
        "non_embedding_parameters": non_emb,
        "quantized_expert_banks": banks,
        "experts_quantized_on_load": streamed,
        "load_in_4bit": load_4bit,
        "compute_dtype": dtype_name,
        "compute_dtype_reason": dtype_reason,
        "attn_implementation": None if gla else model_cfg.attn_implementation,
        "summary": summary,
        "notes": notes,
    }
    return model, info


def load_frozen_model(cfg: TrainConfig, device, tokenizer, dtype: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """A frozen model in eval mode (distill.py's teacher): hub id / local path, or random init from model.config.
    `dtype` "auto" is resolved for `device` (trainkit.runtime.resolve_dtype)."""
    from transformers import AutoModelForCausalLM

    dtype, dtype_reason = resolve_dtype(dtype, device)
    torch_dtype = DTYPES[dtype]
    source, name, common = model_source(cfg, tokenizer, torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map={"": torch.device(device)},
                                                 attn_implementation=cfg.model.attn_implementation, **common)
    model.requires_grad_(False)
    model.eval()
    total = sum(p.numel() for p in model.parameters())
    return model, {"name": name, "family": model.config.model_type, "parameters": {"total": total},
                   "dtype": dtype, "dtype_reason": dtype_reason,
                   "summary": f"{name} ({model.config.model_type}): {total:,} parameters in {dtype} ({dtype_reason}), frozen"}


def read_pretrained_weights(directory) -> dict:
    """The weights of a save_pretrained directory (single or sharded safetensors), on the CPU."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict = {}
    for name in files:
        state.update(load_file(directory / name, device="cpu"))
    return state


def weights_mismatch(model: nn.Module, directory, missing, unexpected) -> str | None:
    """The error for weights of `directory` that do not match `model`, or None; weights tied to others
    (save_pretrained leaves those out) may be missing."""
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied |= {k for k in missing if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        return f"{directory}: weights do not match the model (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
    return None


def load_weights_into(model: nn.Module, directory) -> None:
    """Load a save_pretrained directory into an existing model, strictly except for tied weights
    (under FSDP: trainkit.loop.load_sharded_weights)."""
    missing, unexpected = model.load_state_dict(read_pretrained_weights(directory), strict=False)
    error = weights_mismatch(model, directory, missing, unexpected)
    if error:
        raise RuntimeError(error)
