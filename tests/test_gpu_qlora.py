"""The 4-bit MoE path on CUDA with the bitsandbytes kernels (run on a GPU machine: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "glm4_moe"])
def test_cuda_4bit_moe_lora_step(family):
    from moe_fixtures import batch, load
    from trainkit.adapters import apply_lora
    from trainkit.config.base import LoraSection
    from trainkit.moe import RouterStats
    from trainkit.quantization import NF4ExpertBank, count_parameters

    model, info = load(family, device="cuda")
    cpu_model, cpu_info = load(family, device="cpu")
    assert info["parameters"] == cpu_info["parameters"]
    banks = [m for m in model.modules() if isinstance(m, NF4ExpertBank)]
    assert banks and all(b.packed.device.type == "cuda" for b in banks)
    # same random weights, same NF4 format on both devices
    cpu_banks = [m for m in cpu_model.modules() if isinstance(m, NF4ExpertBank)]
    for b, c in zip(banks, cpu_banks):
        assert torch.allclose(b.dequantize().float().cpu(), c.dequantize().float(), atol=1e-2, rtol=1e-2)
    peft_model = apply_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))
    stats = RouterStats(peft_model)
    b = batch(1, device="cuda")
    out = peft_model(**b)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    snap = stats.snapshot()
    assert all(sum(l["tokens_per_expert"]) == b["input_ids"].numel() * 2 for l in snap["layers"])
    assert count_parameters(peft_model)["quantized_4bit"] == info["parameters"]["quantized_4bit"]


def test_cuda_grouped_forward_matches_eager_loop():
    from moe_fixtures import load
    model, _ = load("mixtral", device="cuda")
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(0)
    x = torch.randn(64, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(64)]).cuda()
    w = torch.rand(64, 2, dtype=torch.bfloat16, device="cuda")
    fast = experts(x, idx, w)
    experts.config._experts_implementation = "eager"
    eager = type(experts).forward(experts, x, idx, w)
    assert torch.allclose(fast.float(), eager.float(), atol=3e-2, rtol=3e-2)
    g1, = torch.autograd.grad(fast.float().sum(), x)
    g2, = torch.autograd.grad(eager.float().sum(), x)
    assert torch.allclose(g1.float(), g2.float(), atol=5e-2, rtol=5e-2)


def test_bank_moves_between_devices():
    from trainkit.quantization import NF4ExpertBank
    w = torch.randn(3, 128, 64, dtype=torch.bfloat16)
    bank = NF4ExpertBank.from_weight(w, device="cuda")       # expert by expert onto the GPU
    ref = bank.dequantize().cpu()
    cpu = bank.to("cpu")
    assert cpu.packed.device.type == "cpu" and torch.equal(cpu.dequantize(), ref)
    back = cpu.cuda()
    assert torch.equal(back[1].cpu(), ref[1])
