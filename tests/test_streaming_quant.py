"""MoE experts quantized while they load (trainkit.patches.transformers.quantize_experts_on_load).

Without it, transformers loads every fused expert tensor in bf16 onto the device and
trainkit quantizes them afterwards: ~200 GB of bf16 experts for a 106B MoE on an 80 GB
GPU. With it, each expert tensor becomes an NF4 bank as soon as it is read, so at most
one layer's bf16 experts exist at a time. Checked here on CPU, for the per-expert
checkpoint layout (the hub's, which save_pretrained writes) and the fused one, against
the post-load path: same bank bytes, and the memory actually alive during loading.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moe_fixtures import TINY, VOCAB, ByteTok, batch, load_quantized
from trainkit import quantization as Q
from trainkit.config import validate
from trainkit.config.qlora import QLoRAConfig
from trainkit.models import build_random_model_dir
from trainkit.quantization import NF4ExpertBank, float_expert_params

MOE = ["mixtral", "qwen3_moe", "glm4_moe"]
REPO = Path(__file__).resolve().parents[1]

# experts large relative to the rest: 12.6 MB of bf16 experts per layer, 6 layers
BIG = {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
       "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 16, "num_experts_per_tok": 2,
       "max_position_embeddings": 64}


def layer_expert_bytes(c: dict) -> int:
    return c["num_local_experts"] * 3 * c["intermediate_size"] * c["hidden_size"] * 2


def cfg_for(source: str, *, stream=True, quantize_experts=True) -> QLoRAConfig:
    return validate({"paths": {"model_name_or_path": source, "cache_dir": None},
            "model": {"local_files_only": True},
            "training": {"seed": 0},
            "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                             "compute_dtype": "bfloat16", "quantize_moe_experts": quantize_experts,
                             "quantize_experts_on_load": stream},
            "memory": {"gradient_checkpointing": False}}, QLoRAConfig)


def per_expert_state_dict(state: dict, model_type: str) -> dict:
    """transformers 5's fused expert tensors split back into the hub's per-expert tensors."""
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".experts.")
        if name not in ("gate_up_proj", "down_proj") or value.dim() != 3:
            out[key] = value
            continue
        for e in range(value.shape[0]):
            if model_type == "mixtral":       # block_sparse_moe.experts.N.{w1 gate, w3 up, w2 down}
                base = prefix.replace(".mlp", ".block_sparse_moe") + f".experts.{e}."
                names = {"gate": "w1", "up": "w3", "down": "w2"}
            else:                             # qwen2_moe family: mlp.experts.N.{gate,up,down}_proj
                base, names = prefix + f".experts.{e}.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
            if name == "gate_up_proj":
                gate, up = value[e].chunk(2, dim=0)
                out[base + names["gate"] + ".weight"] = gate.contiguous()
                out[base + names["up"] + ".weight"] = up.contiguous()
            else:
                out[base + names["down"] + ".weight"] = value[e].contiguous()
    if model_type == "mixtral":              # the router too: block_sparse_moe.gate
        out = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in out.items()}
    return out


def write_both_layouts(source: str, out: Path) -> dict[str, str]:
    """The weights of `source` in the hub's per-expert layout (``experts.N.gate_proj.weight``)
    and in transformers 5's fused one (``experts.gate_up_proj``), as two checkpoints."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dirs = {"per_expert": out / "per_expert", "fused": out / "fused"}
    for layout, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(str(d / "config.json"))
        tensors = state if layout == "fused" else per_expert_state_dict(state, model.config.model_type)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return {k: str(v) for k, v in dirs.items()}


def checkpoint_keys(d) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
        return list(f.keys())


