"""Spider execution accuracy as test-suite-sql-eval defines it (taoyds/test-suite-sql-eval, exec_eval.py).

    with Executor(timeout_s=5.0) as ex:          # keep_distinct=False: the official default
        ok = ex.matches("database/school/school.sqlite", predicted_sql, gold_sql)
    execution_match(db_path, predicted_sql, gold_sql)   # one pair, same rules

A prediction is right when, on every database of the test suite, it returns gold's result:

  * test suite: every file with ".sqlite" in its name in the folder of `db_path`
    (database/<db_id>/); the plain Spider release has one, the test-suite release several.
  * both queries first get the official rewrites: "> =", "< =", "! =" -> ">=", "<=", "!="; then,
    unless keep_distinct, every DISTINCT keyword is dropped (also inside count(DISTINCT x)) and the
    query is cut to its first statement (sqlparse's split); at execution
    YEAR(CURDATE()) becomes 2020.
  * order matters exactly when the rewritten gold query contains the text "order by" in lower
    case: a plain substring test, so "ORDER  BY" (two spaces) or "ORDER\\nBY" is unordered, and
    "order by" inside a string literal or in "...order by" counts.
  * results: both empty -> equal; else same row count and column count, then (the official quick
    rejection) each row's values sorted by str(value) + str(type(value)) must agree (as lists when
    ordered, as sets otherwise); then some permutation of the prediction's columns must make the
    rows equal: as lists when ordered, as multisets otherwise. Values compare as Python values (1 == 1.0).
  * values: the prediction's own literals are executed (the official plug_value option, which
    plugs gold's values into the prediction, is off by default and not offered here).

Where this differs from exec_eval.py, on purpose (safety, and never scoring a non-answer):
  * databases open read-only behind an authorizer that allows reads only, so a write, ATTACH or
    PRAGMA prediction is wrong (official: it runs; a DELETE returning no rows matches an empty gold);
  * each query runs under a time limit (sqlite progress handler): past it the prediction is wrong
    (official: asyncio.wait_for cannot interrupt the blocking sqlite call, so it waits forever);
  * a prediction returning more rows than gold stops early (wrong in both);
  * a blank prediction, an unparseable one, a gold query that fails, or a folder without any
    .sqlite file count as wrong (official: a blank line is not a prediction, the others crash or,
    for an empty folder, count as right).
Invalid UTF-8 in text columns is dropped, as the official code does.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------- read-only execution
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _authorizer(action, *_):
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def connect_read_only(db_path) -> sqlite3.Connection:
    """Read-only connection (file:...?mode=ro); invalid UTF-8 in text dropped (as exec_eval does)."""
    conn = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    conn.text_factory = lambda b: b.decode("utf-8", errors="ignore")
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
    except Exception as e:  # noqa: BLE001 - sqlite3.Error, ProgrammingError (several statements), OverflowError, MemoryError...
        raise QueryFailed(f"{type(e).__name__}: {e}") from None
    finally:
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(None)


# ---------------------------------------------------------------------- the official query rewrites
_CURRENT_YEAR = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", re.I)


def drop_distinct(sql: str) -> str:
    """The first statement (sqlparse's split) without its DISTINCT keywords; everything else,
    whitespace included, kept as written. Quoted "distinct" or 'distinct' stay.
    The same tokens as exec_eval's sqlparse.parse(sql)[0].flatten(), without the grouping pass,
    which gives up on deep nesting or long queries."""
    from sqlparse.engine import FilterStack

    for statement in FilterStack().run(sql):
        return "".join(tok.value for tok in statement.flatten() if tok.value.lower() != "distinct")
    return ""


def prepare_query(sql: str, keep_distinct: bool = False) -> str:
    """The text exec_eval compares: spaced comparison operators joined, DISTINCT dropped unless kept."""
    sql = sql.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")
    return sql if keep_distinct else drop_distinct(sql)


def order_matters(prepared_gold: str) -> bool:
    """exec_eval's rule, quirks included: the substring "order by" in the lower-cased gold text."""
    return "order by" in prepared_gold.lower()


def with_current_year(sql: str) -> str:
    """YEAR(CURDATE()) -> 2020 (and the whitespace after it), as exec_eval runs every query."""
    return _CURRENT_YEAR.sub("2020", sql)


# ---------------------------------------------------------------------- comparing results
def _values_sorted(row: tuple) -> tuple:
    # exec_eval's sort key; it orders 1 and 1.0 differently among other values, so rows that are
    # equal as Python values can still be rejected here, as they are there.
    return tuple(sorted(row, key=lambda v: str(v) + str(type(v))))


def _column_orders(gold_rows: list[tuple], pred_rows: list[tuple]):
    """Orders of the prediction's columns (pred column order[j] stands for gold column j) in which
    every column holds the same multiset of values as gold's; only these can make the rows equal.
    Of prediction columns identical row by row, one order is enough (swapping them changes nothing),
    so ten copies of one column cost one order, not 10!."""
    n = len(gold_rows[0])
    gold_cols = [Counter(row[j] for row in gold_rows) for j in range(n)]
    pred_values = [tuple(row[k] for row in pred_rows) for k in range(n)]
    pred_cols = [Counter(values) for values in pred_values]
    candidates = [[k for k in range(n) if pred_cols[k] == gold_cols[j]] for j in range(n)]
    first_copy = [pred_values.index(values) for values in pred_values]  # lowest column with the same values

    def extend(order: list[int]):
        if len(order) == n:
            yield tuple(order)
            return
        for k in candidates[len(order)]:
            # a copy only after the copies before it: identical columns are used in increasing order
            if k not in order and all(c in order for c in range(first_copy[k], k) if first_copy[c] == first_copy[k]):
                yield from extend(order + [k])

    yield from extend([])


def results_equal(gold_rows: list[tuple], pred_rows: list[tuple], ordered: bool) -> bool:
    """exec_eval's result_eq: equal up to a permutation of the prediction's columns (and of rows
    unless `ordered`)."""
    if not gold_rows and not pred_rows:
        return True
    if len(gold_rows) != len(pred_rows) or len(gold_rows[0]) != len(pred_rows[0]):
        return False
    gold_sorted = [_values_sorted(r) for r in gold_rows]
    pred_sorted = [_values_sorted(r) for r in pred_rows]
    if (gold_sorted != pred_sorted) if ordered else (set(gold_sorted) != set(pred_sorted)):
        return False
    gold_counts = None if ordered else Counter(gold_rows)
    for order in _column_orders(gold_rows, pred_rows):
        permuted = [tuple(row[k] for k in order) for row in pred_rows]
        if (permuted == gold_rows) if ordered else (Counter(permuted) == gold_counts):
            return True
    return False


# ---------------------------------------------------------------------- the metric
def suite_databases(db_path) -> list[Path]:
    """The databases a query pair is checked on: every file with ".sqlite" in its name next to
    `db_path` (exec_eval's rule), sorted; [] when the folder is missing."""
    folder = Path(db_path).parent
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if ".sqlite" in p.name and p.is_file())


