"""trainkit.patches: every patch of a library's internals in one place, each checked before it acts.

Each guard is tested by taking away (or changing) the internal its patch relies on: the patch must
stop with a one-line PatchError naming the package and its installed version, or, where running
on is safe, warn with a PatchWarning. Never a silent no-op.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import trainkit.patches as patches
from trainkit.patches import PatchError, PatchWarning

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = [REPO / "train_qlora.py", REPO / "train_lora.py", REPO / "distill.py",
              *sorted((REPO / "trainkit").rglob("*.py")), *sorted((REPO / "dashboard").rglob("*.py"))]

# Internals only a patch may touch: (pattern, what it is)
INTERNALS = [
    (r"_MODEL_TO_CONVERSION_PATTERN", "PEFT's MoE remap table"),
    (r"AUTO_QUANTIZER_MAPPING", "transformers' quantizer registry"),
    (r"_is_hf_initialized", "transformers' init flag"),
    (r"_experts_implementation\s*=", "transformers' experts kernel switch"),
    (r"support_avx512bf16_for_cpu", "bitsandbytes' CPU repacking flag"),
    (r"\.HF_(HUB|DATASETS)_OFFLINE\s*=(?!=)", "datasets / huggingface_hub offline globals"),
    (r"warnings\.filterwarnings\(\s*[\"']ignore", "a warning filter"),
    (r"\.forward\s*=\s*types\.MethodType", "a library module's forward"),
    (r"_init_sharded_param|init_dtype_attrs", "torch FSDP2's FSDPParam"),
    (r"\._models\b|\._optimizers\b", "accelerate's prepared models and optimizers"),
]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_library_internals_are_touched_only_in_trainkit_patches():
    offenders = []
    for path in PRODUCTION:
        if "patches" in path.relative_to(REPO).parts:
            continue
        text = path.read_text()
        for pattern, what in INTERNALS:
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not offenders, "patches outside trainkit/patches:\n" + "\n".join(offenders)


def test_patch_error_names_the_package_its_version_and_what_to_do():
    patch = patches.Patch("x.demo", "peft", "why", checked="0.21")
    text = one_line(patch.error("the table is gone"))
    version = importlib.metadata.version("peft")
    assert text.startswith(f"peft {version}: the table is gone (trainkit patch 'x.demo', checked on peft 0.21); ")
    assert "setup_env.sh" in text


# ---------------------------------------------------------------- peft
def test_peft_remap_table_missing_is_an_error(monkeypatch):
    pytest.importorskip("peft.utils.transformers_weight_conversion")
    from peft.utils import transformers_weight_conversion as conversion

    from trainkit.patches.peft import no_moe_target_remap
    monkeypatch.delattr(conversion, "_MODEL_TO_CONVERSION_PATTERN")
    with pytest.raises(PatchError, match=r"^peft \S+: .*_MODEL_TO_CONVERSION_PATTERN") as info:
        with no_moe_target_remap("qwen3_moe"):
            pass
    one_line(info.value)


def test_peft_remap_entry_is_restored_and_recorded():
    pytest.importorskip("peft.utils.transformers_weight_conversion")
    from peft.utils import transformers_weight_conversion as conversion

    from trainkit.patches.peft import no_moe_target_remap
    table = conversion._MODEL_TO_CONVERSION_PATTERN
    model_type = next(iter(table))
    entry = table[model_type]
    with no_moe_target_remap(model_type):
        assert model_type not in table
    assert table[model_type] is entry
    assert "peft.no_moe_target_remap" in [p["name"] for p in patches.applied()]


# ---------------------------------------------------------------- bitsandbytes
def _linear4bit():
    import bitsandbytes as bnb
    return nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4"))


def test_cpu_4bit_layout_flag_is_turned_off():
    from trainkit.patches.bitsandbytes import keep_cpu_4bit_layout
    model = _linear4bit()
    assert hasattr(model[0], "support_avx512bf16_for_cpu")
    assert keep_cpu_4bit_layout(model) == 1 and model[0].support_avx512bf16_for_cpu is False
    assert "bitsandbytes.cpu_4bit_layout" in [p["name"] for p in patches.applied()]


def test_cpu_4bit_layout_flag_missing_warns():
    from trainkit.patches.bitsandbytes import keep_cpu_4bit_layout
    model = _linear4bit()
    del model[0].support_avx512bf16_for_cpu
    with pytest.warns(PatchWarning, match=r"^bitsandbytes \S+: Linear4bit has no support_avx512bf16_for_cpu flag"):
        assert keep_cpu_4bit_layout(model) == 0


def test_4bit_weights_become_plain_parameters_for_fsdp_and_still_compute():
    from trainkit.patches.bitsandbytes import shardable_4bit_weights
    model = _linear4bit().to("cpu")  # .to() quantizes
    x = torch.randn(3, model[0].in_features)
    want = model(x)
    assert shardable_4bit_weights(model) == 1
    assert type(model[0].weight) is nn.Parameter and model[0].weight.dtype == torch.uint8
    assert not model[0].weight.requires_grad
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # Linear4bit.forward re-attached the statistics
    assert "bitsandbytes.shardable_4bit_weights" in [p["name"] for p in patches.applied()]


def test_4bit_forward_without_the_quant_state_recovery_is_an_error(monkeypatch):
    import bitsandbytes as bnb
    from trainkit.patches.bitsandbytes import shardable_4bit_weights
    model = _linear4bit().to("cpu")
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: bnb.matmul_4bit(x, self.weight.t()))
    with pytest.raises(PatchError, match=r"^bitsandbytes \S+: Linear4bit.forward no longer restores") as info:
        shardable_4bit_weights(model)
    one_line(info.value)
    assert model[0].weight.__class__.__name__ == "Params4bit"  # nothing changed


def test_fsdp2_integer_params_patch_acts_only_where_needed(monkeypatch):
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    from trainkit.patches.torch import allow_frozen_integer_params_in_fsdp2
    source = inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param)
    if "requires_grad=param.requires_grad" in source:  # torch >= 2.13: FSDP2 does it itself
        assert allow_frozen_integer_params_in_fsdp2() is False
    def unknown(self, param, *args):
        return None
    monkeypatch.setattr(_fsdp_param.FSDPParam, "_init_sharded_param", unknown)
    with pytest.raises(PatchError, match=r"^torch \S+: FSDPParam._init_sharded_param is not the code") as info:
        allow_frozen_integer_params_in_fsdp2()
    one_line(info.value)


def test_accelerate_state_without_model_hides_and_restores_them():
    from types import SimpleNamespace

    from trainkit.patches.accelerate import hide_models_and_optimizers
    model, optimizer = object(), object()
    acc = SimpleNamespace(_models=[model], _optimizers=[optimizer])
    with pytest.raises(RuntimeError, match="inside"):
        with hide_models_and_optimizers(acc):
            assert acc._models == [] and acc._optimizers == []
            raise RuntimeError("inside")
    assert acc._models == [model] and acc._optimizers == [optimizer]
    with pytest.raises(PatchError, match=r"^accelerate \S+: Accelerator has no _models") as info:
        with hide_models_and_optimizers(SimpleNamespace()):
            pass
    one_line(info.value)


# ---------------------------------------------------------------- transformers: 4-bit experts
def _experts_with_banks(forward):
    from trainkit.quantization import NF4ExpertBank, install_bank

    class DemoExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.gate_up_proj = nn.Parameter(torch.randn(2, 128, 64))
            self.down_proj = nn.Parameter(torch.randn(2, 64, 64))

    DemoExperts.forward = forward
    module = DemoExperts()
    for name in ("gate_up_proj", "down_proj"):
        install_bank(module, name, NF4ExpertBank.from_weight(getattr(module, name).data, compute_dtype=torch.float32))
    return module


def test_experts_forward_with_another_signature_is_an_error():
    from trainkit.patches.transformers import use_4bit_experts_forward

    def forward(self, hidden_states, router_logits):  # not (hidden_states, top_k_index, top_k_weights)
        return hidden_states

    with pytest.raises(PatchError, match=r"^transformers \S+: DemoExperts\.forward takes \(hidden_states, router_logits\)"):
        use_4bit_experts_forward(_experts_with_banks(forward))


def test_experts_forward_is_bound_for_the_known_signature():
    from trainkit.patches.transformers import use_4bit_experts_forward
    from trainkit.quantization import nf4_experts_forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("the 4-bit forward replaces this")

    module = _experts_with_banks(forward)
    use_4bit_experts_forward(module)
    assert module.forward.__func__ is nf4_experts_forward
    assert "transformers.experts_4bit_forward" in [p["name"] for p in patches.applied()]


def test_unknown_bank_layout_without_eager_switch_is_an_error():
    from trainkit.patches.transformers import use_4bit_experts_forward
    from trainkit.quantization import NF4ExpertBank, install_bank

    module = nn.Module()
    module.w_in = nn.Parameter(torch.randn(2, 64, 64))
    install_bank(module, "w_in", NF4ExpertBank.from_weight(module.w_in.data, compute_dtype=torch.float32))
    with pytest.raises(PatchError, match=r"layout trainkit does not know"):
        use_4bit_experts_forward(module)


# ---------------------------------------------------------------- fla
def test_fla_layer_with_a_changed_forward_is_an_error(monkeypatch):
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    from test_gla import build

    from trainkit.patches import fla as patches_fla
    from trainkit.patches.fla import use_reference_backend
    model, _ = build()
    from fla.layers.gla import GatedLinearAttention
    original = GatedLinearAttention.forward

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, position_ids=None, **kwargs):  # a new argument the backend ignores
        return original(self, hidden_states, attention_mask, past_key_values, use_cache, output_attentions, **kwargs)

    monkeypatch.setattr(GatedLinearAttention, "forward", forward)
    monkeypatch.setattr(patches_fla, "_SIGNATURES_CHECKED", set())
    with pytest.raises(PatchError, match=r"^flash-linear-attention \S+: GatedLinearAttention\.forward takes "
                                         r"position_ids, which the CPU reference backend does not handle") as info:
        use_reference_backend(model)
    one_line(info.value)


def test_fla_generation_patch_follows_transformers():
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    import inspect

    from transformers.generation.utils import GenerationMixin

    from trainkit.gla import import_fla
    import_fla()
    needs = "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert ("fla.generation_cache_kwarg" in [p["name"] for p in patches.applied()]) == needs


def test_fla_model_without_past_key_values_is_an_error(monkeypatch):
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    import inspect

    from fla.models.modeling_utils import FLAForCausalLM
    from transformers.generation.utils import GenerationMixin

    from trainkit.patches.fla import patch_generation
    if "cache" not in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters:
        pytest.skip("this transformers passes past_key_values: the patch is not needed")
    monkeypatch.setattr(FLAForCausalLM, "forward", lambda self, input_ids=None, **kwargs: None)
    with pytest.raises(PatchError, match=r"takes neither `past_key_values` nor `cache`"):
        patch_generation()


def test_applied_patches_have_name_library_version_and_why():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trainkit.patches.peft import quiet_known_warnings
        quiet_known_warnings()
    record = {p["name"]: p for p in patches.applied()}["peft.gradient_checkpointing_warning"]
    assert record["library"] == "peft" and record["version"] == importlib.metadata.version("peft") and record["why"]
