"""Disk full, read-only file systems: a failed write of the run becomes one line naming what and where
(exit 1, no traceback); run.json ends `failed` with that line where anything can still be written, and
no partial `.tmp-*` save is left holding space. Real small file systems: a tmpfs mounted in a user +
mount namespace (`unshare`), filled or remounted read-only while the trainer runs, and a run directory
made immutable (`chattr +i`: root ignores file modes) for permission errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers_qlora import REPO, script_env, tiny_config

ONE_LINE = re.compile(r"^(disk full|read-only file system): could not write (.+) \((/\S+)\): (.+)$")


def _unshare_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = Path(f"/tmp/trainkit-unshare-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True, text=True)
    finally:
        probe.rmdir()
    return None if done.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {done.stderr.strip()}"


UNSHARE_PROBLEM = _unshare_problem()
needs_unshare = pytest.mark.skipif(UNSHARE_PROBLEM is not None, reason=str(UNSHARE_PROBLEM))


def start_on_tmpfs(tmp_path: Path, size: str, script: str = "train_qlora.py", **sections):
    """Start `script` with its output dir on a fresh tmpfs of `size`; when it exits, the run dir is
    copied out to tmp_path/'copy' (the tmpfs lives only as long as the namespace). Returns
    (process, mount dir as the test sees it through /proc, config)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    copy = tmp_path / "copy"
    config = tiny_config(tmp_path, paths={"output_dir": str(mount / "out")}, **sections)
    shell = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 90; shift 3; "$@"; rc=$?; cp -a "$M/out" "$C"; exit $rc'
    env = script_env(M=str(mount), C=str(copy))
    proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell, "sh", size, str(mount),
                             "-", sys.executable, str(REPO / script), "--config", str(config)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, Path(f"/proc/{proc.pid}/root{mount}"), copy


def wait_for(proc, condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout} s")
        time.sleep(0.01)


def fill(directory: Path) -> None:
    """Write zeros into `directory` until the file system is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e


def lines(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    assert not text or text.endswith("\n"), f"{path.name} ends with a partial line"
    return [json.loads(line) for line in text.splitlines()]


def finish(proc) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def assert_one_line(stderr: str) -> re.Match:
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    match = ONE_LINE.match(last)
    assert match, f"not the one-line write error: {last!r}"
    return match


@needs_unshare
def test_disk_full_during_a_checkpoint_is_one_line_and_run_json_failed(tmp_path):
    # 300 KiB hold the logs and one adapter save, not all of best-adapter and two checkpoints: which
    # save runs out first depends on the sizes of the files each release writes, so any of them may.
    proc, _, copy = start_on_tmpfs(tmp_path, "300k")
    code, stderr = finish(proc)
    assert code == 1, stderr[-3000:]
    match = assert_one_line(stderr)
    assert match.group(1) == "disk full" and re.fullmatch(r"(final-)?checkpoint-\d+|best-adapter", match.group(2)), match.group(0)
    run_dir = copy / "tiny"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == match.group(0)
    errors = lines(run_dir / "logs" / "error_log.jsonl")
    assert [e["message"] for e in errors if e["fatal"]] == [match.group(0)]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp")], "a partial save was left"
    if match.group(2) != "best-adapter":  # an earlier best-adapter stays, complete; a failed checkpoint is not there
        assert not (run_dir / match.group(2)).exists()


@needs_unshare
def test_disk_full_while_logging_rewrites_run_json_in_place(tmp_path):
    proc, mount, copy = start_on_tmpfs(tmp_path, "2m", training={"max_steps": 40},
                                       logging={"log_interval": 1, "eval_interval": 1000, "checkpoint_interval": 1000,
                                                "expert_stats_interval": 1000})
    wait_for(proc, lambda: (mount / "out" / "tiny" / "logs" / "training_log.jsonl").is_file(), "training log")
    fill(mount)  # nothing the trainer can free: run.json must be rewritten where it is
    code, stderr = finish(proc)
    assert code == 1, stderr[-3000:]
    match = assert_one_line(stderr)
    assert match.group(1) == "disk full" and re.fullmatch(r"the training_log\.jsonl line of step \d+", match.group(2))
    run_dir = copy / "tiny"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == match.group(0)
    steps = [r["step"] for r in lines(run_dir / "logs" / "training_log.jsonl")]  # whole lines only
    assert steps == list(range(1, len(steps) + 1))
    assert f"line of step {steps[-1] + 1} " in match.group(2) + " "


@needs_unshare
@pytest.mark.skipif(shutil.which("nsenter") is None, reason="no nsenter command")
def test_read_only_file_system_is_one_line(tmp_path):
    proc, mount, copy = start_on_tmpfs(tmp_path, "2m")
    wait_for(proc, lambda: (mount / "out" / "tiny" / "checkpoint-4" / "trainer_state.json").is_file(), "checkpoint-4")
    # What an ext4 `errors=remount-ro` does to a running job; root ignores file modes, a read-only mount it cannot.
    # The run directory is bind-mounted onto itself and that bind made read-only: a plain remount of the
    # tmpfs is refused while a file on it is open for writing (the run-dir lock file beside the run).
    run_dir = str(tmp_path / "mnt" / "out" / "tiny")
    for args in (["--bind", run_dir, run_dir], ["-o", "remount,bind,ro", run_dir]):
        subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "mount", *args], check=True)
    code, stderr = finish(proc)
    assert code == 1, stderr[-3000:]
    match = assert_one_line(stderr)
    assert match.group(1) == "read-only file system" and match.group(3).startswith(str(tmp_path / "mnt" / "out" / "tiny"))


def test_permission_denied_in_the_run_directory_is_one_line_and_recorded(tmp_path):
    """Root ignores file modes; an immutable run directory (chattr +i) refuses new entries even to root."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted on this file system")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    config = tiny_config(tmp_path)
    run_dir = tmp_path / "out" / "tiny"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_qlora.py"), "--config", str(config)], cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, lambda: (run_dir / "checkpoint-4" / "trainer_state.json").is_file(), "checkpoint-4")
        subprocess.run(["chattr", "+i", str(run_dir)], check=True)
        code, stderr = finish(proc)
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=True)
        if proc.poll() is None:
            proc.kill()
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    match = re.match(r"^permission denied: could not write (best-adapter|checkpoint-\d+) \((\S+)\): Operation not permitted$", last)
    assert match, last
    info = json.loads((run_dir / "run.json").read_text())  # its temp file was refused: rewritten in place
    assert info["status"] == "failed" and info["error"] == last
    assert [e["message"] for e in lines(run_dir / "logs" / "error_log.jsonl") if e["fatal"]] == [last]
