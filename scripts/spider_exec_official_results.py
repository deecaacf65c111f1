"""Record test-suite-sql-eval's own verdicts on our execution-accuracy cases.

    python scripts/spider_exec_official_results.py \\
        --official /work/.mirror/taoyds+test-suite-sql-eval/repo      # a git mirror or a checkout

Runs the official exec_eval.eval_exec_match (plug_value off, keep_distinct as the case says) on
each (database, prediction, gold) case below, over the fixture databases in
data/tasks/spider/database (tests/task_fixtures.py), and writes tests/spider_exec_official.json.
tests/test_spider_exec.py checks that trainkit.tasks.spider_exec gives the same verdict on every
case, except the cases marked `ours` (deliberate differences, each with its reason).

    python scripts/spider_exec_official_results.py --all-pairs     # agreement at scale, writes nothing

--all-pairs compares ours with the official verdict in one process on every (prediction, gold)
pair of the fixture questions' gold queries of one schema (school, shop, and school's queries on
the school_suite test suite), the predictions also with DISTINCT added, with ORDER BY 1 DESC
appended and lower-cased, each with keep_distinct off and on; it prints the counts and every
disagreement. All are read-only SELECTs, so one copy of the databases serves.

The official code opens the databases read-write (a DROP TABLE prediction would commit) and cannot
interrupt a query, so each case runs in its own process on a fresh copy of the databases, under a
wall-clock limit; a case still running then is recorded as "no verdict".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import sqlparse

REPO = Path(__file__).resolve().parents[1]
DATABASES = REPO / "data" / "tasks" / "spider" / "database"
OUT = REPO / "tests" / "spider_exec_official.json"
WALL_LIMIT_S = 10

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"

# name, db folder, prediction, gold, keep_distinct; `ours` + `why` where we differ on purpose.
CASES = [
    # column permutations
    dict(name="permuted_columns", db="school", pred="SELECT age, name FROM student", gold="SELECT name, age FROM student"),
    dict(name="permuted_columns_ordered", db="school", pred="SELECT age, name FROM student ORDER BY age",
         gold="SELECT name, age FROM student ORDER BY age"),
    dict(name="permuted_four_columns", db="school", pred="SELECT city, age, name, student_id FROM student",
         gold="SELECT student_id, name, age, city FROM student"),
    dict(name="same_columns_other_pairing", db="school",
         pred="SELECT T1.name, T2.city FROM student AS T1 JOIN student AS T2 ON T1.student_id = 7 - T2.student_id",
         gold="SELECT name, city FROM student"),
    dict(name="extra_column", db="school", pred="SELECT name, age FROM student", gold="SELECT name FROM student"),
    dict(name="both_empty_other_columns", db="school", pred="SELECT city, age FROM student WHERE 0",
         gold="SELECT name FROM student WHERE age > 100"),
    dict(name="empty_vs_rows", db="school", pred="SELECT name FROM student WHERE age > 100", gold="SELECT name FROM student"),
    dict(name="duplicates_count", db="school", pred="SELECT city FROM student UNION ALL SELECT 'Paris'",
         gold="SELECT city FROM student UNION ALL SELECT 'Rome'"),
    # values: Python equality, and the quick rejection's sort key (str(value) + str(type))
    dict(name="int_equals_float", db="school", pred="SELECT 6.0", gold="SELECT count(*) FROM student"),
    dict(name="int_float_sort_key_quirk", db="school", pred="SELECT 1.0, 1.5", gold="SELECT 1, 1.5"),
    dict(name="literal_case", db="school", pred="SELECT name FROM student WHERE city = 'paris'",
         gold="SELECT name FROM student WHERE city = \"Paris\""),
    dict(name="spaced_operator", db="school", pred="SELECT name FROM student WHERE age > = 22",
         gold="SELECT name FROM student WHERE age > 21"),
    dict(name="current_year", db="school", pred="SELECT name FROM student WHERE YEAR(CURDATE()) - age < 1999",
         gold="SELECT name FROM student WHERE age > 21"),
    # DISTINCT
    dict(name="distinct_dropped", db="school", pred="SELECT city FROM student", gold="SELECT DISTINCT city FROM student"),
    dict(name="distinct_kept", db="school", pred="SELECT city FROM student", gold="SELECT DISTINCT city FROM student",
         keep_distinct=True),
    dict(name="count_distinct_dropped", db="school", pred="SELECT count(*) FROM student",
         gold="SELECT count(DISTINCT city) FROM student"),
    dict(name="count_distinct_kept", db="school", pred="SELECT count(*) FROM student",
         gold="SELECT count(DISTINCT city) FROM student", keep_distinct=True),
    dict(name="distinct_in_literal", db="school", pred="SELECT name FROM student WHERE city != 'distinct'",
         gold="SELECT name FROM student"),
    dict(name="second_statement_cut", db="school", pred="SELECT count(*) FROM student; SELECT 1",
         gold="SELECT count(*) FROM student"),
    dict(name="second_statement_kept", db="school", pred="SELECT count(*) FROM student; SELECT 1",
         gold="SELECT count(*) FROM student", keep_distinct=True),
    # when order matters: the substring "order by" in the lower-cased gold
    dict(name="order_by_reversed", db="school", pred="SELECT name FROM student ORDER BY age ASC",
         gold="SELECT name FROM student ORDER BY age DESC"),
    dict(name="gold_unordered_pred_ordered", db="school", pred="SELECT name FROM student ORDER BY name DESC",
         gold="SELECT name FROM student"),
    dict(name="order_by_two_spaces", db="school", pred="SELECT name FROM student ORDER BY age ASC",
         gold="SELECT name FROM student ORDER  BY age DESC"),
    dict(name="order_by_newline", db="school", pred="SELECT name FROM student ORDER BY age ASC",
         gold="SELECT name FROM student ORDER\nBY age DESC"),
    dict(name="order_by_in_literal", db="school", pred="SELECT name FROM student ORDER BY name DESC",
         gold="SELECT name FROM student WHERE city != 'order by'"),
    dict(name="order_by_in_subquery", db="school", pred="SELECT name FROM student ORDER BY name DESC",
         gold="SELECT name FROM student WHERE age <= (SELECT age FROM student ORDER BY age DESC LIMIT 1)"),
    # test suites: every database in the folder
    dict(name="suite_all_agree", db="school_suite", pred="SELECT name FROM student WHERE age >= 22",
         gold="SELECT name FROM student WHERE age > 21"),
    dict(name="suite_one_disagrees", db="school_suite", pred="SELECT name FROM student WHERE age IN (22, 23)",
         gold="SELECT name FROM student WHERE city = 'Berlin'"),
    dict(name="single_db_agrees", db="school", pred="SELECT name FROM student WHERE age IN (22, 23)",
         gold="SELECT name FROM student WHERE city = 'Berlin'"),
    # bad predictions
    dict(name="syntax_error", db="school", pred="SELEKT 1", gold="SELECT count(*) FROM student"),
    dict(name="no_such_table", db="school", pred="SELECT nothing FROM nowhere", gold="SELECT count(*) FROM student"),
    dict(name="too_many_rows", db="school", pred="SELECT * FROM student a, student b, student c",
         gold="SELECT count(*) FROM student"),
    dict(name="insert_denied", db="school", pred="INSERT INTO student VALUES (9, 'Zed', 30, 'Nice')",
         gold="SELECT count(*) FROM student"),
    dict(name="delete_with_empty_gold", db="school", pred="DELETE FROM student WHERE age > 100",
         gold="SELECT name FROM student WHERE age > 100",
         ours=0, why="writes are denied (read-only database, authorizer): a write is never a right answer"),
    dict(name="drop_with_empty_gold", db="school", pred="DROP TABLE enrollment",
         gold="SELECT name FROM student WHERE age > 100",
         ours=0, why="writes are denied; the official run drops the table (DDL commits on its read-write connection)"),
    dict(name="pragma_denied", db="school", pred="PRAGMA table_info(course)",
         gold="SELECT count(*) FROM student"),
    dict(name="blank_with_empty_gold", db="school", pred="   ", gold="SELECT name FROM student WHERE age > 100",
         ours=0, why="a blank generation is no answer; exec_eval stops on an IndexError (sqlparse finds no "
                     "statement), and its file format cannot hold one (a blank line separates interactions)"),
    dict(name="endless_query", db="school", pred=ENDLESS, gold="SELECT count(*) FROM student",
         ours=0, why="each query has a time limit (SpiderTask.timeout_s); exec_eval's asyncio.wait_for cannot "
                     "interrupt the blocking sqlite call, so the official run never returns"),
    dict(name="over_10000_tokens", db="school", pred="SELECT count(*) FROM student WHERE age NOT IN (" + "0," * 5100 + "0)",
         gold="SELECT count(*) FROM student",
         ours=1, why="exec_eval's sqlparse.parse gives up past 10,000 tokens (SQLParseError) and stops; we split "
                     "statements without sqlparse's grouping pass, so the query runs"),
    dict(name="gold_fails", db="school", pred="SELECT 1", gold="SELECT nothing FROM nowhere",
         ours=0, why="a gold query that fails scores the item wrong; exec_eval stops on an AssertionError"),
]

RUNNER = """
import json, sys
from exec_eval import eval_exec_match
case = json.loads(sys.argv[1])
print(json.dumps(eval_exec_match(db=case["db_path"], p_str=case["pred"], g_str=case["gold"], plug_value=False,
                                 keep_distinct=case["keep_distinct"], progress_bar_for_each_datapoint=False)))
