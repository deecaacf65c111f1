"""The sweep and aggregate commands over the real train_lora.py on CPU: tiny Llama runs on the SST-2 and
MRPC fixtures, 2 seeds, 2 CPU slots, then the result tables."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from helpers_qlora import REPO, script_env

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def test_sweep_then_aggregate_real_runs(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "gla_lora_sst2.yaml").read_text())
    cfg["model"]["config"] = TINY_LLAMA
    cfg["lora"]["modules_to_save"] = ["embed_tokens", "lm_head"]
    cfg["task"]["local_dir"] = str(REPO / "data" / "tasks" / "glue")
    cfg["training"]["max_steps"] = 6
    cfg["logging"].update(eval_interval=3, checkpoint_interval=3, progress_bar=False)
    config = tmp_path / "tiny_llama_lora.yaml"
    config.write_text(yaml.safe_dump(cfg))
    sweep_dir, out = tmp_path / "sweep", tmp_path / "outputs"
    run = subprocess.run(
        [sys.executable, "-m", "trainkit.sweep", "run", "--configs", str(config), "--seeds", "1", "2",
         "--datasets", "sst2", "glue-tvt_mrpc", "--gpus", "", "--cpu-slots", "2", "--sweep-dir", str(sweep_dir),
         "--output-dir", str(out), "--script", "train_lora.py", "--foreground"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=script_env())
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    state = json.loads((sweep_dir / "state.json").read_text())
    assert [j["state"] for j in state["jobs"]] == ["finished"] * 4
    for job in state["jobs"]:
        info = json.loads((out / job["run_name"] / "run.json").read_text())
        assert info["status"] == "finished" and info["config"]["training"]["seed"] == job["seed"]
    status = subprocess.run([sys.executable, "-m", "trainkit.sweep", "status", "--sweep-dir", str(sweep_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, env=script_env())
    assert status.returncode == 0 and status.stdout.count("finished") >= 4

    results = tmp_path / "results"
    agg = subprocess.run([sys.executable, "-m", "trainkit.aggregate", "--runs", str(out), "--out", str(results), "--plot"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=script_env())
    assert agg.returncode == 0, agg.stderr[-2000:]
    summary = json.loads((results / "summary.json").read_text())
    groups = {(g["dataset"], g["config"]): g for g in summary["groups"]}
    assert set(groups) == {("sst2", "tiny_llama_lora"), ("mrpc-tvt", "tiny_llama_lora")}
    assert all(g["n"] == 2 and g["seeds"] == [1, 2] for g in groups.values())
    mrpc = groups[("mrpc-tvt", "tiny_llama_lora")]
    assert {"f1", "accuracy", "task_score"} <= set(mrpc["metrics"])
    assert mrpc["reported_split"] == "test"  # carved task: the best checkpoint's test metrics
    assert (results / "summary.md").read_text().count("±") >= 2
    assert (results / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
