"""Spider exact-set match and hardness, as the official taoyds/spider evaluation.py defines them.

Written for this project from the official script's documented behaviour (not copied); the test
tests/test_spider_match.py checks it item by item against the official verdicts recorded on the
1,034 dev predictions the Spider repository ships.

A query is parsed into the clause structure the official script compares:
  select (items: aggregate + value unit), from (tables or subqueries, join conditions), where,
  group by, having, order by (one direction for all keys), limit, and at most one
  intersect / union / except, with nested queries as condition values.
  A value unit is `col`, or `col op col` (op: - + * /); a column unit is [agg(] [DISTINCT] col [)].
Columns are resolved to `table.column` (lower case) through the aliases (`AS`) and, for a bare
column, the first FROM table that has it. What the official parser cannot parse, this parser
refuses too (SqlParseError), e.g. comma joins `FROM a, b`, `LEFT JOIN`, select aliases
`count(*) AS n`, `IS NULL`, `a=b` written without spaces (one token), a table alias without AS.

Tokens: string literals ('...' or "...") become placeholders, the rest goes through nltk's
Treebank-style word tokenizer (the one word_tokenize uses; no nltk data needed), tokens are
lower-cased, and `! =`, `> =`, `< =` are joined. The official script tokenises the same way;
like it, the parser ignores tokens after the last clause it knows.

Exact-set match (official defaults: DISABLE_VALUE, DISABLE_DISTINCT), after this rewrite of both
queries: condition values are dropped (a nested query stays, its own values dropped); DISTINCT is
dropped from the select and from every column unit; a column of a FROM table that has a foreign
key is replaced by the lowest-numbered column of its foreign-key group (so `T2.singer_id` and
`T1.singer_id` joined by a foreign key are one column). The rewrite reaches the top query and its
intersect/union/except parts, not subqueries in conditions or FROM (as in the official script).
Then the two queries match when all of these hold:
  * select items equal as multisets (aggregate + value unit);
  * where conditions equal as multisets (negation, operator, value unit; values are gone), and
    the set of where conjunctions (and/or) equal: condition order and AND/OR grouping ignored;
  * group-by column names equal as multisets (table ignored); when either has GROUP BY, both
    have it with the same columns in order and the same HAVING (in order);
  * when either has ORDER BY, both have it with the same keys and direction, and both or
    neither have LIMIT (the LIMIT number is not compared);
  * intersect / union / except: the same one present, its query matching recursively;
  * the same keyword set (where, group, having, order, asc/desc, limit, except, union,
    intersect, and or / not / in / like in any condition);
  * FROM tables (and FROM subqueries, compared with their values) equal as multisets.
  JOIN ... ON conditions are not compared (only through the keyword set). A prediction that
  does not parse is a miss (the official script scores it as an empty query).

Hardness (easy / medium / hard / extra) counts, on the gold query as parsed:
  component1: where, group by, order by, limit, one per joined table beyond the first, one per
    OR and per LIKE in any condition;
  component2: nested queries in conditions + intersect/union/except;
  others: aggregates > 1, select items > 1, where conditions > 1, group-by columns > 1.
  The aggregate count follows the official code exactly: select and group/order aggregates,
  plus one per negated WHERE/HAVING condition and per HAVING conjunction.
  easy: c1 <= 1, others 0, c2 0; medium: (others <= 2, c1 <= 1, c2 0) or (c1 <= 2, others < 2,
  c2 0); hard: (others > 2, c1 <= 2, c2 0) or (2 < c1 <= 3, others <= 2, c2 0) or (c1 <= 1,
  others 0, c2 <= 1); extra: the rest.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from trainkit.tasks.spider_exec import connect_read_only

CLAUSE_KEYWORDS = ("select", "from", "where", "group", "order", "limit", "intersect", "union", "except")
JOIN_KEYWORDS = ("join", "on", "as")
WHERE_OPS = ("not", "between", "=", ">", "<", ">=", "<=", "!=", "in", "like", "is", "exists")
UNIT_OPS = ("none", "-", "+", "*", "/")
AGG_OPS = ("none", "max", "min", "count", "sum", "avg")
SET_OPS = ("intersect", "union", "except")
HARDNESS_LEVELS = ("easy", "medium", "hard", "extra")


class SqlParseError(ValueError):
    """The query is outside what the official Spider parser accepts."""


# ---------------------------------------------------------------------- schema
def _fk_representatives(column_ids: list[str], foreign_keys: list[tuple[int, int]]) -> dict[str, str]:
    """Foreign-key pairs (column indices) -> groups -> every member maps to the member with the
    lowest index. A pair joins the first group holding either column (groups are not merged),
    as the official build_foreign_key_map does."""
    groups: list[set[int]] = []
    for a, b in foreign_keys:
        group = next((g for g in groups if a in g or b in g), None)
        if group is None:
            group = set()
            groups.append(group)
        group.update((a, b))
    return {column_ids[i]: column_ids[min(g)] for g in groups for i in g}


@dataclass(frozen=True)
class Schema:
    """Lower-cased table -> column names, and each foreign-key column -> its group's representative."""
    tables: dict[str, tuple[str, ...]]
    fk_representative: dict[str, str] = field(default_factory=dict)

    def has_column(self, table: str, column: str) -> bool:
        return column in self.tables.get(table, ())

    @classmethod
    def from_tables_entry(cls, entry: dict) -> Schema:
        """A tables.json entry -> Schema (original names, lower-cased; foreign keys from the entry)."""
        table_names = [t.lower() for t in entry["table_names_original"]]
        tables: dict[str, list[str]] = {t: [] for t in table_names}
        column_ids = []
        for t, name in entry["column_names_original"]:
            if t < 0:
                column_ids.append("*")
                continue
            tables[table_names[t]].append(name.lower())
            column_ids.append(f"{table_names[t]}.{name.lower()}")
        return cls({t: tuple(cols) for t, cols in tables.items()},
                   _fk_representatives(column_ids, [tuple(fk) for fk in entry.get("foreign_keys", [])]))

    @classmethod
    def from_sqlite(cls, db_path) -> Schema:
        """Schema read from a database file (for a db_id that tables.json lacks); foreign keys from
        PRAGMA foreign_key_list."""
        with contextlib.closing(connect_read_only(db_path)) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            tables = {n.lower(): tuple(r[1].lower() for r in conn.execute(f'PRAGMA table_info("{n}")')) for n in names}
            column_ids = ["*"] + [f"{t}.{c}" for t, cols in tables.items() for c in cols]
            pairs = []
            for n in names:
                for fk in conn.execute(f'PRAGMA foreign_key_list("{n}")'):
                    a, b = f"{n.lower()}.{fk[3].lower()}", f"{fk[2].lower()}.{(fk[4] or '').lower()}"
                    if a in column_ids and b in column_ids:
                        pairs.append((column_ids.index(a), column_ids.index(b)))
        return cls(tables, _fk_representatives(column_ids, pairs))


