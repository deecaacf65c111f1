"""requirements.lock: it covers requirements.txt, and setup_env.sh's plan keeps what the installed torch pins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "scripts" / "lock_plan.py"


def _locked_here() -> dict[str, str]:
    sys.path.insert(0, str(PLAN.parent))
    try:
        import lock_plan
    finally:
        sys.path.pop(0)
    return {name: version for _, name, version in lock_plan.pins_here(str(REPO / "requirements.lock"))}


def test_lock_pins_every_requirement_within_its_range():
    locked = _locked_here()
    assert "torch" not in locked  # setup_env.sh chooses torch; the lock must not drag CUDA wheels in
    stale = []
    for raw in (REPO / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = req.name.lower().replace("_", "-")
        version = locked.get(name)
        if version is None or not req.specifier.contains(version, prereleases=True):
            stale.append(f"{line} (lock: {version})")
    assert not stale, "requirements.lock is stale, run ./scripts/lock_requirements.sh: " + "; ".join(stale)


def _fake_torch(site: Path, requires: list[str]) -> None:
    info = site / "torch-9.9.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: torch", "Version: 9.9.0", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_plan_leaves_what_the_installed_torch_pins(tmp_path):
    site = tmp_path / "site"
    _fake_torch(site, ["triton==3.6.0; platform_system == 'Linux'", "filelock", "sympy>=1.13.3"])
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nfilelock==4.3.1\n    # via torch\ntriton==3.9.0\nsympy==1.14.0\n"
                    "colorama==0.4.6 ; sys_platform == 'win32'\n")
    out = tmp_path / "plan.txt"
    result = subprocess.run([sys.executable, str(PLAN), str(lock), str(out)], capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    planned = out.read_text().splitlines()
    assert planned == ["filelock==4.3.1", "sympy==1.14.0"]  # triton as torch has it; colorama not for Linux
    assert "keeping triton as the installed torch 9.9.0 requires (==3.6.0); requirements.lock says 3.9.0" in result.stderr


def test_report_only_names_installed_versions_that_differ(tmp_path):
    import importlib.metadata
    have = importlib.metadata.version("pyyaml")
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"pyyaml=={have}\nsafetensors==0.0.1\n")
    result = subprocess.run([sys.executable, str(PLAN), str(lock), "--report-only"], capture_output=True, text=True)
    assert result.returncode == 0
    assert f"safetensors {importlib.metadata.version('safetensors')} (lock: 0.0.1)" in result.stderr
    assert "pyyaml" not in result.stderr
