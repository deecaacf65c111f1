"""python -m trainkit.generate on real checkpoints of tiny models, run as a real subprocess: a QLoRA MoE
adapter (the default training_config.yaml's model, trained a few steps), a GLA train_lora.py adapter, a
distilled student and a plain save_pretrained model directory; interactive chat through a pipe; bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_qlora import REPO, run_script, script_env
from trainkit.fileio import iter_jsonl
from trainkit.generation import GenerationSettings, generate_texts

# a template of its own (not the byte tokenizer's), so the test shows the directory's template is the one used
CHAT_TEMPLATE = ("{% for m in messages %}{{ '[' ~ m['role'] ~ '] ' ~ m['content'] ~ '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


def generate_cli(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The command on the CPU unless args name a --device: the references are computed on the CPU."""
    device = [] if "--device" in args else ["--device", "cpu"]
    return subprocess.run([sys.executable, "-m", "trainkit.generate", *map(str, args), *device], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=timeout, env=script_env())


# the runs train on the CPU on every machine, so that their predictions are the CPU's
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """training_config.yaml (the default tiny MoE, NF4 experts) for 4 steps on CPU."""
    out = tmp_path_factory.mktemp("qlora")
    result = run_script(["--config", "training_config.yaml", f"paths.output_dir={out}", "training.max_steps=4",
                         "training.max_seq_length=64", "optimization.micro_batch_size=2", "training.max_eval_batches=1",
                         "logging.eval_interval=2", "logging.checkpoint_interval=2", "logging.log_interval=2",
                         "logging.progress_bar=false", "memory.gradient_checkpointing=false"], **CPU_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "tiny-moe-qlora"


@pytest.fixture(scope="module")
def gla_run(tmp_path_factory):
    """configs/gla_lora_sst2.yaml for 4 steps, one evaluation (4 validation prompts) at the end; PiSSA init by the
    fast randomized SVD, which leaves the residual in the base: loading must redo it as training did."""
    out = tmp_path_factory.mktemp("gla")
    result = run_script(["--config", "configs/gla_lora_sst2.yaml", f"paths.output_dir={out}", "training.max_steps=4",
                         "task.max_eval_samples=4", "task.evaluate_test=false", "logging.eval_interval=4",
                         "logging.checkpoint_interval=4", "logging.progress_bar=false", "lora.init=pissa",
                         "lora.pissa_fast=true"], script="train_lora.py",
                        **CPU_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "tiny-gla-lora-sst2"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved with save_pretrained, the byte tokenizer with CHAT_TEMPLATE, and a
    generation_config.json that asks for 7 new tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from trainkit.tokenizer import build_byte_level_tokenizer

    path = tmp_path_factory.mktemp("model") / "llama"
    tokenizer = build_byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(max_new_tokens=7, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reference_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- adapters

def test_qlora_moe_checkpoint_matches_generate_texts(qlora_run):
    """The CLI's text equals generate_texts on the base built as training builds it (4-bit, NF4 experts) with
    the adapter loaded; greedy, so deterministic."""
    from trainkit.adapters import load_adapter
    from trainkit.checkpoint_model import prepare_for_generation
    from trainkit.checkpoints import checkpoint_config
    from trainkit.models import load_model
    from trainkit.tokenizer import load_tokenizer

    checkpoint = qlora_run / "final-checkpoint-4"
    prompts = ["Once upon a time", "The weather today"]
    result = generate_cli("--checkpoint", checkpoint, *prompts, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4-bit base parameters" in result.stderr and "max_new_tokens=12, greedy" in result.stderr

    cfg = checkpoint_config(checkpoint)
    tokenizer = load_tokenizer(cfg)
    base, info = load_model(cfg, "cpu", tokenizer, cfg.quantization.compute_dtype, cfg.quantization)
    assert info["quantized_expert_banks"] > 0 and info["fraction_4bit"] > 0.9
    model = load_adapter(base, str(checkpoint))
    prepare_for_generation(model)
    texts = generate_texts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12)).texts
    assert result.stdout == "\n---\n".join(texts) + "\n"
    # the adapter matters: the base alone continues differently
    with model.disable_adapter():
        assert generate_texts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12)).texts != texts

    jsonl = generate_cli("--checkpoint", checkpoint, *prompts, "--max-new-tokens", "12", "--jsonl")
    assert [json.loads(line) for line in jsonl.stdout.splitlines()] == [
        {"prompt": p, "completion": t} for p, t in zip(prompts, texts)]


def test_every_adapter_directory_of_a_run_loads(qlora_run):
    from trainkit.checkpoint_model import load_checkpoint_model

    dirs = [d for d in qlora_run.iterdir() if d.name.startswith(("checkpoint-", "final-checkpoint-", "best-adapter"))]
    assert {d.name for d in dirs} >= {"best-adapter", "final-checkpoint-4"}
    for d in dirs:
        loaded = load_checkpoint_model(d, "cpu")
        assert loaded.kind == "adapter" and loaded.config.script == "train_qlora.py"
        assert loaded.settings == GenerationSettings()  # train_qlora.py evaluates by loss: the defaults
        assert any(type(p).__name__ == "Params4bit" for p in loaded.model.parameters())


