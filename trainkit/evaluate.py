"""Score predictions without training: `python -m trainkit.evaluate`. The same task scorers that
train_lora.py logs (trainkit.tasks), so a number printed here equals the number a run reports for
the same predictions.

    # a predictions file a run wrote (<run_dir>/predictions/<tag>-<split>.jsonl): the gold is in it
    python -m trainkit.evaluate --task sst2 --predictions outputs/tiny-gla-lora-sst2/predictions/step-60-validation.jsonl

    # your own predictions against a split of the task's data (task.local_dir layout, or HF datasets);
    # PRED is JSONL with a "prediction" field per line, or plain text with one prediction per line
    python -m trainkit.evaluate --task samsum --pred preds.jsonl --data-dir data/tasks/samsum --split test

    # Spider in the official files' formats: one SQL per line; gold "SQL<TAB>db_id" per line
    python -m trainkit.evaluate --task spider --pred pred.sql --gold gold.sql --db-dir database --tables tables.json

    # DART in the official files' formats: one output per line; reference files line-aligned with it
    # (an empty line: that tripleset has fewer references)
    python -m trainkit.evaluate --task dart --pred hyp.txt --refs ref0.lex ref1.lex ref2.lex

Prints one JSON object: every metric of the task, `task_score` (what runs rank checkpoints by) and
`num_examples`; `--out FILE` also writes it. An undefined metric is null and named in
`nan_fields`, as in eval_log.jsonl. Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainkit.config import ConfigError
from trainkit.fileio import JsonlError, iter_jsonl_rows
from trainkit.runlog import json_record
from trainkit.tasks import Example, get_task
from trainkit.tasks.official import TASK_SCORE, selection_score


class EvaluateError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------- reading files
def read_lines(path: Path) -> list[str]:
    """The lines of a text file, without their line ends (a final empty line is not a line)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvaluateError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise EvaluateError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one per line; a bad line is an EvaluateError naming the file and line."""
    if not path.is_file():
        raise EvaluateError(f"{path}: no such file")
    rows = []
    try:
        for _, where, row in iter_jsonl_rows(path):
            if not isinstance(row, dict):
                raise EvaluateError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    except JsonlError as e:
        raise EvaluateError(str(e)) from None
    return rows


def read_predictions(path: Path) -> list[str]:
    """Predictions from JSONL ("prediction" field) or from a text file (one per line)."""
    if path.suffix in (".jsonl", ".json"):
        rows = read_jsonl(path)
        missing = [i + 1 for i, row in enumerate(rows) if not isinstance(row.get("prediction"), str)]
        if missing:
            raise EvaluateError(f"{path} line {missing[0]}: no \"prediction\" string")
        return [row["prediction"] for row in rows]
    return read_lines(path)


def examples_from_run_predictions(path: Path) -> tuple[list[str], list[Example], str | None]:
    """(predictions, examples, split) of a predictions file a run wrote: every line holds the prompt,
    the prediction, the references and the example's fields (label, db_id, ...)."""
    rows = read_jsonl(path)
    predictions, examples = [], []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row.get("prediction"), str) or not isinstance(row.get("references"), list):
            raise EvaluateError(f"{path} line {n}: a run's predictions line has \"prediction\" and \"references\"")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "prediction", "references")}
        predictions.append(row["prediction"])
        examples.append(Example(prompt=row.get("prompt", ""), target="", references=row["references"], meta=meta))
    splits = {e.meta.get("split") for e in examples}
    return predictions, examples, splits.pop() if len(splits) == 1 else None


# ---------------------------------------------------------------------- scoring
def check_count(predictions: list, examples: list, what: str) -> None:
    if len(predictions) != len(examples):
        raise EvaluateError(f"{len(predictions)} predictions for {len(examples)} {what}: the files must be line-aligned")


def with_task_score(task_name: str, metrics: dict) -> dict:
    score = selection_score(task_name, metrics)
    return {**metrics, TASK_SCORE: score}