def banks_of(model) -> dict[str, NF4ExpertBank]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4ExpertBank)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> {"per_expert": dir, "fused": dir} with the same random weights."""
    return {family: write_both_layouts(build_random_model_dir(TINY[family], VOCAB, 5, torch.bfloat16, ByteTok()),
                                       tmp_path_factory.mktemp(family)) for family in MOE}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", MOE)
def test_quantized_on_load_equals_post_load(checkpoints, family, layout):
    source = checkpoints[family][layout]
    keys = checkpoint_keys(source)
    if layout == "per_expert":
        assert any(".experts.0." in k for k in keys) and not any("gate_up_proj" in k for k in keys)
    else:
        assert any(k.endswith("experts.gate_up_proj") for k in keys) and not any(".experts.0." in k for k in keys)

    streamed, info = load_quantized(cfg_for(source), "cpu")
    post, info_post = load_quantized(cfg_for(source, stream=False), "cpu")

    n_layers = sum(1 for n, _ in Q.iter_expert_modules(streamed))
    assert info["experts_quantized_on_load"] == info["quantized_expert_banks"] == 2 * n_layers > 0
    assert info_post["experts_quantized_on_load"] == 0 and info_post["quantized_expert_banks"] == 2 * n_layers
    assert float_expert_params(streamed) == []
    assert type(streamed.hf_quantizer).__name__ == "ExpertBankBnb4BitHfQuantizer"
    assert getattr(streamed, "is_loaded_in_4bit", False)
    # the same bytes: packed codes, quantized absmax, second-level statistics
    a, b = banks_of(streamed), banks_of(post)
    assert a.keys() == b.keys() and len(a) == 2 * n_layers
    for name in a:
        pa, pb = dict(a[name].named_parameters()), dict(b[name].named_parameters())
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), name
        # the statistics stay as bitsandbytes makes them (fp32), not cast to the compute dtype with the norms
        stats = {k: v.dtype for k, v in pa.items() if v.is_floating_point()}
        assert stats and set(stats.values()) == {torch.float32}, (name, stats)
    sa, sb = streamed.state_dict(), post.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert info["parameters"] == info_post["parameters"]
    # the grouped 4-bit forward is installed, and the model computes the same thing
    assert all(getattr(m, Q.BANK_MARKER, False) for _, m in Q.iter_expert_modules(streamed))
    streamed.eval(), post.eval()
    with torch.no_grad():
        assert torch.equal(streamed(**batch(3)).logits, post(**batch(3)).logits)


def test_fused_and_per_expert_layouts_hold_the_same_weights(checkpoints):
    from transformers import AutoModelForCausalLM
    for family in MOE:
        ref = AutoModelForCausalLM.from_pretrained(checkpoints[family]["per_expert"], dtype=torch.bfloat16).state_dict()
        got = AutoModelForCausalLM.from_pretrained(checkpoints[family]["fused"], dtype=torch.bfloat16).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), family


def _live_expert_bytes(shapes: set) -> int:
    """Bytes of distinct CPU storages behind live float tensors shaped like (parts of) expert banks."""
    seen = {}
    with warnings.catch_warnings():       # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    del objects
    for obj in tensors:
        try:
            if not (isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.is_floating_point()
                    and tuple(obj.shape) in shapes):
                continue
            storage = obj.untyped_storage()
        except Exception:     # not a plain tensor (e.g. a tensor subclass mid-construction)
            continue
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    source = build_random_model_dir(BIG, VOCAB, 0, torch.bfloat16, ByteTok())
    return write_both_layouts(source, tmp_path_factory.mktemp("big"))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_at_most_one_layer_of_bf16_experts_alive(big_checkpoints, layout, monkeypatch):
    """Each time a bank is made, count the live bf16 expert tensors (fused or per expert)."""
    E, H, I = BIG["num_local_experts"], BIG["hidden_size"], BIG["intermediate_size"]
    shapes = {(I, H), (H, I), (2 * I, H), (E, 2 * I, H), (E, H, I), (E, I, H)}
    layer = layer_expert_bytes(BIG)
    seen: list[int] = []
    original = NF4ExpertBank.from_weight.__func__

    def counting(cls, weight, *args, **kwargs):
        seen.append(_live_expert_bytes(shapes))
        return original(cls, weight, *args, **kwargs)

    monkeypatch.setattr(NF4ExpertBank, "from_weight", classmethod(counting))
    results = {}
    for stream in (True, False):
        seen.clear()
        model, info = load_quantized(cfg_for(big_checkpoints[layout], stream=stream), "cpu")
        results[stream] = (list(seen), info, {n: b.packed.clone() for n, b in banks_of(model).items()})
        del model
        gc.collect()
    on_load, info, packed = results[True]
    post_load, info_post, packed_post = results[False]
    n_layers = BIG["num_hidden_layers"]
    assert info["experts_quantized_on_load"] == len(on_load) == 2 * n_layers
    assert info_post["experts_quantized_on_load"] == 0 and len(post_load) == 2 * n_layers
    # quantized while loading: never more than one layer's bf16 experts (here: one gate_up_proj, 2/3 layer)
    assert max(on_load) <= layer, [round(x / layer, 2) for x in on_load]
    # post-load (the old path): every layer's bf16 experts are alive when quantization starts
    assert max(post_load) >= n_layers * layer, [round(x / layer, 2) for x in post_load]
    assert packed.keys() == packed_post.keys() and all(torch.equal(packed[k], packed_post[k]) for k in packed)


_RSS_SCRIPT = r"""
import gc, json, sys, threading, time
import torch, transformers, bitsandbytes  # noqa: F401  (imported before the baseline)
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
from test_streaming_quant import cfg_for
from moe_fixtures import load_quantized
from trainkit.quantization import base_weight_bytes

def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

peak, stop = [0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)

gc.collect()
base = peak[0] = anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
model, info = load_quantized(cfg_for(sys.argv[1], stream=sys.argv[2] == "1"), "cpu")
seconds = time.perf_counter() - t0
stop[0] = True
thread.join()
gc.collect()
print(json.dumps({"peak": peak[0] - base, "final": anon() - base, "seconds": seconds,
                  "base_weight_bytes": base_weight_bytes(model), "on_load": info["experts_quantized_on_load"]}))
