"""Aggregate finished runs: each run's best evaluation by its task's official metric, mean ± std over seeds.

    python -m trainkit.aggregate --runs outputs [more dirs or globs ...] --out results/ \\
        [--plot] [--group-by dataset,config] [--include-archived] [--quiet]

    python -m trainkit.aggregate --runs 'outputs/gla*__mrpc__*' outputs-old --out results/mrpc --plot

Runs. Every directory under --runs (searched recursively; a glob may name them directly) that
holds run.json is a run; archived copies (`<run>.old-<time>`, left by a restart without
--resume) are left out unless --include-archived. Each run's evaluations are
<run dir>/logs/eval_log.jsonl; when a step goes backwards (a resume), the earlier attempt's lines
from that step on are dropped.

Task. The eval line's `task` field, else run.json's config `task.name`, else run.json `task`.
Its metrics come from trainkit.tasks.official (official, ranked: MNLI accuracy matched/mismatched,
MRPC/QQP F1 + accuracy, STS-B Pearson + Spearman, CoLA MCC, SAMSum ROUGE-Lsum, Spider exact
match + execution accuracy, DART BLEU, ...; extra, reported only: SAMSum ROUGE-1/2/L, DART
sacreBLEU and TER).

Best evaluation. The validation evaluation (split "validation", or no split) with the highest
`task_score` (the mean of the task's official metrics; computed with selection_score when the
field is absent); ties go to the earliest step. eval_loss plays no part. The reported metrics
are that same evaluation's official metrics, except:

    When the run also has a split "test" line whose `evaluated_step` is the selected step (the
    trainer's final test evaluation of its best adapter), the test metrics are reported
    (reported_split = test) and the validation ones are kept as val_*. When the test line is of
    another step (the trainer ranked by another metric, e.g. eval_loss), the validation metrics
    are reported and `note` says why. Selection never looks at test metrics.

Config name. run.json's run name (config paths.run_name, else run_name, else the directory
name) minus a `__<dataset>__seed<S>` suffix (what trainkit.sweep names its runs); without the
suffix, the stem of the config file when run.json records one (config_path), else the run name.
Seed: config training.seed, else the `seed<S>` suffix.

Outputs (in --out; every ordering is sorted, so reruns give identical files):

    results.csv   one row per run (skipped ones too, with skip_reason): run_dir, run_name, config,
                  dataset, task, seed, status, n_evals, best_step, reported_split, task_score and
                  the reported metrics (official and extra), val_task_score / val_<metric> of the selected
                  validation evaluation, test_task_score / test_<metric> (empty without a test
                  line for that step), eval_loss at the selected step, note, skip_reason
    summary.csv   one row per group (default: dataset, config): n, seeds, reported_split
                  ("test", "validation" or "mixed"), <metric>_mean and <metric>_std for
                  task_score, every reported metric and val_task_score, runs
    summary.json  {"group_by", "selection", "metrics", "groups": [{<keys>, n, seeds,
                  reported_split, runs, metrics: {name: {mean, std, n, values}}}],
                  "runs": [results rows], "skipped": [{run_dir, run_name, reason}]}
    summary.md    the same table as mean ± std (n), the selection rule, the skipped runs
    summary.png   with --plot: task_score mean per dataset (groups) and config (bars), error
                  bars = std (matplotlib, Agg backend)

std is the sample standard deviation (n - 1); it is empty (null) for a group of one run.
Undefined metrics (NaN: the eval line lists them in `nan_fields`, e.g. MCC when gold has one class)
stay NaN: results.csv writes NaN, a NaN task_score never selects an evaluation, and a group's
mean ± std is over the runs where the metric is defined (`undefined` counts the others; the
cell reads "undefined" when no run defines it). summary.json writes NaN as null (JSON has no NaN).
Metrics are on the scale the trainer logged (0-100; correlations and MCC x100).
Exit codes: 0 written, 2 bad arguments or no run directories found.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from trainkit.fileio import iter_jsonl, json_safe, read_json, write_text_atomic
from trainkit.runlog import LOGS_DIR, RUN_INFO_FILE, STREAMS, read_number
from trainkit.tasks.official import OFFICIAL_METRICS, TASK_SCORE, base_task, official_metrics, reported_metrics, selection_score

SUFFIX_RE = re.compile(r"^(?P<config>.+?)__(?P<dataset>.+)__seed(?P<seed>-?\d+)$")
ARCHIVE_RE = re.compile(r"\.old-\d{8}-\d{6}(-\d+)?$")
PRUNE_PREFIXES = (".", "checkpoint-", "final-checkpoint-")
PRUNE_NAMES = {LOGS_DIR, "best-adapter", "predictions", "__pycache__"}
GROUP_KEYS = ("dataset", "config", "task", "script", "seed")
REPORTED_METRICS = {task: reported_metrics(task) for task in OFFICIAL_METRICS}  # official first, then extras
ALL_METRICS = tuple(dict.fromkeys(m for names in REPORTED_METRICS.values() for m in names))
SELECTION = ("best validation evaluation by task_score (mean of the task's official metrics, earliest step on "
             "ties); test metrics of that step are reported when the run has a test line for it")


class AggregateError(Exception):
    pass


# ---------------------------------------------------------------- finding runs
def find_run_dirs(patterns: list[str], include_archived: bool = False) -> list[Path]:
    found: dict[str, Path] = {}
    for pattern in patterns:
        paths = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not paths or not all(os.path.exists(p) for p in paths):
            raise AggregateError(f"--runs: nothing matches {pattern}")
        for path in map(Path, paths):
            if path.is_file() and path.name == RUN_INFO_FILE:
                path = path.parent
            if not path.is_dir():
                continue
            for run_dir in _walk_runs(path, include_archived, top=True):
                found.setdefault(str(run_dir.resolve()), run_dir)
    return sorted(found.values(), key=str)


def _walk_runs(root: Path, include_archived: bool, top: bool = False):
    if not include_archived and ARCHIVE_RE.search(root.name) and not top:
        return
    if (root / RUN_INFO_FILE).is_file():
        yield root
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for child in children:
        if child.name.startswith(PRUNE_PREFIXES) or child.name in PRUNE_NAMES:
            continue
        yield from _walk_runs(child, include_archived)


# ---------------------------------------------------------------- one run
def clean_evals(records: list[dict]) -> list[dict]:
    """Drop the lines of an earlier attempt: a step that does not advance (per split) means a resume."""
    kept: list[dict] = []
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)):
            continue
        split = rec.get("split") or "validation"
        same = [r for r in kept if (r.get("split") or "validation") == split]
        if same and step <= same[-1]["step"]:
            kept = [r for r in kept if (r.get("split") or "validation") != split or r["step"] < step]
        kept.append(rec)
    return kept


def _score(task: str, rec: dict) -> float | None:
    """The line's task_score (NaN when undefined), else the mean of its official metrics (None
    when one is missing)."""
    value = read_number(rec, TASK_SCORE)
    if value is not None:
        return value
    return selection_score(task, {name: read_number(rec, name) for name in official_metrics(task)})


def load_run(run_dir: Path) -> dict:
    """The results row of one run; a row with `skip_reason` set when it has nothing to report."""
    info = read_json(run_dir / RUN_INFO_FILE, default=None)
    row: dict[str, Any] = {"run_dir": str(run_dir), "run_name": run_dir.name, "config": None, "dataset": None,
                           "task": None, "seed": None, "status": None, "script": None, "n_evals": 0,
                           "best_step": None, "reported_split": None, "note": None, "skip_reason": None}
    if not isinstance(info, dict):
        row["skip_reason"] = f"{RUN_INFO_FILE} is not readable JSON"
        return row
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    section = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}  # noqa: E731
    run_name = section("paths").get("run_name") or info.get("run_name") or run_dir.name
    row.update(run_name=run_name, status=info.get("status"), script=info.get("script"))
    m = SUFFIX_RE.match(run_name)
    config_path = info.get("config_path") or cfg.get("_config_path") or cfg.get("config_path")
    row["config"] = m.group("config") if m else (Path(config_path).stem if config_path else run_name)
    seed = section("training").get("seed")
    row["seed"] = seed if isinstance(seed, int) else (int(m.group("seed")) if m else None)

    evals = clean_evals(list(iter_jsonl(run_dir / LOGS_DIR / STREAMS["eval"])))
    task = next((r["task"] for r in evals if r.get("task")), None) or section("task").get("name") or info.get("task")
    if isinstance(task, dict):
        task = task.get("name")
    row["dataset"] = task or (m.group("dataset") if m else None)
    row["n_evals"] = len(evals)
    if not evals:
        row["skip_reason"] = f"no evaluations ({LOGS_DIR}/{STREAMS['eval']} missing or empty)"
        return row
    if not task:
        row["skip_reason"] = "no task (no eval line field 'task', no config task.name)"
        return row
    try:
        names = official_metrics(task)
        columns = reported_metrics(task)
    except KeyError:
        row["skip_reason"] = f"task {task!r} has no official metrics in trainkit.tasks.official"
        return row
    row["task"] = base_task(task)
    validation = [r for r in evals if (r.get("split") or "validation") == "validation"]
    scored = [(s, r) for r in validation if (s := _score(task, r)) is not None and math.isfinite(s)]
    if not scored:
        row["skip_reason"] = (f"no validation evaluation has task_score or all of {', '.join(names)} "
                              f"({len(evals)} eval lines)")
        return row
    best_score, best = max(scored, key=lambda sr: (sr[0], -sr[1]["step"]))
    row["best_step"] = best["step"]
    row["eval_loss"] = read_number(best, "eval_loss")
    row["val_task_score"] = best_score
    for name in columns:
        row[f"val_{name}"] = read_number(best, name)
    tests = [r for r in evals if r.get("split") == "test"]
    test = next((r for r in reversed(tests) if r.get("evaluated_step") == best["step"]), None)
    if test is not None:
        row["test_task_score"] = _score(task, test)
        for name in columns:
            row[f"test_{name}"] = read_number(test, name)
        row["reported_split"] = "test"
        source, row[TASK_SCORE] = "test", row["test_task_score"]
    else:
        row["test_task_score"] = None
        for name in columns:
            row[f"test_{name}"] = None
        if tests:
            row["note"] = (f"test line is for step {tests[-1].get('evaluated_step')}, not the selected step "
                           f"{best['step']}: validation metrics reported")
        row["reported_split"] = "validation"
        source, row[TASK_SCORE] = "val", best_score
    for name in columns:
        row[name] = row[f"{source}_{name}"]
    return row


# ---------------------------------------------------------------- groups
def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _sort_key(value: Any) -> tuple:
    return (value is None, isinstance(value, str), value if value is not None else 0)


def metric_columns(rows: list[dict]) -> list[str]:
    """The reported metrics (official, then extra) of the tasks present, in OFFICIAL_METRICS task order."""
    present = {m for r in rows if r.get("task") for m in REPORTED_METRICS.get(r["task"], ())}
    return [m for m in ALL_METRICS if m in present]


def summarize(rows: list[dict], group_by: list[str]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group_by), []).append(row)
    out = []
    for key in sorted(groups, key=lambda k: tuple(_sort_key(v) for v in k)):
        members = sorted(groups[key], key=lambda r: (_sort_key(r.get("seed")), r["run_dir"]))
        names = [TASK_SCORE, *metric_columns(members), "val_task_score"]
        metrics = {}
        for name in names:
            present = [r[name] for r in members if r.get(name) is not None]
            values = [v for v in present if not math.isnan(v)]
            mean, std = mean_std(values)
            metrics[name] = {"mean": mean, "std": std, "n": len(values), "values": values,
                             "undefined": len(present) - len(values)}
        splits = sorted({r["reported_split"] for r in members})
        out.append({**dict(zip(group_by, key)), "n": len(members),
                    "seeds": [r.get("seed") for r in members],
                    "reported_split": splits[0] if len(splits) == 1 else "mixed",
                    "runs": [r["run_name"] for r in members], "metrics": metrics})
    return out


# ---------------------------------------------------------------- writing
def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{round(value, 6)}"
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return value


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    write_text_atomic(path, buf.getvalue())


def results_columns(rows: list[dict]) -> list[str]:
    metrics = metric_columns(rows)
    return (["run_dir", "run_name", "config", "dataset", "task", "seed", "status", "script", "n_evals",
             "best_step", "reported_split", TASK_SCORE, *metrics, "val_task_score", *[f"val_{m}" for m in metrics],
             "test_task_score", *[f"test_{m}" for m in metrics], "eval_loss", "note", "skip_reason"])


def summary_rows(groups: list[dict], group_by: list[str], metrics: list[str]) -> tuple[list[str], list[dict]]:
    names = [TASK_SCORE, *metrics, "val_task_score"]
    columns = [*group_by, "n", "seeds", "reported_split",
               *[f"{n}_{s}" for n in names for s in ("mean", "std")], "runs"]
    rows = []
    for g in groups:
        row = {k: g[k] for k in (*group_by, "n", "seeds", "reported_split", "runs")}
        for name in names:
            stats = g["metrics"].get(name) or {}
            row[f"{name}_mean"], row[f"{name}_std"] = stats.get("mean"), stats.get("std")
        rows.append(row)
    return columns, rows


def _pm(stats: dict | None) -> str:
    if not stats or stats.get("mean") is None:
        return "undefined" if stats and stats.get("undefined") else "—"
    undefined = f" ({stats['undefined']} undefined)" if stats.get("undefined") else ""
    if stats.get("std") is None:
        return f"{stats['mean']:.2f}{undefined}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}{undefined}"


def markdown(groups: list[dict], group_by: list[str], metrics: list[str], skipped: list[dict],
             n_runs: int) -> str:
    names = [TASK_SCORE, *metrics]
    head = [*group_by, "n", "split", *names, "val task_score"]
    lines = ["# Results", "",
             f"{n_runs} runs, {len(skipped)} skipped. Each run: {SELECTION}. "
             "Cells: mean ± sample std over the runs of the group (n = runs; no std for n = 1).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        cells = [str(g[k]) if g[k] is not None else "—" for k in group_by]
        cells += [str(g["n"]), g["reported_split"], *[_pm(g["metrics"].get(n)) for n in names],
                  _pm(g["metrics"].get("val_task_score"))]
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "## Skipped runs", ""]
        lines += [f"- `{s['run_dir']}`: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def plot(path: Path, groups: list[dict], group_by: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(g, keys):
        return " / ".join(str(g[k]) for k in keys) or "all"

    if "dataset" in group_by and len(group_by) > 1:
        other = [k for k in group_by if k != "dataset"]
        datasets = sorted({g["dataset"] for g in groups}, key=_sort_key)
        series = sorted({label(g, other) for g in groups})
    else:
        datasets, series, other = [label(g, group_by) for g in groups], [TASK_SCORE], []
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(datasets) * max(1, len(series)) ** 0.5 + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for k, name in enumerate(series):
        means, errs = [], []
        for d in datasets:
            if other:
                g = next((g for g in groups if g["dataset"] == d and label(g, other) == name), None)
            else:
                g = next(g for g in groups if label(g, group_by) == d)
            stats = (g or {}).get("metrics", {}).get(TASK_SCORE) or {}
            means.append(stats.get("mean") if stats.get("mean") is not None else float("nan"))
            errs.append(stats.get("std") or 0.0)
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(datasets))]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=name if other else None)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels([str(d) for d in datasets], rotation=20 if len(datasets) > 4 else 0, ha="right" if len(datasets) > 4 else "center")
    ax.set_ylabel("task_score (mean ± std over seeds)")
    ax.set_title("best checkpoint per run, by official metric")
    if other:
        ax.legend(title=" / ".join(other), fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- CLI
def aggregate(patterns: list[str], out: Path, group_by: list[str], make_plot: bool = False,
              include_archived: bool = False) -> dict:
    run_dirs = find_run_dirs(patterns, include_archived)
    if not run_dirs:
        raise AggregateError(f"--runs: no run directories (with {RUN_INFO_FILE}) under {' '.join(patterns)}")
    all_rows = [load_run(d) for d in run_dirs]
    all_rows.sort(key=lambda r: (_sort_key(r.get("dataset")), _sort_key(r.get("config")),
                                 _sort_key(r.get("seed")), r["run_dir"]))
    rows = [r for r in all_rows if not r["skip_reason"]]
    skipped = [{"run_dir": r["run_dir"], "run_name": r["run_name"], "reason": r["skip_reason"]}
               for r in all_rows if r["skip_reason"]]
    groups = summarize(rows, group_by)
    metrics = metric_columns(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", results_columns(rows), all_rows)
    columns, srows = summary_rows(groups, group_by, metrics)
    write_csv(out / "summary.csv", columns, srows)
    summary = {"group_by": group_by, "selection": SELECTION, "metrics": [TASK_SCORE, *metrics],
               "groups": groups, "runs": rows, "skipped": skipped}
    write_text_atomic(out / "summary.json", json.dumps(json_safe(summary), indent=2, sort_keys=False) + "\n")
    md = markdown(groups, group_by, metrics, skipped, len(all_rows))
    write_text_atomic(out / "summary.md", md)
    files = ["results.csv", "summary.csv", "summary.json", "summary.md"]
    if make_plot:
        if groups:
            plot(out / "summary.png", groups, group_by)
            files.append("summary.png")
    return {"summary": summary, "markdown": md, "files": [str(out / f) for f in files]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainkit.aggregate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="DIR|GLOB",
                        help="run directories, directories that hold them (searched recursively), or globs")
    parser.add_argument("--out", default="results", help="output directory (default: results)")
    parser.add_argument("--plot", action="store_true", help="also write summary.png (task_score bar chart)")
    parser.add_argument("--group-by", default="dataset,config",
                        help=f"comma-separated keys from {', '.join(GROUP_KEYS)} (default: dataset,config)")
    parser.add_argument("--include-archived", action="store_true", help="also read <run>.old-<time> directories")
    parser.add_argument("--quiet", action="store_true", help="print only the written files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        group_by = [k.strip() for k in args.group_by.split(",") if k.strip()]
        bad = [k for k in group_by if k not in GROUP_KEYS]
        if bad or not group_by or len(set(group_by)) != len(group_by):
            raise AggregateError(f"--group-by: {args.group_by!r}: use distinct keys from {', '.join(GROUP_KEYS)}")
        result = aggregate(args.runs, Path(args.out), group_by, args.plot, args.include_archived)
    except AggregateError as e:
        print(f"aggregate: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(result["markdown"])
    skipped = result["summary"]["skipped"]
    if skipped and args.quiet:
        print(f"{len(skipped)} runs skipped (see summary.md)")
    print("wrote " + ", ".join(result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
