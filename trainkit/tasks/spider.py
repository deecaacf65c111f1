"""Spider text-to-SQL: exact_match (official exact-set match), execution_accuracy (sqlite), per hardness.

Local copy ($SPIDER_LOCAL_DIR or task.local_dir), the Spider release layout: train_spider.json,
dev.json, tables.json, database/<db_id>/<db_id>.sqlite. Splits: train = train_spider.json,
validation = dev.json, test = dev.json again (Spider's test set is not part of the usual release).
HF (xlangai/spider) can supply the question/query rows only; the schema and the databases always
come from a local folder (tables.json + database/), so Spider needs $SPIDER_LOCAL_DIR either way.

The prompt: an instruction, the schema as one compact CREATE TABLE line per table (from
tables.json: original table/column names, Spider column types, primary and foreign keys; a
database missing from tables.json is described from its sqlite file instead), the question, "SQL:".
The target is the gold query with whitespace outside string literals collapsed.

exact_match — Spider's official exact-set match (trainkit/tasks/spider_match.py: both queries
parsed into clauses and compared clause by clause as sets, values and DISTINCT ignored, aliases
resolved, foreign-key-equivalent columns merged; a prediction that does not parse is a miss).
The schema it resolves columns with is the database's tables.json entry (its sqlite file for a
db_id that tables.json lacks).

execution_accuracy — test-suite-sql-eval's execution match (trainkit/tasks/spider_exec.py: read-only
sqlite, per-query time limit SpiderTask.timeout_s, default 5 s; column permutations, DISTINCT
dropped, every database of the folder's test suite).

Per official hardness level of the gold query (easy, medium, hard, extra): exact_match_<level>,
execution_accuracy_<level> (NaN for a level without items) and num_examples_<level>;
num_gold_unparsed counts gold queries the parser refuses (scored as misses, in no level).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from pathlib import Path

from trainkit.tasks import spider_match
from trainkit.tasks.base import (Example, PromptCut, Task, TaskDataError, check_lengths, clean_generation, fill_prompt, load_hf,
                                 need_file)
from trainkit.tasks.spider_exec import DEFAULT_TIMEOUT_S, Executor, connect_read_only

ENV_VAR = "SPIDER_LOCAL_DIR"
HF_PATH = "xlangai/spider"
LAYOUT = "train_spider.json, dev.json, tables.json and database/<db_id>/<db_id>.sqlite (the Spider release)"
PROMPT = ("Translate the question into a SQL query for the SQLite database below.\n\n"
          "Database: {db_id}\n{schema}\n\nQuestion: {question}\nSQL:")
SPLIT_FILES = {"train": "train_spider.json", "validation": "dev.json"}


# ---------------------------------------------------------------------- schema text
def _quote_name(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


def schema_from_tables_entry(entry: dict) -> str:
    """tables.json entry -> one 'CREATE TABLE t (col type, ..., PRIMARY KEY (c), FOREIGN KEY (c) REFERENCES u(d))'
    line per table, with the original (database) names."""
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    types = entry.get("column_types") or ["text"] * len(columns)
    pks = set()
    for pk in entry.get("primary_keys", []):
        pks.update(pk if isinstance(pk, list) else [pk])
    lines = []
    for t, table in enumerate(tables):
        parts = [f"{_quote_name(name)} {types[c]}" for c, (ti, name) in enumerate(columns) if ti == t]
        keys = [_quote_name(columns[c][1]) for c in sorted(pks) if columns[c][0] == t]
        if keys:
            parts.append(f"PRIMARY KEY ({', '.join(keys)})")
        for a, b in entry.get("foreign_keys", []):
            if columns[a][0] == t:
                parts.append(f"FOREIGN KEY ({_quote_name(columns[a][1])}) REFERENCES "
                             f"{_quote_name(tables[columns[b][0]])}({_quote_name(columns[b][1])})")
        lines.append(f"CREATE TABLE {_quote_name(table)} ({', '.join(parts)})")
    return "\n".join(lines)


def schema_from_sqlite(db_path: Path) -> str:
    """The same compact lines read from a database file (for a db_id that tables.json lacks)."""
    with contextlib.closing(connect_read_only(db_path)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
        lines = []
        for table in tables:
            info = conn.execute(f"PRAGMA table_info({_quote_name(table)})").fetchall()
            parts = [f"{_quote_name(r[1])} {(r[2] or 'text').lower()}" for r in info]
            keys = [_quote_name(r[1]) for r in sorted(info, key=lambda r: r[5]) if r[5]]
            if keys:
                parts.append(f"PRIMARY KEY ({', '.join(keys)})")
            for fk in conn.execute(f"PRAGMA foreign_key_list({_quote_name(table)})").fetchall():
                parts.append(f"FOREIGN KEY ({_quote_name(fk[3])}) REFERENCES {_quote_name(fk[2])}({_quote_name(fk[4] or fk[3])})")
            lines.append(f"CREATE TABLE {_quote_name(table)} ({', '.join(parts)})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- SQL text
_LITERAL_OR_SPACE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|\s+|[^'\"`\[\s;]+|.", re.S)


def collapse_whitespace(sql: str) -> str:
    """Runs of whitespace outside quoted literals/names -> one space; ends stripped."""
    return "".join(" " if tok.isspace() else tok for tok in _LITERAL_OR_SPACE.findall(sql.strip()))


def first_statement(sql: str) -> str:
    """Text up to the first ';' outside quotes (the ';' dropped)."""
    out = []
    for tok in _LITERAL_OR_SPACE.findall(sql):
        if tok == ";":
            break
        out.append(tok)
    return "".join(out).strip()


def prediction_sql(text: str) -> str:
    """A generation -> the SQL it proposes: cut at the first blank line and the first statement end."""
    return collapse_whitespace(first_statement(clean_generation(text)))


# ---------------------------------------------------------------------- scores
def score_sql_lists(predicted: list[str], gold: list[str], db_ids: list[str], db_dir,
                    tables: dict[str, dict], timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Spider metrics of predicted vs gold SQL (one per item, SQL text as given), each item on
    <db_dir>/<db_id>/<db_id>.sqlite; `tables` is {db_id: tables.json entry} (spider_match.load_tables),
    a db_id missing there is read from its sqlite file. Returns exact_match, execution_accuracy,
    num_examples, and per hardness level (of the gold query) exact_match_<level>,
    execution_accuracy_<level> (NaN when the level has no items), num_examples_<level>, plus
    num_gold_unparsed. With db_dir None (no databases) only the exact-match fields: every schema must
    then be in `tables`."""
    if not len(predicted) == len(gold) == len(db_ids):
        raise ValueError(f"spider: {len(predicted)} predictions, {len(gold)} gold queries, {len(db_ids)} db_ids")
    schemas: dict[str, spider_match.Schema] = {}
    counts = {level: Counter() for level in (*spider_match.HARDNESS_LEVELS, "all")}
    unparsed_gold = 0
    with Executor(timeout_s) as executor:
        for pred, gold_sql, db_id in zip(predicted, gold, db_ids):
            db_path = Path(db_dir or ".") / db_id / f"{db_id}.sqlite"
            if db_id not in schemas:
                schemas[db_id] = (spider_match.Schema.from_tables_entry(tables[db_id]) if db_id in tables
                                  else spider_match.Schema.from_sqlite(db_path))
            try:
                level = spider_match.hardness(gold_sql, schemas[db_id])
                em = spider_match.exact_set_match(pred, gold_sql, schemas[db_id])
            except spider_match.SqlParseError:
                level, em = None, False
                unparsed_gold += 1
            ex = db_dir is not None and executor.matches(str(db_path), pred, gold_sql)
            for key in ("all", level) if level else ("all",):
                counts[key].update(n=1, em=em, ex=ex)

    def percent(hits: int, n: int) -> float:
        return 100.0 * hits / n if n else math.nan

    out = {"exact_match": percent(counts["all"]["em"], len(gold)),
           "execution_accuracy": percent(counts["all"]["ex"], len(gold)), "num_examples": len(gold)}
    for level in spider_match.HARDNESS_LEVELS:
        c = counts[level]
        out.update({f"exact_match_{level}": percent(c["em"], c["n"]),
                    f"execution_accuracy_{level}": percent(c["ex"], c["n"]), f"num_examples_{level}": c["n"]})
    if db_dir is None:
        out = {k: v for k, v in out.items() if not k.startswith("execution_accuracy")}
    out["num_gold_unparsed"] = unparsed_gold
    return out


