#!/usr/bin/env python
"""Write the small synthetic task fixtures (GLUE, SAMSum, Spider, DART) in their real layouts.

    python scripts/make_task_fixtures.py                 # into data/tasks (the shipped copy)
    python scripts/make_task_fixtures.py --out DIR

The generator is trainkit/tasks/fixtures.py (write_fixtures); tests/test_tasks.py regenerates the
fixtures and checks that data/tasks matches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainkit.tasks.fixtures import write_fixtures  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "data" / "tasks"), help="output folder (default: data/tasks)")
    args = parser.parse_args()
    written = write_fixtures(args.out)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files ({total / 1024:.1f} KiB) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
