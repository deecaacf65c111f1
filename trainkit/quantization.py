"""NF4 quantization of fused MoE expert tensors, and 4-bit parameter accounting.

transformers 5 stores the experts of a MoE layer as fused 3-D tensors
(``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) inside a module whose class name
ends with ``Experts``. bitsandbytes only replaces ``nn.Linear``, so a "QLoRA" MoE model
keeps its experts, most of its weights, in bf16. ``quantize_moe_experts`` replaces each
such 3-D Parameter with an :class:`NF4ExpertBank`: the same NF4 + double-quant format as
``bnb.nn.Linear4bit`` (blocks of 64, absmax quantized to 8 bit in blocks of 256),
quantized expert by expert on the target device, the bf16 tensor freed as it goes.

At run time the experts module gets a forward (``nf4_experts_forward``) that sorts the
token/expert pairs, dequantizes the layer's bank once into the compute dtype and runs one
grouped GEMM per projection (``torch.nn.functional.grouped_mm`` where available, a
per-expert loop otherwise). The dequantized weights are never saved for backward: the
autograd function dequantizes again in backward (as bitsandbytes' ``MatMul4Bit`` does),
so memory stays at the 4-bit bank plus one layer's transient. ``bank[expert_idx]``
dequantizes one expert, so a model's original eager expert loop also works unchanged.

The bank's tensors are frozen ``nn.Parameter``s (not buffers: DDP broadcasts buffers on
every forward), so they move with ``.to()/.cuda()``, are ignored by optimizers and
gradient reduction, and are never part of a PEFT adapter state dict.
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from typing import Iterator

import torch
from torch import nn

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
BANK_MARKER = "_trainkit_nf4_bank"


def _bnb():
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    import bitsandbytes.functional as bnbF
    return bnbF


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class NF4ExpertBank(nn.Module):
    """A (E, out, in) expert weight bank stored in 4 bit (NF4/FP4, optional double quant).

    ``bank[e]`` -> (out, in) tensor in ``compute_dtype``; ``bank.dequantize()`` -> the whole
    (E, out, in) bank. ``bank.shape`` / ``bank.dtype`` mimic the replaced Parameter.
    """

    def __init__(self, shape, compute_dtype, quant_type, double_quant, packed, absmax=None,
                 qabsmax=None, absmax2=None, code2=None, offset=None, blocksize=BLOCKSIZE):
        super().__init__()
        self.shape = torch.Size(shape)
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.blocksize = blocksize
        self.packed = _frozen(packed)
        if double_quant:
            self.qabsmax = _frozen(qabsmax)
            self.absmax2 = _frozen(absmax2)
            self.code2 = _frozen(code2)
            self.offset = _frozen(offset.reshape(1).float())
        else:
            self.absmax = _frozen(absmax)

    # --- Parameter look-alike -------------------------------------------------------
    @property
    def dtype(self):
        return self.compute_dtype

    @property
    def device(self):
        return self.packed.device

    def dim(self):
        return len(self.shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def __len__(self):
        return self.shape[0]

    def numel(self):
        return math.prod(self.shape)

    def extra_repr(self):
        dq = ", double_quant" if self.double_quant else ""
        return f"{tuple(self.shape)}, {self.quant_type}{dq}, compute_dtype={self.compute_dtype}"

    # --- dequantization ---------------------------------------------------------------
    def _absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax.float()
        bnbF = _bnb()
        absmax = bnbF.dequantize_blockwise(self.qabsmax, absmax=self.absmax2.float(), code=self.code2.float(),
                                           blocksize=NESTED_BLOCKSIZE)
        return absmax.float() + self.offset.float()

    def _dequant(self, packed, absmax, shape, dtype):
        _bnb()
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, self.blocksize, self.quant_type,
                                                               list(shape), dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole bank, (E, out, in), in `dtype` (default: the compute dtype)."""
        return self._dequant(self.packed.reshape(-1), self._absmax(), self.shape, dtype or self.compute_dtype)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            if idx.numel() != 1:
                return self.dequantize()[idx]
            idx = int(idx.item())
        if not isinstance(idx, int):
            return self.dequantize()[idx]
        num = self.shape[0]
        idx = idx + num if idx < 0 else idx
        per = math.prod(self.shape[1:])
        blocks = per // self.blocksize
        absmax = self._absmax()[idx * blocks:(idx + 1) * blocks]
        return self._dequant(self.packed[idx].reshape(-1), absmax, self.shape[1:], self.compute_dtype)

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))

    # --- construction -----------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, device=None, compute_dtype=torch.bfloat16, quant_type="nf4",
                    double_quant=True) -> "NF4ExpertBank":
        """Quantize a (E, out, in) tensor expert by expert on `device` (default: its own).

        Only one expert is ever copied to `device` in high precision, so the bank may live
        on the CPU (or be memory-mapped) while the 4-bit result lands on the GPU.
        """
        bnbF = _bnb()
        if weight.dim() != 3:
            raise ValueError(f"expected a 3-D expert bank, got shape {tuple(weight.shape)}")
        device = torch.device(device) if device is not None else weight.device
        num, out_f, in_f = weight.shape
        per = out_f * in_f
        if per % BLOCKSIZE != 0:
            raise ValueError(f"expert size {out_f}x{in_f} is not a multiple of the 4-bit block size {BLOCKSIZE}")
        packed = torch.empty(num, per // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(num * (per // BLOCKSIZE), dtype=torch.float32, device=device)
        blocks = per // BLOCKSIZE
        for e in range(num):
            w = weight[e].to(device=device)
            if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                w = w.float()
            q, a = torch.ops.bitsandbytes.quantize_4bit.default(w.contiguous(), BLOCKSIZE, quant_type, torch.uint8)
            packed[e].copy_(q.reshape(-1))
            absmax[e * blocks:(e + 1) * blocks].copy_(a.reshape(-1).float())
            del w, q, a
        if double_quant:
            offset = absmax.mean()
            qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
            return cls((num, out_f, in_f), compute_dtype, quant_type, True, packed, qabsmax=qabsmax,
                       absmax2=state2.absmax.float(), code2=state2.code.float(), offset=offset)
        return cls((num, out_f, in_f), compute_dtype, quant_type, False, packed, absmax=absmax)


# ----------------------------------------------------------------------------------------
# grouped GEMM on a 4-bit bank
# ----------------------------------------------------------------------------------------

def _grouped_mm_ok(x: torch.Tensor) -> bool:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None or x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and _torch_at_least(2, 11)


def _torch_at_least(major, minor) -> bool:
    try:
        v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return v >= (major, minor)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(S, K) rows grouped by `offs` (cumulative, int32) @ w (E, K, N) -> (S, N)."""
    if _grouped_mm_ok(x):
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        return fn(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync per call
        if end > start:
            torch.mm(x[start:end], w[e].to(x.dtype), out=out[start:end])
        start = end
    return out


class _NF4GroupedLinear(torch.autograd.Function):
    """y = grouped x @ W_e^T with W a frozen 4-bit bank; dequantized again in backward."""

    @staticmethod
    def forward(ctx, x, offs, bank: NF4ExpertBank, transposed: bool):
        w = bank.dequantize(x.dtype)               # (E, out, in), or (E, in, out) if transposed
        y = _grouped_mm(x, w if transposed else w.transpose(-2, -1), offs)
        ctx.bank, ctx.transposed = bank, transposed
        ctx.save_for_backward(offs)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (offs,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        w = ctx.bank.dequantize(grad_y.dtype)
        grad_x = _grouped_mm(grad_y.contiguous(), w.transpose(-2, -1) if ctx.transposed else w, offs)
        return grad_x, None, None, None


def nf4_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for a transformers 5 `*Experts` module whose banks are 4-bit."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape[0], hidden_states.shape[-1]
    dtype = hidden_states.dtype
    expert_ids = top_k_index.reshape(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden_states[perm // num_top_k]
    counts = torch.zeros(self.num_experts, dtype=torch.int64, device=expert_ids_g.device).scatter_add_(
        0, expert_ids_g.clamp(max=self.num_experts - 1), (expert_ids_g < self.num_experts).to(torch.int64))
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    transposed = bool(getattr(self, "is_transposed", False))
    has_gate = bool(getattr(self, "has_gate", True))
    has_bias = bool(getattr(self, "has_bias", False))
    if has_gate:
        up_bank, up_bias = self.gate_up_proj, getattr(self, "gate_up_proj_bias", None)
    else:
        up_bank, up_bias = self.up_proj, getattr(self, "up_proj_bias", None)
    h = _NF4GroupedLinear.apply(x, offs, up_bank, transposed)
    if has_bias and up_bias is not None:
        h = h + up_bias[expert_ids_g].to(h.dtype)
    if has_gate:
        h = self._apply_gate(h) if hasattr(self, "_apply_gate") else _default_gate(self, h)
    else:
        h = self.act_fn(h)
    out = _NF4GroupedLinear.apply(h, offs, self.down_proj, transposed)
    down_bias = getattr(self, "down_proj_bias", None)
    if has_bias and down_bias is not None:
        out = out + down_bias[expert_ids_g].to(out.dtype)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    weighted = out * sample_weights[perm].unsqueeze(-1).to(out.dtype)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    weighted = weighted[inv_perm]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(dtype)


def _default_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


# ----------------------------------------------------------------------------------------
# model-level helpers
# ----------------------------------------------------------------------------------------

def iter_expert_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules holding fused expert banks: class name ends with 'Experts' and has a 3-D param or bank."""
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Experts"):
            continue
        has_bank = any(isinstance(m, NF4ExpertBank) for m in module.children())
        has_3d = any(p.dim() == 3 for p in module.parameters(recurse=False))
        if has_bank or has_3d:
            yield name, module


_KNOWN_BANKS = ({"gate_up_proj", "down_proj"}, {"up_proj", "down_proj"})


def _finalize_expert_module(module: nn.Module) -> None:
    """Switch an `*Experts` module whose banks are 4-bit to the grouped 4-bit forward."""
    banks = {pn for pn, c in module.named_children() if isinstance(c, NF4ExpertBank)}
    if not banks:
        return
    if any(known <= banks for known in _KNOWN_BANKS) and hasattr(module, "num_experts"):
        module.forward = types.MethodType(nf4_experts_forward, module)
    elif hasattr(module, "config") and hasattr(module.config, "_experts_implementation"):
        # unknown layout: the model's own eager loop indexes bank[expert_idx]
        try:
            module.config._experts_implementation = "eager"
        except Exception:  # pragma: no cover - config refuses the attribute
            pass
    setattr(module, BANK_MARKER, True)


def _install_bank(module: nn.Module, name: str, bank: NF4ExpertBank) -> None:
    delattr(module, name)          # drops the Parameter (and its high-precision storage)
    setattr(module, name, bank)


def float_expert_params(model: nn.Module) -> list[str]:
    """Qualified names of the 3-D float (not yet quantized) Parameters of `*Experts` modules."""
    return [f"{mn}.{pn}" if mn else pn for mn, module in iter_expert_modules(model)
            for pn, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]


@torch.no_grad()
def quantize_moe_experts(model: nn.Module, device=None, compute_dtype=torch.bfloat16, quant_type: str = "nf4",
                         double_quant: bool = True) -> int:
    """Replace every 3-D float Parameter of every `*Experts` module by an NF4ExpertBank.

    Quantizes expert by expert on `device` (default: where the bank lies), frees the
    high-precision tensor before the next bank, and switches the module to the 4-bit
    grouped forward (modules already holding banks, e.g. quantized while loading by
    :func:`quantize_experts_on_load`, are switched too). Returns the number of banks
    quantized by this call.
    """
    n = 0
    for _, module in list(iter_expert_modules(model)):
        names = [pn for pn, p in module.named_parameters(recurse=False)
                 if p.dim() == 3 and p.is_floating_point()]
        for pn in names:
            weight = getattr(module, pn)
            target = device if device is not None else weight.device
            bank = NF4ExpertBank.from_weight(weight.data, device=target, compute_dtype=compute_dtype,
                                             quant_type=quant_type, double_quant=double_quant)
            del weight
            _install_bank(module, pn, bank)
            n += 1
        _finalize_expert_module(module)
        if names and device is not None and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return n


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
            bank = NF4ExpertBank.from_weight(value, device=value.device, compute_dtype=qc.bnb_4bit_compute_dtype,
                                             quant_type=qc.bnb_4bit_quant_type,
                                             double_quant=bool(qc.bnb_4bit_use_double_quant))
            bank._is_hf_initialized = True          # transformers' init functions skip it
            for p in bank.parameters():
                p._is_hf_initialized = True
            _install_bank(module, pn, bank)
            self.streamed_banks.append(name)
            if not any(p.dim() == 3 and p.is_floating_point() for p in module.parameters(recurse=False)):
                _finalize_expert_module(module)

        def _process_model_after_weight_loading(self, model, **kwargs):
            model = super()._process_model_after_weight_loading(model, **kwargs)
            for _, module in iter_expert_modules(model):
                _finalize_expert_module(module)
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
        warnings.warn(f"MoE experts cannot be quantized while loading: {reason}. Falling back to quantizing "
                      "them after loading: every expert is first loaded in bf16 onto the device "
                      "(a 100B MoE needs ~200 GB there).", RuntimeWarning, stacklevel=3)
        yield False
        return
    from transformers.quantizers import auto
    mapping = auto.AUTO_QUANTIZER_MAPPING
    previous = mapping["bitsandbytes_4bit"]
    mapping["bitsandbytes_4bit"] = cls
    try:
        yield True
    finally:
        mapping["bitsandbytes_4bit"] = previous


def _params4bit_numel(p) -> int | None:
    qs = getattr(p, "quant_state", None)
    if type(p).__name__ == "Params4bit" and qs is not None and getattr(qs, "shape", None) is not None:
        return math.prod(qs.shape)
    return None


def count_parameters(model: nn.Module) -> dict:
    """Parameter counts with 4-bit tensors counted at their ORIGINAL element count.

    total: all parameters of the model (base + adapters), quantized_4bit: elements stored
    in 4 bit (Linear4bit weights and expert banks), trainable: requires_grad elements,
    fraction_4bit: quantized_4bit / total.
    """
    total = quantized = trainable = 0
    bank_param_ids = set()
    for module in model.modules():
        if isinstance(module, NF4ExpertBank):
            n = module.numel()
            total += n
            quantized += n
            bank_param_ids.update(id(p) for p in module.parameters(recurse=False))
    seen = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in bank_param_ids:
            continue
        seen.add(id(p))
        n4 = _params4bit_numel(p)
        if n4 is not None:
            total += n4
            quantized += n4
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"total": total, "quantized_4bit": quantized, "trainable": trainable,
            "fraction_4bit": quantized / total if total else 0.0}


def non_embedding_parameters(model: nn.Module) -> int:
    """Original element count of every parameter outside input embeddings and the output head."""
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, getter, lambda: None)()
        if mod is not None:
            skip.update(id(p) for p in mod.parameters())
    counts = count_parameters(model)["total"]
    for p in {id(p): p for p in model.parameters() if id(p) in skip}.values():
        counts -= _params4bit_numel(p) or p.numel()
    return counts


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the frozen base weights (4-bit data + quantization statistics + the rest)."""
    total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                for t in (s2.absmax, s2.code):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
    return total


def bf16_weight_bytes(model: nn.Module) -> int:
    """What the frozen base weights would take in bf16 (2 bytes per original element)."""
    c = count_parameters(model)
    return 2 * (c["total"] - c["trainable"])
