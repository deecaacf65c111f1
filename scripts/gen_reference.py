#!/usr/bin/env python
"""Print the README's generated reference (config keys, log fields) from the code.

    python scripts/gen_reference.py            # print markdown
    python scripts/gen_reference.py --write    # replace the block between the markers in README.md

tests/test_docs.py fails when README.md and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from typing import Literal, get_args, get_origin  # noqa: E402

from trainkit import runlog  # noqa: E402
from trainkit.config import section_class  # noqa: E402
from trainkit.config.fields import expected_types  # noqa: E402
from trainkit.config.scripts import SCRIPT_CONFIGS  # noqa: E402

BEGIN = "<!-- BEGIN GENERATED REFERENCE (scripts/gen_reference.py) -->"
END = "<!-- END GENERATED REFERENCE -->"
ENV_BEGIN = "<!-- BEGIN GENERATED ENV TABLE (scripts/gen_reference.py) -->"
ENV_END = "<!-- END GENERATED ENV TABLE -->"


def _fmt(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, dict):
        return "*(mapping)*"
    return f"`{value}`".replace("|", "\\|")


def _type_name(field) -> str:
    if get_origin(field.annotation) is Literal:
        return "str"
    expect = expected_types(field)
    return expect.type_name() if expect else getattr(field.annotation, "__name__", str(field.annotation))


def config_table(config_class) -> str:
    """One row per key of a script's config model: its type, default and description."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in config_class.model_fields.items():
        section = section_class(config_class, name)
        if section is None:  # a top-level key (script)
            rows.append(f"| `{name}` | {_type_name(field)} | {_fmt(field.default)} | {field.description} |")
            continue
        for key, spec in section.model_fields.items():
            choices = get_args(spec.annotation) if get_origin(spec.annotation) is Literal else ()
            doc = spec.description + (f" (one of: {', '.join(choices)})" if choices else "")
            rows.append(f"| `{name}.{key}` | {_type_name(spec)} | {_fmt(spec.default)} | {_text(doc)} |")
    return "\n".join(rows)


def _text(doc: str) -> str:
    """Table-cell text: no column breaks, no raw HTML-looking <names>."""
    return doc.replace("|", "/").replace("<", "&lt;").replace(">", "&gt;")


def fields_table(title: str, fields: dict) -> str:
    rows = [f"**{title}**", "", "| field | meaning |", "| --- | --- |"]
    rows += [f"| `{name}` | {_text(doc)} |" for name, doc in fields.items()]
    return "\n".join(rows)


def env_table() -> str:
    from trainkit.env_overrides import ENV_OVERRIDES

    rows = ["| variable | sets | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{var}` | `{var_spec.key}` | {_text(var_spec.doc)} |" for var, var_spec in ENV_OVERRIDES.items()]
    return "\n".join(rows)


def reference() -> str:
    parts = []
    for script, config_class in SCRIPT_CONFIGS.items():
        parts += [f"### Config reference: {script}", "", config_table(config_class), ""]
    parts += [
        "### Log fields", "",
        fields_table("run.json", runlog.RUN_FIELDS), "",
        fields_table("logs/training_log.jsonl", runlog.TRAINING_FIELDS), "",
        fields_table("logs/training_log.jsonl, distill.py adds", runlog.DISTILL_TRAINING_FIELDS), "",
        fields_table("logs/eval_log.jsonl", runlog.EVAL_FIELDS), "",
        fields_table("logs/eval_log.jsonl, train_lora.py adds", runlog.LORA_EVAL_FIELDS), "",
        fields_table("logs/eval_log.jsonl, distill.py adds", runlog.DISTILL_EVAL_FIELDS), "",
        fields_table("logs/expert_usage_log.jsonl", runlog.EXPERT_FIELDS), "",
        fields_table("logs/error_log.jsonl", runlog.ERROR_FIELDS), "",
        fields_table("logs/events.jsonl", runlog.EVENT_FIELDS), "",
        fields_table("events (`event` values)", runlog.EVENTS),
    ]
    return "\n".join(parts)


BLOCKS = ((BEGIN, END, reference), (ENV_BEGIN, ENV_END, env_table))


def main() -> None:
    if "--write" in sys.argv:
        readme = REPO / "README.md"
        content = readme.read_text()
        for begin, end_marker, make in BLOCKS:
            start, end = content.index(begin) + len(begin), content.index(end_marker)
            content = content[:start] + "\n" + make() + "\n" + content[end:]
        readme.write_text(content)
    else:
        for _, _, make in BLOCKS:
            print(make() + "\n")


if __name__ == "__main__":
    main()
