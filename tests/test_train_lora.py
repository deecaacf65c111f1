"""train_lora.py end to end on a tiny GLA (fla's GLAForCausalLM on the CPU reference backend), run as a
real subprocess on the GLUE / SAMSum / Spider fixtures shipped in data/tasks."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_qlora import REPO, run_script, kill_at_drawn_state
from trainkit.fileio import iter_jsonl
from trainkit.runlog import EVAL_FIELDS, LORA_EVAL_FIELDS

CONFIG = REPO / "configs" / "gla_lora_sst2.yaml"


def lora_config(tmp_path: Path, **sections) -> Path:
    """The shipped tiny GLA config, shortened for tests; `sections` update it per section."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["paths"].update(output_dir=str(tmp_path / "out"), run_name="gla")
    cfg["task"]["local_dir"] = str(REPO / "data" / "tasks" / "glue")
    cfg["training"].update(max_steps=8, seed=3)
    cfg["task"].update(max_eval_samples=12)
    cfg["logging"].update(log_interval=2, eval_interval=4, checkpoint_interval=4, progress_bar=False)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stream(run_dir: Path, name: str) -> list[dict]:
    return list(iter_jsonl(run_dir / "logs" / name))


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    # GRADIENT_CHECKPOINTING=auto over the config's false, with a budget nothing fits: every layer checkpointed
    cfg = lora_config(tmp, memory={"activation_memory_budget_gib": 1e-9})
    result = run_script(["--config", str(cfg)], script="train_lora.py", HP_PEFT_R="4", HP_PEFT_ALPHA="8",
                        GRADIENT_CHECKPOINTING="auto")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out" / "gla", result


def test_gla_run_reports_the_task_metric(sst2_run):
    run_dir, result = sst2_run
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["script"] == "train_lora.py" and info["task"] == "sst2"
    assert info["model"]["family"] == "gla"
    assert any("reference backend" in note for note in info["model"]["notes"])
    assert info["versions"]["flash-linear-attention"] and info["versions"]["fla-core"] and info["versions"]["triton"]
    assert "fla.reference_backend" in {p["name"] for p in info["patches"]}
    evals = stream(run_dir, "eval_log.jsonl")
    assert [e["step"] for e in evals] == [4, 8]
    # every literal field (not the <placeholder> families, which depend on the task) but those of test lines and DART
    lora_fields = {f for f in LORA_EVAL_FIELDS if "<" not in f} - {"evaluated_step", "signatures"}
    always = set(EVAL_FIELDS) - {"nan_fields"}  # nan_fields: only in a line with a NaN value
    for e in evals:
        assert always | lora_fields <= set(e), always | lora_fields - set(e)
        assert 0 <= e["accuracy"] <= 100 and e["task_score"] == e["accuracy"]
        assert e["metric"] == "task_score" and e["eval_loss"] > 0 and e["split"] == "validation"
        predictions = [json.loads(line) for line in (run_dir / e["predictions"][0]).read_text().splitlines()]
        assert len(predictions) == 12 and {"prompt", "prediction", "references"} <= predictions[0].keys()
    # generation.max_length null: the longest label word + eos, " negative" + eos in byte-level tokens
    assert info["data"]["max_new_tokens"] == 10 and "longest label word" in info["data"]["max_new_tokens_from"]
    assert "generation: up to 10 new tokens" in result.stdout
    assert all(e["truncated_prompts"] == 0 for e in evals)
    assert (run_dir / "final-checkpoint-8" / "adapter_model.safetensors").is_file()
    assert (run_dir / "best-adapter" / "adapter_config.json").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["metric"] == "task_score" and results["best_step"] in (4, 8)
    assert "task_score" in result.stdout


