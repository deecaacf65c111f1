"""The fused LoRA forward (trainkit.fused_lora via trainkit.patches.peft) against PEFT's own forward:
the same loss and the same gradients for every adapter tensor, on real tiny models (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moe_fixtures import batch, load, loss_and_grads
from trainkit.adapters import apply_lora
from trainkit.config.base import LoraSection
from trainkit.fused_lora import lora_update
from trainkit.patches import applied
from trainkit.patches.peft import use_fused_lora_forward


def _random_b(model):
    """PEFT starts B at zero, which would leave A without a gradient: give B values."""
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)


def _pair(family, lora: LoraSection, dtype=None, **load_kw):
    """(PEFT forward, fused forward) copies of one adapted tiny model."""
    model, _ = load(family, **load_kw)
    if dtype is not None:
        model.to(dtype)
    plain = apply_lora(model, lora.model_copy(update={"fused_forward": False}))
    _random_b(plain)
    fused = copy.deepcopy(plain)
    assert use_fused_lora_forward(fused) == plain.trainkit_lora_info["num_targets"]
    return plain, fused


def _assert_same(plain, fused, inputs, atol, rtol):
    loss_p, grads_p = loss_and_grads(plain, inputs)
    loss_f, grads_f = loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss_f, loss_p, atol=atol, rtol=rtol)
    assert grads_p.keys() == grads_f.keys() and any("lora_A" in n for n in grads_p)
    for name in grads_p:
        assert grads_f[name].dtype == torch.float32, name  # fp32 master weights get fp32 gradients
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def test_lora_update_matches_the_formula_and_its_gradients():
    torch.manual_seed(0)
    result = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    out = lora_update(result, x, a, b, 0.7)
    torch.testing.assert_close(out, result + 0.7 * (x @ a.t()) @ b.t())
    assert torch.autograd.gradcheck(lambda r, x, a, b: lora_update(r, x, a, b, 0.7), (result, x, a, b))


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_fused_forward_equals_peft_fp32(variant):
    plain, fused = _pair("llama", LoraSection(r=4, alpha=8, dropout=0.0, variant=variant), dtype=torch.float32,
                         load_in_4bit=False)
    _assert_same(plain, fused, batch(), atol=1e-5, rtol=1e-4)
    assert any(p["name"] == "peft.fused_lora_forward" for p in applied())


def test_fused_forward_equals_peft_with_dropout():
    """Dropout is PEFT's own module in both paths: the same masks from the same seed."""
    plain, fused = _pair("llama", LoraSection(r=4, alpha=8, dropout=0.3), dtype=torch.float32, load_in_4bit=False)
    inputs = batch()
    torch.manual_seed(1)
    loss_p, grads_p = loss_and_grads(plain, inputs)
    torch.manual_seed(1)
    loss_f, grads_f = loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-5, rtol=1e-4)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-5, rtol=1e-4)


def test_cast_copies_follow_optimizer_steps_and_loaded_state():
    """The compute copies of A and scaling*B are made once per step: after AdamW steps both paths, and after
    an adapter state is loaded into both, the fused path still computes PEFT's loss (no stale copy), and
    within a step the copy is reused, not recast."""
    plain, fused = _pair("llama", LoraSection(r=4, alpha=8, dropout=0.0), dtype=torch.bfloat16, load_in_4bit=False)
    inputs = batch()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, fused)]
    for _ in range(2):
        _assert_same(plain, fused, inputs, atol=2e-2, rtol=5e-2)
        for opt in opts:
            opt.step()
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    loss_and_grads(fused, inputs)
    copies = layer._trainkit_compute_copies["default"]["copies"]
    loss_and_grads(fused, inputs)
    assert layer._trainkit_compute_copies["default"]["copies"] is copies  # same step: reused
    state = {k: v + 0.01 for k, v in plain.state_dict().items() if "lora_" in k}
    for m in (plain, fused):
        m.load_state_dict(state, strict=False)
    _assert_same(plain, fused, inputs, atol=2e-2, rtol=5e-2)
    assert layer._trainkit_compute_copies["default"]["copies"] is not copies
    for opt in opts:  # new weights, then an evaluation under inference_mode first: it must leave no inference
        opt.step()     # tensor in the cache ...
    with torch.inference_mode():
        fused(**inputs)
    _assert_same(plain, fused, inputs, atol=2e-2, rtol=5e-2)  # ... that the next training step would save


