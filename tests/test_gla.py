"""trainkit.gla on CPU: GLA (flash-linear-attention) through the PyTorch reference backend.

Tiny random-init models (tiny_gla_config), no downloads. The GPU comparison against fla's
Triton kernels is tests/test_gpu_gla.py.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

pytest.importorskip("fla")
pytest.importorskip("triton")

from trainkit import gla  # noqa: E402
from trainkit.gla import (GLA_TARGET_MODULES, guard_adapter_paths, import_fla, prepare_gla_config,  # noqa: E402
                          tiny_gla_config, use_reference_backend)

VOCAB = 261


def build(on_cuda=False, fused_swiglu=False, targets=GLA_TARGET_MODULES, modules_to_save=None, prepare=True,
          seed=0, **overrides):
    import_fla()
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = tiny_gla_config(**overrides)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    notes = prepare_gla_config(config, on_cuda=on_cuda, fused_swiglu=fused_swiglu, adapter_targets=targets,
                               modules_to_save=modules_to_save) if prepare else []
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model, notes


@pytest.fixture(scope="module")
def tiny():
    model, _ = build()
    use_reference_backend(model)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_conv():
    model, _ = build(use_short_conv=True, conv_size=4)
    use_reference_backend(model)
    return model.eval()


def test_tiny_config_matches_the_byte_tokenizer():
    from trainkit.tokenizer import build_byte_level_tokenizer
    assert tiny_gla_config()["vocab_size"] == len(build_byte_level_tokenizer()) == VOCAB
    assert tiny_gla_config(hidden_size=128)["hidden_size"] == 128


def test_reference_backend_forward_backward_and_idempotent():
    model, _ = build()
    keys = sorted(model.state_dict())
    swapped = use_reference_backend(model)
    assert any("GatedLinearAttention" in s for s in swapped) and any("RMSNorm" in s for s in swapped)
    assert any("GatedMLP" in s for s in swapped)
    assert use_reference_backend(model) == []  # idempotent
    assert sorted(model.state_dict()) == keys  # same parameters: checkpoints load both ways
    assert gla.uses_reference_backend(model)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 80))  # > 64 tokens: fla's chunk mode; shorter: fused_recurrent
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 80, VOCAB)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "embeddings" not in n)


def test_reference_op_matches_fla_naive_recurrence():
    """trainkit's reference GLA against fla's own pure-PyTorch naive recurrence (fla/ops/gla/naive.py)."""
    naive = pytest.importorskip("fla.ops.gla.naive")
    from trainkit.linear_attention import reference_gla
    torch.manual_seed(0)
    q, k = torch.randn(2, 30, 4, 8), torch.randn(2, 30, 4, 8)
    v = torch.randn(2, 30, 4, 16)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 30, 4, 8)) / 16
    ref, _ = reference_gla(q, k, v, g)
    fla_out = naive.naive_recurrent_gla(q, k, v, g)
    fla_out = fla_out[0] if isinstance(fla_out, tuple) else fla_out
    torch.testing.assert_close(ref, fla_out.to(ref.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_conv"])
def test_left_padded_batch_gives_the_unpadded_logits(fixture, request):
    model = request.getfixturevalue(fixture)
    torch.manual_seed(1)
    lengths = [70, 23, 5]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None]).logits[0]
            torch.testing.assert_close(batch[i, width - len(s):], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_conv"])
def test_generate_left_padded_equals_stepwise_argmax(fixture, request):
    model = request.getfixturevalue(fixture)
    torch.manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (9, 4)]
    width, new = max(len(p) for p in prompts), 6
    pad = 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=pad, eos_token_id=None, use_cache=True)
        for i, p in enumerate(prompts):
            seq = p[None]
            for _ in range(new):  # no cache: the whole sequence each step
                nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
            assert out[i, width:].tolist() == seq[0, len(p):].tolist()


@pytest.mark.parametrize("overrides", [{}, {"use_short_conv": True, "conv_size": 4}], ids=["plain", "short_conv"])
def test_cached_generation_equals_uncached(overrides):
    """Every step's logits, not just the argmax: on transformers >= 5.24 fla's models got the cache as
    `cache=` and restarted from an empty state at every token until trainkit.patches.fla handed it back
    as `past_key_values`. initializer_range 0.2: with 0.02 the tiny model's output hardly depends on
    the history, and a lost state changed the logits by only 5e-5 in the short-conv variant."""
    model, _ = build(initializer_range=0.2, **overrides)
    use_reference_backend(model)
    model.eval()
    torch.manual_seed(4)
    lengths, width = (11, 6, 3), 11
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,))
        mask[i, width - n:] = 1
    runs = {}
    with torch.no_grad():
        for use_cache in (True, False):
            runs[use_cache] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                             do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=use_cache,
                                             output_scores=True, return_dict_in_generate=True)
    cached, uncached = runs[True], runs[False]
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, step=step: f"new token {step + 1}: {m}")


def _lora(model, modules_to_save=("lm_head",), targets=GLA_TARGET_MODULES):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=list(modules_to_save),
                     init_lora_weights=False)  # random A and B: every adapter tensor gets a gradient
    torch.manual_seed(3)
    return get_peft_model(model, cfg)


def _adapter_grads(peft_model, ids):
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def test_every_adapter_gets_a_gradient_with_fused_swiglu_requested():
    """The trainer's order on CPU: prepare -> build -> reference backend -> PEFT -> guard."""
    model, notes = build(fused_swiglu=True, modules_to_save=["lm_head"])
    assert model.config.fuse_swiglu is False and model.config.fuse_cross_entropy is False
    use_reference_backend(model)
    peft_model = _lora(model)
    guard_adapter_paths(peft_model)
    names = {n for n, _ in peft_model.named_modules()}
    for leaf in GLA_TARGET_MODULES:
        assert any(n.endswith(leaf) for n in names), leaf
    grads = _adapter_grads(peft_model, torch.randint(0, VOCAB, (2, 40)))
    lora = [n for n in grads if "lora_" in n]
    assert len(lora) == 2 * len(GLA_TARGET_MODULES) * 2  # A and B, every target, 2 layers
    assert any("down_proj.lora_A" in n for n in lora) and any("gk_proj.0.lora_B" in n for n in lora)
    assert any("lm_head.modules_to_save" in n for n in grads)
    bad = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not bad, bad