"""


def measure_load_rss(source: str, stream: bool) -> dict:
    """Anonymous RSS (heap, not the mmapped checkpoint) of a fresh process loading `source`."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")   # freed memory goes back
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, source, "1" if stream else "0", str(REPO)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_host_memory_during_loading(big_checkpoints):
    """The hub layout: experts.N.* tensors are read and stacked into anonymous memory.

    (A fused checkpoint loaded onto the CPU in its own dtype stays a view of the mmapped
    file, page cache rather than process memory, so RssAnon cannot show its cost there.)
    """
    big_checkpoint = big_checkpoints["per_expert"]
    layer = layer_expert_bytes(BIG)
    all_layers = BIG["num_hidden_layers"] * layer
    on_load = measure_load_rss(big_checkpoint, True)
    post_load = measure_load_rss(big_checkpoint, False)
    report = {k: {m: (round(v / 2**20, 1) if m in ("peak", "final", "base_weight_bytes") else round(v, 2)) for m, v in d.items()}
              for k, d in (("on_load", on_load), ("post_load", post_load))}
    print(f"\nbf16 experts: {layer / 2**20:.1f} MiB a layer, {all_layers / 2**20:.1f} MiB in all; MiB: {report}")
    assert on_load["on_load"] == 2 * BIG["num_hidden_layers"] and post_load["on_load"] == 0
    # quantize-on-load: the peak is the final model plus about one layer's bf16 experts
    assert on_load["peak"] - on_load["final"] <= 2 * layer, report
    # the old path holds (nearly) all bf16 experts at once
    assert post_load["peak"] - post_load["final"] >= all_layers / 2, report
    assert on_load["peak"] <= post_load["peak"] - 2 * layer, report


def test_falls_back_to_post_load_with_a_warning(checkpoints, monkeypatch):
    from trainkit.patches import PatchWarning
    from trainkit.patches import transformers as patches_transformers
    monkeypatch.setattr(patches_transformers, "_streaming_quantizer_class", lambda: (None, "transformers lacks X (test)"))
    source = checkpoints["qwen3_moe"]["per_expert"]
    with pytest.warns(PatchWarning, match=r"^transformers \S+: transformers lacks X \(test\) .*quantized after loading"):
        model, info = load_quantized(cfg_for(source), "cpu")
    assert info["experts_quantized_on_load"] == 0 and info["quantized_expert_banks"] == 4
    assert float_expert_params(model) == [] and type(model.hf_quantizer).__name__ == "Bnb4BitHfQuantizer"


def test_no_streaming_when_experts_stay_bf16(checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, info = load_quantized(cfg_for(checkpoints["mixtral"]["per_expert"], quantize_experts=False), "cpu")
    assert info["quantized_expert_banks"] == 0 and len(float_expert_params(model)) == 4
    assert type(model.hf_quantizer).__name__ == "Bnb4BitHfQuantizer"


def test_registry_restored_and_errors_raised(checkpoints, monkeypatch):
    from transformers.quantizers import auto
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    source = checkpoints["glm4_moe"]["fused"]
    load_quantized(cfg_for(source), "cpu")
    assert auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is Bnb4BitHfQuantizer

    def broken(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(NF4ExpertBank, "from_weight", broken)
    # transformers logs a failing conversion op as a "conversion error" (5.23 then raises, 5.17
    # goes on); either way load_model must not hand back experts silently left uninitialized
    with pytest.raises(RuntimeError, match=r"quantizing MoE experts while loading failed: .*experts\..*MemoryError"
                       r"|issues during automatic conversion of the weights"):
        load_quantized(cfg_for(source), "cpu")
    assert auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is Bnb4BitHfQuantizer


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_peak_gpu_memory_during_loading(layout, tmp_path):
    """On CUDA: peak allocated while loading <= final 4-bit model + ~1 layer of bf16 experts."""
    big = dict(BIG, hidden_size=1024, intermediate_size=1024, num_local_experts=32, num_hidden_layers=8)
    layer = layer_expert_bytes(big)
    source = write_both_layouts(build_random_model_dir(big, VOCAB, 0, torch.bfloat16, ByteTok()), tmp_path)[layout]
    device = torch.device("cuda", torch.cuda.current_device())
    stats = {}
    for stream in (True, False):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        model, info = load_quantized(cfg_for(source, stream=stream), device)
        stats[stream] = {"peak": torch.cuda.max_memory_allocated(device) - start,
                         "final": torch.cuda.memory_allocated(device) - start, "banks_on_load":
                         info["experts_quantized_on_load"]}
        del model, info
    mib = {k: {m: (round(v / 2**20, 1) if m != "banks_on_load" else v) for m, v in d.items()} for k, d in stats.items()}
    print(f"\n{layout}: bf16 experts {layer / 2**20:.0f} MiB/layer x {big['num_hidden_layers']}; MiB (on_load=True/False) {mib}")
    assert stats[True]["banks_on_load"] == 2 * big["num_hidden_layers"]
    assert stats[True]["peak"] <= stats[True]["final"] + 2 * layer, mib
    # the post-load path holds every layer's bf16 experts on the GPU at once
    assert stats[False]["peak"] >= big["num_hidden_layers"] * layer, mib
