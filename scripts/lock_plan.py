#!/usr/bin/env python3
"""What requirements.lock means on this machine (used by scripts/setup_env.sh; stdlib + packaging only).

    lock_plan.py requirements.lock OUT            # write the pins to install here to OUT
    lock_plan.py requirements.lock --report-only  # name installed packages whose version differs from the lock

Pins whose environment marker does not hold here are left out. A pin whose version the installed
torch does not accept (a CUDA torch pins its own triton, e.g. triton==3.6.0) is left out too and
named on stderr: the installed torch is never replaced, so what it pins stays as torch has it.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_here(lock_path: str) -> list[tuple[str, str, str]]:
    """(line, name, version) of every `name==version` pin whose marker holds on this machine."""
    pins = []
    with open(lock_path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            spec, _, marker = line.partition(";")
            name, _, version = spec.strip().partition("==")
            if marker.strip() and not Marker(marker.strip()).evaluate():
                continue
            pins.append((line, normalize(name), version.strip()))
    return pins


def torch_requirements() -> dict:
    """name -> specifier of what the installed torch requires here ({} without torch)."""
    try:
        texts = md.requires("torch") or []
    except md.PackageNotFoundError:
        return {}
    wanted = {}
    for text in texts:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            wanted[normalize(req.name)] = req.specifier
    return wanted


def report_differences(pins) -> None:
    differ = []
    for _, name, version in pins:
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            continue
        if have != version:
            differ.append(f"{name} {have} (lock: {version})")
    if differ:
        print("setup: note: versions differ from requirements.lock: " + ", ".join(differ), file=sys.stderr)


def write_plan(pins, out_path: str) -> None:
    by_torch = torch_requirements()
    with open(out_path, "w") as f:
        for line, name, version in pins:
            spec = by_torch.get(name)
            if spec is not None and not spec.contains(version, prereleases=True):
                print(f"setup: keeping {name} as the installed torch {md.version('torch')} requires ({spec}); "
                      f"requirements.lock says {version}", file=sys.stderr)
                continue
            f.write(line + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    pins = pins_here(argv[0])
    if argv[1] == "--report-only":
        report_differences(pins)
    else:
        write_plan(pins, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
