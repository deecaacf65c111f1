"""Checkpoint directories: atomic writes, resume discovery, top-K retention.

A checkpoint is written into a hidden temp directory and renamed to `checkpoint-<step>`
only when complete, so a crash during a save never leaves a directory that resume
would pick. `trainer_state.json` is written last inside the temp directory; a
`checkpoint-<step>` without it is never picked.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

from trainkit.fileio import fsync_directory, fsync_tree, read_json
from trainkit.runlog import CHECKPOINT_PREFIX, FINAL_CHECKPOINT_PREFIX, RUN_INFO_FILE, TRAINER_STATE_FILE

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = f"{TMP_PREFIX}old-"  # a committed directory moved aside while its replacement is renamed in


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete `checkpoint-<step>` directories of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / TRAINER_STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a plain resume continues from: the newest complete one on the line of the
    run's latest attempt (run.json `lineage`), so that after `--resume_from checkpoint-4` was
    killed at step 6 the next resume takes checkpoint-4 again, not the abandoned line's
    checkpoint-12 (which would leave steps 5-12 missing). A run from before lineages were
    recorded: the newest complete checkpoint."""
    dirs = checkpoint_dirs(run_dir)
    lineage = (read_json(Path(run_dir) / RUN_INFO_FILE) or {}).get("lineage")
    if not lineage:
        return dirs[-1][1] if dirs else None
    for step, path in reversed(dirs):
        if on_lineage(read_json(path / TRAINER_STATE_FILE) or {}, step, lineage):
            return path
    return None


def continue_lineage(attempt: str, resumed_state: dict | None) -> list[list]:
    """The line of an attempt: [[attempt id, None]] followed by the line of the checkpoint it
    resumed, each entry capped at that checkpoint's step ([id, last step on the line]). A
    checkpoint from before lineages were recorded counts as attempt None."""
    lineage: list[list] = [[attempt, None]]
    if resumed_state is not None:
        step = resumed_state["step"]
        parent = resumed_state.get("lineage") or [[resumed_state.get("attempt"), None]]
        lineage += [[a, step if limit is None else min(limit, step)] for a, limit in parent]
    return lineage


def on_lineage(trainer_state: dict, step: int, lineage: list[list]) -> bool:
    """True when a checkpoint (its trainer_state and step) belongs to `lineage`."""
    attempt = trainer_state.get("attempt")
    return any(a == attempt and (limit is None or step <= limit) for a, limit in lineage)


def final_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"{FINAL_CHECKPOINT_PREFIX}{step}"


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    state = read_json(Path(checkpoint) / TRAINER_STATE_FILE)
    if not isinstance(state, dict) or "step" not in state:
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {TRAINER_STATE_FILE})")
    return state


def checkpoint_config(path: str | os.PathLike):
    """The validated training config a checkpoint directory was written with, for tools that use a finished
    checkpoint (trainkit.export, trainkit.generate): the `config` of its trainer_state.json
    (checkpoint-<step>, final-checkpoint-<step>), else of its run directory's run.json (best-adapter/, or
    any directory directly inside a run directory). Secrets were redacted when it was stored. Raises
    FileNotFoundError naming the directory when neither holds a config."""
    from trainkit.config import validate
    from trainkit.config.scripts import SCRIPT_CONFIGS
    path = Path(path)
    state = read_json(path / TRAINER_STATE_FILE)
    config = state.get("config") if isinstance(state, dict) else None
    if not config:
        info = read_json(path.parent / RUN_INFO_FILE)
        config = info.get("config") if isinstance(info, dict) else None
    if not isinstance(config, dict):
        raise FileNotFoundError(f"{path}: no training config found (no {TRAINER_STATE_FILE} with a config here, "
                                f"no {RUN_INFO_FILE} in {path.parent})")
    script = config.get("script")
    if script not in SCRIPT_CONFIGS:
        raise FileNotFoundError(f"{path}: the stored config names no known script (script: {script!r})")
    stored = {k: v for k, v in config.items() if k != "run_dir"}  # as_dict() adds run_dir; it is not a key
    return validate(stored, SCRIPT_CONFIGS[script])


def run_info_value(checkpoint: str | os.PathLike, cfg, section: str, key: str):
    """run.json's `section.key` for a checkpoint of a run: from the run directory that holds the checkpoint, else
    from the one its config names (a checkpoint copied elsewhere); None when neither records it."""
    for run_dir in (Path(checkpoint).parent, Path(cfg.run_dir)):
        info = read_json(run_dir / RUN_INFO_FILE)
        value = (info.get(section) or {}).get(key) if isinstance(info, dict) else None
        if value is not None:
            return value
    return None


def remove_partial_saves(run_dir: str | os.PathLike) -> None:
    """Clean up after a save that a crash interrupted: a complete copy that commit_directory had
    moved aside (`.tmp-old-<name>`) goes back to `<name>` when the new copy never arrived; every
    other temp directory (half-written staging, an old copy already replaced) is deleted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for child in sorted(run_dir.iterdir()):
        if child.name.startswith(OLD_PREFIX) and child.is_dir():
            final = run_dir / child.name[len(OLD_PREFIX):]
            if not final.exists():
                os.rename(child, final)
    for child in run_dir.iterdir():
        if child.name.startswith(TMP_PREFIX) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def staging_dir(final: str | os.PathLike) -> Path:
    """Hidden temp directory beside `final`; the same name on every process of a run."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}")


def commit_directory(staging: Path, final: str | os.PathLike) -> None:
    """Make a complete staging directory visible as `final` in one rename."""
    final = Path(final)
    fsync_tree(staging)
    if final.exists():
        # Same name saved again (best-adapter, or a step saved again after a resume): move the
        # old copy aside first, so a crash between the two renames still leaves one complete
        # copy, which remove_partial_saves puts back at the next start.
        old = final.with_name(f"{OLD_PREFIX}{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)
    fsync_directory(final.parent)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Single-process writer: yield a staging directory that replaces `final` on success."""
    staging = staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        commit_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def directory_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checkpoints_to_delete(scored: list[tuple[int, float | None]], keep_top_k: int,
                          greater_is_better: bool, latest: int | None = None) -> list[int]:
    """Steps to delete: keep the `keep_top_k` best by metric, plus `latest` (default: the highest step).

    `scored` holds (step, metric); a checkpoint without a finite metric (none, NaN, inf)
    ranks below every scored one, newer before older.
    """
    if not scored:
        return []
    if latest is None:
        latest = max(step for step, _ in scored)

    def rank(item):
        step, metric = item
        if not isinstance(metric, (int, float)) or not math.isfinite(metric):
            return (1, -step)
        return (0, -metric if greater_is_better else metric)

    keep = {step for step, _ in sorted(scored, key=rank)[:keep_top_k]} | {latest}
    return sorted(step for step, _ in scored if step not in keep)


def archive_run_dir(run_dir: str | os.PathLike) -> Path | None:
    """Move a run directory aside to `<run>.old-<timestamp>` (a rename: nothing copied or deleted)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    os.rename(run_dir, target)
    return target