"""


def official_source(path: Path, into: Path) -> str:
    """Extract a git mirror (HEAD) or copy a checkout into `into`; returns the commit id or "checkout"."""
    if (path / "HEAD").is_file() and not (path / "exec_eval.py").is_file():
        archive = subprocess.run(["git", "-C", str(path), "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    shutil.copytree(path, into, dirs_exist_ok=True)
    return "checkout"


def official_verdict(code_dir: Path, work: Path, case: dict) -> int | str:
    """eval_exec_match's verdict (1/0), "no verdict within N s", or "error: <exception type>"."""
    databases = work / "database"
    shutil.rmtree(databases, ignore_errors=True)
    shutil.copytree(DATABASES, databases)
    db = case["db"]
    args = {"db_path": str(databases / db / f"{db}.sqlite"), "pred": case["pred"], "gold": case["gold"],
            "keep_distinct": case.get("keep_distinct", False)}
    try:
        result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(args)], cwd=code_dir, capture_output=True,
                                text=True, timeout=WALL_LIMIT_S)
    except subprocess.TimeoutExpired:
        return f"no verdict within {WALL_LIMIT_S} s"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return "error: " + last.split(":")[0]
    return int(result.stdout.strip().splitlines()[-1])


def _variants(sql: str) -> list[str]:
    out = [sql, sql.replace("SELECT", "SELECT DISTINCT", 1), sql.lower()]
    if "ORDER BY" not in sql and "LIMIT" not in sql:
        out.append(sql + " ORDER BY 1 DESC")
    return out


