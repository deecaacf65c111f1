"""LoRA on fused MoE experts (trainkit.expert_lora) on real tiny 4-bit and bf16 MoE models (CPU): gradients
reach every expert adapter and nothing else, the base stays frozen and 4-bit, the result equals PEFT's
`target_parameters` adapters on a bf16 twin, and the adapter saves and loads in PEFT's format."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from moe_fixtures import batch, force_experts_0_1, load, loss_and_grads
from trainkit.adapters import apply_lora, resolve_target_modules
from trainkit.config import ConfigError
from trainkit.config.base import LoraSection
from trainkit.expert_lora import ExpertLoRA
from trainkit.models import apply_activation_checkpointing
from trainkit.moe import RouterStats
from trainkit.patches import PatchError
from trainkit.patches.peft import no_moe_target_remap
from trainkit.quantization import NF4ExpertBank, count_parameters, iter_expert_modules

FAMILIES = ["mixtral", "qwen3_moe", "glm4_moe"]
DIMS = {"mixtral": (64, 96), "qwen3_moe": (64, 64), "glm4_moe": (64, 64)}   # H, expert I of moe_fixtures.TINY
R = 4


def _lora(**kw) -> LoraSection:
    return LoraSection(**{"r": R, "alpha": 8.0, "dropout": 0.0, "expert_targets": "auto", **kw})


def _randomize(model, seed=5):
    """PEFT starts B at zero, which would leave A without a gradient: give every adapter tensor values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)


def _expert_adapters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n and ".experts." in n}


