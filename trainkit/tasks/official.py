"""Metrics per task: the official ones, which rank a run, and the extra ones it also reports.

OFFICIAL_METRICS (official_metrics()): what the task's official evaluation / leaderboard ranks by.
`task_score` is their mean (all of them are "higher is better", on a 0-100 scale; correlations
and MCC x100 as in the GLUE leaderboard); it is what `logging.metric_for_best: task_score` ranks
checkpoints by, and what the aggregate command selects with.
EXTRA_METRICS: reported beside them (eval_log fields, aggregate columns) but never averaged into
`task_score`: peers' figures (sacreBLEU, ROUGE-1/2/L) and TER, which is "lower is better".
reported_metrics() is both, official first. A task's evaluation writes all of them (flat names) to
eval_log.jsonl, plus `task_score`.

One exception: MNLI with carved splits (`glue-tvt_mnli`, `mnli-tvt`). Its held-out validation is
cut from the training set, whose genres are the matched ones, so validation reports
`accuracy_matched` alone and `task_score` there is that accuracy; the test line (public
validation_matched + validation_mismatched) has both and `task_score` is their mean as usual.
"""

from __future__ import annotations

OFFICIAL_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy_matched", "accuracy_mismatched"),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "samsum": ("rougeLsum",),
    "spider": ("exact_match", "execution_accuracy"),
    "dart": ("bleu",),
}
EXTRA_METRICS: dict[str, tuple[str, ...]] = {
    "samsum": ("rouge1", "rouge2", "rougeL"),
    "dart": ("sacrebleu", "ter"),
}
LOWER_IS_BETTER = frozenset({"ter"})
TASK_SCORE = "task_score"


def base_task(name: str) -> str:
    """'glue-tvt_mrpc', 'mrpc-tvt', 'glue_mrpc', 'mrpc' -> 'mrpc'."""
    name = name.lower()
    for prefix in ("glue-tvt_", "glue_tvt_", "glue-", "glue_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.endswith("-tvt"):
        name = name[: -len("-tvt")]
    return name


def is_tvt(name: str) -> bool:
    """True for the carved train/validation/test variants: 'glue-tvt_mrpc', 'glue_tvt_mrpc', 'mrpc-tvt'."""
    name = name.lower()
    return name.startswith(("glue-tvt_", "glue_tvt_")) or name.endswith("-tvt")


def official_metrics(task: str) -> tuple[str, ...]:
    task = base_task(task)
    if task not in OFFICIAL_METRICS:
        raise KeyError(f"unknown task {task!r} (known: {', '.join(OFFICIAL_METRICS)})")
    return OFFICIAL_METRICS[task]


def reported_metrics(task: str) -> tuple[str, ...]:
    """Every metric the task writes to eval_log: the official ones (ranked), then the extras."""
    return official_metrics(task) + EXTRA_METRICS.get(base_task(task), ())


def selection_score(task: str, metrics: dict) -> float | None:
    """Mean of the task's official metrics in `metrics`; None if any is missing."""
    names = official_metrics(task)
    if base_task(task) == "mnli" and is_tvt(task) and metrics.get("accuracy_mismatched") is None:
        names = ("accuracy_matched",)  # the carved validation has the training (matched) genres only
    values = [metrics.get(name) for name in names]
    if any(v is None for v in values):
        return None
    return sum(float(v) for v in values) / len(values)