def test_missing_base_model_is_one_line_error(qlora_run, tmp_path, capsys):
    """An adapter whose run's base model is gone (here: paths.model_name_or_path, a folder now empty)."""
    import shutil

    from trainkit.generate import main

    checkpoint = tmp_path / "final-checkpoint-4"
    shutil.copytree(qlora_run / "final-checkpoint-4", checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (tmp_path / "base").mkdir()
    state["config"]["paths"]["model_name_or_path"] = str(tmp_path / "base")
    state["config"]["model"]["config"] = None
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert main(["--checkpoint", str(checkpoint), "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run's base model does not load: paths.model_name_or_path" in err[0], err


def test_gla_checkpoint_reproduces_the_runs_predictions(gla_run):
    """The CLI on the final adapter with the run's generation settings (new tokens from run.json) prints what
    the run's evaluation at that step predicted."""
    rows = list(iter_jsonl(gla_run / "predictions" / "step-4-validation.jsonl"))
    assert len(rows) == 4
    result = generate_cli("--checkpoint", gla_run / "final-checkpoint-4", "--jsonl", *[r["prompt"] for r in rows])
    assert result.returncode == 0, result.stderr[-3000:]
    max_new = json.loads((gla_run / "run.json").read_text())["data"]["max_new_tokens"]
    assert f"max_new_tokens={max_new}, greedy" in result.stderr and "reference backend" in result.stderr
    completions = [json.loads(line)["completion"] for line in result.stdout.splitlines()]
    assert completions == [r["prediction"] for r in rows]

    # --task-format: the sentence alone (SST-2 has one text field) or its JSON fields give the run's prompt
    sentences = [r["prompt"].split("Sentence: ", 1)[1].removesuffix("\nAnswer:") for r in rows]
    inputs = [sentences[0], *[json.dumps({"sentence": s}) for s in sentences[1:]]]
    result = generate_cli("--checkpoint", gla_run / "best-adapter", "--task-format", "--jsonl", *inputs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["completion"] for line in result.stdout.splitlines()] == completions


def test_gla_checkpoint_reproduces_the_runs_eval_loss(gla_run):
    """Finer than the greedy text: the loaded model's loss on the run's validation rows equals the eval_loss the
    run logged at that step (the PiSSA residual in the base must be rebuilt exactly for this)."""
    import torch.nn.functional as F

    from trainkit.checkpoint_model import load_checkpoint_model
    from trainkit.data import make_collator, tokenize_prompt_target

    loaded = load_checkpoint_model(gla_run / "final-checkpoint-4", "cpu")
    rows = list(iter_jsonl(gla_run / "predictions" / "step-4-validation.jsonl"))
    cfg = loaded.config
    batch = make_collator(loaded.tokenizer)(tokenize_prompt_target(
        [r["prompt"] for r in rows], [" " + r["references"][0] for r in rows], loaded.tokenizer,
        cfg.task.max_source_length, cfg.task.max_target_length))
    with torch.no_grad():
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100).item()
    logged = [e for e in iter_jsonl(gla_run / "logs" / "eval_log.jsonl") if e["step"] == 4][0]["eval_loss"]
    assert loss == pytest.approx(logged, rel=1e-5)


# ---------------------------------------------------------------------------------------------- model dirs

def test_model_directory_uses_its_generation_config(model_dir):
    model, tokenizer = reference_model(model_dir)
    seven = generate_texts(model, tokenizer, ["Hello"], GenerationSettings(max_new_tokens=7)).texts
    assert seven != generate_texts(model, tokenizer, ["Hello"], GenerationSettings(max_new_tokens=20)).texts
    result = generate_cli("--checkpoint", model_dir, "Hello")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == seven[0] + "\n"
    assert "max_new_tokens=7, greedy" in result.stderr

    # the flags override it: sampling with a top_p that keeps only the most likely token is greedy again
    result = generate_cli("--checkpoint", model_dir, "Hello", "--max-new-tokens", "20", "--top-p", "1e-6", "--seed", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_new_tokens=20, sampling top_p=1e-06" in result.stderr
    assert result.stdout == generate_texts(model, tokenizer, ["Hello"], GenerationSettings(max_new_tokens=20)).texts[0] + "\n"


def test_distilled_student_generates_without_cache(tmp_path):
    """A distill.py student (save_pretrained form, no KV cache in its mixers): the CLI's text equals a greedy
    loop that recomputes the whole sequence each step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainkit.students import build_student
    from trainkit.tokenizer import build_byte_level_tokenizer

    tokenizer = build_byte_level_tokenizer()
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  vocab_size=len(tokenizer), initializer_range=0.2)
    torch.manual_seed(3)
    teacher = AutoModelForCausalLM.from_config(config)
    student, _ = build_student(teacher, mixer="discrete_mamba2", attention_layers=[1])
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    student.eval()

    ids = tokenizer("Once upon", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            next_id = student(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id], dim=1)
    expected = tokenizer.decode(ids[0, 9:], skip_special_tokens=True)

    result = generate_cli("--checkpoint", tmp_path / "student", "Once upon", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distill.py student" in result.stderr
    assert result.stdout == expected + "\n"


# ---------------------------------------------------------------------------------------------- interactive

def test_interactive_chat_through_a_pipe(model_dir):
    """Without a terminal and with --interactive: each line is the next user turn of a conversation rendered
    with the tokenizer's chat template; /reset starts over (so the same line gives the same reply), /quit ends."""
    model, tokenizer = reference_model(model_dir)
    settings = GenerationSettings(max_new_tokens=7)

    def reply(messages):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt.startswith("[user] ")  # CHAT_TEMPLATE
        return generate_texts(model, tokenizer, [prompt], settings).texts[0]

    first = reply([{"role": "user", "content": "hello"}])
    second = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "how are you"}])
    result = generate_cli("--checkpoint", model_dir, "--interactive", stdin="hello\nhow are you\n/reset\nhello\n/quit\nmore\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    assert "(conversation cleared)" in result.stderr

    # --no-chat: each line on its own, as given; the end of input ends the loop
    plain = generate_texts(model, tokenizer, ["hello", "how are you"], settings).texts
    result = generate_cli("--checkpoint", model_dir, "-i", "--no-chat", "--jsonl", stdin="hello\n\nhow are you\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"prompt": "hello", "completion": plain[0]}, {"prompt": "how are you", "completion": plain[1]}]


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_exit_2(tmp_path, model_dir, capsys):
    from trainkit.generate import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "no_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "no_tokenizer" / name).write_bytes((model_dir / name).read_bytes())
    cases = {
        (str(tmp_path / "missing"), "hi"): "missing: no such directory",
        (str(tmp_path / "empty"), "hi"): "not a checkpoint or model directory",
        (str(tmp_path / "config_only"), "hi"): "not a checkpoint or model directory",
        (str(tmp_path / "no_tokenizer"), "hi"): "no_tokenizer: no tokenizer saved there",
        (str(model_dir), ""): "prompt 1 is empty",
        (str(model_dir), "hi", "  "): "prompt 2 is empty",
        (str(model_dir), "hi", "--max-new-tokens", "0"): "--max-new-tokens: must be >= 1",
        (str(model_dir), "hi", "--temperature", "0"): "--temperature: must be > 0",
        (str(model_dir), "hi", "--device", "tpu"): "--device: 'tpu' is not auto, cpu, cuda or cuda:N",
        (str(model_dir), "hi", "--task-format"): "is not a train_lora.py adapter directory",
        (str(model_dir), "hi", "--task-format", "--chat"): "no --chat / --system with it",
    }
    if not torch.cuda.is_available():
        cases[(str(model_dir), "hi", "--device", "cuda")] = "--device cuda: CUDA is not available here"
    for (checkpoint, *rest), expected in cases.items():
        assert main(["--checkpoint", checkpoint, *rest]) == 2, (checkpoint, rest)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1 and expected in lines[-1], (rest, captured.err)

    # the same through the real command: no traceback; and no prompt without a terminal or --interactive
    one_line_error(generate_cli("--checkpoint", tmp_path / "empty", "hi"), "not a checkpoint or model directory")
    one_line_error(generate_cli("--checkpoint", model_dir, stdin=""), "no prompt given")


# ---------------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("run", ["qlora_run", "gla_run"])
def test_cuda_checkpoint_matches_generate_texts(run, request):
    """On CUDA: the 4-bit MoE base with the bitsandbytes kernels / GLA with fla's Triton kernels, in the dtype
    auto picks there; the CLI prints what generate_texts gives on the same directory loaded in this process."""
    from trainkit.checkpoint_model import load_checkpoint_model

    run_dir = request.getfixturevalue(run)
    checkpoint = next(d for d in sorted(run_dir.iterdir()) if d.name.startswith("final-checkpoint-"))
    prompts = ["Once upon a time", "The weather today"]
    result = generate_cli("--checkpoint", checkpoint, *prompts, "--device", "cuda", "--max-new-tokens", "12", "--jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device: cuda" in result.stderr
    loaded = load_checkpoint_model(checkpoint, "cuda")
    assert next(loaded.model.parameters()).device.type == "cuda"
    settings = dataclasses.replace(loaded.settings, max_new_tokens=12)
    texts = generate_texts(loaded.model, loaded.tokenizer, prompts, settings).texts
    assert [json.loads(line)["completion"] for line in result.stdout.splitlines()] == texts