def load_tables(path) -> dict[str, dict]:
    """tables.json -> {db_id: entry}."""
    return {entry["db_id"]: entry for entry in json.loads(Path(path).read_text(encoding="utf-8"))}


# ---------------------------------------------------------------------- tokens
@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer  # the tokenizer nltk.word_tokenize runs per sentence

    return NLTKWordTokenizer()


def tokenize(sql: str) -> list[str]:
    """Lower-cased tokens; a string literal ('...' or "...", always paired quotes) is one token
    in double quotes, its case kept."""
    text = sql.replace("'", '"')
    quotes = [i for i, ch in enumerate(text) if ch == '"']
    if len(quotes) % 2:
        raise SqlParseError("unbalanced quotes")
    literals: dict[str, str] = {}
    pieces, last = [], 0
    for start, end in zip(quotes[::2], quotes[1::2]):
        key = f"__val_{start}_{end}__"  # one word for the tokenizer, whatever surrounds it
        literals[key] = text[start:end + 1]
        pieces += [text[last:start], key]
        last = end + 1
    pieces.append(text[last:])
    tokens = [literals.get(tok.lower(), tok.lower()) for tok in _word_tokenizer().tokenize("".join(pieces))]
    joined: list[str] = []
    for tok in tokens:  # the tokenizer splits '!=' '>=' '<='
        if tok == "=" and joined and joined[-1] in ("!", ">", "<"):
            joined[-1] += "="
        else:
            joined.append(tok)
    return joined


