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

from trainkit import runlog  # noqa: E402
from trainkit.config import TOP_LEVEL_KEYS  # noqa: E402

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


def config_table(schema: dict) -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, spec in TOP_LEVEL_KEYS.items():
        rows.append(f"| `{key}` | str | {_fmt(spec.default)} | {spec.doc} |")
    for section, keys in schema.items():
        for key, spec in keys.items():
            types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
            type_name = " or ".join(t.__name__ for t in types)
            doc = spec.doc + (f" (one of: {', '.join(spec.choices)})" if spec.choices else "")
            rows.append(f"| `{section}.{key}` | {type_name} | {_fmt(spec.default)} | {_text(doc)} |")
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
    rows += [f"| `{var}` | `{key}` | {_text(doc)} |" for var, (key, _, doc) in ENV_OVERRIDES.items()]
    return "\n".join(rows)


def reference() -> str:
    import distill
    import train_lora
    import train_qlora

    parts = [
        "### Config reference: train_qlora.py", "",
        config_table(train_qlora.QLORA_SCHEMA), "",
        "### Config reference: train_lora.py", "",
        config_table(train_lora.LORA_SCHEMA), "",
        "### Config reference: distill.py", "",
        config_table(distill.DISTILL_SCHEMA), "",
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
