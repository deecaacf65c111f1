"""Record the OFFICIAL Spider exact-match verdicts on the dev predictions the Spider repository ships.

    python scripts/spider_official_results.py --mirror /work/.mirror/taoyds+spider/repo \
        --out tests/data/spider_official

Reads the taoyds/spider repository (a bare git mirror; the files used are extracted with `git archive` into a
temp dir; nothing of its code is copied into this project), and writes to --out:
  gold.txt, predict.txt      evaluation_examples/gold_example.txt and pred_example.txt (1,034 dev items)
  tables.json                evaluation_examples/examples/tables.json reduced to the 20 dev databases
  official_results.json      {"commit", "total": {...}, "items": [{"exact": 0/1, "hardness": ...}, ...]}

How the official code is run: evaluation.py reads each schema from database/<db>/<db>.sqlite, which
the repository does not ship; empty sqlite files are created from tables.json (the same tables and
columns, original names) in the temp dir. Each item goes through the official functions in the
order evaluation.py's evaluate() calls them (get_schema, get_sql, eval_hardness, get_sql of the
prediction with its empty-SQL fallback, build_valid_col_units, rebuild_sql_val, rebuild_sql_col,
Evaluator.eval_exact_match), so the per-item verdict is recorded; the official command line
(`evaluation.py --etype match`) is also run as a subprocess, and its printed totals must equal the
sum of the per-item verdicts (the script stops otherwise).

nltk data: process_sql.tokenize calls nltk.word_tokenize, which first splits sentences with the
punkt model (nltk data, not installed here, no network). word_tokenize(s, preserve_line=True)
skips that sentence split and runs the same word tokenizer; a SQL query has no sentence break
(string literals are replaced by placeholders before tokenising), so the tokens are the same.
The script puts that call in place of process_sql.word_tokenize, in this process and, for the
command line, through a small wrapper script (run_official.py in the temp dir) that runs
evaluation.py as __main__.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

FILES = {"gold.txt": "evaluation_examples/gold_example.txt", "predict.txt": "evaluation_examples/pred_example.txt"}
TABLES = "evaluation_examples/examples/tables.json"

# Runs the official evaluation.py's command line with the punkt-free word_tokenize (see the docstring).
CLI_WRAPPER = """
import sys, runpy, nltk, process_sql
process_sql.word_tokenize = lambda s: nltk.word_tokenize(s, preserve_line=True)
sys.argv = ["evaluation.py"] + sys.argv[1:]
runpy.run_path("evaluation.py", run_name="__main__")
"""


def extract(mirror: Path, dest: Path) -> str:
    # only the files used: the mirror lacks some large blobs (e.g. train_spider.json)
    paths = ["evaluation.py", "process_sql.py", TABLES, *FILES.values()]
    archive = subprocess.run(["git", "-C", str(mirror), "archive", "HEAD", *paths], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return subprocess.run(["git", "-C", str(mirror), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def build_empty_databases(tables: list[dict], db_dir: Path) -> None:
    for entry in tables:
        path = db_dir / entry["db_id"] / f"{entry['db_id']}.sqlite"
        path.parent.mkdir(parents=True)
        with sqlite3.connect(path) as conn:
            for t, table in enumerate(entry["table_names_original"]):
                if table == "sqlite_sequence":  # sqlite makes it (name, seq) for an AUTOINCREMENT table
                    conn.execute("CREATE TABLE tmp_autoincrement (id INTEGER PRIMARY KEY AUTOINCREMENT)")
                    conn.execute("DROP TABLE tmp_autoincrement")
                    continue
                cols = [name for ti, name in entry["column_names_original"] if ti == t]
                conn.execute(f'CREATE TABLE "{table}" ({", ".join(chr(34) + c + chr(34) for c in cols)})')
        conn.close()


def per_item_verdicts(src: Path, gold_lines: list[str], pred_lines: list[str], db_dir: Path, tables_path: Path):
    sys.path.insert(0, str(src))
    import nltk
    import process_sql
    import evaluation as ev

    process_sql.word_tokenize = lambda s: nltk.word_tokenize(s, preserve_line=True)
    kmaps = ev.build_foreign_key_map_from_json(str(tables_path))
    evaluator = ev.Evaluator()
    items = []
    for p_str, g_line in zip(pred_lines, gold_lines):
        g_str, db_id = g_line.split("\t")
        schema = ev.Schema(ev.get_schema(str(db_dir / db_id / f"{db_id}.sqlite")))
        g_sql = ev.get_sql(schema, g_str)
        hardness = evaluator.eval_hardness(g_sql)
        try:
            p_sql = ev.get_sql(schema, p_str)
            parsed = True
        except Exception:  # noqa: BLE001 - the official fallback: any parse error -> empty SQL
            p_sql = {"except": None, "from": {"conds": [], "table_units": []}, "groupBy": [], "having": [],
                     "intersect": None, "limit": None, "orderBy": [], "select": [False, []], "union": None, "where": []}
            parsed = False
        kmap = kmaps[db_id]
        g_valid = ev.build_valid_col_units(g_sql["from"]["table_units"], schema)
        g_sql = ev.rebuild_sql_col(g_valid, ev.rebuild_sql_val(g_sql), kmap)
        p_valid = ev.build_valid_col_units(p_sql["from"]["table_units"], schema)
        p_sql = ev.rebuild_sql_col(p_valid, ev.rebuild_sql_val(p_sql), kmap)
        exact = int(evaluator.eval_exact_match(p_sql, g_sql))
        items.append({"exact": exact, "hardness": hardness, "pred_parsed": parsed})
    return items


def official_cli_totals(src: Path, db_dir: Path, tables_path: Path, gold: Path, pred: Path) -> dict:
    (src / "run_official.py").write_text(CLI_WRAPPER)
    out = subprocess.run([sys.executable, "run_official.py", "--gold", str(gold), "--pred", str(pred),
                          "--db", str(db_dir), "--table", str(tables_path), "--etype", "match"],
                         cwd=src, check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    counts = next(line for line in lines if line.startswith("count")).split()[1:]
    exact = next(line for line in lines if line.startswith("exact match")).split()[2:]
    levels = ["easy", "medium", "hard", "extra", "all"]
    return {level: {"count": int(c), "exact": float(e)} for level, c, e in zip(levels, counts, exact)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", type=Path, required=True, help="taoyds/spider git directory")
    parser.add_argument("--out", type=Path, default=Path("tests/data/spider_official"))
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "spider"
        src.mkdir()
        commit = extract(args.mirror, src)
        for name, path in FILES.items():
            (args.out / name).write_bytes((src / path).read_bytes())
        gold_lines = [line.strip() for line in (src / FILES["gold.txt"]).read_text().splitlines() if line.strip()]
        pred_lines = [line.strip() for line in (src / FILES["predict.txt"]).read_text().splitlines() if line.strip()]
        assert len(gold_lines) == len(pred_lines), "gold and predictions differ in length"
        dev_dbs = {line.split("\t")[1] for line in gold_lines}
        tables = [t for t in json.loads((src / TABLES).read_text()) if t["db_id"] in dev_dbs]
        tables_path = args.out / "tables.json"
        tables_path.write_text(json.dumps(tables, indent=1) + "\n")
        db_dir = Path(tmp) / "database"
        build_empty_databases(tables, db_dir)

        items = per_item_verdicts(src, gold_lines, pred_lines, db_dir, tables_path)
        cli = official_cli_totals(src, db_dir, tables_path, args.out / "gold.txt", args.out / "predict.txt")
    total = {"count": len(items), "exact": sum(i["exact"] for i in items) / len(items)}
    assert cli["all"]["count"] == total["count"] and abs(cli["all"]["exact"] - total["exact"]) < 5e-4, (cli, total)
    for level in ("easy", "medium", "hard", "extra"):
        mine = [i["exact"] for i in items if i["hardness"] == level]
        assert cli[level]["count"] == len(mine) and abs(cli[level]["exact"] - sum(mine) / len(mine)) < 5e-4, level
    result = {"source": f"taoyds/spider@{commit} evaluation.py --etype match", "official_cli": cli, "items": items}
    text = json.dumps(result, indent=None, separators=(",", ":"))
    text = re.sub(r'(\{"exact")', "\n" + r"\1", text)  # one item per line: readable diffs
    (args.out / "official_results.json").write_text(text + "\n")
    print(json.dumps(cli, indent=1))


if __name__ == "__main__":
    main()
