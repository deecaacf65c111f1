"""4-bit loading, expert quantization, parameter counts, LoRA presets, checkpointing (CPU, real)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_fixtures import batch, load
from trainkit.adapters import apply_lora, load_adapter, resolve_target_modules
from trainkit.config import ConfigError
from trainkit.config.base import LoraSection
from trainkit.models import apply_activation_checkpointing, is_moe
from trainkit.quantization import (NF4ExpertBank, base_weight_bytes, bf16_weight_bytes, count_parameters,
                                   non_embedding_parameters)

MOE = ["mixtral", "qwen3_moe", "glm4_moe"]
LORA = LoraSection(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module", params=MOE)
def pair(request):
    """(family, 4-bit model, bf16 reference with the same random weights)."""
    q, info = load(request.param)
    ref, _ = load(request.param, load_in_4bit=False)
    return request.param, q, info, ref


def expected_4bit(ref: nn.Module) -> int:
    """Elements that must be 4-bit: every Linear weight except lm_head and gates, and every expert bank."""
    n = 0
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] not in ("lm_head", "gate", "shared_expert_gate"):
            n += mod.weight.numel()
        if type(mod).__name__.endswith("Experts"):
            n += sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() == 3)
    return n


def test_every_expert_weight_is_4bit(pair):
    family, q, info, ref = pair
    assert info["is_moe"] and is_moe(q) and info["num_experts"] == 4 and info["top_k"] == 2
    assert not [n for n, p in q.named_parameters() if p.is_floating_point() and p.dim() == 3]
    banks = [m for m in q.modules() if isinstance(m, NF4ExpertBank)]
    n_moe_layers = sum(1 for m in ref.modules() if type(m).__name__.endswith("Experts"))
    assert len(banks) == 2 * n_moe_layers == info["quantized_expert_banks"]
    assert all(b.packed.dtype == torch.uint8 and b.double_quant for b in banks)
    lin4 = [m for m in q.modules() if type(m).__name__ == "Linear4bit"]
    assert lin4 and all(m.weight.quant_state.nested for m in lin4)   # double quant on the Linears too


def test_count_parameters_exact(pair):
    family, q, info, ref = pair
    counts = count_parameters(q)
    assert counts["total"] == sum(p.numel() for p in ref.parameters())     # original element counts
    assert counts["quantized_4bit"] == expected_4bit(ref)
    assert counts["trainable"] == 0
    assert info["parameters"] == counts
    # everything but norms and router weights is 4-bit: > 0.9 of the non-embedding parameters
    assert counts["quantized_4bit"] / non_embedding_parameters(q) > 0.9
    assert "4-bit base parameters: " in info["summary"]
    # the base weights take well under 0.4x their bf16 size (embeddings excluded from neither)
    assert base_weight_bytes(q) < 0.5 * bf16_weight_bytes(q)


def test_logits_close_to_bf16(pair):
    family, q, info, ref = pair
    b = batch(1)
    q.eval(), ref.eval()
    with torch.no_grad():
        lq, lr = q(**b).logits.float(), ref(**b).logits.float()
    q.train()
    assert torch.isfinite(lq).all()
    rel = ((lq - lr).norm() / lr.norm()).item()
    cos = torch.nn.functional.cosine_similarity(lq.flatten(), lr.flatten(), dim=0).item()
    assert rel < 0.2 and cos > 0.98, (rel, cos)   # NF4 noise on random weights: measured rel ~0.10-0.12


def test_bank_matches_bitsandbytes_and_eager_loop():
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    w = torch.randn(4, 96, 64, dtype=torch.bfloat16)
    bank = NF4ExpertBank.from_weight(w)
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = F.dequantize_4bit(q, state)
    assert torch.equal(bank.dequantize(), ref)                      # same format as Linear4bit
    for e in range(4):
        assert torch.equal(bank[e], ref[e]) and torch.equal(bank[torch.tensor(e)], ref[e])
    assert bank.shape == w.shape and bank.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in bank.parameters())
    moved = bank.to("meta")
    assert moved.packed.device.type == "meta"


def test_nf4_grouped_forward_matches_eager_loop():
    family_model, _ = load("mixtral")
    experts = family_model.model.layers[0].mlp.experts
    torch.manual_seed(1)
    x = torch.randn(10, 64, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    wts = torch.rand(10, 2, dtype=torch.bfloat16)
    fast = experts(x, idx, wts)
    # the class's original eager loop indexes bank[expert_idx]
    experts.config._experts_implementation = "eager"
    eager = type(experts).forward(experts, x, idx, wts)
    assert torch.allclose(fast.float(), eager.float(), atol=2e-2, rtol=2e-2)
    gx, = torch.autograd.grad(fast.float().sum(), x)
    gx_e, = torch.autograd.grad(eager.float().sum(), x)
    assert torch.isfinite(gx).all() and torch.allclose(gx.float(), gx_e.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("family", MOE)
def test_lora_forward_backward_and_checkpointing(family):
    model, _ = load(family)
    assert model.training and model.config.use_cache is False
    peft_model = apply_lora(model, LORA)
    record = apply_activation_checkpointing(peft_model, True, device="cpu", tokens=48, trainable=[])
    assert record["policy"] == "true" and record["layers"] == record["of"] == 2 and record["budget_gib"] is None
    info = peft_model.trainkit_lora_info
    assert info["trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
    layers = peft_model.get_base_model().model.layers
    recomputed = []
    for i, layer in enumerate(layers):   # the layer's own __call__ is the checkpointed call; hook a child
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: recomputed.append(i) if torch._C._current_graph_task_id() != -1 else None,
            with_kwargs=True)
    out = peft_model(**batch(2))
    assert out.aux_loss is None or torch.isfinite(out.aux_loss)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # gradient checkpointing really acts: every decoder layer ran again inside backward
    assert sorted(recomputed) == list(range(len(layers)))
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)   # B gets gradient first
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)


def test_no_checkpointing_when_disabled():
    model, _ = load("mixtral")
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a, k: seen.append(torch._C._current_graph_task_id()),
                                                          with_kwargs=True)
    peft_model = apply_lora(model, LORA)
    record = apply_activation_checkpointing(peft_model, False, device="cpu", tokens=48, trainable=[])
    assert record["policy"] == "false" and record["layers"] == 0 and record["of"] == 2
    peft_model(**batch()).loss.backward()
    assert seen == [-1]


def test_presets_and_user_targets():
    glm, _ = load("glm4_moe")
    names = resolve_target_modules(glm, "auto")
    assert "model.layers.0.mlp.gate_proj" in names                 # dense first layer
    assert "model.layers.1.mlp.shared_experts.down_proj" in names  # shared expert
    assert not [n for n in names if ".experts." in n or n.endswith(("lm_head", ".gate"))]
    mix, _ = load("mixtral")
    assert {n.rsplit(".", 1)[-1] for n in resolve_target_modules(mix, "auto")} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(ConfigError, match=r"lora\.target_modules: 'w1' matches no linear.*available: .*q_proj"):
        resolve_target_modules(mix, ["q_proj", "w1"])
    assert len(resolve_target_modules(mix, ["o_proj"])) == 2
    dense, _ = load("llama")
    assert not is_moe(dense)
    assert len(resolve_target_modules(dense, "auto")) == 2 * 7


@pytest.mark.parametrize("family,variant", [("mixtral", "lora"), ("glm4_moe", "dora"), ("qwen3_moe", "rslora")])
def test_peft_save_load_round_trip(tmp_path, family, variant):
    from peft import PeftModel
    model, _ = load(family)
    peft_model = apply_lora(model, LORA.model_copy(update={"variant": variant}))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**batch(3)).loss.backward()
    opt.step()
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    saved = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    fresh, _ = load(family)
    if family == "mixtral":
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")   # plain PEFT API
    else:
        loaded = load_adapter(fresh, tmp_path / "adapter")
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert saved.keys() == got.keys() and saved
    assert all(torch.equal(saved[k], got[k]) for k in saved)
    peft_model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(**batch(4)).logits, loaded(**batch(4)).logits)


def test_quantize_moe_experts_applies_only_with_load_in_4bit():
    """quantization.quantize_moe_experts (default true) was silently ignored without load_in_4bit: the
    experts stay in the compute dtype like every other weight, and load_model says so."""
    model, info = load("mixtral", load_in_4bit=False)
    assert info["quantized_expert_banks"] == 0 and not any(isinstance(m, NF4ExpertBank) for m in model.modules())
    assert any("quantize_moe_experts applies only with load_in_4bit" in note for note in info["notes"])
    _, info = load("mixtral")
    assert not any("quantize_moe_experts" in note for note in info["notes"])
