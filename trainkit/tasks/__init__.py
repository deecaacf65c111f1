"""Tasks evaluated by generation: GLUE, SAMSum, Spider, DART.

    from trainkit.tasks import get_task, Example
    task = get_task("mrpc")            # ValueError listing the known names for a bad one
    task.name, task.kind               # "mrpc", "classification" | "regression" | "generation"
    task.label_words                   # ["no", "yes"] (index = label id); None unless classification
    task.eval_splits                   # ["validation"]; MNLI ["validation_matched", "validation_mismatched"]
    task.metrics                       # official metric names, the ones task_score averages (trainkit.tasks.official;
                                       # reported_metrics(name) adds the extras: ROUGE-1/2/L, sacreBLEU, TER)
    splits = task.load(local_dir=None, seed=42, cache_dir=None, local_files_only=False,
                       max_train=None, max_eval=None, max_test=None)   # split -> list[Example]
    # caps (first N): max_train the train split, max_eval the validation splits, max_test the test splits
    metrics = task.score(predictions, splits["validation"], split="validation")
    # {"mcc": ..., "num_examples": n}: official metrics x100 (0-100 scale) + num_examples

Names: cola sst2 mrpc qqp stsb mnli qnli rte wnli (also glue_<task>, glue-<task>), their carved
variants glue-tvt_<task> / glue_tvt_<task> / <task>-tvt (canonical name "<task>-tvt"), samsum,
spider, dart. Case-insensitive.

Data: `local_dir` (the config's task.local_dir) wins over the environment variable
(GLUE_LOCAL_DIR, SAMSUM_LOCAL_DIR, SPIDER_LOCAL_DIR, DART_LOCAL_DIR); with neither, HF datasets
(nyu-mll/glue; knkarthick/samsum or Samsung/samsum; xlangai/spider rows + a local Spider folder for
schema and databases; GEM/dart or dart). A folder that is named but missing raises TaskDataError
(a FileNotFoundError) naming the variable. A relative folder that does not exist from the working
directory is looked up from the repository root. Layouts: see each module (glue, samsum, spider,
dart) and data/tasks/README.md; data/tasks holds small synthetic fixtures in these layouts
(written by tests/task_fixtures.py).

Splits: keys "train", "validation", "test". GLUE without -tvt: test = public validation (GLUE test
labels are hidden). With -tvt: test = public validation and train/validation are carved from the
public train by seed (trainkit.tasks.base.carve: 10% capped at 1000 rows held out). MNLI keys its
evaluation splits validation_matched / validation_mismatched / test_matched / test_mismatched
(mnli-tvt: validation_matched carved from train, the two tests = the public validation sets).
SAMSum and DART: their own three splits. Spider: test = dev.

Examples: prompt ends where the answer starts ("...\\nAnswer:", "Summary:", "SQL:", "Text:");
target starts with a space. Example.cut (a PromptCut) names the part of the prompt a prompt longer
than task.max_source_length loses (trainkit.data.fit_prompt): Spider the schema's last CREATE TABLE
lines, SAMSum the dialogue's last turns, DART the last triples, GLUE the tail of the (longer)
sentence; never the instruction, the question or the answer cue. Scoring reads generations robustly:
classification takes the first line's label word (case-insensitive; unparseable = label -1, its own
wrong class, as T5 does), STS-B the first number clipped to [0, 5] (unparseable = -1.0), generation
tasks the text up to the first blank line. Undefined metrics (MCC with one gold class, a correlation
of constant input) are NaN.
"""

from __future__ import annotations

from trainkit.tasks.base import Example, PromptCut, Task, TaskDataError, carve
from trainkit.tasks.dart import DartTask
from trainkit.tasks.glue import GLUE_TASKS, GlueTask
from trainkit.tasks.official import (OFFICIAL_METRICS, TASK_SCORE, base_task, is_tvt, official_metrics, reported_metrics,
                                     selection_score)
from trainkit.tasks.samsum import SamsumTask
from trainkit.tasks.spider import SpiderTask

OTHER_TASKS = {"samsum": SamsumTask, "spider": SpiderTask, "dart": DartTask}

__all__ = ["Example", "PromptCut", "Task", "TaskDataError", "get_task", "known_tasks", "carve", "OFFICIAL_METRICS",
           "TASK_SCORE", "base_task", "is_tvt", "official_metrics", "reported_metrics", "selection_score", "GLUE_TASKS"]


def known_tasks() -> list[str]:
    """Canonical task names (GLUE tasks also take the glue_ / glue-tvt_ / -tvt forms)."""
    return [*GLUE_TASKS, *(f"{t}-tvt" for t in GLUE_TASKS), *OTHER_TASKS]


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive); ValueError listing the known names otherwise."""
    raw = str(name or "").strip()
    key = raw.lower()
    tvt = is_tvt(key)
    base = base_task(key)
    if base in GLUE_TASKS:
        return GlueTask(base, tvt=tvt)
    if base in OTHER_TASKS and key == base:
        return OTHER_TASKS[base]()
    if base in OTHER_TASKS:
        raise ValueError(f"unknown task {raw!r}: {base} has no GLUE or carved (-tvt) variant; use {base!r}")
    raise ValueError(f"unknown task {raw!r}; known: {', '.join([*GLUE_TASKS, *OTHER_TASKS])} "
                     f"(GLUE tasks also as glue_<task>, and glue-tvt_<task> or <task>-tvt for train/validation/test "
                     f"carved from the public splits)")
