"""trainkit.tasks: task names, loading from the shipped fixtures (data/tasks), carving, prompts and the
official metrics on hand-computed cases (real sklearn / scipy / rouge_score / sacrebleu / sqlite)."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainkit.tasks import Example, TaskDataError, carve, get_task, known_tasks, selection_score
from trainkit.tasks.base import parse_float, parse_label
from task_fixtures import sqlite_files, text_files, write_fixtures
from trainkit.tasks.glue import GLUE_TASKS
from trainkit.tasks.spider import prediction_sql
from trainkit.tasks.spider_exec import QueryFailed, execute, execution_match

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tasks"
GLUE = DATA / "glue"
SCHOOL_DB = DATA / "spider" / "database" / "school" / "school.sqlite"


@pytest.fixture(autouse=True)
def no_task_env(monkeypatch):
    for var in ("GLUE_LOCAL_DIR", "SAMSUM_LOCAL_DIR", "SPIDER_LOCAL_DIR", "DART_LOCAL_DIR"):
        monkeypatch.delenv(var, raising=False)


def examples(task, labels, split="validation"):
    return [Example(prompt="p", target=" x", references=[], meta={"label": lab, "split": split}) for lab in labels]


# ---------------------------------------------------------------------- names
def test_names_aliases_and_attributes():
    assert get_task("sst2").name == "sst2" and get_task("GLUE_SST2").name == "sst2" and get_task("glue-sst2").name == "sst2"
    for alias in ("glue-tvt_mrpc", "glue_tvt_mrpc", "mrpc-tvt"):
        task = get_task(alias)
        assert task.name == "mrpc-tvt" and task.base == "mrpc" and task.tvt
    assert get_task("sst2").label_words == ["negative", "positive"]
    assert get_task("cola").label_words == ["unacceptable", "acceptable"]
    assert get_task("mnli").label_words == ["entailment", "neutral", "contradiction"]
    assert get_task("stsb").kind == "regression" and get_task("stsb").label_words is None
    assert get_task("samsum").kind == "generation" and get_task("samsum").label_words is None
    assert get_task("mnli").eval_splits == ["validation_matched", "validation_mismatched"]
    assert get_task("mnli-tvt").eval_splits == ["validation_matched"]
    assert get_task("spider").eval_splits == ["validation"]
    assert get_task("mrpc").metrics == ("f1", "accuracy")
    assert set(known_tasks()) >= {*GLUE_TASKS, "samsum", "spider", "dart", "sst2-tvt"}


@pytest.mark.parametrize("name", ["sst3", "glue_samsum", "spider-tvt", ""])
def test_bad_task_name_is_a_value_error_listing_known_names(name):
    with pytest.raises(ValueError) as info:
        get_task(name)
    message = str(info.value)
    assert "unknown task" in message
    if name in ("sst3", ""):
        assert all(t in message for t in ("cola", "sst2", "mnli", "wnli", "samsum", "spider", "dart", "-tvt"))


# ---------------------------------------------------------------------- parsing
def test_parse_label_and_float():
    words = ["unacceptable", "acceptable"]
    assert parse_label(" Acceptable.\nmore text", words) == 1
    assert parse_label("unacceptable", words) == 0
    assert parse_label('"UNACCEPTABLE" because', words) == 0
    assert parse_label("acceptably", words) is None
    assert parse_label("", words) is None and parse_label("   \n", words) is None
    assert parse_label("not sure", ["no", "yes"]) is None and parse_label("no, they differ", ["no", "yes"]) == 1 - 1
    assert parse_label("second line\nyes", ["no", "yes"]) is None  # the first line decides
    assert parse_float(" 3.25 out of 5") == 3.25 and parse_float("7", 0, 5) == 5 and parse_float("-1", 0, 5) == 0
    assert parse_float("score: .5") == 0.5 and parse_float("none") is None and parse_float("\n\n4\n") == 4.0


# ---------------------------------------------------------------------- GLUE metrics, hand-computed
def test_cola_mcc():
    task = get_task("cola")
    # gold 1 1 0 0, predicted 1 0 0 0: TP 1, FN 1, TN 2, FP 0 -> (1*2 - 0*1) / sqrt(1*2*2*3) = 0.57735
    got = task.score([" acceptable", "unacceptable", "Unacceptable.", "unacceptable\nacceptable"], examples(task, [1, 1, 0, 0]))
    assert got["mcc"] == pytest.approx(100 * 2 / math.sqrt(12)) and got["num_examples"] == 4
    assert task.score(["acceptable", "unacceptable"], examples(task, [1, 0]))["mcc"] == pytest.approx(100.0)
    # T5's convention: an unparseable answer is its own class (-1), not the opposite of gold (that gave -100)
    assert task.score(["maybe", "??"], examples(task, [1, 0]))["mcc"] == 0.0
    assert task.score(["maybe"] * 4, examples(task, [1, 1, 0, 0]))["mcc"] == 0.0


def test_cola_invalid_answers_mixed_with_valid_ones_match_sklearn_with_a_minus_one_class():
    from sklearn.metrics import matthews_corrcoef

    task = get_task("cola")
    gold = [1, 1, 1, 0, 0, 0]
    texts = ["acceptable", "garbage", "acceptable", "unacceptable", "acceptable", "??"]
    want = 100 * matthews_corrcoef(gold, [1, -1, 1, 0, 1, -1])
    assert task.score(texts, examples(task, gold))["mcc"] == pytest.approx(want)
    # the old rule (unparseable = opposite of gold) gives a different number on the same answers
    assert want != pytest.approx(100 * matthews_corrcoef(gold, [1, 0, 1, 0, 1, 1]))


def test_undefined_metrics_are_nan_not_zero():
    cola, stsb = get_task("cola"), get_task("stsb")
    assert math.isnan(cola.score(["acceptable", "unacceptable"], examples(cola, [1, 1]))["mcc"])  # gold: one class
    got = stsb.score(["2", "2", "2"], examples(stsb, [0.0, 1.0, 2.0]))  # constant prediction
    assert math.isnan(got["pearson"]) and math.isnan(got["spearman"]) and got["num_examples"] == 3
    got = stsb.score(["1", "2"], examples(stsb, [3.0, 3.0]))  # constant gold
    assert math.isnan(got["pearson"]) and math.isnan(got["spearman"])
    assert math.isnan(stsb.score(["1"], examples(stsb, [3.0]))["pearson"])  # one point
    # an undefined component makes task_score NaN (never a best checkpoint: trainkit.loop.is_better)
    assert math.isnan(selection_score("stsb", {"pearson": math.nan, "spearman": 50.0}))


def test_mrpc_f1_and_accuracy():
    task = get_task("mrpc")
    # gold 1 1 1 0 0, predicted 1 1 0 1 0: TP 2, FP 1, FN 1 -> F1 2/3, accuracy 3/5
    got = task.score(["yes", "Yes.", "no", "yes", "no"], examples(task, [1, 1, 1, 0, 0]))
    assert got == pytest.approx({"f1": 200 / 3, "accuracy": 60.0, "num_examples": 5})
    # gibberish for a gold 0 must not count as a true negative
    got = task.score(["yes", "banana"], examples(task, [1, 0]))
    assert got["accuracy"] == 50.0 and got["f1"] == pytest.approx(100 * 2 / 3)  # TP 1, FP 1
    # ... nor for a gold 1 as a true positive (T5's f1_score_with_invalid: a false negative)
    got = task.score(["banana", "yes", "no"], examples(task, [1, 1, 0]))
    assert got["accuracy"] == pytest.approx(200 / 3) and got["f1"] == pytest.approx(100 * 2 / 3)  # TP 1, FN 1


def test_stsb_pearson_spearman():
    task = get_task("stsb")
    # parsed 0 1 2 3 5 (7 clipped) vs gold 0 1 2 3 4: spearman 1; pearson 12 / sqrt(10 * 14.8)
    preds = ["0", " 1.0\nnoise", "2 points", "3", "7"]
    got = task.score(preds, examples(task, [0.0, 1.0, 2.0, 3.0, 4.0]))
    assert got["spearman"] == pytest.approx(100.0)
    assert got["pearson"] == pytest.approx(100 * 12 / math.sqrt(148))
    # an unparseable score is -1.0 (T5's string_to_float default), outside [0, 5], not the far end of the range
    got = task.score(["0", "no idea", "2", "3", "4"], examples(task, [0.0, 1.0, 2.0, 3.0, 4.0]))
    assert got["pearson"] == pytest.approx(100 * float(np.corrcoef([0, 1, 2, 3, 4], [0, -1, 2, 3, 4])[0, 1]))
    assert got["spearman"] == pytest.approx(100 * 0.9)  # ranks 2 1 3 4 5: 1 - 6 * 2 / 120
    # (the old rule put 5.0 there: ranks 1 5 2 3 4, Spearman 40)


def test_accuracy_tasks_and_mnli_splits():
    for name in ("sst2", "qnli", "rte", "wnli"):
        task = get_task(name)
        words = task.label_words
        got = task.score([words[0], words[1], "???", words[0]], examples(task, [0, 1, 1, 1]))
        assert got == {"accuracy": 50.0, "num_examples": 4}, name
        # label -1 never equals a gold label, whatever the gold
        assert task.score(["???", "???"], examples(task, [0, 1])) == {"accuracy": 0.0, "num_examples": 2}, name
    task = get_task("mnli")
    preds = ["entailment", "Neutral", "contradiction.", "neutral"]
    assert task.score(preds, examples(task, [0, 1, 2, 0]), split="validation_matched") == \
        {"accuracy_matched": 75.0, "num_examples": 4}
    assert task.score(preds, examples(task, [0, 1, 2, 0]), split="test_mismatched") == \
        {"accuracy_mismatched": 75.0, "num_examples": 4}
    assert task.score(["maybe", "neutral", "contradiction"], examples(task, [0, 1, 2]), split="validation_matched") == \
        pytest.approx({"accuracy_matched": 200 / 3, "num_examples": 3})
    assert get_task("sst2").score([], []) == {"num_examples": 0}
    with pytest.raises(ValueError):
        get_task("sst2").score(["positive"], [])


def test_selection_score_for_carved_mnli():
    assert selection_score("mnli", {"accuracy_matched": 80.0}) is None
    assert selection_score("mnli-tvt", {"accuracy_matched": 80.0}) == 80.0
    assert selection_score("glue-tvt_mnli", {"accuracy_matched": 80.0, "accuracy_mismatched": 70.0}) == 75.0
    assert selection_score("mrpc-tvt", {"f1": 90.0, "accuracy": 80.0}) == 85.0


# ---------------------------------------------------------------------- ROUGE, BLEU
def test_samsum_rouge():
    task = get_task("samsum")
    refs = ["Anna will bring the cake tomorrow.", "the cat sat"]
    exs = [Example("p", " " + r, [r], {}) for r in refs]
    assert task.score(refs, exs) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0,
                                                   "num_examples": 2})
    # "the cat" vs "the cat sat": ROUGE-1 P 1 R 2/3 -> F 0.8; ROUGE-2 P 1 R 1/2 -> F 2/3; ROUGE-L(sum) like ROUGE-1
    got = task.score(["the cat"], exs[1:])
    assert got == pytest.approx({"rouge1": 80.0, "rouge2": 200 / 3, "rougeL": 80.0, "rougeLsum": 80.0, "num_examples": 1})
    # Porter stemming: "cats running" == "cat run"; the text after a blank line is not part of the summary
    stem = Example("p", " cat run", ["cat run"], {})
    assert task.score(["cats running\n\nDialogue: more"], [stem])["rouge1"] == pytest.approx(100.0)
    assert task.score(["zebra"], [stem])["rouge1"] == 0.0


def test_dart_bleu_with_several_references():
    task = get_task("dart")
    exs = [Example("p", " a", ["x y z w", "the cat sat on the mat"], {}), Example("p", " b", ["one two three four"], {})]
    assert task.score(["the cat sat on the mat", "one two three four"], exs)["bleu"] == pytest.approx(100.0)
    # every n-gram matches, hypothesis 4 tokens vs closest reference 5: BP = exp(1 - 5/4)
    got = task.score(["a b c d"], [Example("p", " a", ["a b c d e"], {})])
    assert got["bleu"] == pytest.approx(100 * math.exp(-0.25)) and got["num_examples"] == 1


# ---------------------------------------------------------------------- carving
def test_carve_is_deterministic_disjoint_and_capped():
    rows = [{"idx": i} for i in range(200)]
    train, held = carve(rows, seed=42)
    assert len(held) == 20 and len(train) == 180
    assert carve(rows, seed=42) == (train, held) and carve(rows, seed=7)[1] != held
    assert {r["idx"] for r in train} | {r["idx"] for r in held} == set(range(200))
    assert not {r["idx"] for r in train} & {r["idx"] for r in held}
    assert [r["idx"] for r in held] == sorted(r["idx"] for r in held)  # file order kept
    assert len(carve(list(range(20000)), seed=1)[1]) == 1000 and carve([1], seed=1) == ([1], [])


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_glue_tvt_splits_from_fixture(name):
    plain = get_task(name).load(local_dir=GLUE)
    tvt = get_task(f"glue-tvt_{name}")
    a, b, other = tvt.load(local_dir=GLUE, seed=1), tvt.load(local_dir=GLUE, seed=1), tvt.load(local_dir=GLUE, seed=2)
    val_key = "validation_matched" if name == "mnli" else "validation"
    prompts = lambda exs: [(e.prompt, e.meta["idx"]) for e in exs]  # noqa: E731
    assert prompts(a["train"]) == prompts(b["train"]) and prompts(a[val_key]) == prompts(b[val_key])
    assert prompts(a[val_key]) != prompts(other[val_key])
    train_idx, val_idx = {e.meta["idx"] for e in a["train"]}, {e.meta["idx"] for e in a[val_key]}
    assert len(val_idx) == 4 and not train_idx & val_idx and train_idx | val_idx == {e.meta["idx"] for e in plain["train"]}
    if name == "mnli":
        assert set(a) == {"train", "validation_matched", "test_matched", "test_mismatched"}
        for s in ("matched", "mismatched"):  # the tests are the public validation sets, whole
            assert prompts(a[f"test_{s}"]) == prompts(plain[f"validation_{s}"])
        assert {e.meta["mnli_set"] for e in a["test_mismatched"]} == {"mismatched"}
    else:
        assert set(a) == {"train", "validation", "test"} and prompts(a["test"]) == prompts(plain["validation"])


# ---------------------------------------------------------------------- loading the fixtures
@pytest.mark.parametrize("name", GLUE_TASKS)
def test_glue_loads_from_fixture(name):
    task = get_task(name)
    splits = task.load(local_dir=GLUE)
    if name == "mnli":
        assert set(splits) == {"train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"}
    else:
        assert set(splits) == {"train", "validation", "test"}
        assert [e.prompt for e in splits["test"]] == [e.prompt for e in splits["validation"]]  # hidden GLUE test labels
    assert len(splits["train"]) == 40 and all(len(splits[s]) == 16 for s in task.eval_splits)
    for e in splits["train"] + splits[task.eval_splits[0]]:
        assert e.target.startswith(" ") and e.prompt.endswith("\nAnswer:") and e.references == [e.target.strip()] or \
            name == "stsb"
    # scoring the gold targets gives the perfect score
    for split in task.eval_splits:
        got = task.score([e.target for e in splits[split]], splits[split], split=split)
        assert all(got[m] == pytest.approx(100.0) for m in got if m != "num_examples"), got
    capped = task.load(local_dir=GLUE, max_train=5, max_eval=3)
    assert len(capped["train"]) == 5 and all(len(v) == 3 for k, v in capped.items() if not k.startswith(("train", "test")))
    # max_eval caps validation only: the test splits stay whole unless max_test says otherwise
    assert all(len(v) == len(splits[k]) for k, v in capped.items() if k.startswith("test"))
    assert all(len(v) == 2 for k, v in task.load(local_dir=GLUE, max_test=2).items() if k.startswith("test"))


def test_test_splits_worth_scoring_compare_the_whole_validation_split():
    from trainkit.tasks.base import cap_splits, distinct_test_splits

    for name, want in [("sst2", []), ("mnli", []), ("sst2-tvt", ["test"]), ("mnli-tvt", ["test_matched", "test_mismatched"])]:
        splits = get_task(name).load(local_dir=GLUE)
        assert distinct_test_splits(splits) == want, name
    # plain GLUE's test is its validation again: once validation is capped the two differ, so the
    # comparison must run on the uncapped splits (train_lora.py compares, then caps)
    splits = get_task("sst2").load(local_dir=GLUE)
    assert distinct_test_splits(cap_splits(splits, max_eval=3)) == ["test"]


def test_glue_prompt_text_is_pinned():
    e = get_task("sst2").load(local_dir=GLUE)["train"][0]
    assert e.prompt == ("What is the sentiment of the following sentence? Answer positive or negative.\n"
                        "Sentence: the score is tedious .\nAnswer:")
    assert e.target == " negative" and e.references == ["negative"] and e.meta == {"idx": 0, "label": 0, "split": "train"}
    e = get_task("mrpc").load(local_dir=GLUE)["validation"][0]
    assert e.prompt.startswith("Do the two sentences mean the same thing? Answer yes or no.\nSentence 1: ")
    assert "\nSentence 2: " in e.prompt and e.target in (" yes", " no")
    e = get_task("stsb").load(local_dir=GLUE)["train"][1]
    assert e.target == " 1.0" and e.references == ["1"] and e.meta["label"] == 1.0


def test_samsum_spider_dart_load_from_fixtures():
    splits = get_task("samsum").load(local_dir=DATA / "samsum")
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "validation": 8, "test": 8}
    e = splits["validation"][0]
    assert e.prompt.startswith("Summarize the following dialogue.\n\nDialogue:\n") and e.prompt.endswith("\n\nSummary:")
    assert "\r" not in e.prompt and e.target == " " + e.references[0]

    splits = get_task("dart").load(local_dir=DATA / "dart")
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "validation": 6, "test": 6}  # train: one per annotation
    e = splits["validation"][2]
    assert e.prompt.startswith("Write a short text that states all of the following facts.\n\nFacts:\n")
    assert e.prompt.endswith("\n\nText:") and len(e.references) == 3 and e.target == " " + e.references[0]
    assert " | " in e.prompt

    task = get_task("spider")
    splits = task.load(local_dir=DATA / "spider")
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "validation": 8, "test": 8}
    e = splits["validation"][0]
    assert e.prompt.startswith("Translate the question into a SQL query for the SQLite database below.\n\nDatabase: school\n")
    assert "CREATE TABLE student (student_id number, name text, age number, city text, PRIMARY KEY (student_id))" in e.prompt
    assert "FOREIGN KEY (student_id) REFERENCES student(student_id)" in e.prompt
    assert e.prompt.endswith("\nSQL:") and "\nQuestion: " in e.prompt
    assert e.target.startswith(" SELECT") and "  " not in e.target and Path(e.meta["db_path"]).is_file()
    got = task.score([x.target for x in splits["validation"]], splits["validation"])
    assert {k: got[k] for k in ("exact_match", "execution_accuracy", "num_examples", "num_gold_unparsed")} == \
        {"exact_match": 100.0, "execution_accuracy": 100.0, "num_examples": 8, "num_gold_unparsed": 0}
    assert sum(got[f"num_examples_{level}"] for level in ("easy", "medium", "hard", "extra")) == 8


def test_local_dir_argument_wins_over_env_and_env_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("GLUE_LOCAL_DIR", str(GLUE))
    assert len(get_task("rte").load()["train"]) == 40
    monkeypatch.setenv("GLUE_LOCAL_DIR", str(tmp_path / "nowhere"))
    assert len(get_task("rte").load(local_dir=GLUE)["train"]) == 40
    # the task folder itself works too, and a relative path is found from the repo root
    assert len(get_task("rte").load(local_dir=GLUE / "rte")["train"]) == 40
    monkeypatch.chdir(tmp_path)
    assert len(get_task("rte").load(local_dir="data/tasks/glue")["train"]) == 40


@pytest.mark.parametrize("name,env_var", [("sst2", "GLUE_LOCAL_DIR"), ("samsum", "SAMSUM_LOCAL_DIR"),
                                          ("spider", "SPIDER_LOCAL_DIR"), ("dart", "DART_LOCAL_DIR")])
def test_missing_local_dir_names_the_env_var(monkeypatch, tmp_path, name, env_var):
    task = get_task(name)
    with pytest.raises(TaskDataError, match=env_var):
        task.load(local_dir=tmp_path / "missing")
    monkeypatch.setenv(env_var, str(tmp_path / "missing"))
    with pytest.raises(TaskDataError, match=env_var) as info:
        task.load()
    assert str(tmp_path / "missing") in str(info.value)
    # an existing folder without the files
    with pytest.raises(TaskDataError, match=env_var):
        task.load(local_dir=tmp_path)


def test_no_local_dir_and_no_hub_names_the_env_var(tmp_path):
    with pytest.raises(TaskDataError, match="GLUE_LOCAL_DIR") as info:
        get_task("cola").load(cache_dir=str(tmp_path / "hf"), local_files_only=True)
    assert "nyu-mll/glue" in str(info.value)
    with pytest.raises(TaskDataError, match="SPIDER_LOCAL_DIR"):
        get_task("spider").load(cache_dir=str(tmp_path / "hf"), local_files_only=True)


# ---------------------------------------------------------------------- Spider SQL
def test_prediction_sql_cuts_the_generation():
    assert prediction_sql("  SELECT 1 ;  DROP TABLE student\n") == "SELECT 1"
    assert prediction_sql("SELECT name\nFROM student\n\nQuestion: next") == "SELECT name FROM student"
    assert prediction_sql("SELECT ';' FROM t") == "SELECT ';' FROM t"


def test_execution_accuracy_semantics():
    gold = "SELECT name FROM student WHERE age  >  21"
    # written differently, same result: counted right
    assert execution_match(SCHOOL_DB, "select s.NAME from student as s where s.age >= 22 and 1 = 1", gold)
    assert execution_match(SCHOOL_DB, "SELECT name FROM student WHERE age > 21 ORDER BY name DESC", gold)  # gold unordered
    assert not execution_match(SCHOOL_DB, "SELECT name FROM student", gold)
    assert not execution_match(SCHOOL_DB, "SELECT DISTINCT name FROM student WHERE age > 21 UNION ALL SELECT 'x'", gold)
    ordered = "SELECT name FROM student ORDER BY age DESC"
    assert execution_match(SCHOOL_DB, "SELECT name FROM student ORDER BY age DESC, name", ordered)
    assert not execution_match(SCHOOL_DB, "SELECT name FROM student ORDER BY age ASC", ordered)  # order matters
    # DISTINCT is dropped from both queries (test-suite-sql-eval's default); kept, duplicates count
    assert execution_match(SCHOOL_DB, "SELECT city FROM student", "SELECT DISTINCT city FROM student")
    assert not execution_match(SCHOOL_DB, "SELECT city FROM student", "SELECT DISTINCT city FROM student",
                               keep_distinct=True)


def test_execution_failures_are_wrong_and_bounded():
    gold = "SELECT count(*) FROM student"
    original = SCHOOL_DB.read_bytes()
    for bad in ["SELECT count(*) FROM studnet", "SELEKT 1", "", "DROP TABLE student", "DELETE FROM student",
                "INSERT INTO student VALUES (9, 'Zed', 30, 'Nice')", "ATTACH DATABASE 'x.db' AS x", "PRAGMA writable_schema = 1",
                "SELECT * FROM student a, student b, student c, student d"]:  # 1296 rows > gold's 1: stops early
        assert not execution_match(SCHOOL_DB, bad, gold), bad
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    assert not execution_match(SCHOOL_DB, endless, gold, timeout_s=0.5)
    # it ends because the time limit interrupts sqlite (without it the query never returns)
    conn = sqlite3.connect(SCHOOL_DB)
    with pytest.raises(QueryFailed, match="interrupted"):
        execute(conn, endless, timeout_s=0.2)
    conn.close()
    assert SCHOOL_DB.read_bytes() == original  # read-only: nothing written
    # through score(): an erroring and a non-terminating prediction, among right ones
    task = get_task("spider")
    task.timeout_s = 0.3
    val = task.load(local_dir=DATA / "spider")["validation"][:4]
    preds = [val[0].target, "SELECT nothing FROM nowhere", endless, " " + val[3].target.lower()]
    got = task.score(preds, val)
    assert (got["exact_match"], got["execution_accuracy"], got["num_examples"]) == (50.0, 50.0, 4)


# ---------------------------------------------------------------------- fixtures
def test_shipped_fixtures_match_the_generator(tmp_path):
    written = write_fixtures(tmp_path)
    rels = {p.relative_to(tmp_path).as_posix() for p in written}
    assert rels == set(text_files()) | set(sqlite_files())
    shipped = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file()}
    assert shipped == rels, "data/tasks differs from the generator: run python tests/task_fixtures.py"
    for rel in text_files():
        assert (DATA / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    for rel in sqlite_files():
        dumps = []
        for root in (DATA, tmp_path):
            conn = sqlite3.connect(f"file:{root / rel}?mode=ro", uri=True)
            dumps.append(list(conn.iterdump()))
            conn.close()
        assert dumps[0] == dumps[1], rel
    assert sum((DATA / r).stat().st_size for r in rels) < 300_000


def test_fixture_script(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "task_fixtures.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "glue" / "sst2" / "train.jsonl").is_file() and (tmp_path / "spider" / "tables.json").is_file()
    assert len(get_task("qqp").load(local_dir=tmp_path / "glue")["validation"]) == 16
