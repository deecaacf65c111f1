"""`python -m trainkit.evaluate`: scores predictions files with the task scorers train_lora.py uses,
as a subprocess (the command users run), on the shipped task fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trainkit.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO / "data" / "tasks" / "glue"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainkit.evaluate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_pred_against_a_split_equals_the_task_scorer(tmp_path):
    examples = get_task("sst2").load(local_dir=GLUE)["validation"]
    # every third answer wrong, one unparseable: the CLI must give what task.score gives
    preds = []
    for i, e in enumerate(examples):
        word = e.references[0]
        preds.append("maybe" if i == 0 else ("negative" if word == "positive" else "positive") if i % 3 == 0 else word)
    pred_file = tmp_path / "preds.txt"
    pred_file.write_text("\n".join(preds) + "\n")
    out = run_cli("--task", "sst2", "--pred", str(pred_file), "--data-dir", str(GLUE), "--split", "validation",
                  "--out", str(tmp_path / "scores.json"))
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    expected = get_task("sst2").score(preds, examples, split="validation")
    assert printed["accuracy"] == expected["accuracy"] < 100
    assert printed["num_examples"] == len(examples)
    assert printed["task_score"] == expected["accuracy"]
    assert json.loads((tmp_path / "scores.json").read_text()) == printed


def test_jsonl_predictions_and_a_run_predictions_file(tmp_path):
    examples = get_task("mrpc").load(local_dir=GLUE)["validation"]
    preds = [e.references[0] for e in examples]
    pred_file = tmp_path / "preds.jsonl"
    pred_file.write_text("".join(json.dumps({"prediction": p}) + "\n" for p in preds))
    out = run_cli("--task", "mrpc", "--pred", str(pred_file), "--data-dir", str(GLUE))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["accuracy"] == 100.0

    # the file a run writes: prompt, prediction, references and the example's fields on every line
    run_file = tmp_path / "step-10-validation.jsonl"
    run_file.write_text("".join(json.dumps({"prompt": e.prompt, "prediction": "no", "references": e.references, **e.meta}) + "\n"
                                for e in examples))
    out = run_cli("--task", "mrpc", "--predictions", str(run_file))
    assert out.returncode == 0, out.stderr
    expected = get_task("mrpc").score(["no"] * len(examples), examples, split="validation")
    assert json.loads(out.stdout)["accuracy"] == expected["accuracy"]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("positive\n")
    out = run_cli("--task", "sst2", "--pred", str(short), "--data-dir", str(GLUE))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "1 predictions for" in out.stderr and "Traceback" not in out.stderr

    out = run_cli("--task", "nosuchtask", "--pred", str(short))
    assert out.returncode == 2 and "unknown task" in out.stderr and "Traceback" not in out.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "yes"}\n{not json\n')
    out = run_cli("--task", "sst2", "--pred", str(bad), "--data-dir", str(GLUE))
    assert out.returncode == 2 and "line 2" in out.stderr and out.stderr.count("\n") == 1

    out = run_cli("--task", "sst2", "--pred", str(short), "--data-dir", str(tmp_path / "missing"))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_spider_run_predictions_with_databases_moved(tmp_path):
    """A run's Spider predictions scored elsewhere: --db-dir points at the databases' new place."""
    import shutil

    spider = REPO / "data" / "tasks" / "spider"
    examples = get_task("spider").load(local_dir=spider)["validation"]
    moved = tmp_path / "database"
    shutil.copytree(spider / "database", moved)
    lines = []
    for i, e in enumerate(examples):
        prediction = e.references[0] if i % 2 == 0 else "SELECT 1"
        meta = {**e.meta, "db_path": "/elsewhere/" + e.meta["db_id"] + ".sqlite"}
        lines.append(json.dumps({"prompt": e.prompt, "prediction": prediction, "references": e.references, **meta}))
    run_file = tmp_path / "step-5-validation.jsonl"
    run_file.write_text("\n".join(lines) + "\n")
    out = run_cli("--task", "spider", "--predictions", str(run_file), "--db-dir", str(moved),
                  "--tables", str(spider / "tables.json"))
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    right = len(range(0, len(examples), 2))
    assert printed["exact_match"] == printed["execution_accuracy"] == 100.0 * right / len(examples)
    assert printed["num_examples"] == len(examples)


def test_dart_official_files_give_the_official_scripts_bleu(tmp_path):
    """`--task dart --pred HYP --refs REF0 REF1 REF2` on a slice of the official BART-large output and
    references: the printed bleu is what the official multi-bleu.perl prints for the same files."""
    import gzip
    import re
    import shutil

    import pytest

    if shutil.which("perl") is None:
        pytest.skip("perl (the official script's interpreter) is not installed")
    official = REPO / "tests" / "official" / "dart"
    n = 300
    paths = []
    for name in ("bart-large_dart.txt", *(f"all-delex-reference{k}.lex" for k in range(3))):
        with gzip.open(official / f"{name}.gz", "rt", encoding="utf-8") as f:
            text = "".join(f.readlines()[:n])
        (tmp_path / name).write_text(text, encoding="utf-8")
        paths.append(str(tmp_path / name))
    hyp, *refs = paths
    perl = subprocess.run(["perl", str(official / "multi-bleu.perl"), *refs], stdin=open(hyp, encoding="utf-8"),
                          capture_output=True, text=True, timeout=120)
    official_bleu = float(re.match(r"BLEU = ([\d.]+),", perl.stdout).group(1))

    out = run_cli("--task", "dart", "--pred", hyp, "--refs", *refs)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["num_examples"] == n
    assert abs(printed["bleu"] - official_bleu) <= 0.005 + 1e-9  # perl prints 2 decimals
    assert printed["task_score"] == printed["bleu"]
    assert {"sacrebleu", "ter", "signatures"} <= set(printed) and "tok:13a" in printed["signatures"]["sacrebleu"]


def test_spider_files_without_databases(tmp_path):
    """No --db-dir: exact match only (schemas from --tables), never a silent execution_accuracy of 0;
    a --db-dir that lacks a database is one line naming the db_id."""
    official = REPO / "tests" / "data" / "spider_official"
    files = ["--pred", str(official / "predict.txt"), "--gold", str(official / "gold.txt")]
    out = run_cli("--task", "spider", *files, "--tables", str(official / "tables.json"))
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert round(printed["exact_match"], 2) == 69.73 and printed["num_examples"] == 1034
    assert not any(k.startswith("execution_accuracy") for k in printed)

    out = run_cli("--task", "spider", *files, "--tables", str(official / "tables.json"),
                  "--db-dir", str(REPO / "data" / "tasks" / "spider" / "database"))
    assert out.returncode == 2 and "no database in" in out.stderr and "concert_singer" in out.stderr
    assert out.stderr.count("\n") == 1

    out = run_cli("--task", "spider", *files)
    assert out.returncode == 2 and "without --db-dir every schema must be in --tables" in out.stderr
