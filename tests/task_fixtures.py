"""Small synthetic task data in the exact layouts the loaders read (see data/tasks/README.md).

    python tests/task_fixtures.py                  # into data/tasks (the shipped copy)
    python tests/task_fixtures.py --out DIR        # or: write_fixtures(root)

Writes, under root:
    glue/<task>/{train,validation,test}.jsonl    (MNLI: validation_/test_ matched and mismatched)
        HF GLUE rows (column names, label ids, idx); 40 train and 16 validation rows per task, 8
        unlabeled test rows (label -1). Labels follow a keyword, so a tiny model can learn them
        (SST-2: a positive or negative adjective).
    glue_demo/sst2/{train,validation,test}.jsonl  the CPU demo's SST-2 (configs/gla_lora_sst2.yaml):
        240 train / 32 validation rows, balanced, four adjectives a side; 8 unlabeled test rows.
    samsum/{train,validation,test}.csv           id, dialogue, summary (dialogue lines joined by \\r\\n)
    spider/{train_spider.json,dev.json,tables.json}, spider/database/<db_id>/<db_id>.sqlite
        two tiny databases (school, shop) built with sqlite3; rows carry db_id, query, query_toks,
        query_toks_no_value, question, question_toks (not the parsed "sql" field); plus
        database/school_suite/ with two databases of the school schema (a test suite, no questions).
    dart/dart-v1.1.1-full-{train,dev,test}.json
    README.md
Deterministic: the same files every run (the .sqlite files: the same content; their header
records the sqlite library version, so compare them with iterdump, not bytes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import sqlite3
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run as a script: trainkit (task names) from this checkout

N_TRAIN, N_VALIDATION, N_TEST = 40, 16, 8

README = """# Task fixtures

Small synthetic data in the exact layouts of the real task data, written by
`python tests/task_fixtures.py --out data/tasks` (the generator lives with the tests); tests
regenerate them and compare, so edit the generator, not these files.

| folder | point at it with | layout |
|---|---|---|
| glue | `GLUE_LOCAL_DIR=data/tasks/glue` or `task.local_dir` | `<task>/{train,validation,test}.jsonl` (MNLI: `validation_matched`, `validation_mismatched`, `test_matched`, `test_mismatched`), HF GLUE rows |
| samsum | `SAMSUM_LOCAL_DIR=data/tasks/samsum` | `train.csv`, `validation.csv`, `test.csv` (id, dialogue, summary) |
| spider | `SPIDER_LOCAL_DIR=data/tasks/spider` | `train_spider.json`, `dev.json`, `tables.json`, `database/<db_id>/<db_id>.sqlite`; `database/school_suite/` is a test suite (two databases of the school schema, as in test-suite-sql-eval) |
| dart | `DART_LOCAL_DIR=data/tasks/dart` | `dart-v1.1.1-full-{train,dev,test}.json` |
| glue_demo | `task.local_dir: data/tasks/glue_demo` (configs/gla_lora_sst2.yaml) | `sst2/{train,validation,test}.jsonl`, HF GLUE rows |

