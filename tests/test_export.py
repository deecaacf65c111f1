"""python -m trainkit.export: merged checkpoints that plain transformers loads, compared with base + adapter as
trainkit loads them (dense Llama, the default 4-bit Mixtral-shaped MoE, GLA), PEFT's merge_and_unload, sharding,
streaming memory and bad input. Adapters are PEFT's, saved as the training scripts save them, with random
weights (lora_B is zero at init: a zero delta would prove nothing)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainkit.adapters import apply_lora, load_adapter
from trainkit.config import validate
from trainkit.config.scripts import SCRIPT_CONFIGS
from trainkit.export import main as export_main
from trainkit.gla import tiny_gla_config
from trainkit.models import load_model
from trainkit.runlog import TRAINER_STATE_FILE
from trainkit.tokenizer import build_byte_level_tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": False}


def lora_config(model: dict | None = None, model_path: str | None = None, **lora) -> dict:
    """A train_lora.py config (task sst2 from the repo's demo rows)."""
    return {"script": "train_lora.py",
            "paths": {"model_name_or_path": model_path, "output_dir": "OUT", "run_name": "run"},
            "model": {"config": model, "dtype": "float32"},
            "task": {"name": "sst2", "local_dir": str(REPO / "data/tasks/glue_demo")},
            "training": {"seed": 3},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, **lora}}


def qlora_config() -> dict:
    """The default job (training_config.yaml: tiny Mixtral-shaped MoE, NF4 Linear4bit + NF4 expert banks),
    CPU compute dtype."""
    cfg = yaml.safe_load((REPO / "training_config.yaml").read_text())
    cfg["paths"].update(output_dir="OUT", data_path=str(REPO / "data/tiny_corpus.jsonl"))
    return cfg


def _build(raw: dict, root: Path):
    raw = copy.deepcopy(raw)
    raw["paths"]["output_dir"] = str(root)
    cfg = validate(raw, SCRIPT_CONFIGS[raw["script"]])
    quant = getattr(cfg, "quantization", None)
    dtype = quant.compute_dtype if quant is not None else cfg.model.dtype
    tokenizer = load_tokenizer(cfg)
    model, _ = load_model(cfg, "cpu", tokenizer, dtype, quant)
    return cfg, tokenizer, model, quant, dtype


def make_checkpoint(raw: dict, root: Path, seed: int = 0) -> Path:
    """checkpoint-1 of a run of `raw`: the PEFT adapter (every trainable tensor moved off its init), the
    tokenizer and trainer_state.json with the config, as the training scripts write them."""
    cfg, tokenizer, model, _, _ = _build(raw, root)
    peft = apply_lora(model, cfg.lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    checkpoint = cfg.run_dir / "checkpoint-1"
    peft.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / TRAINER_STATE_FILE).write_text(json.dumps({"step": 1, "config": cfg.as_dict()}))
    return checkpoint