# ---------------------------------------------------------------------- parsed form
# col_unit: (agg index, "table.column" or "*", distinct)
# val_unit: (unit-op index, col_unit, col_unit or None)
# cond_unit: (negated, where-op index, val_unit, value1, value2); a value is a string literal
#            ('"x"'), a float, a col_unit or a Sql, or None once values are dropped
# condition: (cond_unit, "and"/"or", cond_unit, ...) as written
@dataclass(frozen=True)
class Sql:
    select: tuple            # (distinct, ((agg index, val_unit), ...))
    tables: tuple            # (("table", name) | ("sql", Sql), ...)
    join_conds: tuple        # condition from the JOIN ... ON parts
    where: tuple = ()
    group_by: tuple = ()     # (col_unit, ...)
    having: tuple = ()
    order_by: tuple = ()     # () or ("asc"/"desc", (val_unit, ...))
    limit: int | None = None
    intersect: Sql | None = None
    union: Sql | None = None
    except_: Sql | None = None

    def set_op(self) -> dict[str, Sql | None]:
        return {"intersect": self.intersect, "union": self.union, "except": self.except_}


def _units(condition: tuple) -> tuple:
    return condition[::2]


def _conjunctions(condition: tuple) -> tuple:
    return condition[1::2]


# ---------------------------------------------------------------------- parser
class _Parser:
    """Recursive descent over the tokens, accepting what the official parser accepts.
    Positions are passed and returned explicitly (each method: position in -> position out)."""

    def __init__(self, tokens: list[str], schema: Schema, aliases: dict[str, str]):
        self.toks, self.schema, self.aliases = tokens, schema, aliases

    def at(self, i: int) -> str:
        if i >= len(self.toks):
            raise SqlParseError("query ends early")
        return self.toks[i]

    def expect(self, i: int, tok: str) -> int:
        if self.at(i) != tok:
            raise SqlParseError(f"expected {tok!r}, got {self.toks[i]!r}")
        return i + 1

    def peek_in(self, i: int, options) -> bool:
        return i < len(self.toks) and self.toks[i] in options

    # -- columns and units
    def column(self, i: int, default_tables: list[str]) -> tuple[int, str]:
        tok = self.at(i)
        if tok == "*":
            return i + 1, "*"
        if "." in tok:
            alias, _, col = tok.partition(".")
            if "." in col or alias not in self.aliases:
                raise SqlParseError(f"unknown column {tok}")
            table = self.aliases[alias]
            if not self.schema.has_column(table, col):
                raise SqlParseError(f"unknown column {tok}")
            return i + 1, f"{table}.{col}"
        for table in default_tables:
            if self.schema.has_column(self.aliases[table], tok):
                return i + 1, f"{self.aliases[table]}.{tok}"
        raise SqlParseError(f"unknown column {tok}")

    def col_unit(self, i: int, default_tables: list[str]) -> tuple[int, tuple]:
        block = self.at(i) == "("
        i += block
        if self.at(i) in AGG_OPS:
            agg = AGG_OPS.index(self.toks[i])
            i = self.expect(i + 1, "(")
            distinct = self.at(i) == "distinct"
            i, col = self.column(i + distinct, default_tables)
            return self.expect(i, ")"), (agg, col, distinct)  # an opening '(' before agg( stays open, as officially
        distinct = self.at(i) == "distinct"
        i, col = self.column(i + distinct, default_tables)
        if block:
            i = self.expect(i, ")")
        return i, (0, col, distinct)

    def val_unit(self, i: int, default_tables: list[str]) -> tuple[int, tuple]:
        block = self.at(i) == "("
        i, left = self.col_unit(i + block, default_tables)
        op, right = 0, None
        if self.peek_in(i, UNIT_OPS):
            op = UNIT_OPS.index(self.toks[i])
            i, right = self.col_unit(i + 1, default_tables)
        if block:
            i = self.expect(i, ")")
        return i, (op, left, right)

    def value(self, i: int, default_tables: list[str]):
        start = i
        block = self.at(i) == "("
        i += block
        tok = self.at(i)
        if tok == "select":
            i, val = self.sql(i)
        elif '"' in tok:
            val, i = tok, i + 1
        else:
            try:
                val, i = float(tok), i + 1
            except ValueError:
                # a column: the official parser reads it from the tokens up to the next , ) and,
                # clause or join keyword, and continues after them
                end = i
                stops = (",", ")", "and", *CLAUSE_KEYWORDS, *JOIN_KEYWORDS)
                while end < len(self.toks) and self.toks[end] not in stops:
                    end += 1
                _, val = _Parser(self.toks[start:end], self.schema, self.aliases).col_unit(0, default_tables)
                i = end
        if block:
            i = self.expect(i, ")")
        return i, val

    def condition(self, i: int, default_tables: list[str]) -> tuple[int, tuple]:
        out: list = []
        while i < len(self.toks):
            i, unit = self.val_unit(i, default_tables)
            negated = self.at(i) == "not"
            i += negated
            if not self.peek_in(i, WHERE_OPS):
                raise SqlParseError(f"no condition operator at {i}")
            op = WHERE_OPS.index(self.toks[i])
            i, val1 = self.value(i + 1, default_tables)
            val2 = None
            if WHERE_OPS[op] == "between":
                i = self.expect(i, "and")
                i, val2 = self.value(i, default_tables)
            out.append((negated, op, unit, val1, val2))
            if self.peek_in(i, (*CLAUSE_KEYWORDS, ")", ";", *JOIN_KEYWORDS)):
                break
            if self.peek_in(i, ("and", "or")):
                out.append(self.toks[i])
                i += 1
            elif i < len(self.toks):  # officially a condition list out of step, which it scores as a miss or crashes on
                raise SqlParseError(f"no AND/OR before {self.toks[i]!r}")
        return i, tuple(out)

    # -- clauses
    def select(self, i: int, default_tables: list[str]) -> tuple[int, tuple]:
        i = self.expect(i, "select")
        distinct = self.peek_in(i, ("distinct",))
        i += distinct
        items = []
        while i < len(self.toks) and self.toks[i] not in CLAUSE_KEYWORDS:
            agg = 0
            if self.toks[i] in AGG_OPS:
                agg = AGG_OPS.index(self.toks[i])
                i += 1
            i, unit = self.val_unit(i, default_tables)
            items.append((agg, unit))
            i += self.peek_in(i, (",",))
        return i, (distinct, tuple(items))

    def from_(self, start: int):
        if "from" not in self.toks[start:]:
            raise SqlParseError("no FROM")
        i = self.toks.index("from", start) + 1
        default_tables: list[str] = []
        tables, conds = [], []
        while i < len(self.toks):
            block = self.toks[i] == "("
            i += block
            if self.at(i) == "select":
                i, sub = self.sql(i)
                tables.append(("sql", sub))
            else:
                i += self.at(i) == "join"
                name = self.aliases.get(self.at(i))
                if name not in self.schema.tables:
                    raise SqlParseError(f"unknown table {self.toks[i]}")
                i += 3 if self.peek_in(i + 1, ("as",)) else 1
                tables.append(("table", name))
                default_tables.append(name)
            if self.peek_in(i, ("on",)):
                i, these = self.condition(i + 1, default_tables)
                if conds:
                    conds.append("and")
                conds.extend(these)
            if block:
                i = self.expect(i, ")")
            if self.peek_in(i, (*CLAUSE_KEYWORDS, ")", ";")):
                break
        return i, tuple(tables), tuple(conds), default_tables

    def col_list(self, i: int, default_tables: list[str]) -> tuple[int, tuple]:
        cols = []
        while i < len(self.toks) and not self.peek_in(i, (*CLAUSE_KEYWORDS, ")", ";")):
            i, unit = self.col_unit(i, default_tables)
            cols.append(unit)
            if not self.peek_in(i, (",",)):
                break
            i += 1
        return i, tuple(cols)

    def order_by(self, i: int, default_tables: list[str]) -> tuple[int, tuple]:
        direction, units = "asc", []
        while i < len(self.toks) and not self.peek_in(i, (*CLAUSE_KEYWORDS, ")", ";")):
            i, unit = self.val_unit(i, default_tables)
            units.append(unit)
            if self.peek_in(i, ("asc", "desc")):
                direction = self.toks[i]  # one direction for the clause: the last one written
                i += 1
            if not self.peek_in(i, (",",)):
                break
            i += 1
        return i, (direction, tuple(units))

    def sql(self, i: int) -> tuple[int, Sql]:
        start = i
        block = self.at(i) == "("
        i += block
        end, tables, join_conds, default_tables = self.from_(start)
        _, select = self.select(i, default_tables)
        i = end
        where = group_by = having = order_by = ()
        limit = None
        if self.peek_in(i, ("where",)):
            i, where = self.condition(i + 1, default_tables)
        if self.peek_in(i, ("group",)):
            i, group_by = self.col_list(self.expect(i + 1, "by"), default_tables)
        if self.peek_in(i, ("having",)):
            i, having = self.condition(i + 1, default_tables)
        if self.peek_in(i, ("order",)):
            i, order_by = self.order_by(self.expect(i + 1, "by"), default_tables)
        if self.peek_in(i, ("limit",)):
            try:
                limit = int(self.at(i + 1))
            except ValueError:
                raise SqlParseError("LIMIT without an integer") from None
            i += 2
        while self.peek_in(i, (";",)):
            i += 1
        if block:
            i = self.expect(i, ")")
        while self.peek_in(i, (";",)):
            i += 1
        parts = {}
        if self.peek_in(i, SET_OPS):
            op = self.toks[i]
            i, parts[op] = self.sql(i + 1)
        return i, Sql(select, tables, join_conds, where, group_by, having, order_by, limit,
                      parts.get("intersect"), parts.get("union"), parts.get("except"))


