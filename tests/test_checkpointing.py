"""Activation checkpointing as a policy (memory.gradient_checkpointing: auto | true | false) on tiny real
models on CPU: 4-bit dense and MoE QLoRA models, a GLA LoRA model (fla's reference backend) and a
distillation student. The probe's measurement, the decision against a budget, the layers it flags, and
that checkpointing some layers leaves the loss and gradients as they are without it."""

from __future__ import annotations

import pytest
import torch

from moe_fixtures import load
from trainkit.adapters import apply_lora
from trainkit.config.base import LoraSection
from trainkit.models import (GIB, apply_activation_checkpointing, checkpoint_layers, decoder_layers,
                             describe_activation_checkpointing, layers_to_checkpoint, probe_activations)

LORA = LoraSection(r=4, alpha=8, dropout=0.1)  # dropout on: the recompute must replay the same masks
FAMILIES = ["llama_4bit", "mixtral_4bit", "gla", "student"]
TOKENS = 4 * 48  # micro batch 4 x 48 tokens


def build(family: str, device: str = "cpu"):
    """A tiny model as the scripts train it: adapters placed (or the student's trainable layers), train mode.
    On CUDA: bitsandbytes' 4-bit kernels, fla's Triton kernels in bf16."""
    if family in ("llama_4bit", "mixtral_4bit"):
        model, _ = load(family.removesuffix("_4bit"), device=device)
        return apply_lora(model, LORA)
    if family == "gla":
        pytest.importorskip("fla")
        pytest.importorskip("triton")
        from transformers import AutoConfig, AutoModelForCausalLM

        from trainkit.gla import import_fla, prepare_gla_config, tiny_gla_config, use_reference_backend
        import_fla()
        spec = tiny_gla_config()
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        prepare_gla_config(config, on_cuda=device == "cuda", fused_swiglu=False, adapter_targets="auto", modules_to_save=[])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        if device == "cuda":
            model.to("cuda", torch.bfloat16)
        else:
            use_reference_backend(model)
        model.requires_grad_(False)
        return apply_lora(model, LORA).train()
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainkit.students import build_student
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                           num_key_value_heads=2, vocab_size=261, tie_word_embeddings=False))
    student, _ = build_student(teacher, mixer="discrete_mamba2", attention_layers=[3], device=torch.device(device))
    return student.train()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return request.param, build(request.param)


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def batch(model, seed=3, b=4, t=48):
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, embeddings.num_embeddings, (b, t), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(embeddings.weight.device)
    return {"input_ids": ids, "labels": ids}


def recomputed_layers(model) -> tuple[list[int], list]:
    """Indices of the decoder layers that run again inside backward (a layer's own hooks stay outside its
    checkpoint, so a child's pre-hook is used), and the hook handles."""
    seen, handles = [], []
    for i, layer in enumerate(decoder_layers(model)):
        child = next(iter(layer.children()))
        handles.append(child.register_forward_pre_hook(
            lambda m, a, i=i: seen.append(i) if torch._C._current_graph_task_id() != -1 else None))
    return seen, handles


def test_decoder_layers_are_found_in_each_family(model):
    family, m = model
    expected = {"llama_4bit": 2, "mixtral_4bit": 2, "gla": 2, "student": 4}[family]
    layers = decoder_layers(m)
    assert len(layers) == expected
    assert all(hasattr(layer, "gradient_checkpointing") for layer in layers)


def test_probe_grows_linearly_with_tokens_and_leaves_rng_alone(model):
    family, m = model
    state = torch.random.get_rng_state()
    small, large = probe_activations(m, "cpu", tokens=32), probe_activations(m, "cpu", tokens=128)
    assert torch.equal(torch.random.get_rng_state(), state)   # dropout in the probe did not move the training RNG
    assert m.training
    n = len(decoder_layers(m))
    assert len(small.layer_bytes) == len(small.input_bytes) == n
    assert all(b > 0 for b in small.layer_bytes) and small.outside_bytes > 0
    # measured, not scaled: 4x the tokens saves 4x the bytes, layer by layer and outside
    for s, l in zip(small.layer_bytes + [small.outside_bytes], large.layer_bytes + [large.outside_bytes]):
        assert l == pytest.approx(4 * s, rel=0.1), (family, small, large)
    assert large.estimate(512, 0) == pytest.approx(small.estimate(512, 0), rel=0.1)
    # checkpointing keeps only the layer inputs: each checkpointed layer lowers the estimate
    estimates = [small.estimate(TOKENS, k) for k in range(n + 1)]
    assert estimates == sorted(estimates, reverse=True) and estimates[-1] < estimates[0]


def test_probe_leaves_no_tensor_alive(model):
    """The probe's graph is freed when it returns: no tensor more after a call than before it (a pack hook that
    returned the saved tensor itself made a reference cycle through autograd's C++ nodes for saved outputs, and
    every call leaked its whole graph: 111 tensors per call on the tiny Llama, 4,781 on the student)."""
    import gc
    _, m = model

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    probe_activations(m, "cpu", tokens=64)  # first call: one-time caches (e.g. fused-LoRA casts)
    before = live_tensors()
    probe_activations(m, "cpu", tokens=64)
    assert live_tensors() == before