class Executor:
    """Runs query pairs on Spider databases and test suites, with cached read-only connections and
    cached gold results. Never raises on a bad prediction."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, keep_distinct: bool = False):
        self.timeout_s = timeout_s
        self.keep_distinct = keep_distinct
        self._conns: dict[Path, sqlite3.Connection] = {}
        self._suites: dict[str, list[Path]] = {}
        self._gold: dict[tuple[Path, str], list[tuple] | None] = {}

    def conn(self, db_file: Path) -> sqlite3.Connection:
        if db_file not in self._conns:
            self._conns[db_file] = connect_read_only(db_file)
        return self._conns[db_file]

    def _gold_rows(self, db_file: Path, gold_sql: str) -> list[tuple] | None:
        key = (db_file, gold_sql)
        if key not in self._gold:
            try:
                self._gold[key] = execute(self.conn(db_file), with_current_year(gold_sql), self.timeout_s)
            except (QueryFailed, sqlite3.Error):
                self._gold[key] = None
        return self._gold[key]

    def matches(self, db_path, predicted: str, gold: str) -> bool:
        """Whether `predicted` returns gold's result on every database of db_path's test suite."""
        if not predicted.strip():
            return False
        try:
            pred_sql = prepare_query(predicted, self.keep_distinct)
            gold_sql = prepare_query(gold, self.keep_distinct)
        except Exception:  # noqa: BLE001 - whatever sqlparse's lexer may raise on odd text: wrong, never a crash
            return False
        ordered = order_matters(gold_sql)
        key = str(db_path)
        if key not in self._suites:
            self._suites[key] = suite_databases(db_path)
        if not self._suites[key]:
            return False
        for db_file in self._suites[key]:
            gold_rows = self._gold_rows(db_file, gold_sql)
            if gold_rows is None:
                return False
            try:
                pred_rows = execute(self.conn(db_file), with_current_year(pred_sql), self.timeout_s,
                                    max_rows=len(gold_rows))
            except (QueryFailed, sqlite3.Error):
                return False
            if not results_equal(gold_rows, pred_rows, ordered):
                return False
        return True

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def execution_match(db_path, predicted: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                    keep_distinct: bool = False) -> bool:
    """One query pair, as execution_accuracy counts it."""
    with Executor(timeout_s, keep_distinct) as ex:
        return ex.matches(db_path, predicted, gold)
