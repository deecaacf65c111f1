"""One writer per run directory: an OS lock (fcntl.flock) on `<output_dir>/.<run_name>.lock`.

The lock file lies beside the run directory, not inside it, so moving an earlier attempt aside
(checkpoints.archive_run_dir) never moves the lock with it; the dashboard skips dot files. The
lock itself is the flock: the kernel drops it when the holder's last descriptor of the file
closes (exit, SIGKILL, OOM kill), so the lock of a dead process never blocks. The file holds one
JSON line naming the holder (host, pid, program, start time) for the one-line error of a launch
that finds the run in use; the next holder overwrites it. The file is never deleted: deleting a
lock file races with a process that has it open and would let two processes lock two files.

Who locks:
- launch_training.sh (machine rank 0) before it decides on resume or moves an earlier attempt
  aside, and holds it until training ends: the shell keeps the file open on a descriptor and a
  python child (`python -m trainkit.launcher lock --fd N`) flocks that shared open file.
- the scripts' global main process when a TrainingRun block is entered (trainkit.training_run), before anything is written or moved
  and before data and model load, for the life of the process. A script the launcher started
  cannot inherit the shell's lock (subprocess closes inherited descriptors), so it accepts a
  lock held by its own ancestor when TRAINKIT_RUN_LOCK names this lock file.

Where flock is not supported (some network filesystems answer ENOLCK), the record decides: a
holder on this host whose pid is alive (not a zombie) blocks, anything else is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from trainkit.config import ConfigError

LOCK_ENV = "TRAINKIT_RUN_LOCK"  # set by launch_training.sh: the lock file its shell holds for its children
_READ_ATTEMPTS = 20  # a holder writes its record right after locking; a reader may land in between
_held: dict[str, int] = {}  # lock file -> descriptor this process holds (kept open until exit)


class RunDirInUse(Exception):
    """Another live process holds the run directory's lock; str() is the one-line reason."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    """`<output_dir>/.<run_name>.lock`, with the output dir resolved so two spellings of one run lock one file."""
    run_dir = Path(run_dir)
    return run_dir.parent.resolve() / f".{run_dir.name}.lock"


def pid_alive(pid: Any, must_contain: str | None = None) -> bool:
    """True when process `pid` exists on this host and is not a zombie (and its command line
    contains `must_contain`, when given and /proc is readable). A zombie has exited: its parent
    just has not collected its status yet, and it holds no files."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if must_contain is not None:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            return must_contain in cmdline
    except (OSError, IndexError):
        pass
    return True


def ancestors(pid: int | None = None) -> list[int]:
    """Parent, grandparent, ... of `pid` (default: this process), from /proc; [getppid()] without /proc."""
    pid = os.getpid() if pid is None else pid
    chain = []
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return chain or ([os.getppid()] if pid == os.getpid() else [])
        if pid <= 0 or pid in chain:
            return chain
        chain.append(pid)


def read_holder(path: str | os.PathLike) -> dict | None:
    """The holder record of a lock file, or None when there is none (or it cannot be read)."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            text = Path(path).read_text()
        except OSError:
            return None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
        except ValueError:
            pass
        if attempt + 1 < _READ_ATTEMPTS:
            time.sleep(0.05)
    return None


def holder_record(pid: int, program: str) -> dict:
    return {"host": socket.gethostname(), "pid": pid, "program": program, "start_time": time.time()}


def in_use_message(run_dir: str | os.PathLike, holder: dict | None, path: Path) -> str:
    """One line: who holds the run directory, and what the user can do."""
    advice = "wait for it to end or stop it, or set paths.run_name to start another run"
    if not holder:
        return f"{run_dir} is in use by another process (its lock file {path} names no holder): {advice}"
    pid, host = holder.get("pid"), holder.get("host")
    started = holder.get("start_time")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if isinstance(started, (int, float)) else ""
    who = f"pid {pid} on host {host} ({holder.get('program') or 'unknown program'}{since})"
    if host == socket.gethostname() and not pid_alive(pid):
        who += f"; pid {pid} has exited, but a process it started still holds {path}"
    return f"{run_dir} is in use by {who}: {advice}"


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())


def _flock_unsupported(e: OSError) -> bool:
    return e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _blocks(holder: dict | None) -> bool:
    """Without flock: does the record name a live holder? Only a holder on this host can be checked."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    return holder.get("pid") != os.getpid() and pid_alive(holder.get("pid"))


def lock_fd(fd: int, run_dir: str | os.PathLike, holder_pid: int, program: str) -> None:
    """Lock the open lock file `fd` for `holder_pid` (which keeps `fd` open), or raise RunDirInUse.
    What launch_training.sh calls on the descriptor its shell holds."""
    path = lock_path(run_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirInUse(in_use_message(run_dir, read_holder(path), path)) from None
    except OSError as e:
        if not _flock_unsupported(e):
            raise
        holder = read_holder(path)
        if _blocks(holder) and holder.get("pid") != holder_pid:
            raise RunDirInUse(in_use_message(run_dir, holder, path)) from None
    _write_record(fd, holder_record(holder_pid, program))


def held_by_ancestor(path: Path, holder: dict | None) -> bool:
    """True when the launcher that started this process holds the lock: TRAINKIT_RUN_LOCK names
    this lock file and its recorded holder is an ancestor of this process on this host."""
    if not holder or os.environ.get(LOCK_ENV) != str(path) or holder.get("host") != socket.gethostname():
        return False
    return holder.get("pid") in ancestors()


def acquire(run_dir: str | os.PathLike, program: str | None = None) -> None:
    """Lock `run_dir` for this process until it exits, or raise RunDirInUse (one line); ConfigError
    when the output dir cannot hold the lock file. Accepts the lock of the launcher that started
    this process; a second call for the same run is a no-op."""
    path = lock_path(run_dir)
    if str(path) in _held:
        return
    program = program or Path(sys.argv[0]).name or "python"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise ConfigError(f"paths.output_dir: {path.parent} is not a directory") from None
    except OSError as e:
        raise ConfigError(f"paths.output_dir: cannot create the run-dir lock file {path} ({e.strerror or e})") from None
    try:
        lock_fd(fd, run_dir, os.getpid(), program)
    except RunDirInUse:
        os.close(fd)
        if held_by_ancestor(path, read_holder(path)):
            return
        raise
    except BaseException:
        os.close(fd)
        raise
    _held[str(path)] = fd


def probe(run_dir: str | os.PathLike) -> None:
    """Raise RunDirInUse when another process holds the lock; creates and changes nothing."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(path)
        if not held_by_ancestor(path, holder):
            raise RunDirInUse(in_use_message(run_dir, holder, path)) from None
    except OSError as e:
        if not _flock_unsupported(e):
            raise
        holder = read_holder(path)
        if _blocks(holder):
            raise RunDirInUse(in_use_message(run_dir, holder, path)) from None
    finally:
        os.close(fd)  # closing drops a lock taken here