def parse_sql(sql: str, schema: Schema) -> Sql:
    """SQL text -> Sql; SqlParseError where the official parser fails (tokens after the last
    clause it knows are ignored, as officially)."""
    tokens = tokenize(sql)
    aliases = {}
    for i, tok in enumerate(tokens):  # every `x AS y` in the query, as the official parser scans them
        if tok == "as":
            if i + 1 >= len(tokens):
                raise SqlParseError("AS at the end")
            aliases[tokens[i + 1]] = tokens[i - 1]
    for table in schema.tables:
        if table in aliases:
            raise SqlParseError(f"alias {table} is also a table name")
        aliases[table] = table
    try:
        return _Parser(tokens, schema, aliases).sql(0)[1]
    except RecursionError:
        raise SqlParseError("nested too deeply") from None


# ---------------------------------------------------------------------- rewrite for comparison
def _without_values(sql: Sql) -> Sql:
    """Condition values dropped (a nested query kept, without its values), also in the
    intersect/union/except parts; FROM subqueries untouched (as officially)."""
    def cond(condition):
        return tuple(c if k % 2 else (c[0], c[1], c[2],
                                      _without_values(c[3]) if isinstance(c[3], Sql) else None,
                                      _without_values(c[4]) if isinstance(c[4], Sql) else None)
                     for k, c in enumerate(condition))
    return replace(sql, join_conds=cond(sql.join_conds), where=cond(sql.where), having=cond(sql.having),
                   **{name: _without_values(part) for name, part in _set_parts(sql).items()})


