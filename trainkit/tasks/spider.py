"""Spider text-to-SQL: exact_match (normalised SQL string match) and execution_accuracy (sqlite).

Local copy ($SPIDER_LOCAL_DIR or task.local_dir), the Spider release layout: train_spider.json,
dev.json, tables.json, database/<db_id>/<db_id>.sqlite. Splits: train = train_spider.json,
validation = dev.json, test = dev.json again (Spider's test set is not part of the usual release).
HF (xlangai/spider) can supply the question/query rows only; the schema and the databases always
come from a local folder (tables.json + database/), so Spider needs $SPIDER_LOCAL_DIR either way.

The prompt: an instruction, the schema as one compact CREATE TABLE line per table (from
tables.json: original table/column names, Spider column types, primary and foreign keys; a
database missing from tables.json is described from its sqlite file instead), the question, "SQL:".
The target is the gold query with whitespace outside string literals collapsed.

exact_match — NOT Spider's official exact-set-match (which parses both queries into clauses,
compares them as sets and ignores values). It is a string match after this normalisation
(normalize_sql), done on sqlparse's lexer tokens:
  * the prediction is cut at its first blank line and at its first ';' outside string literals;
    trailing semicolons go; comments go;
  * keywords upper case, multi-word keywords single-spaced ("order  by" -> "ORDER BY"), word
    operators (like, in, ...) upper case;
  * names (tables, columns, aliases, functions) lower case, with `...` / [...] quoting removed;
  * string literals in single quotes: "Paris" and 'Paris' are the same literal (Spider's gold
    writes values in double quotes); the value's case and content are kept;
  * whitespace: one space between tokens, none after '(' or around '.', none before '(', ')' or ','.
  So column order, condition order, aliases and values all still matter.

execution_accuracy — predicted and gold query run against database/<db_id>/<db_id>.sqlite, opened
read-only (file:...?mode=ro URI) behind an authorizer that allows reads only (no ATTACH, PRAGMA or
writes). Results are compared as multisets of rows, as ordered lists when the gold query has
ORDER BY (anywhere outside string literals, as in Spider's evaluation). Column order matters
(Spider's evaluation also tries column permutations; this does not). Each query runs under a
time limit (sqlite3 progress handler, SpiderTask.timeout_s, default 5 s); a predicted query that
errors, times out or returns more rows than gold counts as wrong and never raises.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections import Counter
from pathlib import Path

from trainkit.tasks.base import (Example, Task, TaskDataError, check_lengths, clean_generation, fill_prompt, load_hf,
                                 need_file)

ENV_VAR = "SPIDER_LOCAL_DIR"
HF_PATH = "xlangai/spider"
LAYOUT = "train_spider.json, dev.json, tables.json and database/<db_id>/<db_id>.sqlite (the Spider release)"
PROMPT = ("Translate the question into a SQL query for the SQLite database below.\n\n"
          "Database: {db_id}\n{schema}\n\nQuestion: {question}\nSQL:")
SPLIT_FILES = {"train": "train_spider.json", "validation": "dev.json"}
DEFAULT_TIMEOUT_S = 5.0


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
    with contextlib.closing(_connect(db_path)) as conn:
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


def normalize_sql(sql: str) -> str:
    """The normal form exact_match compares (module docstring lists the rules)."""
    from sqlparse import tokens as T
    from sqlparse.lexer import tokenize

    pieces: list[str] = []
    for ttype, value in tokenize(first_statement(sql)):
        if ttype in T.Whitespace or ttype in T.Newline or ttype in T.Comment:
            continue
        if ttype in T.Punctuation and value == ";":
            continue
        if ttype in T.String.Single or ttype in T.String.Symbol:
            q = value[0]
            body = value[1:-1].replace(q + q, q) if len(value) >= 2 and value[-1] == q else value[1:]
            value = "'" + body.replace("'", "''") + "'"
        elif ttype in T.Keyword or (ttype in T.Operator and value[:1].isalpha()):
            value = " ".join(value.split()).upper()
        elif ttype in T.Name:
            if value[:1] in "`[" and len(value) >= 2:
                value = value[1:-1]
            value = value.lower()
        pieces.append(value)
    out = ""
    for piece in pieces:
        if out and not (piece in (",", ")", ".", "(") or out.endswith(("(", "."))):
            out += " "
        out += piece
    return out


def has_order_by(sql: str) -> bool:
    """ORDER BY anywhere in the query, outside string literals."""
    code = "".join(" " if tok[:1] in "'\"" else tok for tok in _LITERAL_OR_SPACE.findall(sql))
    return re.search(r"\border\s+by\b", code, re.I) is not None


# ---------------------------------------------------------------------- execution
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _authorizer(action, *_):
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def _connect(db_path: Path) -> sqlite3.Connection:
    """Read-only connection (file:...?mode=ro); text with invalid UTF-8 decoded with replacement."""
    conn = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    return conn


class QueryFailed(Exception):
    """A query errored, was denied, timed out, or returned more rows than allowed."""


def execute(conn: sqlite3.Connection, sql: str, timeout_s: float, max_rows: int | None = None) -> list[tuple]:
    """Rows of `sql`; QueryFailed on any sqlite error, after `timeout_s`, or past `max_rows` rows.
    Only reads are allowed (authorizer)."""
    deadline = time.monotonic() + timeout_s
    conn.set_authorizer(_authorizer)
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
    try:
        cursor = conn.execute(sql)
        rows: list[tuple] = []
        while True:
            chunk = cursor.fetchmany(256)
            if not chunk:
                return rows
            rows.extend(chunk)
            if max_rows is not None and len(rows) > max_rows:
                raise QueryFailed(f"more than {max_rows} rows")
    except Exception as e:  # noqa: BLE001 - sqlite3.Error, Warning (several statements), OverflowError, MemoryError...
        raise QueryFailed(f"{type(e).__name__}: {e}") from None
    finally:
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(None)


def results_match(pred_rows: list[tuple], gold_rows: list[tuple], order_matters: bool) -> bool:
    if order_matters:
        return list(pred_rows) == list(gold_rows)
    return Counter(pred_rows) == Counter(gold_rows)


class Executor:
    """Runs queries on Spider databases with cached read-only connections and cached gold results."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._conns: dict[str, sqlite3.Connection] = {}
        self._gold: dict[tuple[str, str], list[tuple] | None] = {}

    def conn(self, db_path: str) -> sqlite3.Connection:
        if db_path not in self._conns:
            self._conns[db_path] = _connect(Path(db_path))
        return self._conns[db_path]

    def matches(self, db_path: str, predicted: str, gold: str) -> bool:
        """Whether `predicted` returns gold's result on the database; False on any failure."""
        try:
            conn = self.conn(db_path)
        except sqlite3.Error:
            return False
        key = (db_path, gold)
        if key not in self._gold:
            try:
                self._gold[key] = execute(conn, gold, self.timeout_s)
            except QueryFailed:
                self._gold[key] = None
        gold_rows = self._gold[key]
        if gold_rows is None or not predicted.strip():
            return False
        try:
            pred_rows = execute(conn, predicted, self.timeout_s, max_rows=len(gold_rows))
        except QueryFailed:
            return False
        return results_match(pred_rows, gold_rows, has_order_by(gold))

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def execution_match(db_path, predicted: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """One query pair, as execution_accuracy counts it."""
    with Executor(timeout_s) as ex:
        return ex.matches(str(db_path), predicted, gold)


# ---------------------------------------------------------------------- the task
class SpiderTask(Task):
    name = "spider"
    env_var = ENV_VAR
    layout = LAYOUT

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s

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
        tables = {t["db_id"]: t for t in json.loads(tables_path.read_text(encoding="utf-8"))} if tables_path.is_file() else {}
        schemas: dict[str, str] = {}

        def example(row: dict, split: str) -> Example:
            db_id = row["db_id"]
            db_path = root / "database" / db_id / f"{db_id}.sqlite"
            if db_id not in schemas:
                need_file(db_path, ENV_VAR, self.name, LAYOUT)
                schemas[db_id] = (schema_from_tables_entry(tables[db_id]) if db_id in tables
                                  else schema_from_sqlite(db_path))
            gold = collapse_whitespace(row["query"])
            # a prompt too long for task.max_source_length loses CREATE TABLE lines, last first
            prompt, cut = fill_prompt(PROMPT, "schema", side="right", whole_lines=True, db_id=db_id,
                                      schema=schemas[db_id], question=" ".join(row["question"].split()))
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
        em = ex = 0
        with Executor(self.timeout_s) as executor:
            for text, example in zip(predictions, examples):
                sql = prediction_sql(text)
                gold = example.references[0]
                em += bool(sql) and normalize_sql(sql) == normalize_sql(gold)
                ex += executor.matches(example.meta["db_path"], sql, gold)
        n = len(examples)
        return {"exact_match": 100.0 * em / n, "execution_accuracy": 100.0 * ex / n, "num_examples": n}