def test_auto_picks_the_fewest_first_layers_that_fit_the_budget(model):
    family, m = model
    probe = probe_activations(m, "cpu", tokens=48)
    n = len(probe.layer_bytes)
    cases = [(probe.estimate(TOKENS, 0) * 2, 0),             # everything fits: no checkpointing
             (1.0, n),                                       # nothing fits: every layer
             (probe.estimate(TOKENS, n // 2), n // 2)]       # just fits with the first n/2 checkpointed
    for budget_bytes, expected in cases:
        assert layers_to_checkpoint(probe, TOKENS, budget_bytes) == expected
        record = apply_activation_checkpointing(m, "auto", device="cpu", tokens=TOKENS, trainable=trainable(m),
                                                budget_gib=budget_bytes / GIB)
        assert record["policy"] == "auto" and record["layers"] == expected and record["of"] == n, record
        assert record["budget_gib"] == pytest.approx(budget_bytes / GIB)
        assert record["budget_from"] == "memory.activation_memory_budget_gib"
        assert record["estimated_gib"] == pytest.approx(probe.estimate(TOKENS, expected) / GIB, rel=0.1)
        assert record["estimated_gib_per_layer"] == pytest.approx(
            sum(probe.layer_bytes) / n * TOKENS / probe.tokens / GIB, rel=0.1)
        assert [layer.gradient_checkpointing for layer in decoder_layers(m)] == [i < expected for i in range(n)]
        assert f"auto -> {expected} of {n} layers" in describe_activation_checkpointing(record)
        # the flags act: exactly the checkpointed layers run again in backward
        seen, handles = recomputed_layers(m)
        m(**batch(m)).loss.backward()
        for h in handles:
            h.remove()
        m.zero_grad(set_to_none=True)
        assert sorted(seen) == list(range(expected)), (family, expected, seen)


def test_partial_checkpointing_keeps_loss_and_gradients(model):
    family, m = model
    losses_and_grads_do_not_depend_on_checkpointing(m, tolerance=1e-6)


def losses_and_grads_do_not_depend_on_checkpointing(m, tolerance):
    """Loss and every trainable gradient with none, half and all of the layers checkpointed, the same dropout
    masks: equal within `tolerance`, relative (the loss) or relative to the gradient's norm."""
    n = len(decoder_layers(m))
    results = []
    for count in (0, n // 2, n):
        checkpoint_layers(m, count)
        torch.manual_seed(11)  # the same dropout masks in each run
        loss = m(**batch(m, seed=5)).loss
        loss.backward()
        results.append((loss.detach().float(), {name: p.grad.float() for name, p in m.named_parameters() if p.requires_grad}))
        m.zero_grad(set_to_none=True)
    reference_loss, reference_grads = results[0]
    assert all(g.abs().sum() > 0 for name, g in reference_grads.items() if "lora_B" in name)
    for loss, grads in results[1:]:
        assert abs(loss - reference_loss) <= tolerance * abs(reference_loss), (loss, reference_loss)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            reference = reference_grads[name]
            assert (grad - reference).norm() <= tolerance * reference.norm() + 1e-12, name


def test_true_and_false_measure_nothing(model):
    family, m = model
    n = len(decoder_layers(m))
    for policy, layers in ((True, n), (False, 0)):
        record = apply_activation_checkpointing(m, policy, device="cpu", tokens=TOKENS, trainable=trainable(m),
                                                budget_gib=0.5)  # read only by auto
        assert record == {"policy": str(policy).lower(), "layers": layers, "of": n, "tokens": TOKENS,
                          "estimated_gib_per_layer": None, "estimated_gib": None, "budget_gib": None, "budget_from": None}
        assert [layer.gradient_checkpointing for layer in decoder_layers(m)] == [policy] * n
        assert describe_activation_checkpointing(record) == f"activation checkpointing: {str(policy).lower()} -> {layers} of {n} layers"


def test_derived_budget_on_cpu_counts_optimizer_state():
    import psutil

    from trainkit.models import derived_activation_budget
    params = [torch.zeros(1000, 1000)]  # 4 MB of fp32: gradients 4 MB + AdamW state 8 MB
    budget, source = derived_activation_budget("cpu", params)
    available = psutil.virtual_memory().available
    assert budget == pytest.approx(0.5 * available - 12e6, rel=0.05)
    assert "available RAM" in source and "optimizer state" in source


def test_auto_without_the_weights_here_checkpoints_every_layer():
    """ZeRO-3 partitions and FSDP's meta tensors cannot run a probe before accelerate.prepare."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=261))
    record = apply_activation_checkpointing(model, "auto", device="cpu", tokens=TOKENS, trainable=[])
    assert record["layers"] == record["of"] == 3 and record["budget_gib"] is None
    assert "not measured" in record["budget_from"] and "not measured" in describe_activation_checkpointing(record)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_probe_budget_and_numerics(family):
    """On CUDA (4-bit bitsandbytes weights, fla's Triton kernels): the probe runs and gives its memory back,
    the derived budget reads the device, partial checkpointing keeps loss and gradients."""
    m = build(family, device="cuda")
    # the first runs make one-time allocations (the cuBLAS workspace, ~32 MiB on Hopper; kernels' cached index
    # tensors): what matters is that a run keeps nothing more than the run before it kept (no growth per call; the
    # leak test_probe_leaves_no_tensor_alive pins on CPU made this fail on an H200 with +2 to +34 MiB per call)
    allocated = []
    for _ in range(3):
        record = apply_activation_checkpointing(m, "auto", device="cuda", tokens=4 * 2048, trainable=trainable(m))
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[2] <= allocated[1] + 2 ** 20, f"the probe kept memory: allocated after each run {allocated}"
    assert record["layers"] == 0 and record["of"] == len(decoder_layers(m)), record  # a tiny model fits an H200
    assert "free on cuda" in record["budget_from"] and 0 < record["estimated_gib"] < record["budget_gib"], record
    probe = probe_activations(m, "cuda", tokens=256)
    assert all(b > 0 for b in probe.layer_bytes), probe
    losses_and_grads_do_not_depend_on_checkpointing(m, tolerance=1e-2)  # bf16, atomics in kernels