def reference_logits(raw: dict, root: Path, checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    """Base + adapter as trainkit loads them (load_model + load_adapter), eval mode."""
    cfg, _, model, _, _ = _build(raw, root)
    model = load_adapter(model, checkpoint)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def input_ids(vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def export(checkpoint: Path, out: Path, *args: str) -> None:
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", *args]) == 0


LOADER = r"""
import sys, torch
if sys.argv[3] == "gla":
    import fla  # noqa: F401  (registers model_type gla)
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, output_loading_info=True)
bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
assert not bad, bad
assert not any(m == "trainkit" or m.startswith("trainkit.") for m in sys.modules), "trainkit was imported"
if sys.argv[3] != "gla":  # fla's kernels are Triton (GPU); on CPU the GLA logits are computed by the test
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(sys.argv[2])).logits.float(), sys.argv[2] + ".logits")
print("loaded", type(model).__name__)
"""


def plain_transformers_logits(out: Path, ids: torch.Tensor, kind: str = "hf") -> torch.Tensor | None:
    """Load `out` with AutoModelForCausalLM.from_pretrained in a fresh interpreter that never imports trainkit
    (cwd outside the repo); its logits on `ids` (None for GLA, whose forward needs the GPU there)."""
    ids_file = out.parent / f"{out.name}-ids.pt"
    torch.save(ids, ids_file)
    result = subprocess.run([sys.executable, "-c", LOADER, str(out), str(ids_file), kind], cwd=out.parent,
                            capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded" in result.stdout
    return None if kind == "gla" else torch.load(str(ids_file) + ".logits")


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_base(tmp_path_factory) -> Path:
    """A saved random-init Llama with the byte-level tokenizer: paths.model_name_or_path of the dense runs."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = tmp_path_factory.mktemp("llama-base")
    tokenizer = build_byte_level_tokenizer()
    kwargs = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(5)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **kwargs)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_dense_llama_export_matches_base_plus_adapter(tmp_path, dense_base):
    raw = lora_config(model_path=str(dense_base), modules_to_save=["lm_head"])
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    ids = input_ids()
    expected = reference_logits(raw, tmp_path / "runs", checkpoint, ids)
    errors = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"export-{dtype}"
        export(checkpoint, out, "--dtype", dtype)
        got = plain_transformers_logits(out, ids)
        errors[dtype] = max_error(got, expected)
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        assert "quantization_config" not in config
    print(f"dense Llama: max |logit error| fp32 {errors['fp32']:.2e}, bf16 {errors['bf16']:.2e} "
          f"(logit scale {expected.abs().max():.2f})")
    assert errors["fp32"] < 1e-4
    assert errors["bf16"] < 2e-2 * expected.abs().max().item()
    # the export is not the base: the adapter changed the logits
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(dense_base, dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_error(base(input_ids=ids).logits, expected) > 100 * errors["fp32"]
    gen = json.loads((tmp_path / "export-fp32" / "generation_config.json").read_text())
    tokenizer = build_byte_level_tokenizer()
    assert gen["eos_token_id"] == tokenizer.eos_token_id
    assert (tmp_path / "export-fp32" / "tokenizer.json").is_file()
    assert "AutoModelForCausalLM.from_pretrained" in (tmp_path / "export-fp32" / "EXPORT.md").read_text()


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merge_equals_peft_merge_and_unload(tmp_path, dense_base, variant):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    raw = lora_config(model_path=str(dense_base), variant=variant, target_modules="llama", bias="none")
    checkpoint = make_checkpoint(raw, tmp_path / "runs", seed=4)
    export(checkpoint, tmp_path / "out", "--dtype", "fp32")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(dense_base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, checkpoint).merge_and_unload().state_dict()
    assert set(exported) == set(merged)
    adapted = [k for k in exported if "q_proj" in k]
    for name, tensor in merged.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    original = AutoModelForCausalLM.from_pretrained(dense_base, dtype=torch.float32).state_dict()
    assert all(max_error(exported[k], original[k]) > 1e-3 for k in adapted)


def test_moe_4bit_export_dequantized_and_original(tmp_path):
    raw = qlora_config()
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    ids = input_ids()
    expected = reference_logits(raw, tmp_path / "runs", checkpoint, ids)
    errors = {}
    for dtype, base_weights in (("fp32", "dequantized"), ("bf16", "dequantized"), ("fp32", "original")):
        out = tmp_path / f"export-{dtype}-{base_weights}"
        export(checkpoint, out, "--dtype", dtype, "--base-weights", base_weights)
        errors[dtype, base_weights] = max_error(plain_transformers_logits(out, ids), expected)
    print("MoE 4-bit: max |logit error| " + ", ".join(f"{d} {b} {e:.2e}" for (d, b), e in errors.items())
          + f" (logit scale {expected.abs().max():.2f})")
    assert errors["fp32", "dequantized"] < 1e-4
    assert errors["bf16", "dequantized"] < 2e-2 * expected.abs().max().item()
    # the full-precision base differs from the 4-bit one the adapter was trained over by the NF4 error
    assert errors["fp32", "original"] > 20 * errors["fp32", "dequantized"]
    note = (tmp_path / "export-fp32-original" / "EXPORT.md").read_text()
    assert "base weights: original" in note


def test_gla_export_loads_with_fla_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainkit.patches.fla import use_reference_backend
    raw = lora_config(model=tiny_gla_config(), modules_to_save=["lm_head"])
    raw["model"]["config"].pop("vocab_size")
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    ids = input_ids(vocab=256)
    expected = reference_logits(raw, tmp_path / "runs", checkpoint, ids)
    out = tmp_path / "export"
    export(checkpoint, out, "--dtype", "fp32")
    plain_transformers_logits(out, ids, kind="gla")  # loads in a process without trainkit, every key matched
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    use_reference_backend(model)  # fla's kernels need a GPU: same weights, PyTorch ops
    with torch.no_grad():
        error = max_error(model(input_ids=ids).logits.float(), expected)
    print(f"GLA: max |logit error| fp32 {error:.2e}")
    assert error < 1e-4
    note = (out / "EXPORT.md").read_text()
    assert "pip install flash-linear-attention" in note and "import fla" in note


def test_small_shards_and_index(tmp_path, dense_base):
    from safetensors import safe_open
    raw = lora_config(model_path=str(dense_base))
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    out = tmp_path / "out"
    export(checkpoint, out, "--dtype", "bf16", "--max-shard-size", "40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == files
    total = 0
    for name in files:
        with safe_open(str(out / name), "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == name
                total += f.get_tensor(key).numel() * 2
    assert total == index["metadata"]["total_size"]
    whole = tmp_path / "whole"
    export(checkpoint, whole, "--dtype", "bf16")
    ids = input_ids()
    torch.testing.assert_close(plain_transformers_logits(out, ids), plain_transformers_logits(whole, ids),
                               rtol=0, atol=0)


MEMORY_PROBE = r"""
import gc, json, sys, threading, time
import bitsandbytes, safetensors.torch, torch, transformers  # noqa: F401  (imported before the baseline)
from trainkit.export import main

def rss_anon():  # anonymous memory: the safetensors' mmapped file pages (which the kernel can drop) excluded
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

what, warmup, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
if warmup:  # an export of a small model first: modules imported on first use, tokenizer and meta-model setup
    assert main(warmup) == 0
gc.collect()
baseline, peak, running = rss_anon(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
if what == "export":
    code = main(args)
else:  # the whole base in memory at once: what the measurement sees when a tool does not stream
    weights = {k: v.clone() for k, v in safetensors.torch.load_file(args[0]).items()}
    time.sleep(0.05)
    code = 0
running[0] = False
thread.join()
print(json.dumps({"above": peak[0] - baseline, "code": code}))
"""


def _peak_memory_above_start(what: str, *args: str, warmup: list[str] | None = None) -> int:
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, what, json.dumps(warmup or []), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["code"] == 0, result.stderr[-3000:]
    return record["above"]


def test_peak_memory_stays_near_one_tensor(tmp_path):
    """Export a 4-bit MoE whose size dwarfs its largest tensor, in a fresh process; its anonymous RSS sampled
    while it runs, against the same probe holding the whole base once. The process exported the small default
    MoE first, so that what every export costs once (imports, tokenizer, the meta model) is not counted."""
    from safetensors import safe_open

    from trainkit.models import model_source
    small = make_checkpoint(qlora_config(), tmp_path / "small")
    warmup = ["--checkpoint", str(small), "--out", str(tmp_path / "warmup"), "--dtype", "fp32", "--no-progress"]
    raw = qlora_config()
    raw["model"]["config"].update(hidden_size=256, intermediate_size=512, num_hidden_layers=12)
    raw["lora"]["modules_to_save"] = []
    raw["paths"]["output_dir"] = str(tmp_path)
    # the run reads its base from a directory (a random-init build in the export would hold the whole model once)
    cfg = validate(raw, SCRIPT_CONFIGS[raw["script"]])
    tokenizer = load_tokenizer(cfg)
    base_dir, _, _ = model_source(cfg, tokenizer, torch.float32)
    tokenizer.save_pretrained(base_dir)
    raw["paths"]["model_name_or_path"], raw["model"]["config"] = base_dir, None
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    base_file = Path(base_dir) / "model.safetensors"
    with safe_open(str(base_file), "pt") as f:
        sizes = [4 * torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys()]
    largest, model_bytes = max(sizes), sum(sizes)

    whole = _peak_memory_above_start("load", str(base_file))
    exported = _peak_memory_above_start("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                                        "--dtype", "fp32", "--no-progress", warmup=warmup)
    mib = 2 ** 20
    print(f"4-bit MoE of {model_bytes / mib:.0f} MiB in fp32, largest tensor {largest / mib:.1f} MiB (one layer's "
          f"gate_up expert bank): export peak {exported / mib:.1f} MiB above the start; holding the base once: "
          f"{whole / mib:.1f} MiB")
    assert whole > 0.8 * model_bytes  # the probe sees a whole model when one is held
    assert exported < model_bytes / 4
    assert exported < 4 * largest


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainkit.export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_bad_input_one_line_errors(tmp_path, dense_base):
    not_checkpoint = tmp_path / "empty"
    not_checkpoint.mkdir()
    result = _run_cli("--checkpoint", str(not_checkpoint), "--out", str(tmp_path / "o1"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: ") and "no training config" in result.stderr

    raw = lora_config(model_path=str(dense_base))
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    result = _run_cli("--checkpoint", str(checkpoint), "--out", str(busy))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--overwrite" in result.stderr and (busy / "keep.txt").exists()

    from safetensors.torch import load_file, save_file
    weights = load_file(checkpoint / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.nope_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(weights, checkpoint / "adapter_model.safetensors")
    result = _run_cli("--checkpoint", str(checkpoint), "--out", str(tmp_path / "o2"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "nope_proj.lora_A.weight" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_merge_into_the_residual_base(tmp_path, dense_base, init):
    from safetensors.torch import load_file
    raw = lora_config(model_path=str(dense_base), init=init, target_modules=["q_proj", "v_proj"])
    checkpoint = make_checkpoint(raw, tmp_path / "runs", seed=2)
    ids = input_ids()
    expected = reference_logits(raw, tmp_path / "runs", checkpoint, ids)
    out = tmp_path / "out"
    export(checkpoint, out, "--dtype", "fp32")
    error = max_error(plain_transformers_logits(out, ids), expected)
    print(f"{init}: max |logit error| fp32 {error:.2e}")
    assert error < 1e-4
    # merged into W - s B0 A0, not into W: a plain LoRA merge of the same factors is far off
    adapter, base = load_file(checkpoint / "adapter_model.safetensors"), load_file(dense_base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    plain = base[f"{name}.weight"] + (8 / 4) * b @ a
    assert max_error(load_file(out / "model.safetensors")[f"{name}.weight"], plain) > 1e-2


def test_randomized_pissa_refused(tmp_path, dense_base):
    raw = lora_config(model_path=str(dense_base), init="pissa", pissa_fast=True)
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    result = _run_cli("--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "pissa_niter_4" in result.stderr and "lora.init" in result.stderr


def distill_checkpoint(tmp_path: Path, mixer: str) -> tuple[Path, torch.nn.Module]:
    """checkpoint-2 of a distill.py run as distill.py writes it (the student's save_pretrained, the tokenizer,
    trainer_state.json with the config): a student of a tiny random Llama teacher, gates moved off their init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainkit.students import build_student
    tokenizer = build_byte_level_tokenizer()
    kwargs = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(6)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tokenizer), **kwargs))
    student, _ = build_student(teacher, mixer=mixer)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = validate({"script": "distill.py", "paths": {"output_dir": str(tmp_path), "run_name": "distill-run"},
                       "model": {"config": dict(TINY_LLAMA)}, "student": {"mixer": mixer}},
                      SCRIPT_CONFIGS["distill.py"])
    checkpoint = tmp_path / "distill-run" / "checkpoint-2"
    student.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / TRAINER_STATE_FILE).write_text(json.dumps({"step": 2, "config": config.as_dict()}))
    return checkpoint, student.eval()


