"""trainkit.aggregate: best evaluation by official metric, test-split reporting, mean/std over seeds, outputs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit import aggregate
from trainkit.tasks.official import selection_score

REPO = Path(__file__).resolve().parents[1]
FAKE = str(REPO / "tests" / "fake_trainer.py")


def make_run(root: Path, name: str, evals: list[dict] | None, task: str | None = "mrpc", seed: int | None = 1,
             status: str = "finished", **info) -> Path:
    run = root / name
    (run / "logs").mkdir(parents=True)
    config = {"paths": {"run_name": name, "output_dir": str(root)}, "training": {"seed": seed}}
    if task:
        config["task"] = {"name": task}
    (run / "run.json").write_text(json.dumps({"run_name": name, "status": status, "script": "train_lora.py",
                                              "config": config, **info}, indent=2))
    if evals is not None:
        with open(run / "logs" / "eval_log.jsonl", "w") as f:
            for rec in evals:
                f.write(json.dumps({"time": 0, **rec}) + "\n")
    return run


def mrpc(step, f1, acc, loss, **extra):
    return {"step": step, "task": "mrpc", "split": "validation", "f1": f1, "accuracy": acc, "eval_loss": loss,
            **extra}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run_main(argv, capsys):
    code = aggregate.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_best_by_official_metric_not_eval_loss(tmp_path, capsys):
    runs = tmp_path / "outputs"
    # task_score (mean of F1 and accuracy, computed here: no task_score field) is best at step 10,
    # eval_loss is best at step 30
    make_run(runs, "lora__mrpc__seed1", [mrpc(10, 80.0, 75.0, 1.0), mrpc(20, 70.0, 72.0, 0.8),
                                         mrpc(30, 60.0, 65.0, 0.5)])
    code, out, _ = run_main(["--runs", str(runs), "--out", str(tmp_path / "res")], capsys)
    assert code == 0
    [row] = read_csv(tmp_path / "res" / "results.csv")
    assert row["best_step"] == "10" and float(row["task_score"]) == 77.5
    assert float(row["f1"]) == 80.0 and float(row["accuracy"]) == 75.0 and float(row["eval_loss"]) == 1.0
    assert row["config"] == "lora" and row["dataset"] == "mrpc" and row["seed"] == "1"
    assert row["reported_split"] == "validation" and row["skip_reason"] == ""
    assert "| mrpc | lora | 1 | validation | 77.50 |" in out


def test_task_score_field_wins_and_ties_take_earliest(tmp_path):
    runs = tmp_path / "outputs"
    make_run(runs, "x", [mrpc(1, 50, 50, 1, task_score=90.0), mrpc(2, 99, 99, 1, task_score=91.0),
                         mrpc(3, 99, 99, 1, task_score=91.0)])
    row = aggregate.load_run(runs / "x")
    assert row["best_step"] == 2 and row["task_score"] == 91.0


def test_mean_std_over_seeds_and_output_files(tmp_path, capsys):
    runs = tmp_path / "outputs"
    for seed, score in ((1, 80.0), (2, 82.0), (3, 84.0)):
        make_run(runs, f"lora__mrpc__seed{seed}", [mrpc(5, score - 1, score + 1, 1.0), mrpc(10, 10, 10, 0.1)],
                 seed=seed)
    make_run(runs, "full__mrpc__seed1", [mrpc(5, 70, 70, 1.0)])
    make_run(runs, "lora__cola__seed1", [{"step": 5, "task": "cola", "mcc": 40.0}], task="cola")
    make_run(runs, "lora__sst2__seed9", None, task="sst2", seed=9, status="failed")  # no evaluations
    out_dir = tmp_path / "res"
    code, out, _ = run_main(["--runs", str(runs), "--out", str(out_dir)], capsys)
    assert code == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["group_by"] == ["dataset", "config"]
    keys = [(g["dataset"], g["config"]) for g in summary["groups"]]
    assert keys == [("cola", "lora"), ("mrpc", "full"), ("mrpc", "lora")]
    lora = summary["groups"][2]
    assert lora["n"] == 3 and lora["seeds"] == [1, 2, 3] and lora["reported_split"] == "validation"
    assert lora["metrics"]["task_score"]["mean"] == pytest.approx(82.0)
    assert lora["metrics"]["task_score"]["std"] == pytest.approx(2.0)  # sample std
    assert lora["metrics"]["f1"]["mean"] == pytest.approx(81.0) and lora["metrics"]["accuracy"]["mean"] == pytest.approx(83.0)
    assert summary["groups"][1]["metrics"]["task_score"]["std"] is None  # n = 1
    assert summary["skipped"] == [{"run_dir": str(runs / "lora__sst2__seed9"), "run_name": "lora__sst2__seed9",
                                   "reason": "no evaluations (logs/eval_log.jsonl missing or empty)"}]
    rows = read_csv(out_dir / "summary.csv")
    assert list(rows[0])[:5] == ["dataset", "config", "n", "seeds", "reported_split"]
    assert {"task_score_mean", "task_score_std", "mcc_mean", "f1_std", "accuracy_mean", "runs"} <= set(rows[0])
    assert rows[2]["seeds"] == "1;2;3" and float(rows[2]["task_score_std"]) == 2.0
    assert rows[0]["mcc_mean"] == "40.0" and rows[0]["f1_mean"] == "" and rows[1]["task_score_std"] == ""
    results = read_csv(out_dir / "results.csv")
    assert [r["run_name"] for r in results] == ["lora__cola__seed1", "full__mrpc__seed1", "lora__mrpc__seed1",
                                                "lora__mrpc__seed2", "lora__mrpc__seed3", "lora__sst2__seed9"]
    assert results[-1]["skip_reason"].startswith("no evaluations") and results[-1]["task_score"] == ""
    md = (out_dir / "summary.md").read_text()
    assert "| dataset | config | n | split | task_score | mcc | accuracy | f1 | val task_score |" in md
    assert "| mrpc | lora | 3 | validation | 82.00 ± 2.00 | — | 83.00 ± 2.00 | 81.00 ± 2.00 | 82.00 ± 2.00 |" in md
    assert "| cola | lora | 1 | validation | 40.00 | 40.00 | — | — | 40.00 |" in md
    assert "## Skipped runs" in md and "lora__sst2__seed9`: no evaluations" in md
    assert "82.00 ± 2.00" in out
    # deterministic: a second pass writes the same bytes
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert run_main(["--runs", str(runs), "--out", str(out_dir)], capsys)[0] == 0
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_test_split_reported_for_the_selected_step_only(tmp_path, capsys):
    runs = tmp_path / "outputs"
    val = [mrpc(10, 80, 80, 0.9), mrpc(20, 90, 90, 1.2)]
    make_run(runs, "a__mrpc__seed1", val + [
        {"step": 20, "task": "mrpc", "split": "test", "evaluated_step": 20, "f1": 85.0, "accuracy": 83.0}])
    # the trainer ranked by eval_loss: its test line is for step 10, not the step selected here
    make_run(runs, "a__mrpc__seed2", val + [
        {"step": 20, "task": "mrpc", "split": "test", "evaluated_step": 10, "f1": 70.0, "accuracy": 71.0,
         "task_score": 70.5}], seed=2)
    out_dir = tmp_path / "res"
    assert run_main(["--runs", str(runs / "a__*"), "--out", str(out_dir)], capsys)[0] == 0
    r1, r2 = read_csv(out_dir / "results.csv")
    assert r1["reported_split"] == "test" and r1["best_step"] == "20"
    assert float(r1["task_score"]) == 84.0 and float(r1["f1"]) == 85.0 and float(r1["test_task_score"]) == 84.0
    assert float(r1["val_task_score"]) == 90.0 and float(r1["val_f1"]) == 90.0
    assert r2["reported_split"] == "validation" and float(r2["task_score"]) == 90.0 and r2["test_f1"] == ""
    assert "step 10, not the selected step 20" in r2["note"]
    group = json.loads((out_dir / "summary.json").read_text())["groups"][0]
    assert group["reported_split"] == "mixed" and group["metrics"]["val_task_score"]["mean"] == 90.0


def test_resume_lines_task_from_config_config_name_and_archives(tmp_path, capsys):
    runs = tmp_path / "outputs"
    # a resume from step 10: the earlier attempt's steps 20 and 30 are dropped (30 had the best score)
    evals = [{"step": s, "f1": f, "accuracy": f, "eval_loss": 1.0} for s, f in ((10, 70), (20, 75), (30, 99),
                                                                                (20, 74), (30, 76))]
    make_run(runs / "group", "plainname", evals, task="glue_mrpc", config_path="configs/my_cfg.yaml")
    make_run(runs / "group", "plainname.old-20240101-120000", [mrpc(10, 99, 99, 1.0)])
    make_run(runs, "nametoo", [mrpc(10, 60, 60, 1.0)], seed=None)
    rows = {r["run_name"]: r for r in (aggregate.load_run(d) for d in aggregate.find_run_dirs([str(runs)]))}
    assert set(rows) == {"plainname", "nametoo"}  # the archived copy is left out
    row = rows["plainname"]
    assert row["best_step"] == 30 and row["task_score"] == 76.0 and row["n_evals"] == 3
    assert row["dataset"] == "glue_mrpc" and row["task"] == "mrpc" and row["config"] == "my_cfg"
    assert rows["nametoo"]["config"] == "nametoo" and rows["nametoo"]["seed"] is None
    assert len(aggregate.find_run_dirs([str(runs)], include_archived=True)) == 3
    code, _, err = run_main(["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "nothing matches" in err
    code, _, err = run_main(["--runs", str(runs), "--group-by", "dataset,colour"], capsys)
    assert code == 2 and "--group-by" in err


def test_skips_runs_without_scores(tmp_path):
    runs = tmp_path / "outputs"
    make_run(runs, "lossonly", [{"step": 10, "task": "mrpc", "eval_loss": 0.5}])
    make_run(runs, "weird", [{"step": 10, "task": "nosuchtask", "accuracy": 50}])
    assert "no validation evaluation has task_score or all of f1, accuracy" in aggregate.load_run(runs / "lossonly")["skip_reason"]
    assert "no official metrics" in aggregate.load_run(runs / "weird")["skip_reason"]


def test_fake_trainer_runs_end_to_end_with_plot(tmp_path, capsys):
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("task:\n  name: stsb\ntraining:\n  max_steps: 8\nfake:\n  peak_step: 4\n  test_split: true\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for seed in (1, 2):
        subprocess.run([sys.executable, FAKE, "--config", str(cfg), f"training.seed={seed}",
                        f"paths.run_name=lora__stsb__seed{seed}", f"paths.output_dir={tmp_path / 'outputs'}"],
                       env=env, check=True, capture_output=True)
    out_dir = tmp_path / "res"
    assert run_main(["--runs", str(tmp_path / "outputs"), "--out", str(out_dir), "--plot", "--quiet"], capsys)[0] == 0
    rows = read_csv(out_dir / "results.csv")
    assert [r["best_step"] for r in rows] == ["4", "4"]  # task_score peaks at 4; eval_loss is lowest at 8
    for r, seed in zip(rows, (1, 2)):
        val = {"pearson": 70 + 0.5 * seed, "spearman": 72 + 0.5 * seed}
        assert float(r["val_task_score"]) == pytest.approx(selection_score("stsb", val))
        assert r["reported_split"] == "test" and float(r["pearson"]) == pytest.approx(70 + 0.5 * (seed + 1))
        assert float(r["eval_loss"]) == pytest.approx(1.6)
    png = (out_dir / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_undefined_metrics_travel_as_nan_through_the_log_into_the_tables(tmp_path, capsys):
    """CoLA scored on a validation sample whose gold has one class: MCC is undefined (NaN). RunLog
    writes it as null named in nan_fields (standard JSON), read_number gives NaN back; the NaN
    evaluation is never selected, and the tables say NaN / undefined rather than 0 or a blank."""
    from trainkit.runlog import RunLog, read_number
    from trainkit.tasks import Example, get_task

    cola = get_task("cola")

    def scored(labels, texts):
        examples = [Example("p", " x", meta={"label": lab}) for lab in labels]
        metrics = cola.score(texts, examples)
        return {"task": "cola", "split": "validation", "mcc": metrics["mcc"],
                "task_score": selection_score("cola", metrics)}

    runs = tmp_path / "outputs"
    defined = make_run(runs, "lora__cola__seed1", [], task="cola", seed=1)
    log = RunLog(defined)
    log.write("eval", {"step": 10, **scored([1, 0, 1, 0], ["acceptable", "unacceptable", "acceptable", "acceptable"])})
    log.write("eval", {"step": 20, **scored([1, 1], ["acceptable", "acceptable"])})  # one gold class: undefined
    undefined = make_run(runs, "lora__cola__seed2", [], task="cola", seed=2)
    RunLog(undefined).write("eval", {"step": 10, **scored([1, 0], ["acceptable", "unacceptable"])})
    RunLog(undefined).write("eval", {"step": 20, "task": "cola", "split": "test", "evaluated_step": 10,
                                     **{k: v for k, v in scored([0, 0], ["x", "y"]).items() if k != "split"}})

    line = (defined / "logs" / "eval_log.jsonl").read_text().splitlines()[1]
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert record["mcc"] is None and record["task_score"] is None and record["nan_fields"] == ["mcc", "task_score"]
    assert math.isnan(read_number(record, "mcc")) and read_number(record, "step") == 20
    assert read_number({"mcc": None}, "mcc") is None  # null without nan_fields: missing

    code, _, _ = run_main(["--runs", str(runs), "--out", str(tmp_path / "res")], capsys)
    assert code == 0
    rows = {r["seed"]: r for r in read_csv(tmp_path / "res" / "results.csv")}
    assert rows["1"]["best_step"] == "10" and float(rows["1"]["mcc"]) == pytest.approx(100 * 0.57735, abs=1e-3)
    assert rows["2"]["reported_split"] == "test" and rows["2"]["mcc"] == "NaN" and rows["2"]["task_score"] == "NaN"
    assert rows["2"]["val_mcc"] == "100.0"
    summary = json.loads((tmp_path / "res" / "summary.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    [group] = summary["groups"]
    assert group["metrics"]["mcc"]["n"] == 1 and group["metrics"]["mcc"]["undefined"] == 1
    md = (tmp_path / "res" / "summary.md").read_text()
    assert "(1 undefined)" in md


def test_extra_metrics_are_reported_but_do_not_rank(tmp_path, capsys):
    """SAMSum ranks by rougeLsum alone; rouge1/2/L are columns too. DART's ter (lower is better, test line only)
    is reported from the test line and never enters task_score."""
    runs = tmp_path / "outputs"
    samsum = [{"step": 1, "task": "samsum", "split": "validation", "rougeLsum": 40.0, "rouge1": 60.0, "rouge2": 30.0,
               "rougeL": 35.0},
              {"step": 2, "task": "samsum", "split": "validation", "rougeLsum": 45.0, "rouge1": 50.0, "rouge2": 20.0,
               "rougeL": 30.0}]
    make_run(runs, "lora__samsum__seed1", samsum, task="samsum")
    dart = [{"step": 1, "task": "dart", "split": "validation", "bleu": 40.0, "sacrebleu": 35.0,
             "signatures": {"sacrebleu": "nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"}},
            {"step": 2, "task": "dart", "split": "test", "evaluated_step": 1, "bleu": 42.0, "sacrebleu": 37.0,
             "ter": 50.0}]
    make_run(runs, "lora__dart__seed1", dart, task="dart")
    code, _, _ = run_main(["--runs", str(runs), "--out", str(tmp_path / "res")], capsys)
    assert code == 0
    rows = {r["dataset"]: r for r in read_csv(tmp_path / "res" / "results.csv")}
    s = rows["samsum"]
    assert s["best_step"] == "2" and float(s["task_score"]) == 45.0  # rougeLsum's best, not rouge1's
    assert (float(s["rouge1"]), float(s["rouge2"]), float(s["rougeL"])) == (50.0, 20.0, 30.0)
    d = rows["dart"]
    assert d["reported_split"] == "test" and float(d["task_score"]) == 42.0 and float(d["ter"]) == 50.0
    assert d["val_ter"] == "" and float(d["val_sacrebleu"]) == 35.0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert {"rougeLsum", "rouge1", "bleu", "sacrebleu", "ter"} <= set(summary["metrics"])