def _set_parts(sql: Sql) -> dict[str, Sql]:
    return {name: getattr(sql, name) for name in ("intersect", "union", "except_") if getattr(sql, name) is not None}


def _canonical_columns(sql: Sql, schema: Schema, from_tables: set[str]) -> Sql:
    """DISTINCT dropped from the select and from column units; a foreign-key column of a table in
    `from_tables` (the top query's FROM) replaced by its group's representative. Applies to this
    query and its intersect/union/except parts, not to subqueries."""
    def col(unit):
        if unit is None:
            return None
        agg, column, _ = unit
        if column.partition(".")[0] in from_tables:
            column = schema.fk_representative.get(column, column)
        return agg, column, None

    def val(unit):
        return unit[0], col(unit[1]), col(unit[2])

    def cond(condition):
        return tuple(c if k % 2 else (c[0], c[1], val(c[2]), c[3], c[4]) for k, c in enumerate(condition))

    return replace(sql, select=(None, tuple((agg, val(u)) for agg, u in sql.select[1])),
                   join_conds=cond(sql.join_conds), where=cond(sql.where), having=cond(sql.having),
                   group_by=tuple(col(u) for u in sql.group_by),
                   order_by=(sql.order_by[0], tuple(val(u) for u in sql.order_by[1])) if sql.order_by else (),
                   **{name: _canonical_columns(part, schema, from_tables) for name, part in _set_parts(sql).items()})


def comparable(sql: Sql, schema: Schema) -> Sql:
    """The form exact_set_match compares (official defaults: values and DISTINCT ignored,
    foreign-key-equivalent columns merged)."""
    from_tables = {name for kind, name in sql.tables if kind == "table"}
    return _canonical_columns(_without_values(sql), schema, from_tables)


