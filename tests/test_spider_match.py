"""Spider exact-set match and hardness (trainkit/tasks/spider_match.py) against the official
taoyds/spider evaluation.py: its per-item verdicts on the 1,034 dev predictions the repository ships
(tests/data/spider_official, recorded by scripts/spider_official_results.py), and small cases
where the official definition and a string match disagree."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from trainkit.tasks.spider import score_sql_lists
from trainkit.tasks.spider_match import Schema, SqlParseError, exact_set_match, hardness, load_tables, parse_sql

OFFICIAL = Path(__file__).parent / "data" / "spider_official"
TABLES = load_tables(OFFICIAL / "tables.json")
CONCERT = Schema.from_tables_entry(TABLES["concert_singer"])


def official_items():
    gold = [line.split("\t") for line in (OFFICIAL / "gold.txt").read_text().splitlines() if line.strip()]
    pred = [line.strip() for line in (OFFICIAL / "predict.txt").read_text().splitlines() if line.strip()]
    recorded = json.loads((OFFICIAL / "official_results.json").read_text())
    return pred, [g for g, _ in gold], [db for _, db in gold], recorded


def test_agrees_with_the_official_script_on_the_shipped_dev_predictions():
    pred, gold, db_ids, recorded = official_items()
    items = recorded["items"]
    assert len(pred) == len(gold) == len(items) == 1034
    ours = [exact_set_match(p, g, Schema.from_tables_entry(TABLES[db])) for p, g, db in zip(pred, gold, db_ids)]
    levels = [hardness(g, Schema.from_tables_entry(TABLES[db])) for g, db in zip(gold, db_ids)]
    agree = sum(o == bool(i["exact"]) for o, i in zip(ours, items)) / len(items)
    assert agree >= 0.995, agree
    official_total = 100 * sum(i["exact"] for i in items) / len(items)
    assert abs(official_total - 100 * recorded["official_cli"]["all"]["exact"]) < 0.05  # 69.73 (the CLI prints 0.697)
    assert abs(100 * sum(ours) / len(ours) - official_total) <= 0.2
    assert sum(a == i["hardness"] for a, i in zip(levels, items)) / len(items) >= 0.995
    assert Counter(levels) == {level: recorded["official_cli"][level]["count"] for level in ("easy", "medium", "hard", "extra")}
    # the predictions the official parser refused are the ones ours refuses
    for p, db, item in zip(pred, db_ids, items):
        try:
            parse_sql(p, Schema.from_tables_entry(TABLES[db]))
            parsed = True
        except SqlParseError:
            parsed = False
        assert parsed == item["pred_parsed"], p


def empty_databases(db_dir: Path, tables: dict) -> Path:
    """<db_dir>/<db>/<db>.sqlite with the tables.json tables and no rows (execution is not under test
    here), built as for the official run (scripts/spider_official_results.py)."""
    spec = importlib.util.spec_from_file_location("spider_official_results",
                                                  Path(__file__).parents[1] / "scripts" / "spider_official_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.build_empty_databases(list(tables.values()), db_dir)
    return db_dir


def test_score_sql_lists_reports_the_official_totals_per_hardness(tmp_path):
    pred, gold, db_ids, recorded = official_items()
    got = score_sql_lists(pred, gold, db_ids, empty_databases(tmp_path, TABLES), TABLES, timeout_s=2.0)
    assert got["num_examples"] == 1034 and got["num_gold_unparsed"] == 0
    assert abs(got["exact_match"] - 100 * sum(i["exact"] for i in recorded["items"]) / 1034) <= 0.2
    for level in ("easy", "medium", "hard", "extra"):
        official = recorded["official_cli"][level]
        assert got[f"num_examples_{level}"] == official["count"]
        assert abs(got[f"exact_match_{level}"] - 100 * official["exact"]) < 0.06, level  # the CLI prints 3 decimals
        assert 0 <= got[f"execution_accuracy_{level}"] <= 100


def test_evaluate_command_on_the_official_files(tmp_path):
    """`python -m trainkit.evaluate --task spider` on the official files prints the official total."""
    db_dir = empty_databases(tmp_path / "database", TABLES)
    out = subprocess.run([sys.executable, "-m", "trainkit.evaluate", "--task", "spider",
                          "--pred", str(OFFICIAL / "predict.txt"), "--gold", str(OFFICIAL / "gold.txt"),
                          "--db-dir", str(db_dir), "--tables", str(OFFICIAL / "tables.json")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    recorded = json.loads((OFFICIAL / "official_results.json").read_text())
    assert abs(got["exact_match"] - 100 * sum(i["exact"] for i in recorded["items"]) / 1034) <= 0.2
    assert got["num_examples_extra"] == recorded["official_cli"]["extra"]["count"]


# ---------------------------------------------------------------------- distinguishing cases
@pytest.mark.parametrize("pred,gold", [
    # aliases resolved; case and spacing free
    ("select T1.name from singer as T1", "SELECT name FROM singer"),
    ("SELECT T2.name FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id",
     "SELECT stadium.name FROM concert JOIN stadium ON concert.stadium_id  =  stadium.stadium_id"),
    # condition order and select order are sets
    ("SELECT name FROM singer WHERE age > 30 AND country = 'France'",
     "SELECT name FROM singer WHERE country  =  'France' AND age  >  30"),
    ("SELECT age, name FROM singer", "SELECT name ,  age FROM singer"),
    # values are not compared: literals, LIMIT numbers, BETWEEN bounds
    ("SELECT name FROM singer WHERE country = 'USA'", 'SELECT name FROM singer WHERE country  =  "France"'),
    ("SELECT name FROM singer ORDER BY age DESC LIMIT 3", "SELECT name FROM singer ORDER BY age DESC LIMIT 1"),
    ("SELECT name FROM singer WHERE age BETWEEN 1 AND 2", "SELECT name FROM singer WHERE age BETWEEN 30 AND 40"),
    # DISTINCT ignored, in the select and inside an aggregate
    ("SELECT country FROM singer", "SELECT DISTINCT country FROM singer"),
    ("SELECT count(country) FROM singer", "SELECT count(DISTINCT country) FROM singer"),
    # foreign-key-equivalent columns (singer_in_concert.singer_id -> singer.singer_id), both tables in FROM
    ("SELECT T2.singer_id FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id",
     "SELECT T1.singer_id FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id  =  T2.singer_id"),
    # nested queries and set operations, values inside them ignored
    ("SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert WHERE concert_id = 9)",
     "SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert WHERE concert_id = 1)"),
    ("SELECT name FROM singer WHERE age > 40 UNION SELECT name FROM singer WHERE age < 20",
     "SELECT name FROM singer WHERE age  >  50 UNION SELECT name FROM singer WHERE age  <  10"),
    # the JOIN ... ON condition itself is not compared
    ("SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.age = T2.concert_id",
     "SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id  =  T2.singer_id"),
])
def test_same_query_the_official_way(pred, gold):
    assert exact_set_match(pred, gold, CONCERT)


@pytest.mark.parametrize("pred,gold", [
    ("SELECT age FROM singer", "SELECT name FROM singer"),                              # wrong column
    ("SELECT max(age) FROM singer", "SELECT min(age) FROM singer"),                     # wrong aggregate
    ("SELECT count(*) FROM stadium", "SELECT count(*) FROM singer"),                    # wrong table
    ("SELECT name FROM singer WHERE age < 30", "SELECT name FROM singer WHERE age  >  30"),        # operator
    ("SELECT name FROM singer WHERE age > 3 OR country = 'x'",
     "SELECT name FROM singer WHERE age  >  3 AND country  =  'x'"),                   # AND vs OR
    ("SELECT name FROM singer ORDER BY age ASC", "SELECT name FROM singer ORDER BY age DESC"),     # direction
    ("SELECT name FROM singer ORDER BY age DESC", "SELECT name FROM singer ORDER BY age DESC LIMIT 1"),  # LIMIT
    ("SELECT name FROM singer WHERE age > 40 INTERSECT SELECT name FROM singer WHERE age < 20",
     "SELECT name FROM singer WHERE age  >  40 UNION SELECT name FROM singer WHERE age  <  20"),   # set operation
    ("SELECT name FROM singer WHERE age > 40", "SELECT name FROM singer WHERE age  >  40 EXCEPT SELECT name FROM singer"),
    ("SELECT name FROM singer WHERE singer_id IN (SELECT singer_id FROM singer_in_concert)",
     "SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert)"),  # NOT
    ("SELECT name FROM singer WHERE singer_id NOT IN (SELECT concert_id FROM singer_in_concert)",
     "SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert)"),  # nested column
    ("SELECT country FROM singer GROUP BY country", "SELECT country FROM singer GROUP BY country HAVING count(*)  >  1"),
    # FK equivalence needs both tables in FROM: singer_in_concert.singer_id is not singer.singer_id here
    ("SELECT singer_id FROM singer_in_concert", "SELECT singer_id FROM singer"),
    # unparseable predictions are misses (the official empty-SQL fallback)
    ("SELECT count(*) AS n FROM singer", "SELECT count(*) FROM singer"),               # select alias
    ("SELECT T1.name FROM singer AS T1, singer_in_concert AS T2", "SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2"),
    ("SELECT name FROM singer WHERE age IS NULL", "SELECT name FROM singer WHERE age  >  1"),
    ("SELECT name FROM singer WHERE age=30", "SELECT name FROM singer WHERE age  =  30"),   # one token 'age=30'
    ("SELECT nonexistent FROM singer", "SELECT name FROM singer"),
    ("", "SELECT name FROM singer"), ("I don't know", "SELECT name FROM singer"), ("SELECT", "SELECT name FROM singer"),
])
def test_different_query_the_official_way(pred, gold):
    assert not exact_set_match(pred, gold, CONCERT)


def test_unparseable_gold_is_an_error_not_a_miss():
    with pytest.raises(SqlParseError):
        exact_set_match("SELECT name FROM singer", "SELECT name FROM singers", CONCERT)
    with pytest.raises(SqlParseError):
        hardness("SELECT x FROM singer", CONCERT)


@pytest.mark.parametrize("gold,level", [
    ("SELECT count(*) FROM singer", "easy"),
    ("SELECT name FROM singer WHERE age > 30", "easy"),
    ("SELECT name, country FROM singer ORDER BY age DESC", "medium"),            # 2 select items + ORDER BY
    ("SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id WHERE T2.concert_id = 1",
     "medium"),                                                                   # join + where
    ("SELECT country FROM singer GROUP BY country ORDER BY count(*) DESC LIMIT 1", "hard"),     # 3 of component1
    ("SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert)", "hard"),  # one nested
    ("SELECT name FROM singer WHERE age > 40 UNION SELECT name FROM singer WHERE age < 20", "hard"),  # one set op
    ("SELECT name FROM singer WHERE age > 40 AND country = 'x' UNION SELECT name FROM singer", "extra"),
    ("SELECT name, age, country FROM singer WHERE age > 1 AND country = 'x' GROUP BY country, name ORDER BY max(age), min(age)",
     "extra"),
])
def test_hardness_levels(gold, level):
    assert hardness(gold, CONCERT) == level


def test_schema_from_sqlite_matches_the_tables_entry(tmp_path):
    """A database that tables.json lacks: the schema and its foreign keys are read from the file."""
    entry = TABLES["concert_singer"]
    path = tmp_path / "concert_singer.sqlite"
    names = entry["table_names_original"]
    with sqlite3.connect(path) as conn:
        for t, table in enumerate(names):
            cols = [c for ti, c in entry["column_names_original"] if ti == t]
            fks = [f'FOREIGN KEY ("{entry["column_names_original"][a][1]}") REFERENCES '
                   f'"{names[entry["column_names_original"][b][0]]}"("{entry["column_names_original"][b][1]}")'
                   for a, b in entry["foreign_keys"] if entry["column_names_original"][a][0] == t]
            conn.execute(f'CREATE TABLE "{table}" ({", ".join([chr(34) + c + chr(34) for c in cols] + fks)})')
    conn.close()
    assert Schema.from_sqlite(path) == CONCERT
    pred = "SELECT T2.singer_id FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id"
    gold = "SELECT T1.singer_id FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id  =  T2.singer_id"
    db_dir = tmp_path / "database"
    (db_dir / "concert_singer").mkdir(parents=True)
    path.rename(db_dir / "concert_singer" / "concert_singer.sqlite")
    got = score_sql_lists([pred, "SELECT name FROM singer", "SELECT 1"], [gold, "SELECT name FROM singer", "SELECT x FROM nowhere"],
                          ["concert_singer"] * 3, db_dir, tables={})
    assert got["exact_match"] == pytest.approx(200 / 3) and got["num_gold_unparsed"] == 1
    assert got["num_examples_easy"] == 2 and got["exact_match_easy"] == 100.0
    assert got["num_examples_hard"] == 0 and got["exact_match_hard"] != got["exact_match_hard"]  # NaN: no items


def test_score_sql_lists_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="2 predictions, 1 gold"):
        score_sql_lists(["a", "b"], ["c"], ["d"], "db", {})