def all_pairs(code_dir: Path, work: Path) -> int:
    """Ours vs the official verdict on every pair (module docstring); returns the disagreement count."""
    sys.path[:0] = [str(code_dir), str(REPO), str(REPO / "tests")]
    from exec_eval import eval_exec_match

    from task_fixtures import SPIDER_DBS
    from trainkit.tasks.spider_exec import Executor

    shutil.copytree(DATABASES, work / "database")
    plan = [("school", "school"), ("shop", "shop"), ("school_suite", "school")]
    total, right, differ = 0, 0, []
    for keep_distinct in (False, True):
        with Executor(timeout_s=5.0, keep_distinct=keep_distinct) as ex:
            for db, queries_of in plan:
                db_path = work / "database" / db / f"{db}.sqlite"
                golds = [q for _, q in SPIDER_DBS[queries_of]["queries"]]
                for gold in golds:
                    for pred in [v for q in golds for v in _variants(q)]:
                        official = eval_exec_match(db=str(db_path), p_str=pred, g_str=gold, plug_value=False,
                                                   keep_distinct=keep_distinct, progress_bar_for_each_datapoint=False)
                        ours = int(ex.matches(db_path, pred, gold))
                        total += 1
                        right += official
                        if ours != official:
                            differ.append((db, keep_distinct, pred, gold, official, ours))
    for row in differ:
        print("differs:", row)
    print(f"{total - len(differ)}/{total} pairs agree with exec_eval ({len(differ)} differ; official: {right} right)")
    return len(differ)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default="/work/.mirror/taoyds+test-suite-sql-eval/repo",
                        help="test-suite-sql-eval: a bare git mirror or a checkout")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--all-pairs", action="store_true", help="print agreement on all fixture query pairs instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        code_dir, work = Path(tmp) / "official", Path(tmp) / "work"
        code_dir.mkdir()
        work.mkdir()
        commit = official_source(Path(args.official), code_dir)
        if args.all_pairs:
            return 1 if all_pairs(code_dir, work) else 0
        records = []
        for case in CASES:
            verdict = official_verdict(code_dir, work, case)
            records.append({"keep_distinct": False, **case, "official": verdict})
            print(f"{case['name']:32s} official={verdict}" + (f"  ours={case['ours']}" if "ours" in case else ""))
    payload = {"source": "taoyds/test-suite-sql-eval exec_eval.eval_exec_match (plug_value=False)",
               "commit": commit, "python": sys.version.split()[0], "sqlparse": sqlparse.__version__,
               "databases": "data/tasks/spider/database (tests/task_fixtures.py)", "cases": records}
    Path(args.out).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