def _torch_fla_swiglu(monkeypatch):
    """fla's GatedMLP code path, unchanged, with its two Triton functions in PyTorch (no GPU here)."""
    import fla.modules.mlp as mlp_mod

    def swiglu(x, y):
        return torch.nn.functional.silu(x) * y

    def swiglu_linear(x, y, weight, bias):  # reads the weight tensor, as fla's fused kernel does
        return torch.nn.functional.linear(swiglu(x, y), weight, bias)

    monkeypatch.setattr(mlp_mod, "swiglu", swiglu)
    monkeypatch.setattr(mlp_mod, "swiglu_linear", swiglu_linear)


def test_guard_restores_the_down_proj_adapter_of_a_fused_swiglu_mlp(monkeypatch):
    """A model built with fuse_swiglu=True (a hub config) keeps fla's GatedMLP forward on GPU.
    Without the guard the down_proj LoRA is bypassed; guard_adapter_paths puts it back."""
    from fla.modules import GatedMLP
    _torch_fla_swiglu(monkeypatch)
    model, _ = build(prepare=False)  # fuse_swiglu defaults to True in GLAConfig
    assert model.config.fuse_swiglu is True
    use_reference_backend(model)
    mlps = [m for m in model.modules() if isinstance(m, GatedMLP)]
    for m in mlps:  # back to fla's own GatedMLP.forward, as on a GPU
        del m.forward
    peft_model = _lora(model)
    ids = torch.randint(0, VOCAB, (2, 24))
    before = _adapter_grads(peft_model, ids)
    skipped = [n for n, g in before.items() if "down_proj.lora" in n and (g is None or g.abs().sum() == 0)]
    assert skipped, "fla's fused swiglu_linear no longer bypasses down_proj: the guard may be unnecessary"
    with torch.no_grad():
        fused_logits = peft_model(input_ids=ids).logits
    notes = guard_adapter_paths(peft_model)
    assert notes and all(m.fuse_swiglu is False for m in mlps)
    assert guard_adapter_paths(peft_model) == []  # idempotent
    after = _adapter_grads(peft_model, ids)
    bad = [n for n, g in after.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not bad, bad
    with torch.no_grad():
        guarded = peft_model(input_ids=ids).logits
        assert (guarded - fused_logits).abs().max() > 1e-3  # the fused path had dropped the adapter's output too
        for name, p in peft_model.named_parameters():
            if "down_proj.lora_B" in name:
                p.zero_()  # without the down_proj adapter both paths are the same function
        torch.testing.assert_close(peft_model(input_ids=ids).logits, fused_logits, atol=1e-5, rtol=1e-5)


def test_guard_leaves_fused_swiglu_when_down_proj_has_no_adapter(monkeypatch):
    from fla.modules import GatedMLP
    model, _ = build(prepare=False)
    peft_model = _lora(model, modules_to_save=(), targets=["q_proj", "gate_proj", "up_proj"])
    assert guard_adapter_paths(peft_model) == []
    assert all(m.fuse_swiglu for m in peft_model.modules() if isinstance(m, GatedMLP))


def test_prepare_config_notes():
    from transformers import AutoConfig
    import_fla()

    def config(**kw):
        spec = tiny_gla_config(**kw)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)

    c = config(attn_mode="fused_chunk")
    notes = prepare_gla_config(c, on_cuda=True, fused_swiglu=False, adapter_targets=GLA_TARGET_MODULES,
                               modules_to_save=None)
    assert c.attn_mode == "chunk" and any("fused_chunk" in n for n in notes)
    assert c.fuse_swiglu is False and c.fuse_norm is True  # fuse_norm names parameters: kept

    c = config()
    prepare_gla_config(c, on_cuda=False, fused_swiglu=False, adapter_targets=None, modules_to_save=None,
                       attn_mode="fused_chunk")
    assert c.attn_mode == "chunk"

    c = config()  # GPU, fused swiglu asked for, down_proj adapted: the fused swiglu_linear is not used
    notes = prepare_gla_config(c, on_cuda=True, fused_swiglu=True, adapter_targets=["down_proj"], modules_to_save=[])
    assert c.fuse_swiglu is False and any("down_proj" in n for n in notes)
    c = config()
    prepare_gla_config(c, on_cuda=True, fused_swiglu=True, adapter_targets=["q_proj", "up_proj"], modules_to_save=[])
    assert c.fuse_swiglu is True
    c = config()
    prepare_gla_config(c, on_cuda=True, fused_swiglu=True, adapter_targets="all_linear", modules_to_save=[])
    assert c.fuse_swiglu is False

    c = config(fuse_linear_cross_entropy=True, fuse_cross_entropy=False)  # lm_head saved: its fused loss is off
    notes = prepare_gla_config(c, on_cuda=True, fused_swiglu=False, adapter_targets=["q_proj"],
                               modules_to_save=["lm_head"])
    assert c.fuse_linear_cross_entropy is False and any("lm_head" in n for n in notes)
    c = config(fuse_linear_cross_entropy=True, fuse_cross_entropy=False)
    prepare_gla_config(c, on_cuda=True, fused_swiglu=False, adapter_targets=["q_proj"], modules_to_save=None)
    assert c.fuse_linear_cross_entropy is True

    c = config()  # model.fused_linear_cross_entropy: on for GPUs, its fused loss replaces fla's fused CE ...
    notes = prepare_gla_config(c, on_cuda=True, adapter_targets=["q_proj"], fused_linear_cross_entropy=True)
    assert c.fuse_linear_cross_entropy is True and c.fuse_cross_entropy is False, notes
    c = config()  # ... unless lm_head is adapted
    prepare_gla_config(c, on_cuda=True, adapter_targets=["q_proj", "lm_head"], fused_linear_cross_entropy=True)
    assert c.fuse_linear_cross_entropy is False

    c = config(fuse_linear_cross_entropy=True, fuse_cross_entropy=False)  # CPU: every fused kernel off
    notes = prepare_gla_config(c, on_cuda=False, fused_swiglu=True, adapter_targets=None, modules_to_save=None)
    assert not (c.fuse_swiglu or c.fuse_cross_entropy or c.fuse_linear_cross_entropy)
    assert all(isinstance(n, str) for n in notes)

    with pytest.raises(ValueError, match="attn_mode"):
        prepare_gla_config(config(attn_mode="parallel"), on_cuda=True, fused_swiglu=False, adapter_targets=None,
                           modules_to_save=None)


def test_import_fla_error_names_what_to_install(monkeypatch):
    assert import_fla().GLAForCausalLM is not None
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    with pytest.raises(RuntimeError, match="pip install .*triton") as info:
        import_fla()
    assert "\n" not in str(info.value)
    monkeypatch.undo()

    import fla
    empty = types.ModuleType("fla.models")  # what `import fla` leaves when triton is missing
    monkeypatch.setitem(sys.modules, "fla.models", empty)
    monkeypatch.setattr(fla, "models", empty, raising=False)
    with pytest.raises(RuntimeError, match="flash-linear-attention.*pip install"):
        import_fla()
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "fla", None)
    with pytest.raises(RuntimeError, match="flash-linear-attention"):
        import_fla()


def test_is_gla_config():
    assert gla.is_gla_config({"model_type": "gla"}) and not gla.is_gla_config({"model_type": "llama"})
    assert gla.is_gla_config(types.SimpleNamespace(model_type="gla"))


def test_deepcopy_keeps_the_reference_backend(tiny):
    clone = copy.deepcopy(tiny)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, tiny(input_ids=ids).logits)