def evaluate(args) -> dict:
    try:
        task = get_task(args.task)
    except ValueError as e:
        raise EvaluateError(str(e)) from None

    if args.predictions:
        predictions, examples, split = examples_from_run_predictions(Path(args.predictions))
        if task.base == "spider":  # the run's database paths may be another machine's: --db-dir, --tables
            if args.db_dir:
                check_databases(Path(args.db_dir), [e.meta["db_id"] for e in examples])
                for e in examples:
                    e.meta["db_path"] = str(Path(args.db_dir) / e.meta["db_id"] / f"{e.meta['db_id']}.sqlite")
            task.tables = spider_tables(args)
        return with_task_score(task.name, task.score(predictions, examples, split=split))

    if not args.pred:
        raise EvaluateError("give --predictions RUN_PREDICTIONS.jsonl, or --pred FILE with the gold "
                            "(--data-dir/--split, or Spider's --gold/--db-dir/--tables, or DART's --refs)")
    predictions = read_predictions(Path(args.pred))

    if task.base == "spider" and args.gold:
        return with_task_score(task.name, score_spider_files(predictions, args))
    if task.base == "dart" and args.refs:
        return with_task_score(task.name, score_dart_files(task, predictions, args))

    splits = task.load(local_dir=args.data_dir, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    split = args.split or task.eval_splits[0]
    if split not in splits:
        raise EvaluateError(f"{task.name} has no split {split!r} (it has: {', '.join(splits)})")
    examples = splits[split]
    check_count(predictions, examples, f"{task.name} {split} examples")
    return with_task_score(task.name, task.score(predictions, examples, split=split))


def score_spider_files(predictions: list[str], args) -> dict:
    """The official Spider files: predicted SQL per line; gold 'SQL<TAB>db_id' per line."""
    from trainkit.tasks.spider import score_sql_lists
    gold_rows = []
    for n, line in enumerate(read_lines(Path(args.gold)), start=1):
        if not line.strip():
            continue
        sql, sep, db_id = line.rpartition("\t")
        if not sep or not db_id.strip():
            raise EvaluateError(f"{args.gold} line {n}: expected 'SQL<TAB>db_id'")
        gold_rows.append((sql.strip(), db_id.strip()))
    check_count(predictions, gold_rows, "gold queries")
    db_ids = [db for _, db in gold_rows]
    tables = spider_tables(args)
    if args.db_dir:
        check_databases(Path(args.db_dir), db_ids)
    elif missing := sorted(set(db_ids) - set(tables)):
        raise EvaluateError(f"spider: without --db-dir every schema must be in --tables; missing: {', '.join(missing[:5])}")
    return score_sql_lists(predictions, [sql for sql, _ in gold_rows], db_ids,
                           Path(args.db_dir) if args.db_dir else None, tables)


def check_databases(db_dir: Path, db_ids: list[str]) -> None:
    """Every db_id has a database under db_dir: a missing one would silently score as wrong."""
    if not db_dir.is_dir():
        raise EvaluateError(f"spider: --db-dir {db_dir}: no such folder")
    missing = sorted({db for db in db_ids if not any((db_dir / db).glob("*.sqlite*"))})
    if missing:
        raise EvaluateError(f"spider: no database in {db_dir} for {len(missing)} db_id(s): {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} (expected {db_dir}/<db_id>/<db_id>.sqlite)")


def spider_tables(args) -> dict:
    """{db_id: tables.json entry} of --tables; {} without it (schemas then come from the databases)."""
    from trainkit.tasks.spider_match import load_tables

    if not args.tables:
        return {}
    if not Path(args.tables).is_file():
        raise EvaluateError(f"spider: --tables {args.tables}: no such file")
    return load_tables(Path(args.tables))


def score_dart_files(task, predictions: list[str], args) -> dict:
    """The official DART files: one output per line; reference files line-aligned with it."""
    references = [read_lines(Path(p)) for p in args.refs]
    for path, refs in zip(args.refs, references):
        if len(refs) > len(predictions):
            raise EvaluateError(f"{path}: {len(refs)} lines for {len(predictions)} predictions")
    examples = [Example(prompt="", target="", references=[r[i] for r in references if i < len(r) and r[i].strip()],
                        meta={"entry": i}) for i in range(len(predictions))]
    empty = [i + 1 for i, e in enumerate(examples) if not e.references]
    if empty:
        raise EvaluateError(f"prediction line {empty[0]} has no reference in any of {', '.join(args.refs)}")
    return task.score(predictions, examples, split="test")


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainkit.evaluate",
                                     description="Score predictions with a task's official metrics (as train_lora.py does).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1].split("Prints one")[0])
    parser.add_argument("--task", required=True, help="task name (sst2, mnli, stsb, samsum, spider, dart, ...)")
    parser.add_argument("--predictions", metavar="FILE", help="a run's predictions JSONL (gold included)")
    parser.add_argument("--pred", metavar="FILE", help="predictions: JSONL with \"prediction\", or one per line")
    parser.add_argument("--data-dir", help="task data folder (task.local_dir layout); default: the task's "
                                           "environment variable, else HF datasets")
    parser.add_argument("--split", help="split to score against (default: the task's first evaluation split)")
    parser.add_argument("--cache-dir", help="HF datasets cache folder")
    parser.add_argument("--local-files-only", action="store_true", help="never contact the HF hub")
    parser.add_argument("--gold", help="spider: gold file, 'SQL<TAB>db_id' per line")
    parser.add_argument("--db-dir", help="spider: folder with <db_id>/<db_id>.sqlite (several .sqlite files in a "
                                         "<db_id> folder: a test suite, every one must match); without it, exact "
                                         "match only (schemas from --tables)")
    parser.add_argument("--tables", help="spider: tables.json (schemas for exact match; without it schemas are "
                                         "read from the databases)")
    parser.add_argument("--refs", nargs="+", metavar="REF", help="dart: reference files, line-aligned with --pred")
    parser.add_argument("--out", help="also write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = evaluate(args)
    except (EvaluateError, ConfigError, FileNotFoundError) as e:  # TaskDataError is a FileNotFoundError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    text = json.dumps(json_record({"task": args.task, **metrics}), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
