"""The LoRA update as one autograd function: bf16 compute over fp32 master adapter weights.

PEFT's LoRA ``Linear.forward`` (with its default ``autocast_adapter_dtype=True``) keeps A and B in
fp32 and casts each adapted layer's input to fp32, then runs ``B(A(dropout(x))) * scaling`` and adds
it to the base output, and casts the sum back: six autograd nodes per adapted layer, three of them
memory-bound passes over fp32 activations, and two GEMMs that miss the tensor cores. On an H200 a GLA
LoRA step spent 98 ms of 319 ms of kernel time in those casts and copies (DESIGN.md).

``LoRAUpdate.apply(result, x, lora_a, lora_b, scaling)`` computes

    result + scaling * (x @ A^T) @ B^T

in the dtype of ``x`` (the base's compute dtype: bf16 on GPUs), with one GEMM for ``x @ A^T`` and one
``addmm`` that multiplies by B and adds the base output together. Only the rank-r copies of A and
scaling * B are cast (not the activations), once per optimizer step (``compute_copies``: a step is host-
bound on small models, and every cast is a kernel launch); A and B stay fp32 parameters, so AdamW
updates fp32 master weights and their gradients arrive in fp32. The backward is written out: four
GEMMs (dA, dB and the input's share) and two casts, instead of autograd's node-by-node walk. Saved for
backward: ``x`` in the compute dtype (PEFT saves it in fp32, twice the bytes) and the rank-r product
``x @ A^T``.

The base layer (``nn.Linear``, bitsandbytes ``Linear4bit``, ...) runs unchanged before it; dropout is
PEFT's own module, applied before (``x`` here is the dropped input). Which PEFT layers take this path
is decided in ``trainkit.patches.peft.use_fused_lora_forward`` (plain LoRA and rsLoRA; DoRA, merged or
mixed-adapter batches keep PEFT's forward).
"""

from __future__ import annotations

import contextlib

import torch


class LoRAUpdate(torch.autograd.Function):
    """result + (x a^T) b^T with a = A and b = scaling * B in x's dtype (see compute_copies); gradients for
    result, x and the fp32 masters A and B."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        compute = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()                             # [N, r]
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(compute), xa, b.t())
        ctx.save_for_backward(x2, xa, a, b)
        ctx.scaling = scaling
        ctx.master_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.x_shape = x.shape
        return out.view(*result.shape[:-1], out.shape[-1]).to(result.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, xa, a, b = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        grad_result = grad_out if ctx.needs_input_grad[0] else None
        grad_x = grad_a = grad_b = None
        dy_b = dy @ b                                # [N, r], scaled by s (b is)
        if ctx.needs_input_grad[1]:
            grad_x = (dy_b @ a).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_a = (dy_b.t() @ x2).to(ctx.master_dtypes[0])
        if ctx.needs_input_grad[3]:
            # s * dy^T xa in one GEMM: with beta=0 addmm ignores its first argument (a 0-dim placeholder)
            grad_b = torch.addmm(dy.new_empty(()), dy.t(), xa, beta=0, alpha=ctx.scaling).to(ctx.master_dtypes[1])
        return grad_result, grad_x, grad_a, grad_b, None, None, None


def compute_copies(cache: dict, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and scaling * B in the compute dtype, detached, kept in `cache` (one per layer) until either master
    changes: the optimizer updates them in place, which bumps their version counters, so a step computes each
    copy once (and not again in every micro batch or in checkpointing's recompute)."""
    if torch.is_inference_mode_enabled():  # inference tensors could not be saved for a later backward: no caching
        return lora_a.to(dtype), (lora_b * scaling).to(dtype)
    key = (lora_a._version, lora_b._version, lora_a.data_ptr(), lora_b.data_ptr(), dtype, scaling)
    if cache.get("key") != key:
        with torch.no_grad():
            cache["copies"] = (lora_a.to(dtype, copy=True), (lora_b * scaling).to(dtype))
        cache["key"] = key
    return cache["copies"]


def without_autocast(x: torch.Tensor):
    """(x, context) for a function that computes in its input's dtype with its backward written out: under autocast
    x cast to autocast's dtype and a context that turns autocast off, else x and a null context. Autocast would
    otherwise change the dtype of the forward's matmuls only (fp32 inputs under bf16 mixed precision: a bf16
    product saved for a backward that runs in fp32)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, contextlib.nullcontext()
    return x.to(torch.get_autocast_dtype(device)), torch.autocast(device, enabled=False)


def lora_update(result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, cache: dict | None = None) -> torch.Tensor:
    """``result + scaling * (x @ lora_a.T) @ lora_b.T`` in x's dtype (under autocast: autocast's dtype; see
    LoRAUpdate); `cache`: a dict kept with the layer for compute_copies (None: cast on every call)."""
    x, no_autocast = without_autocast(x)
    a, b = compute_copies({} if cache is None else cache, lora_a, lora_b, float(scaling), x.dtype)
    with no_autocast:
        return LoRAUpdate.apply(result, x, lora_a, lora_b, float(scaling), a, b)