# ---------------------------------------------------------------------- the task
class SpiderTask(Task):
    name = "spider"
    env_var = ENV_VAR
    layout = LAYOUT

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.tables: dict[str, dict] = {}  # {db_id: tables.json entry}, set by load()

    input_fields = ("db_id", "schema", "question")

    def prompt_from_fields(self, fields: dict) -> tuple[str, PromptCut]:
        """The prompt of a question on a database: db_id, question, and schema (the CREATE TABLE lines of
        schema_from_tables_entry / schema_from_sqlite), or instead of schema `database`, the path of the .sqlite
        file to read it from. A prompt too long for task.max_source_length loses CREATE TABLE lines, last first."""
        if "schema" not in fields and "database" in fields:
            if not Path(fields["database"]).is_file():
                raise ValueError(f"spider: database {fields['database']}: no such file")
            fields = {**fields, "schema": schema_from_sqlite(Path(fields["database"]))}
        self._check_fields(fields)
        return fill_prompt(PROMPT, "schema", side="right", whole_lines=True, db_id=str(fields["db_id"]),
                           schema=str(fields["schema"]), question=" ".join(str(fields["question"]).split()))

    def _load(self, root, seed, cache_dir, local_files_only):
        if root is None:
            raise TaskDataError(f"spider: the schema and databases come from a local copy; set task.local_dir or "
                                f"{ENV_VAR} to a folder with {LAYOUT}")
        if not (root / "database").is_dir():
            raise TaskDataError(f"spider: {root / 'database'} is missing; set task.local_dir or {ENV_VAR} to a folder "
                                f"with {LAYOUT}")
        if all((root / f).is_file() for f in SPLIT_FILES.values()):
            data = {s: json.loads((root / f).read_text(encoding="utf-8")) for s, f in SPLIT_FILES.items()}
        else:  # databases here, question/query rows from HF
            _, hf = load_hf([(HF_PATH, None)], self.name, ENV_VAR, LAYOUT, cache_dir, local_files_only)
            data = {"train": hf["train"], "validation": hf["validation"]}
        tables_path = root / "tables.json"
        tables = spider_match.load_tables(tables_path) if tables_path.is_file() else {}
        self.tables = tables  # score() resolves columns with them
        schemas: dict[str, str] = {}

        def example(row: dict, split: str) -> Example:
            db_id = row["db_id"]
            db_path = root / "database" / db_id / f"{db_id}.sqlite"
            if db_id not in schemas:
                need_file(db_path, ENV_VAR, self.name, LAYOUT)
                schemas[db_id] = (schema_from_tables_entry(tables[db_id]) if db_id in tables
                                  else schema_from_sqlite(db_path))
            gold = collapse_whitespace(row["query"])
            prompt, cut = self.prompt_from_fields({"db_id": db_id, "schema": schemas[db_id], "question": row["question"]})
            return Example(prompt=prompt, target=" " + gold, references=[row["query"]],
                           meta={"db_id": db_id, "db_path": str(db_path), "split": split}, cut=cut)

        validation = [example(r, "validation") for r in data["validation"]]
        return {"train": [example(r, "train") for r in data["train"]], "validation": validation,
                "test": [Example(e.prompt, e.target, list(e.references), {**e.meta, "split": "test"}, e.cut)
                         for e in validation]}

    def score(self, predictions, examples, split=None):
        check_lengths(predictions, examples)
        if not examples:
            return {"num_examples": 0}
        return score_sql_lists([prediction_sql(text) for text in predictions], [e.references[0] for e in examples],
                               [e.meta["db_id"] for e in examples], Path(examples[0].meta["db_path"]).parents[1],
                               self.tables, self.timeout_s)