# ---------------------------------------------------------------------- comparison
def _keywords(sql: Sql) -> set[str]:
    words = {name for name, present in (("where", sql.where), ("group", sql.group_by), ("having", sql.having),
                                        ("limit", sql.limit is not None)) if present}
    if sql.order_by:
        words |= {"order", sql.order_by[0]}
    words |= {name for name, part in sql.set_op().items() if part is not None}
    conditions = sql.join_conds, sql.where, sql.having
    if any("or" in _conjunctions(c) for c in conditions):
        words.add("or")
    units = [u for c in conditions for u in _units(c)]
    if any(u[0] for u in units):
        words.add("not")
    words |= {name for name in ("in", "like") if any(u[1] == WHERE_OPS.index(name) for u in units)}
    return words


def _matches(pred: Sql, gold: Sql) -> bool:
    """Both already comparable(); the official component checks, all required."""
    if Counter(pred.select[1]) != Counter(gold.select[1]):
        return False
    if Counter(_units(pred.where)) != Counter(_units(gold.where)):
        return False
    if set(_conjunctions(pred.where)) != set(_conjunctions(gold.where)):
        return False
    if Counter(u[1].rpartition(".")[2] for u in pred.group_by) != Counter(u[1].rpartition(".")[2] for u in gold.group_by):
        return False
    if bool(pred.group_by) != bool(gold.group_by) or (
            gold.group_by and ([u[1] for u in pred.group_by] != [u[1] for u in gold.group_by] or pred.having != gold.having)):
        return False
    if bool(pred.order_by) != bool(gold.order_by) or (
            gold.order_by and (pred.order_by != gold.order_by or (pred.limit is None) != (gold.limit is None))):
        return False
    for name, gold_part in gold.set_op().items():
        pred_part = pred.set_op()[name]
        if (pred_part is None) != (gold_part is None) or (gold_part is not None and not _matches(pred_part, gold_part)):
            return False
    if _keywords(pred) != _keywords(gold):
        return False
    return not gold.tables or Counter(pred.tables) == Counter(gold.tables)


def exact_set_match(pred: str, gold: str, schema: Schema) -> bool:
    """Spider's official exact-set match (module docstring); a prediction that does not parse is a
    miss. Raises SqlParseError when the gold query does not parse."""
    gold_sql = comparable(parse_sql(gold, schema), schema)
    try:
        pred_sql = comparable(parse_sql(pred, schema), schema)
    except SqlParseError:
        return False
    return _matches(pred_sql, gold_sql)


# ---------------------------------------------------------------------- hardness
def _component1(sql: Sql) -> int:
    count = sum(bool(x) for x in (sql.where, sql.group_by, sql.order_by)) + (sql.limit is not None)
    count += max(len(sql.tables) - 1, 0)
    conditions = sql.join_conds, sql.where, sql.having
    count += sum(_conjunctions(c).count("or") for c in conditions)
    count += sum(u[1] == WHERE_OPS.index("like") for c in conditions for u in _units(c))
    return count


def _component2(sql: Sql) -> int:
    nested = sum(isinstance(v, Sql) for c in (sql.join_conds, sql.where, sql.having)
                 for u in _units(c) for v in (u[3], u[4]))
    return nested + sum(part is not None for part in sql.set_op().values())


def _others(sql: Sql) -> int:
    aggs = sum(agg != 0 for agg, _ in sql.select[1])
    aggs += sum(bool(u[0]) for u in _units(sql.where))  # the official count reads the NOT flag here
    aggs += sum(u[0] != 0 for u in sql.group_by)
    if sql.order_by:
        aggs += sum(cu[0] != 0 for u in sql.order_by[1] for cu in (u[1], u[2]) if cu)
    aggs += sum(1 if isinstance(u, str) else bool(u[0]) for u in sql.having)  # likewise, and one per AND/OR
    return (aggs > 1) + (len(sql.select[1]) > 1) + (len(sql.where) > 1) + (len(sql.group_by) > 1)


def hardness(gold: str, schema: Schema) -> str:
    """Official hardness level of a (gold) query: easy, medium, hard or extra (module docstring).
    Raises SqlParseError when it does not parse."""
    sql = parse_sql(gold, schema)
    c1, c2, others = _component1(sql), _component2(sql), _others(sql)
    if c1 <= 1 and others == 0 and c2 == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0):
        return "medium"
    if (others > 2 and c1 <= 2 and c2 == 0) or (2 < c1 <= 3 and others <= 2 and c2 == 0) or \
            (c1 <= 1 and others == 0 and c2 <= 1):
        return "hard"
    return "extra"
