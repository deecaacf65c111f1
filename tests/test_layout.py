"""The packages users import (trainkit/, dashboard/) hold no test code and import nothing from tests/.

Test helpers, fake trainers and data generators live under tests/ (importable there by their
module names, e.g. `from fake_runs import generate`); a production module importing one of them,
or pytest/selenium, or a test-only module reappearing inside a package, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainkit", "dashboard")
TEST_ONLY_LIBRARIES = {"pytest", "selenium"}
# modules that used to live in the packages and moved to tests/: they must not come back
MOVED_TO_TESTS = {"dashboard/testing.py", "dashboard/fake_runs.py", "trainkit/tasks/fixtures.py"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (absolute imports; relative ones stay in the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def layout_problems(repo: Path) -> list[str]:
    helpers = {p.stem for p in (repo / "tests").glob("*.py")} | {"tests"}
    problems = []
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            rel = path.relative_to(repo).as_posix()
            if rel in MOVED_TO_TESTS or path.name == "conftest.py" or path.name.startswith("test_"):
                problems.append(f"{rel}: test-only module inside a package users import")
            if path.stem in helpers - {"__init__", "__main__"}:
                problems.append(f"{rel}: same name as tests/{path.stem}.py (test helpers live under tests/)")
            for name in sorted(imported_modules(path) & (helpers | TEST_ONLY_LIBRARIES)):
                problems.append(f"{rel}: imports {name} (test code)")
    return problems


def test_packages_import_nothing_from_tests():
    assert layout_problems(REPO) == []


def test_the_check_sees_test_code_in_a_package(tmp_path):
    # a copy of the layout with the faults the check exists for: it must name each one
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "fake_runs.py").write_text("")
    (tmp_path / "tests" / "helpers_dashboard.py").write_text("")
    (tmp_path / "trainkit" / "tasks").mkdir(parents=True)
    (tmp_path / "trainkit" / "clean.py").write_text("import os\nfrom .tasks import x\n")
    (tmp_path / "trainkit" / "tasks" / "fixtures.py").write_text("")
    (tmp_path / "dashboard").mkdir()
    (tmp_path / "dashboard" / "runs.py").write_text("def f():\n    from helpers_dashboard import wait_until\n")
    (tmp_path / "dashboard" / "api.py").write_text("import tests.fake_runs\nimport pytest\n")
    (tmp_path / "dashboard" / "fake_runs.py").write_text("")
    problems = layout_problems(tmp_path)
    assert sorted(problems) == sorted([
        "dashboard/api.py: imports pytest (test code)",
        "dashboard/api.py: imports tests (test code)",
        "dashboard/fake_runs.py: test-only module inside a package users import",
        "dashboard/fake_runs.py: same name as tests/fake_runs.py (test helpers live under tests/)",
        "dashboard/runs.py: imports helpers_dashboard (test code)",
        "trainkit/tasks/fixtures.py: test-only module inside a package users import",
    ]), problems