def test_shipped_cpu_demo_learns(tmp_path):
    """configs/gla_lora_sst2.yaml as shipped (only the output folder moved) ends well above chance
    on its balanced validation split: it fails if learning breaks, not only if the pipeline does."""
    result = run_script(["--config", str(CONFIG), f"paths.output_dir={tmp_path}"], script="train_lora.py", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(CONFIG.read_text())
    run_dir = tmp_path / cfg["paths"]["run_name"]
    validation = [json.loads(line) for line in (REPO / cfg["task"]["local_dir"] / "sst2" / "validation.jsonl").open()]
    assert sum(row["label"] for row in validation) * 2 == len(validation)  # balanced: chance is 50 %
    train = {json.loads(line)["sentence"] for line in (REPO / cfg["task"]["local_dir"] / "sst2" / "train.jsonl").open()}
    assert not train & {row["sentence"] for row in validation}  # learnt, not memorised
    final = stream(run_dir, "eval_log.jsonl")[-1]
    assert final["split"] == "validation" and final["step"] == cfg["training"]["max_steps"]
    assert final["validation_examples"] == len(validation)
    assert final["accuracy"] >= 80, final


def test_env_overrides_are_applied_printed_and_logged(sst2_run):
    run_dir, result = sst2_run
    adapter = json.loads((run_dir / "final-checkpoint-8" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert "HP_PEFT_R -> lora.r=4" in result.stdout
    info = json.loads((run_dir / "run.json").read_text())
    assert info["env_overrides"]["HP_PEFT_R"] == {"key": "lora.r", "value": 4}
    assert info["env_overrides"]["GRADIENT_CHECKPOINTING"] == {"key": "memory.gradient_checkpointing", "value": "auto"}
    ckpt = info["model"]["activation_checkpointing"]
    assert ckpt["policy"] == "auto" and ckpt["layers"] == ckpt["of"] == 2 and ckpt["tokens"] == 8 * (128 + 16), ckpt
    assert ckpt["budget_from"] == "memory.activation_memory_budget_gib" and ckpt["estimated_gib"] > ckpt["budget_gib"]
    assert "activation checkpointing: auto -> 2 of 2 layers" in result.stdout
    # every GLA projection of the preset carries an adapter, gk_proj's two Linear layers included
    assert {"q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "0", "1", "gate_proj", "up_proj", "down_proj"} <= \
        {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} | set(adapter["target_modules"])


def test_malformed_env_and_config_are_one_line_errors(tmp_path):
    cfg = lora_config(tmp_path)
    cases = [({"HP_LR": "fast"}, [], "HP_LR='fast'"),
             ({}, ["task.name=glue_nope"], "task.name"),
             ({}, ["lora.init=svd"], "lora.init: 'svd'"),
             ({"HP_PEFT_DROPOUT": "2"}, [], "lora.dropout"),
             ({"GRADIENT_CHECKPOINTING": "sometimes"}, [], "GRADIENT_CHECKPOINTING='sometimes': expected auto, 1/0"),
             ({}, ["memory.gradient_checkpointing=some"], "memory.gradient_checkpointing: expected auto, true or false")]
    for env, overrides, needle in cases:
        result = run_script(["--config", str(cfg), *overrides], script="train_lora.py", timeout=120, **env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (env, overrides, result.stderr[-2000:])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task,metrics", [
    ("samsum", ("rougeLsum", "rouge1", "rouge2", "rougeL")),
    ("spider", ("exact_match", "execution_accuracy")),
])
def test_generation_tasks_on_a_llama(tmp_path, task, metrics):
    """An HF Llama (not GLA) on SAMSum / Spider fixtures: metrics computed from generations, test split scored."""
    local = {"samsum": "samsum", "spider": "spider"}[task]
    # Spider: byte-level prompts of 408-540 tokens, so some are cut (from the schema's tail)
    max_source_length = {"samsum": 768, "spider": 450}[task]
    cfg = lora_config(tmp_path, model={"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                  "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "max_position_embeddings": 2048}},
                      task={"name": task, "local_dir": str(REPO / "data" / "tasks" / local), "max_eval_samples": 4,
                            "max_source_length": max_source_length, "max_target_length": 64},
                      lora={"modules_to_save": ["embed_tokens", "lm_head"], "variant": "dora"},
                      generation={"max_length": 16, "num_beams": 2, "batch_size": 4},
                      training={"max_steps": 4}, optimization={"micro_batch_size": 2},
                      logging={"eval_interval": 4, "checkpoint_interval": 4})
    result = run_script(["--config", str(cfg)], script="train_lora.py")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "gla"
    evals = stream(run_dir, "eval_log.jsonl")
    validation = [e for e in evals if e["split"] == "validation"]
    assert validation and all(m in validation[-1] for m in metrics) and validation[-1]["task_score"] is not None
    data = json.loads((run_dir / "run.json").read_text())["data"]
    if task == "spider":  # the counts of cut prompts: logged per evaluation, warned, and at start for training
        assert all(e["truncated_prompts"] > 0 for e in evals), evals
        assert "prompts are longer than task.max_source_length=450 tokens and were cut" in result.stdout
        assert data["truncated_train_prompts"] > 0
    else:
        assert all(e["truncated_prompts"] == 0 for e in evals) and data["truncated_train_prompts"] == 0
    assert data["max_new_tokens"] == 16 and data["max_new_tokens_from"] == "generation.max_length"


def test_pissa_init_and_exact_resume_after_sigkill(tmp_path):
    """PiSSA (fast SVD) adapters; SIGKILL at a drawn state after the first checkpoint, --resume: same final adapter bitwise."""
    sections = dict(lora={"init": "pissa", "pissa_fast": True, "modules_to_save": []},
                    training={"max_steps": 8}, generation={"enabled": False},
                    logging={"metric_for_best": "eval_loss", "greater_is_better": False, "eval_interval": 4})
    ref_cfg = lora_config(tmp_path / "ref", **sections)
    result = run_script(["--config", str(ref_cfg)], script="train_lora.py")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_file(tmp_path / "ref" / "out" / "gla" / "final-checkpoint-8" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "ref" / "out" / "gla" / "final-checkpoint-8" / "adapter_config.json").read_text())[
        "init_lora_weights"] == "pissa_niter_4"

    cfg = lora_config(tmp_path / "kill", **sections)
    run_dir = tmp_path / "kill" / "out" / "gla"
    code, state = kill_at_drawn_state("train_lora.py", cfg, run_dir, checkpoints=[4], log_steps=[6])
    assert code == -signal.SIGKILL, f"the run ended before the kill at {state}"
    result = run_script(["--config", str(cfg), "--resume"], script="train_lora.py")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_file(run_dir / "final-checkpoint-8" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert [r["step"] for r in stream(run_dir, "training_log.jsonl")] == [2, 4, 6, 8]


def test_max_eval_samples_caps_validation_not_the_test_split(tmp_path):
    """sst2-tvt: validation carved from train and capped at 2 examples; the test split (the public
    validation, 16 rows) is scored whole at the end, and its count logged and printed. Scored by
    label likelihood (mean-normalized), which names a label for every example."""
    cfg = lora_config(tmp_path, task={"name": "sst2-tvt", "max_eval_samples": 2, "label_likelihood": True,
                                      "label_likelihood_normalization": "mean"},
                      training={"max_steps": 2}, logging={"log_interval": 1, "eval_interval": 2, "checkpoint_interval": 2})
    result = run_script(["--config", str(cfg)], script="train_lora.py")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "gla"
    whole_test = len((REPO / "data" / "tasks" / "glue" / "sst2" / "validation.jsonl").read_text().splitlines())
    assert whole_test > 2
    info = json.loads((run_dir / "run.json").read_text())
    assert info["data"]["validation_examples"] == 2 and info["data"]["test_examples"] == whole_test
    assert info["data"]["test_splits"] == ["test"]
    evals = stream(run_dir, "eval_log.jsonl")
    validation = [e for e in evals if e["split"] == "validation"]
    [test] = [e for e in evals if e["split"] == "test"]
    assert validation and all(e["validation_examples"] == 2 for e in validation)
    assert test["test_examples"] == whole_test and test["evaluated_step"] == 2
    predictions = (run_dir / test["predictions"][0]).read_text().splitlines()
    assert len(predictions) == whole_test
    assert {json.loads(line)["prediction"] for line in predictions} <= {"negative", "positive"}
    assert f"test {whole_test} examples" in result.stdout


TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gla", "llama"])
def test_two_processes_match_one_process_and_resume(tmp_path, family):
    """2 CPU processes (gloo), micro batch 4 == 1 process, micro batch 4 x 2 accumulation: the same
    losses and tokens, the same eval loss and task metric on the same 11 validation examples (an odd
    count: the processes get 6 and 5, none repeated or dropped); a checkpoint of the 2-process run
    resumes on 2 processes to the same adapter. GLA scored by generation, an HF Llama by label likelihood."""
    from trainkit.evaluate import examples_from_run_predictions
    from trainkit.tasks import get_task

    from helpers_qlora import check_two_process_resume, one_and_two_processes

    sections = dict(task={"max_eval_samples": 11, "label_likelihood": family == "llama"},
                    training={"max_steps": 4}, logging={"eval_interval": 2, "checkpoint_interval": 2})
    if family == "llama":
        sections.update(model={"config": TINY_LLAMA}, lora={"modules_to_save": ["embed_tokens", "lm_head"]})
    _, two = one_and_two_processes("train_lora.py", lora_config, tmp_path, 4, **sections)
    one_dir, two_dir = tmp_path / "one" / "out" / "gla", tmp_path / "two" / "out" / "gla"
    info = json.loads((two_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["num_machines"] == 1 and info["status"] == "finished"
    assert info["model"]["family"] == family
    train_one, train_two = stream(one_dir, "training_log.jsonl"), stream(two_dir, "training_log.jsonl")
    assert [r["step"] for r in train_two] == [2, 4]
    assert [r["tokens"] for r in train_one] == [r["tokens"] for r in train_two]
    # fp32 on CPU: measured bitwise equal (GLA and Llama); the bound allows another summation order
    assert [r["loss"] for r in train_two] == pytest.approx([r["loss"] for r in train_one], rel=1e-5)

    evals_one, evals_two = stream(one_dir, "eval_log.jsonl"), stream(two_dir, "eval_log.jsonl")
    assert [e["step"] for e in evals_two] == [2, 4]
    task = get_task("sst2")
    for e1, e2 in zip(evals_one, evals_two):
        assert e2["validation_examples"] == e1["validation_examples"] == 11
        assert e2["eval_tokens"] == e1["eval_tokens"]  # every validation row once, none padded in twice
        assert e2["eval_loss"] == pytest.approx(e1["eval_loss"], rel=1e-5)  # measured: 1e-7 apart (other batches)
        rows_one, rows_two = ([json.loads(line) for line in (d / e["predictions"][0]).read_text().splitlines()]
                              for d, e in ((one_dir, e1), (two_dir, e2)))
        assert [r["prompt"] for r in rows_two] == [r["prompt"] for r in rows_one]  # every example once, in order
        assert [r["prediction"] for r in rows_two] == [r["prediction"] for r in rows_one]
        # the logged metric is the one of these predictions
        texts, examples, split = examples_from_run_predictions(two_dir / e2["predictions"][0])
        assert task.score(texts, examples, split=split)["accuracy"] == e2["accuracy"] == e1["accuracy"]
    if family == "llama":  # label likelihood names a label for every example: a real accuracy, not 0
        assert {r["prediction"] for r in rows_two} <= {"negative", "positive"}

    check_two_process_resume("train_lora.py", two, two_dir, 2, 4, "adapter_model.safetensors")