def test_gla_student_exports_as_fla_gla(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainkit.patches.fla import use_reference_backend
    checkpoint, student = distill_checkpoint(tmp_path, "gla")
    ids = input_ids()
    with torch.no_grad():
        expected = student(input_ids=ids).logits.float()
    out = tmp_path / "export"
    export(checkpoint, out, "--dtype", "fp32", "--max-shard-size", "100KB")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gla"
    plain_transformers_logits(out, ids, kind="gla")  # fla loads it without trainkit, every key matched
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    use_reference_backend(model)
    with torch.no_grad():
        error = max_error(model(input_ids=ids).logits.float(), expected)
    print(f"GLA student as fla GLA: max |logit error| fp32 {error:.2e} (logit scale {expected.abs().max():.2f})")
    assert error < 1e-4
    assert "import fla" in (out / "EXPORT.md").read_text()


def test_mamba2_student_refused_with_what_loads_it(tmp_path):
    checkpoint, _ = distill_checkpoint(tmp_path, "discrete_mamba2")
    result = _run_cli("--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "trainkit_linear_llama" in result.stderr and "import trainkit.students" in result.stderr
    assert not (tmp_path / "o").exists()


def test_trained_moe_run_exports_through_the_cli(tmp_path):
    """The whole path: train_qlora.py trains the tiny 4-bit MoE for 2 steps, `python -m trainkit.export` merges its
    final checkpoint, plain transformers loads the export and computes what trainkit's base + adapter computes."""
    from helpers_qlora import run_script, tiny_config
    config = tiny_config(tmp_path, training={"max_steps": 2},
                         logging={"eval_interval": 2, "checkpoint_interval": 2, "log_interval": 1})
    result = run_script(["--config", str(config)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "tiny" / "final-checkpoint-2"
    out = tmp_path / "export"
    result = _run_cli("--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "load it with" in result.stdout
    ids = input_ids()
    raw = yaml.safe_load(config.read_text())
    expected = reference_logits(raw, tmp_path / "ref", checkpoint, ids)
    error = max_error(plain_transformers_logits(out, ids), expected)
    print(f"trained tiny MoE, fp32 export: max |logit error| {error:.2e}")
    assert error < 1e-4


def per_expert_base(raw: dict, tmp_path: Path) -> dict:
    """`raw` (the default MoE job) with its base saved by transformers 5's save_pretrained: a Mixtral with its
    experts stored one by one (block_sparse_moe.experts.N.w1/w2/w3)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    tokenizer = build_byte_level_tokenizer()
    base = tmp_path / "mixtral-base"
    kwargs = {k: v for k, v in raw["model"]["config"].items() if k != "model_type"}
    kwargs.update(num_hidden_layers=2)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", vocab_size=len(tokenizer), **kwargs)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in f.keys()
    raw["paths"]["model_name_or_path"], raw["model"]["config"] = str(base), None
    return raw


def test_moe_base_in_per_expert_layout(tmp_path):
    """A MoE base as transformers 5's save_pretrained writes it (and hub checkpoints hold it): experts one by one
    (block_sparse_moe.experts.N.w1/w2/w3), fused into 3-D banks only while loading. The dequantized export rounds
    each layer's bank as the run did (stacked, one NF4 bank) and writes the per-expert layout back."""
    raw = per_expert_base(qlora_config(), tmp_path)
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    ids = input_ids()
    expected = reference_logits(raw, tmp_path / "runs", checkpoint, ids)
    errors = {}
    for base_weights in ("dequantized", "original"):
        out = tmp_path / base_weights
        export(checkpoint, out, "--dtype", "fp32", "--base-weights", base_weights)
        errors[base_weights] = max_error(plain_transformers_logits(out, ids), expected)
    print(f"per-expert MoE base: max |logit error| fp32 dequantized {errors['dequantized']:.2e}, "
          f"original {errors['original']:.2e}")
    assert errors["dequantized"] < 1e-4
    assert errors["original"] > 20 * errors["dequantized"]


def test_hub_id_base_resolves_in_the_hf_cache(tmp_path, dense_base):
    """paths.model_name_or_path a hub id: the export finds it in the HF cache (paths.cache_dir), offline. (The
    run is made from the local copy: transformers asks the hub about a hub id even with local_files_only.)"""
    import shutil
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--tiny--llama" / "snapshots" / ("0" * 40)
    shutil.copytree(dense_base, snapshot)
    (cache / "models--tiny--llama" / "refs").mkdir()
    (cache / "models--tiny--llama" / "refs" / "main").write_text("0" * 40)
    raw = lora_config(model_path=str(dense_base))
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    ids = input_ids()
    expected = reference_logits(raw, tmp_path / "runs", checkpoint, ids)

    def point_at(hub_id: str) -> None:
        state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
        state["config"]["paths"].update(model_name_or_path=hub_id, cache_dir=str(cache))
        (checkpoint / TRAINER_STATE_FILE).write_text(json.dumps(state))

    point_at("tiny/llama")
    export(checkpoint, tmp_path / "out", "--dtype", "fp32")
    assert max_error(plain_transformers_logits(tmp_path / "out", ids), expected) < 1e-4
    point_at("tiny/absent")
    result = _run_cli("--checkpoint", str(checkpoint), "--out", str(tmp_path / "o2"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "not in the HF cache" in result.stderr and "huggingface-cli download tiny/absent" in result.stderr


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_moe_expert_adapters_merge_into_the_experts(tmp_path, layout, capsys):
    """LoRA on the fused experts (lora.expert_targets: auto, trainkit.expert_lora) of the default 4-bit MoE job: the
    export merges each expert's update into the dequantized bank (fused base) or into each expert's w1/w3/w2 (a base
    in transformers 5's per-expert layout), and plain transformers computes what trainkit's base + adapter does."""
    raw = qlora_config()
    raw["lora"]["expert_targets"] = "auto"
    raw["lora"]["expert_r"] = 4
    if layout == "per_expert":
        raw = per_expert_base(raw, tmp_path)
    checkpoint = make_checkpoint(raw, tmp_path / "runs")
    assert json.loads((checkpoint / "adapter_config.json").read_text())["target_parameters"]
    ids = input_ids()
    expected = reference_logits(raw, tmp_path / "runs", checkpoint, ids)
    out = tmp_path / "export"
    capsys.readouterr()
    export(checkpoint, out, "--dtype", "fp32")
    said = capsys.readouterr()
    counts = re.search(r"\((\d+) with the adapter merged, (\d+) replaced", said.out + said.err)
    assert counts and int(counts.group(1)) > 0, said  # the summary counts expert tensors too, none negative
    error = max_error(plain_transformers_logits(out, ids), expected)
    # the expert adapters move the logits far more than the export's error: they were merged, not dropped
    from safetensors.torch import load_file, save_file
    no_experts = tmp_path / "runs" / "no-experts"
    shutil.copytree(checkpoint, no_experts)
    state = load_file(no_experts / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if ".experts." in k and "lora_B" in k else v for k, v in state.items()},
              no_experts / "adapter_model.safetensors")
    without = reference_logits(raw, tmp_path / "runs", no_experts, ids)
    print(f"MoE expert adapters ({layout} base), fp32 export: max |logit error| {error:.2e}, expert adapters' "
          f"effect {max_error(expected, without):.2e}")
    assert error < 1e-4
    assert max_error(expected, without) > 100 * error