def test_fused_forward_bf16_base_keeps_fp32_adapters():
    """bf16 base (the GPU case): the update runs in bf16, the adapter weights and gradients stay fp32; the
    result is PEFT's fp32-adapter result within bf16 rounding."""
    plain, fused = _pair("llama", LoraSection(r=4, alpha=8, dropout=0.0), dtype=torch.bfloat16, load_in_4bit=False)
    assert {p.dtype for n, p in fused.named_parameters() if "lora_" in n} == {torch.float32}
    _assert_same(plain, fused, batch(), atol=2e-2, rtol=5e-2)


def test_fused_forward_over_4bit_base():
    """bitsandbytes Linear4bit bases (QLoRA; bnb runs on CPU) take the fused path too."""
    plain, fused = _pair("mixtral", LoraSection(r=4, alpha=8, dropout=0.0))
    assert type(plain.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    _assert_same(plain, fused, batch(), atol=1e-3, rtol=1e-2)


def test_dora_and_disabled_adapters_take_peft_forward():
    model, _ = load("llama", load_in_4bit=False)
    dora = apply_lora(model, LoraSection(r=4, alpha=8, dropout=0.0, variant="dora"))
    assert dora.trainkit_lora_info["fused_forward_layers"] == 0
    plain, fused = _pair("llama", LoraSection(r=4, alpha=8, dropout=0.0), dtype=torch.float32, load_in_4bit=False)
    inputs = batch()
    with torch.no_grad(), plain.disable_adapter(), fused.disable_adapter():
        base_logits = fused(**inputs).logits
        torch.testing.assert_close(base_logits, plain(**inputs).logits)
    with torch.no_grad():  # and back on: the adapters act again
        adapted = fused(**inputs).logits
        assert not torch.allclose(adapted, base_logits, atol=1e-4)
        torch.testing.assert_close(adapted, plain(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_apply_lora_uses_the_fused_forward_by_default_and_saves_peft_format(tmp_path):
    from peft import PeftModel
    model, _ = load("llama", load_in_4bit=False)
    model.float()
    peft_model = apply_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))
    assert peft_model.trainkit_lora_info["fused_forward_layers"] == peft_model.trainkit_lora_info["num_targets"] > 0
    _random_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    inputs = batch()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    base, _ = load("llama", load_in_4bit=False)
    reloaded = PeftModel.from_pretrained(base.float(), tmp_path)  # PEFT's own layers, PEFT's forward
    assert not any(getattr(type(m), "trainkit_fused_lora", False) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-4, rtol=1e-3)


def test_zero3_partitioned_adapters_take_peft_forward(monkeypatch):
    """DeepSpeed ZeRO-3 marks its partitioned parameters with ds_id and gathers them in a hook on their own
    module's forward: the fused forward, which reads lora_A.weight without calling lora_A, must step aside."""
    import trainkit.fused_lora as fused_lora

    plain, fused = _pair("llama", LoraSection(r=4, alpha=8, dropout=0.0), dtype=torch.float32, load_in_4bit=False)
    for name, p in fused.named_parameters():
        if "lora_" in name:
            p.ds_id = 0
    monkeypatch.setattr(fused_lora.LoRAUpdate, "apply", lambda *a: pytest.fail("fused path taken under ZeRO-3"))
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch()).logits, plain(**batch()).logits)


def test_lora_update_of_fp32_inputs_under_bf16_autocast():
    """accelerate's mixed_precision bf16 over fp32 compute (the launcher's GPU accelerate configs run on a CPU, or
    quantization.compute_dtype float32 on a GPU): the forward runs under autocast, the backward outside it. Inside
    lora_update the update is computed in autocast's dtype with autocast off, so forward and the hand-written
    backward agree on dtypes (before, autocast made the forward's rank-r product bf16 and the backward failed with
    'Float and BFloat16' on a GLM-4.5-Air-shaped run); the gradients stay those of the fp32 formula."""
    torch.manual_seed(0)
    result = torch.randn(2, 5, 16, requires_grad=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_update(result, x, a, b, 0.5)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    got = [t.grad.clone() for t in (result, x, a, b)]
    for t in (result, x, a, b):
        t.grad = None
    (result + 0.5 * (x @ a.t()) @ b.t()).square().sum().backward()
    for g, t in zip(got, (result, x, a, b)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, t.grad, rtol=0.05, atol=0.05 * t.grad.abs().max().item())