GLUE: 40 train / 16 validation / 8 unlabeled test rows per task; labels follow a keyword (SST-2:
the adjective), so a tiny model can learn them. glue_demo/sst2 (the CPU demo's data): 240 train /
32 validation rows (balanced) / 8 unlabeled test rows, four adjectives a side, which the demo's
tiny random-init GLA learns within its 2-minute CPU budget; validation and test sentences name
subjects that training never saw, so none of them is a training sentence. The contents are synthetic: scores on
them say nothing about the real benchmarks.
"""

NOUNS = ["film", "movie", "story", "cast", "script", "plot", "score", "ending", "director", "actor"]
GOOD = ["wonderful", "delightful", "great", "charming", "brilliant", "moving", "superb", "lovely"]
BAD = ["awful", "dull", "terrible", "boring", "clumsy", "tedious", "bland", "dreadful"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Hugo", "Iris", "Jack"]
PLACES = ["Paris", "Berlin", "Madrid", "Rome", "Oslo", "Vienna", "Lisbon", "Prague"]
THINGS = ["book", "car", "bike", "phone", "lamp", "guitar", "camera", "kettle"]
VERBS = ["bought", "sold", "painted", "repaired", "borrowed", "found"]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ---------------------------------------------------------------------- GLUE
def _glue_row(task: str, rng: random.Random, label: int) -> dict:
    """One labeled row with HF GLUE column names; the label follows a keyword."""
    n, p, t = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
    v, noun = rng.choice(VERBS), rng.choice(NOUNS)
    if task == "sst2":
        adj = rng.choice(GOOD if label else BAD)
        return {"sentence": f"the {noun} is {adj} . ", "label": label}
    if task == "cola":
        s = f"{n} {v} the {t} ." if label else f"{n} the {t} {v} the ."
        return {"sentence": s, "label": label}
    if task == "mrpc":
        s1 = f"{n} {v} a {t} in {p} last week ."
        s2 = f"Last week in {p} , {n} {v} a {t} ." if label else f"{n} never went to {rng.choice(PLACES)} ."
        return {"sentence1": s1, "sentence2": s2, "label": label}
    if task == "qqp":
        q1 = f"How do I fix a broken {t}?"
        q2 = f"What is the best way to repair a broken {t}?" if label else f"Where can I buy a cheap {rng.choice(THINGS)}?"
        return {"question1": q1, "question2": q2, "label": label}
    if task == "stsb":
        score = float(label)
        s1 = f"{n} {v} a {t} in {p} ."
        variants = [f"The weather in {rng.choice(PLACES)} is cold today .", f"Someone in {p} talked about music .",
                    f"A {t} was mentioned in {p} .", f"{n} has a {t} in {p} .", f"{n} {v} a {t} yesterday in {p} .",
                    f"In {p} , {n} {v} a {t} ."]
        return {"sentence1": s1, "sentence2": variants[label], "label": score}
    if task == "mnli":
        premise = f"{n} {v} a {t} in {p} and then went home ."
        hyp = [f"{n} {v} something .", f"{n} {v} a {t} for a friend .", f"{n} has never been to {p} ."][label]
        return {"premise": premise, "hypothesis": hyp, "label": label}
    if task == "qnli":
        q = f"Where did {n} buy the {t}?"
        s = f"{n} bought the {t} in {p} ." if label == 0 else f"The {t} was red and quite old ."
        return {"question": q, "sentence": s, "label": label}
    if task == "rte":
        s1 = f"{n} lives in {p} and works as a teacher there ."
        s2 = f"{n} lives in {p} ." if label == 0 else f"{n} lives in {rng.choice([x for x in PLACES if x != p])} ."
        return {"sentence1": s1, "sentence2": s2, "label": label}
    if task == "wnli":
        s1 = f"{n} gave the {t} to {rng.choice(NAMES)} because it was broken ."
        s2 = f"The {t} was broken ." if label else f"{n} was broken ."
        return {"sentence1": s1, "sentence2": s2, "label": label}
    raise KeyError(task)


def _glue_rows(task: str, rng: random.Random, n: int, labeled: bool = True) -> list[dict]:
    classes = 6 if task == "stsb" else 3 if task == "mnli" else 2
    rows = []
    for i in range(n):
        row = _glue_row(task, rng, i % classes if classes == 6 else rng.randrange(classes))
        if not labeled:
            row["label"] = -1.0 if task == "stsb" else -1
        rows.append({**row, "idx": i})
    return rows


def glue_files() -> dict[str, str]:
    from trainkit.tasks.glue import GLUE_TASKS

    files = {}
    for k, task in enumerate(GLUE_TASKS):
        rng = random.Random(1000 + k)
        files[f"glue/{task}/train.jsonl"] = _jsonl(_glue_rows(task, rng, N_TRAIN))
        evals = ["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"]
        for split in evals:
            files[f"glue/{task}/{split}.jsonl"] = _jsonl(_glue_rows(task, rng, N_VALIDATION))
        for split in (["test_matched", "test_mismatched"] if task == "mnli" else ["test"]):
            files[f"glue/{task}/{split}.jsonl"] = _jsonl(_glue_rows(task, rng, N_TEST, labeled=False))
    return files


# ---------------------------------------------------------------------- the CPU demo's SST-2
DEMO_GOOD = ["good", "great", "nice", "fine"]
DEMO_BAD = ["bad", "awful", "poor", "dull"]
N_DEMO_TRAIN, N_DEMO_VALIDATION, N_DEMO_TEST = 240, 32, 8
# validation and test sentences name subjects training never saw, so no evaluated sentence is a
# training sentence: the score measures what was learnt (the adjective decides), not what was memorised
DEMO_TRAIN_NOUNS = NOUNS
DEMO_HELDOUT_NOUNS = ["soundtrack", "dialogue", "pacing", "finale", "casting", "sequel"]


def glue_demo_files() -> dict[str, str]:
    """glue_demo/sst2: SST-2 rows for configs/gla_lora_sst2.yaml, a task the tiny random-init GLA learns
    within its 2-minute CPU budget: four adjectives a side (byte-level, a 2-layer model needs many
    more steps to tell the 16 of glue/sst2 apart). Labels alternate, so every split is balanced;
    validation and test subjects are held out of training."""
    rng = random.Random(2000)

    def rows(n, nouns, labeled=True):
        return [{"sentence": f"the {rng.choice(nouns)} is {rng.choice(DEMO_GOOD if i % 2 else DEMO_BAD)} . ",
                 "label": i % 2 if labeled else -1, "idx": i} for i in range(n)]

    return {"glue_demo/sst2/train.jsonl": _jsonl(rows(N_DEMO_TRAIN, DEMO_TRAIN_NOUNS)),
            "glue_demo/sst2/validation.jsonl": _jsonl(rows(N_DEMO_VALIDATION, DEMO_HELDOUT_NOUNS)),
            "glue_demo/sst2/test.jsonl": _jsonl(rows(N_DEMO_TEST, DEMO_HELDOUT_NOUNS, labeled=False))}  # labels hidden


# ---------------------------------------------------------------------- SAMSum
def _dialogue(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    t, p = rng.choice(THINGS), rng.choice(PLACES)
    kind = rng.randrange(3)
    if kind == 0:
        lines = [f"{a}: Have you seen my {t}?", f"{b}: I think you left it at the office.", f"{a}: Oh no, I need it today.",
                 f"{b}: I can bring it tomorrow morning.", f"{a}: Thanks, you're the best!"]
        summary = f"{a} left the {t} at the office. {b} will bring it tomorrow morning."
    elif kind == 1:
        lines = [f"{a}: Are we still going to {p} on Friday?", f"{b}: Yes! I booked the train.",
                 f"{a}: Great, what time?", f"{b}: 8 am, don't be late :)"]
        summary = f"{a} and {b} are going to {p} on Friday by the 8 am train."
    else:
        lines = [f"{a}: Can I borrow your {t}?", f"{b}: Sure, for how long?", f"{a}: Just the weekend.",
                 f"{b}: OK, pick it up tonight."]
        summary = f"{a} will borrow {b}'s {t} for the weekend and pick it up tonight."
    return "\r\n".join(lines), summary


def samsum_files() -> dict[str, str]:
    rng = random.Random(7)
    files = {}
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", "dialogue", "summary"])
        for i in range(n):
            dialogue, summary = _dialogue(rng)
            writer.writerow([f"{13800000 + 1000 * len(files) + i}", dialogue, summary])
        files[f"samsum/{split}.csv"] = buf.getvalue()
    return files


# ---------------------------------------------------------------------- Spider
SPIDER_DBS = {
    "school": {
        "tables": [
            ("student", [("student_id", "number", "INTEGER"), ("name", "text", "TEXT"), ("age", "number", "INTEGER"),
                         ("city", "text", "TEXT")]),
            ("course", [("course_id", "number", "INTEGER"), ("title", "text", "TEXT"), ("credits", "number", "INTEGER")]),
            ("enrollment", [("student_id", "number", "INTEGER"), ("course_id", "number", "INTEGER"),
                            ("grade", "text", "TEXT")]),
        ],
        "primary_keys": [("student", "student_id"), ("course", "course_id")],
        "foreign_keys": [(("enrollment", "student_id"), ("student", "student_id")),
                         (("enrollment", "course_id"), ("course", "course_id"))],
        "rows": {
            "student": [(1, "Anna", 20, "Paris"), (2, "Ben", 22, "Berlin"), (3, "Carla", 19, "Paris"),
                        (4, "David", 25, "Rome"), (5, "Emma", 21, "Oslo"), (6, "Frank", 23, "Berlin")],
            "course": [(1, "Databases", 6), (2, "Algebra", 4), (3, "History", 3), (4, "Physics", 5)],
            "enrollment": [(1, 1, "A"), (1, 2, "B"), (2, 1, "C"), (3, 3, "A"), (4, 4, "B"), (5, 1, "A"), (6, 2, "B"),
                           (3, 1, "B")],
        },
        "queries": [
            ("How many students are there?", "SELECT count(*) FROM student"),
            ("What are the names of students older than 21?", "SELECT name FROM student WHERE age  >  21"),
            ("List the names of students from Paris.", "SELECT name FROM student WHERE city  =  \"Paris\""),
            ("What is the average age of all students?", "SELECT avg(age) FROM student"),
            ("Show the titles of courses ordered by credits descending.", "SELECT title FROM course ORDER BY credits DESC"),
            ("What is the name of the oldest student?", "SELECT name FROM student ORDER BY age DESC LIMIT 1"),
            ("How many students live in each city?", "SELECT city ,  count(*) FROM student GROUP BY city"),
            ("Which courses have more than 4 credits?", "SELECT title FROM course WHERE credits  >  4"),
            ("What are the names of students enrolled in Databases?",
             "SELECT T1.name FROM student AS T1 JOIN enrollment AS T2 ON T1.student_id  =  T2.student_id JOIN course AS T3 "
             "ON T2.course_id  =  T3.course_id WHERE T3.title  =  \"Databases\""),
            ("How many students got grade A?", "SELECT count(*) FROM enrollment WHERE grade  =  \"A\""),
            ("List all distinct cities of students.", "SELECT DISTINCT city FROM student"),
            ("What is the total number of credits of all courses?", "SELECT sum(credits) FROM course"),
            ("Which students are not enrolled in any course?",
             "SELECT name FROM student WHERE student_id NOT IN (SELECT student_id FROM enrollment)"),
            ("What is the youngest student's age?", "SELECT min(age) FROM student"),
            ("Show the names of students aged between 20 and 22.", "SELECT name FROM student WHERE age BETWEEN 20 AND 22"),
            ("Which city has the most students?", "SELECT city FROM student GROUP BY city ORDER BY count(*) DESC LIMIT 1"),
        ],
    },
    "shop": {
        "tables": [
            ("product", [("product_id", "number", "INTEGER"), ("name", "text", "TEXT"), ("price", "number", "REAL"),
                         ("category", "text", "TEXT")]),
            ("orders", [("order_id", "number", "INTEGER"), ("product_id", "number", "INTEGER"),
                        ("quantity", "number", "INTEGER"), ("customer", "text", "TEXT")]),
        ],
        "primary_keys": [("product", "product_id"), ("orders", "order_id")],
        "foreign_keys": [(("orders", "product_id"), ("product", "product_id"))],
        "rows": {
            "product": [(1, "Lamp", 25.0, "home"), (2, "Kettle", 30.5, "kitchen"), (3, "Guitar", 199.0, "music"),
                        (4, "Camera", 349.99, "electronics"), (5, "Phone", 599.0, "electronics")],
            "orders": [(1, 1, 2, "Grace"), (2, 3, 1, "Hugo"), (3, 4, 1, "Grace"), (4, 2, 3, "Iris"), (5, 5, 1, "Jack"),
                       (6, 1, 1, "Hugo")],
        },
        "queries": [
            ("How many products are there?", "SELECT count(*) FROM product"),
            ("What are the names of products cheaper than 100?", "SELECT name FROM product WHERE price  <  100"),
            ("List the names of electronics products.", "SELECT name FROM product WHERE category  =  \"electronics\""),
            ("What is the most expensive product?", "SELECT name FROM product ORDER BY price DESC LIMIT 1"),
            ("What is the average price of products in each category?",
             "SELECT category ,  avg(price) FROM product GROUP BY category"),
            ("How many orders did Grace place?", "SELECT count(*) FROM orders WHERE customer  =  \"Grace\""),
            ("Which customers ordered a Lamp?",
             "SELECT T2.customer FROM product AS T1 JOIN orders AS T2 ON T1.product_id  =  T2.product_id WHERE T1.name  =  \"Lamp\""),
            ("What is the total quantity ordered?", "SELECT sum(quantity) FROM orders"),
            ("List the product names in alphabetical order.", "SELECT name FROM product ORDER BY name"),
            ("Which products have never been ordered?",
             "SELECT name FROM product WHERE product_id NOT IN (SELECT product_id FROM orders)"),
            ("Show all distinct customers.", "SELECT DISTINCT customer FROM orders"),
            ("What is the price of the Guitar?", "SELECT price FROM product WHERE name  =  \"Guitar\""),
            ("How many products cost more than 200?", "SELECT count(*) FROM product WHERE price  >  200"),
            ("Which customer ordered the largest quantity in one order?",
             "SELECT customer FROM orders ORDER BY quantity DESC LIMIT 1"),
            ("What are the categories with more than one product?",
             "SELECT category FROM product GROUP BY category HAVING count(*)  >  1"),
            ("What is the cheapest price of any product?", "SELECT min(price) FROM product"),
        ],
    },
}
SPIDER_DEV_PER_DB = 4  # the last 4 queries of each database are dev, the rest train

# A test suite in test-suite-sql-eval's layout (several databases of one schema in one folder; a query
# pair must agree on each): the school schema twice, with school's rows and with rows that tell apart
# queries agreeing on school (e.g. city = 'Berlin' vs age IN (22, 23)). No questions use it.
SPIDER_TEST_SUITE = {
    "school_suite": {
        "school_suite": SPIDER_DBS["school"],
        "school_suite_variant": {**SPIDER_DBS["school"], "rows": {
            "student": [(1, "Anna", 22, "Paris"), (2, "Ben", 22, "Berlin"), (3, "Carla", 19, "Berlin"),
                        (4, "David", 25, "Rome")],
            "course": [(1, "Databases", 6), (2, "Algebra", 4)],
            "enrollment": [(1, 1, "A"), (2, 1, "B"), (3, 2, "A")],
        }},
    },
}


def _tables_entry(db_id: str, spec: dict) -> dict:
    columns, columns_orig, types = [[-1, "*"]], [[-1, "*"]], ["text"]
    index = {}
    for t, (table, cols) in enumerate(spec["tables"]):
        for col, ctype, _ in cols:
            index[(table, col)] = len(columns)
            columns.append([t, col.replace("_", " ")])
            columns_orig.append([t, col])
            types.append(ctype)
    return {
        "column_names": columns, "column_names_original": columns_orig, "column_types": types, "db_id": db_id,
        "foreign_keys": [[index[a], index[b]] for a, b in spec["foreign_keys"]],
        "primary_keys": [index[k] for k in spec["primary_keys"]],
        "table_names": [t.replace("_", " ") for t, _ in spec["tables"]],
        "table_names_original": [t for t, _ in spec["tables"]],
    }


def _sql_tokens(sql: str) -> list[str]:
    return re.findall(r"\"[^\"]*\"|'[^']*'|[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|[<>!=]=|\w+|[^\s\w]", sql)


def _spider_row(db_id: str, question: str, query: str) -> dict:
    toks = _sql_tokens(query)
    no_value = ["value" if re.fullmatch(r"\"[^\"]*\"|'[^']*'|\d+(?:\.\d+)?", t) else t.lower() for t in toks]
    return {"db_id": db_id, "query": query, "query_toks": toks, "query_toks_no_value": no_value,
            "question": question, "question_toks": re.findall(r"\w+|[^\s\w]", question)}


def spider_files() -> dict[str, str]:
    train, dev, tables = [], [], []
    for db_id, spec in SPIDER_DBS.items():
        tables.append(_tables_entry(db_id, spec))
        rows = [_spider_row(db_id, q, s) for q, s in spec["queries"]]
        train.extend(rows[:-SPIDER_DEV_PER_DB])
        dev.extend(rows[-SPIDER_DEV_PER_DB:])
    dump = lambda x: json.dumps(x, indent=4, ensure_ascii=False) + "\n"  # noqa: E731
    return {"spider/train_spider.json": dump(train), "spider/dev.json": dump(dev), "spider/tables.json": dump(tables)}


def spider_sql(spec: dict) -> str:
    """The CREATE/INSERT script of one fixture database."""
    lines = ["PRAGMA foreign_keys = ON;"]
    pks = dict(spec["primary_keys"])
    fks = {a: b for a, b in spec["foreign_keys"]}
    for table, cols in spec["tables"]:
        parts = [f"{c} {sqltype}" + (" PRIMARY KEY" if pks.get(table) == c else "") for c, _, sqltype in cols]
        parts += [f"FOREIGN KEY ({c}) REFERENCES {fks[(table, c)][0]}({fks[(table, c)][1]})"
                  for c, _, _ in cols if (table, c) in fks]
        lines.append(f"CREATE TABLE {table} ({', '.join(parts)});")
    for table, rows in spec["rows"].items():
        for row in rows:
            lines.append(f"INSERT INTO {table} VALUES ({', '.join(repr(v) if not isinstance(v, str) else chr(39) + v + chr(39) for v in row)});")
    return "\n".join(lines) + "\n"


def write_sqlite(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA page_size = 1024")
        conn.executescript(script)
        conn.commit()
        conn.execute("VACUUM")
    finally:
        conn.close()


# ---------------------------------------------------------------------- DART
def _dart_entry(rng: random.Random, n_refs: int) -> dict:
    kind = rng.randrange(3)
    n, p, t = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
    if kind == 0:
        triples = [[n, "BIRTH_PLACE", p], [n, "OCCUPATION", "teacher"]]
        texts = [f"{n} was born in {p} and works as a teacher.", f"{n}, a teacher, was born in {p}.",
                 f"Born in {p}, {n} is a teacher."]
        source = "webnlg"
    elif kind == 1:
        triples = [["The Golden " + t.title(), "eatType", "restaurant"], ["The Golden " + t.title(), "area", p],
                   ["The Golden " + t.title(), "priceRange", "cheap"]]
        texts = [f"The Golden {t.title()} is a cheap restaurant in {p}.",
                 f"In {p} there is a cheap restaurant called The Golden {t.title()}.",
                 f"The Golden {t.title()} restaurant in {p} is cheap."]
        source = "e2e"
    else:
        year = 1990 + rng.randrange(30)
        triples = [["[TABLECONTEXT]", "[TITLE]", f"{p} Marathon"], ["[TABLECONTEXT]", "YEAR", str(year)],
                   [str(year), "WINNER", n]]
        texts = [f"{n} won the {p} Marathon in {year}.", f"The {year} {p} Marathon was won by {n}.",
                 f"In {year}, {n} was the winner of the {p} Marathon."]
        source = "WikiTableQuestions_lily"
    return {"tripleset": triples, "subtree_was_extended": bool(rng.randrange(2)),
            "annotations": [{"source": source, "text": text} for text in texts[:n_refs]]}


def dart_files() -> dict[str, str]:
    rng = random.Random(11)
    files = {}
    for split, n in (("train", 16), ("dev", 6), ("test", 6)):
        entries = [_dart_entry(rng, 1 if split == "train" and i % 2 else 1 + i % 3) for i in range(n)]
        files[f"dart/dart-v1.1.1-full-{split}.json"] = json.dumps(entries, indent=4, ensure_ascii=False) + "\n"
    return files


# ---------------------------------------------------------------------- all
def text_files() -> dict[str, str]:
    """relative path -> content of every text fixture."""
    return {"README.md": README, **glue_files(), **glue_demo_files(), **samsum_files(), **spider_files(), **dart_files()}


def sqlite_files() -> dict[str, str]:
    """relative path -> SQL script of every database fixture."""
    files = {f"spider/database/{db_id}/{db_id}.sqlite": spider_sql(spec) for db_id, spec in SPIDER_DBS.items()}
    for folder, databases in SPIDER_TEST_SUITE.items():
        files.update({f"spider/database/{folder}/{name}.sqlite": spider_sql(spec) for name, spec in databases.items()})
    return files


def write_fixtures(root) -> list[Path]:
    """Write every fixture under `root`; returns the paths written."""
    root = Path(root)
    written = []
    for rel, content in text_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(content)
        written.append(path)
    for rel, script in sqlite_files().items():
        write_sqlite(root / rel, script)
        written.append(root / rel)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(prog="python tests/task_fixtures.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "data" / "tasks"), help="output folder (default: data/tasks)")
    args = parser.parse_args()
    written = write_fixtures(args.out)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files ({total / 1024:.1f} KiB) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