def test_expert_lora_function_matches_the_formula_and_leaves_empty_experts_at_zero():
    torch.manual_seed(0)
    E, r, T, k, d_in, d_out, s = 4, 3, 7, 2, 5, 6, 1.5
    x = torch.randn(T, d_in, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 2], [0, 0], [2, 0], [0, 2]])   # experts 1 and 3 get no rows
    ids_g, perm = torch.sort(ids.reshape(-1))
    offs = torch.cumsum(torch.bincount(ids_g, minlength=E), 0).to(torch.int32)
    gather = perm // k
    y_base = torch.randn(T * k, d_out, dtype=torch.float64, requires_grad=True)
    A = torch.randn(E * r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, E * r, dtype=torch.float64, requires_grad=True)
    y = ExpertLoRA.apply(y_base, x, gather, offs, A, B, s)
    A_e, B_e = A.view(E, r, d_in)[ids_g], B.view(d_out, r, E).permute(2, 0, 1)[ids_g]   # per sorted row
    ref = y_base + s * torch.einsum("sor,sri,si->so", B_e, A_e, x[gather])
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (y_base, x, A, B), dy)
    want = torch.autograd.grad(ref, (y_base, x, A, B), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    dA, dB = got[2].view(E, r, d_in), got[3].view(d_out, r, E)
    for e in (1, 3):
        assert torch.count_nonzero(dA[e]) == 0 and torch.count_nonzero(dB[:, :, e]) == 0
    for e in (0, 2):
        assert torch.count_nonzero(dA[e]) > 0 and torch.count_nonzero(dB[:, :, e]) > 0


def _check_bf16_expert_lora(device, grouped: bool):
    """bf16 compute (rank 3 padded to 8; an empty expert in the middle) against the float64 formula."""
    from trainkit import quantization
    torch.manual_seed(1)
    E, r, S, d_in, d_out, s = 4, 3, 37, 32, 48, 2.0
    ids_g = torch.sort(torch.randint(0, 3, (S,))).values
    ids_g[ids_g == 1] = 3                                                    # expert 1 gets no rows
    ids_g = torch.sort(ids_g).values
    offs = torch.cumsum(torch.bincount(ids_g, minlength=E), 0).to(torch.int32).to(device)
    x = torch.randn(S, d_in).to(device, torch.bfloat16).requires_grad_(True)
    y_base = torch.randn(S, d_out).to(device, torch.bfloat16).requires_grad_(True)
    A = (0.3 * torch.randn(E * r, d_in)).to(device).requires_grad_(True)
    B = (0.3 * torch.randn(d_out, E * r)).to(device).requires_grad_(True)
    assert quantization._grouped_mm_ok(x) == grouped
    y = ExpertLoRA.apply(y_base, x, None, offs, A, B, s)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(S, d_out).to(device, torch.bfloat16)
    got = torch.autograd.grad(y, (x, A, B), dy)
    x64, A64, B64 = (t.detach().cpu().double().requires_grad_(True) for t in (x, A, B))
    ref = y_base.detach().cpu().double() + s * torch.einsum(
        "sor,sri,si->so", B64.view(d_out, r, E).permute(2, 0, 1)[ids_g], A64.view(E, r, d_in)[ids_g], x64)
    want = torch.autograd.grad(ref, (x64, A64, B64), dy.cpu().double())
    for g, w in zip((y, *got), (ref, *want)):         # within bf16 rounding of the tensor's scale
        assert (g.cpu().double() - w).abs().max() <= 1e-2 * w.abs().max()
    assert got[1].dtype == got[2].dtype == torch.float32
    assert torch.count_nonzero(got[1].view(E, r, d_in)[1]) == 0 and torch.count_nonzero(got[2].view(d_out, r, E)[:, :, 1]) == 0


def test_expert_lora_function_in_bf16_with_a_padded_rank(monkeypatch):
    from trainkit import quantization
    grouped = quantization._grouped_mm_ok(torch.zeros(1, dtype=torch.bfloat16))
    _check_bf16_expert_lora("cpu", grouped)            # torch >= 2.11: grouped_mm on CPU too
    if grouped:                                        # and the per-expert loop, forced
        monkeypatch.setattr(quantization, "_grouped_mm_ok", lambda x: False)
        import trainkit.expert_lora as expert_lora
        monkeypatch.setattr(expert_lora, "_grouped_mm_ok", lambda x: False)
        _check_bf16_expert_lora("cpu", False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expert_lora_function_on_gpu_grouped_mm():
    _check_bf16_expert_lora("cuda", True)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_adapter_gets_a_gradient_and_the_base_stays_frozen_4bit(family, checkpointing):
    model, _ = load(family)
    quantized_before = count_parameters(model)["quantized_4bit"]
    model = apply_lora(model, _lora())
    if checkpointing:
        apply_activation_checkpointing(model, True, device="cpu", tokens=40, trainable=[])
    _randomize(model)
    H, I = DIMS[family]
    moe_layers = len(list(iter_expert_modules(model)))
    assert model.trainkit_lora_info["expert_trainable"] == moe_layers * 4 * R * (2 * H + 3 * I)
    stats = RouterStats(model)
    model.train()
    model(**batch(5, b=2, t=24)).loss.backward()
    routed = stats.snapshot()
    assert all(min(layer["tokens_per_expert"]) > 0 for layer in routed["layers"])   # the batch reaches every expert
    adapters = _expert_adapters(model)
    assert len(adapters) == 4 * moe_layers
    for name, p in adapters.items():
        assert p.dtype == torch.float32 and p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        per_expert = p.grad.view(4, R, -1) if "lora_A" in name else p.grad.view(p.shape[0], R, 4).transpose(0, 2)
        assert all(per_expert[e].abs().sum() > 0 for e in range(4)), name
    for _, experts in iter_expert_modules(model):
        banks = [m for m in experts.children() if isinstance(m, NF4ExpertBank)]
        assert {type(m) for m in experts.children()} >= {NF4ExpertBank} and len(banks) == 2
        for bank in banks:
            assert bank.packed.dtype == torch.uint8
            for p in bank.parameters(recurse=True):
                assert p.grad is None and not p.requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert count_parameters(model)["quantized_4bit"] == quantized_before
    stats.remove()


def test_an_expert_without_routed_tokens_gets_exactly_zero_gradient():
    model, _ = load("mixtral")
    model = apply_lora(model, _lora())
    _randomize(model)
    handles = force_experts_0_1(model)
    model(**batch(7, b=1, t=16)).loss.backward()
    for name, p in _expert_adapters(model).items():
        per_expert = p.grad.view(4, R, -1) if "lora_A" in name else p.grad.view(p.shape[0], R, 4).transpose(0, 2)
        assert per_expert[0].abs().sum() > 0 and per_expert[1].abs().sum() > 0, name
        assert torch.count_nonzero(per_expert[2]) == 0 and torch.count_nonzero(per_expert[3]) == 0, name
    for h in handles:
        h.remove()


def _peft_twin(family, dtype=torch.float32):
    """(trainkit expert LoRA, PEFT target_parameters) on two copies of one bf16-expert tiny model, same weights."""
    from peft import LoraConfig, get_peft_model

    base, _ = load(family, load_in_4bit=False, quantize_experts=False)
    base.to(dtype)
    twin = copy.deepcopy(base)
    ours = apply_lora(base, _lora())
    targets = resolve_target_modules(twin, "auto")
    config = LoraConfig(r=R, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with no_moe_target_remap(family):
        theirs = get_peft_model(twin, config)
    _randomize(ours)
    ours_state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    theirs_keys = {k for k in theirs.state_dict() if "lora_" in k}
    assert set(ours_state) == theirs_keys                  # PEFT's own nesting and names
    for k, v in ours_state.items():
        assert theirs.state_dict()[k].shape == v.shape, k
    theirs.load_state_dict(ours_state, strict=False)
    return ours, theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_peft_target_parameters_on_a_bf16_twin(family):
    ours, theirs = _peft_twin(family)
    inputs = batch(3, b=2, t=20)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=1e-5, atol=1e-5)
    expert_grads = [n for n in grads_t if ".experts." in n]
    assert grads_o.keys() == grads_t.keys() and len(expert_grads) == 4 * len(list(iter_expert_modules(ours)))
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_router_stats_see_the_router_through_the_expert_wrappers():
    model, _ = load("qwen3_moe")
    plain = apply_lora(copy.deepcopy(model), LoraSection(r=R, alpha=8.0, dropout=0.0))
    experts = apply_lora(model, _lora())
    snaps = []
    for m in (plain, experts):
        stats = RouterStats(m)
        with torch.no_grad():
            m.train()
            m(**batch(4, b=2, t=16))
        snaps.append(stats.snapshot())
        stats.remove()
    assert snaps[0]["layers"] == snaps[1]["layers"]      # B = 0: same routing, same entropy
    assert all(layer["router_entropy"] is not None and layer["router_entropy"] > 0 for layer in snaps[1]["layers"])


def test_bypassed_grouped_forward_is_an_error():
    model, _ = load("mixtral", load_in_4bit=False, quantize_experts=False)   # bf16 experts: transformers' forward runs
    model = apply_lora(model, _lora())
    for _, experts in iter_expert_modules(model):
        del experts.forward                       # back to the class's forward, which never reads the adapters
    with pytest.raises(PatchError, match="did not apply the expert adapter"):
        model(**batch(1, b=1, t=8))


def test_config_errors():
    with pytest.raises(ValueError, match="dora"):
        LoraSection(expert_targets="auto", variant="dora")
    with pytest.raises(ValueError, match="expert parameter names"):
        LoraSection(expert_targets=[])
    from trainkit.config.lora import LoRAAdapterSection
    with pytest.raises(ValueError, match="pissa"):
        LoRAAdapterSection(expert_targets="auto", init="pissa")
    model, _ = load("mixtral")
    with pytest.raises(ConfigError, match=r"lora.expert_targets: 'w1'.*available: down_proj, gate_up_proj"):
        apply_lora(copy.deepcopy(model), _lora(expert_targets=["w1"]))
    with pytest.raises(ConfigError, match="lora.expert_impl: peft needs bf16 experts"):
        apply_lora(model, _lora(expert_impl="peft"))
    dense, _ = load("llama")
    with pytest.raises(ConfigError, match="no fused MoE experts"):
        apply_lora(dense, _lora())


def test_expert_rank_and_alpha_are_their_own():
    model, _ = load("mixtral")
    model = apply_lora(model, _lora(expert_r=2, expert_alpha=6.0))
    config = model.peft_config["default"]
    assert config.rank_pattern == {"mlp.experts.down_proj": 2, "mlp.experts.gate_up_proj": 2}
    assert config.alpha_pattern == {"mlp.experts.down_proj": 6.0, "mlp.experts.gate_up_proj": 6.0}
    for name, p in _expert_adapters(model).items():
        assert (p.shape[0] if "lora_A" in name else p.shape[1]) == 2 * 4, name
    wrapper = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.experts"))
    assert wrapper.scaling["default"] == pytest.approx(3.0)
    default = apply_lora(load("mixtral")[0], _lora(expert_r=2))
    wrapper = next(m for n, m in default.named_modules() if n.endswith("layers.0.mlp.experts"))
    assert wrapper.scaling["default"] == pytest.approx(8.0 / R)          # same scale as the module adapters
    assert math.isclose(default.peft_config["default"].alpha_pattern["mlp.experts.down_proj"], 4.0)
    assert isinstance(wrapper, nn.Module)


# ----------------------------------------------------------------------------------------
# saving and loading


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_adapter_into_a_fresh_nf4_model_gives_identical_logits(family, tmp_path):
    from safetensors.torch import load_file

    from trainkit.adapters import load_adapter

    model = apply_lora(load(family)[0], _lora(expert_r=2))
    _randomize(model)
    inputs = batch(2, b=2, t=16)
    want = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in saved   # gate_up, PEFT's key
    assert "base_model.model.model.layers.1.mlp.experts.lora_B.weight" in saved              # down
    loaded = load_adapter(load(family)[0], str(tmp_path))
    torch.testing.assert_close(_logits(loaded, inputs), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(load(family)[0], str(tmp_path), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_peft_from_pretrained_loads_it_on_a_bf16_twin(tmp_path):
    from peft import PeftModel

    ours, _ = _peft_twin("mixtral")
    inputs = batch(2, b=2, t=16)
    want = _logits(ours, inputs)
    ours.save_pretrained(tmp_path)
    fresh, _ = load("mixtral", load_in_4bit=False, quantize_experts=False)
    fresh.to(torch.float32)
    theirs = PeftModel.from_pretrained(fresh, str(tmp_path))       # plain PEFT, no trainkit code in the loop
    assert type(theirs.base_model.model.model.layers[0].mlp.experts).__name__ == "ParamWrapper"
    torch.testing.assert_close(_logits(theirs, inputs), want, rtol=1e-5, atol=1e-5)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model


def test_resume_restores_expert_weights_and_a_missing_key_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from trainkit.adapters import load_adapter
    from trainkit.loop import adapter_loader

    model = apply_lora(load("mixtral")[0], _lora())
    _randomize(model)
    model.save_pretrained(tmp_path)
    resumed = apply_lora(load("mixtral")[0], _lora())
    adapter_loader(_Accelerator, resumed)(str(tmp_path))
    want = _expert_adapters(model)
    got = _expert_adapters(resumed)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)

    state = load_file(tmp_path / "adapter_model.safetensors")
    del state["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="1 adapter weights missing .*layers.0.mlp.experts.lora_A"):
        adapter_loader(_Accelerator, resumed)(str(tmp_path))
    with pytest.raises(ValueError, match="adapter weights missing"):
        load_adapter(load("mixtral")[0], str(tmp_path))


# ----------------------------------------------------------------------------------------
# the default MoE job with expert adapters


def test_train_qlora_with_expert_adapters_from_a_flag(tmp_path):
    import json

    from safetensors.torch import load_file

    from helpers_qlora import run_script, tiny_config
    from trainkit.checkpoint_model import load_checkpoint_model

    cfg = tiny_config(tmp_path, training={"max_steps": 4}, logging={"eval_interval": 4, "checkpoint_interval": 4})
    result = run_script(["--config", str(cfg), "lora.expert_targets=auto"], timeout=600)   # module dropout 0.1 stays
    assert result.returncode == 0, result.stderr[-3000:]
    assert "expert adapters: gate_up_proj, down_proj of 2 experts modules, r=8 per expert" in result.stdout + result.stderr
    final = tmp_path / "out" / "tiny" / "final-checkpoint-4"
    saved = load_file(final / "adapter_model.safetensors")
    expert_keys = [k for k in saved if ".mlp.experts." in k]
    assert len(expert_keys) == 8 and all(torch.isfinite(saved[k]).all() for k in expert_keys)
    # trained: B moved away from PEFT's zero init for every expert projection
    assert all(saved[k].abs().sum() > 0 for k in expert_keys if "lora_B" in k)
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0
    loaded = load_checkpoint_model(final, device="cpu")             # what trainkit.generate / export load
    got = {k.replace(".default", ""): p for k, p in loaded.model.named_parameters()
           if ".mlp.experts." in k and "lora_" in k}
    assert got.keys() == set(expert_keys)
    for k in expert_keys:
        torch.testing.assert_close(got[k].float(), saved[k].float(), rtol=0, atol=0)


def test_bench_qlora_expert_sides_tiny(tmp_path):
    """benchmarks/bench_qlora.py's expert sides on CPU (--tiny): trainkit's and PEFT's expert LoRA train the same
    number of parameters on the same model (timings are not asserted)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_qlora

    out = tmp_path / "rows.json"
    assert bench_qlora.main(["--tiny", "--models", "dense,moe128", "--order", "trainkit,trainkit_experts,"
                             "trainkit_experts_bf16,peft_experts_bf16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    sides = {(r["model"], r["side"]): r for r in rows}
    assert ("dense", "trainkit_experts") not in sides                # expert sides only on MoE models
    experts = [sides["moe128", s] for s in ("trainkit_experts", "trainkit_experts_bf16", "peft_experts_bf16")]
    assert len({r["trainable"] for r in experts}) == 1 and experts[0]["trainable"] > sides["moe128", "trainkit"]["trainable"]
    assert all(r["finite"] for r in rows)
    assert experts[0]["fraction_4bit"] > experts[1]["fraction_4bit"] > experts[2]["fraction_4bit"] == 0.0


def test_zero3_is_refused_with_expert_adapters_and_fsdp_is_not():
    """ZeRO-3 partitions the adapters outside the experts' forward; FSDP gathers each decoder layer whole (its
    training under FSDP: tests/test_fsdp.py)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from trainkit.expert_lora import refuse_sharded_experts
    info = {"expert_targets": ["gate_up_proj", "down_proj"]}
    zero = lambda stage: SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,  # noqa: E731
                                         state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        refuse_sharded_experts(zero(3), info)
    refuse_sharded_experts(zero(3), {"expert_targets": []})
    refuse_sharded_experts(zero(2), info)
    for kind in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        refuse_sharded_experts(SimpleNamespace(distributed_type=kind, state=SimpleNamespace()), info)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_nf4_experts_match_peft_on_the_dequantized_banks(family):
    """Over NF4 banks (fp32 compute): the same loss and adapter gradients as PEFT's target_parameters adapters on a
    twin whose experts are the banks dequantized into float Parameters (attention stays Linear4bit in both)."""
    from peft import LoraConfig, get_peft_model

    from trainkit.quantization import BANK_MARKER
    base, _ = load(family, compute_dtype="float32")
    twin = copy.deepcopy(base)
    for _, experts in iter_expert_modules(twin):
        for name in ("gate_up_proj", "down_proj"):            # transformers' registration order: PEFT nests by it
            bank = getattr(experts, name)
            delattr(experts, name)
            experts.register_parameter(name, nn.Parameter(bank.dequantize(torch.float32), requires_grad=False))
        del experts.forward                                    # transformers' own experts forward
        delattr(experts, BANK_MARKER)
    ours = apply_lora(base, _lora())
    config = LoraConfig(r=R, lora_alpha=8.0, lora_dropout=0.0, target_modules=resolve_target_modules(twin, "auto"),
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], task_type="CAUSAL_LM")
    with no_moe_target_remap(family):
        theirs = get_peft_model(twin, config)
    _randomize(ours)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    inputs = batch(3, b=2, t=20)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_o.keys() == grads_t.keys() and sum(".experts." in n for n in grads_t) == 8
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_in_place_merge_over_nf4_banks_points_to_the_export_and_bf16_merges():
    model = apply_lora(load("mixtral")[0], _lora())
    with pytest.raises(ValueError, match="python -m trainkit.export"):
        model.merge_and_unload()
    ours, _ = _peft_twin("mixtral")
    inputs = batch(2, b=1, t=12)
    want = _logits(ours, inputs)
    merged = ours.merge_and_unload()                   # bf16 experts: PEFT's own merge
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, inputs), want, rtol=1e-4, atol=1e-4)
