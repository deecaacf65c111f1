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

import math
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


def expert_weight(w, dtype: torch.dtype) -> torch.Tensor:
    """A frozen expert tensor in `dtype`: a 4-bit bank dequantized, or a float Parameter detached (no weight grad)."""
    return w.dequantize(dtype) if isinstance(w, NF4ExpertBank) else w.detach().to(dtype)


class _FrozenGroupedLinear(torch.autograd.Function):
    """y = grouped x @ W_e^T with W a frozen 4-bit bank (dequantized again in backward) or a frozen float
    Parameter: only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, offs, weight, transposed: bool):
        w = expert_weight(weight, x.dtype)        # (E, out, in), or (E, in, out) if transposed
        y = _grouped_mm(x, w if transposed else w.transpose(-2, -1), offs)
        ctx.weight, ctx.transposed = weight, transposed
        ctx.save_for_backward(offs)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (offs,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        w = expert_weight(ctx.weight, grad_y.dtype)
        grad_x = _grouped_mm(grad_y.contiguous(), w.transpose(-2, -1) if ctx.transposed else w, offs)
        return grad_x, None, None, None


def nf4_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for a transformers 5 `*Experts` module whose experts are 4-bit banks or frozen float
    Parameters (grouped GEMMs after sorting token/expert pairs by expert). Expert LoRA adapters
    (trainkit.expert_lora) whose wrapper is running around this call add their update per projection."""
    from trainkit.expert_lora import ExpertLoRA, scoped_expert_adapters
    from trainkit.fused_lora import without_autocast

    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape[0], hidden_states.shape[-1]
    dtype = hidden_states.dtype
    expert_ids = top_k_index.reshape(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    token_idx = perm // num_top_k
    x = hidden_states[token_idx]
    counts = torch.zeros(self.num_experts, dtype=torch.int64, device=expert_ids_g.device).scatter_add_(
        0, expert_ids_g.clamp(max=self.num_experts - 1), (expert_ids_g < self.num_experts).to(torch.int64))
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    transposed = bool(getattr(self, "is_transposed", False))
    has_gate = bool(getattr(self, "has_gate", True))
    has_bias = bool(getattr(self, "has_bias", False))
    adapters = scoped_expert_adapters(self)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up_bank, up_bias = getattr(self, up_name), getattr(self, f"{up_name}_bias", None)
    h = _FrozenGroupedLinear.apply(x, offs, up_bank, transposed)
    if up_name in adapters:
        x_in, no_autocast = without_autocast(hidden_states)
        with no_autocast:
            h = ExpertLoRA.apply(h, x_in, token_idx, offs, *adapters[up_name])
    if has_bias and up_bias is not None:
        h = h + up_bias[expert_ids_g].to(h.dtype)
    if has_gate:
        h = self._apply_gate(h) if hasattr(self, "_apply_gate") else _default_gate(self, h)
    else:
        h = self.act_fn(h)
    out = _FrozenGroupedLinear.apply(h, offs, self.down_proj, transposed)
    if "down_proj" in adapters:
        h_in, no_autocast = without_autocast(h)
        with no_autocast:
            out = ExpertLoRA.apply(out, h_in, None, offs, *adapters["down_proj"])
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


def install_bank(module: nn.Module, name: str, bank: NF4ExpertBank) -> None:
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
    ``trainkit.patches.transformers.quantize_experts_on_load``, are switched too). Returns the number of banks
    quantized by this call.
    """
    from trainkit.patches.transformers import use_4bit_experts_forward

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
            install_bank(module, pn, bank)
            n += 1
        use_4bit_experts_forward(module)
        if names and device is not None and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return n


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


def _quant_state_bytes(qs) -> int:
    tensors = [getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None)]
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        tensors += [s2.absmax, s2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes this process holds for the frozen base weights (4-bit data + quantization statistics + the rest).
    Under FSDP: its shards (a DTensor's local part), plus the Linear4bit statistics every process keeps."""
    total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        local = getattr(p, "_local_tensor", p)
        total += local.numel() * local.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += _quant_state_bytes(qs)
    for module in model.modules():  # weights made plain for FSDP (patches.bitsandbytes) keep them on the layer
        qs = getattr(module, "quant_state", None)
        if qs is not None and getattr(getattr(module, "weight", None), "quant_state", None) is None:
            total += _quant_state_bytes(qs)
    return total


def bf16_weight_bytes(model: nn.Module) -> int:
    """What the frozen base weights would take in bf16 (2 bytes per original element)."""
    c = count_parameters(model)
    return 2 * (c["total"] - c["trainable"])


def refuse_4bit_under_zero3(accelerator, load_in_4bit: bool) -> None:
    """A 4-bit base under DeepSpeed ZeRO-3: ConfigError. ZeRO-3 flattens every parameter into its own bf16/fp32
    partitions; the packed 4-bit bytes (uint8) and the NF4 expert banks' statistics are not such parameters, and
    their quantization statistics live outside what it gathers. FSDP shards the 4-bit base instead."""
    from trainkit.loop import is_zero3

    if load_in_4bit and is_zero3(accelerator):
        from trainkit.config import ConfigError
        raise ConfigError("quantization.load_in_4bit: DeepSpeed ZeRO-3 cannot shard 4-bit weights; use "
                          "--accelerate-config fsdp (shards the 4-bit base, NF4 experts included), or ZeRO-3 with "
                          "quantization.load_in_4bit=false (bf16 LoRA)")
