"""Shared pytest setup: the repo root on sys.path, and skips for tests a machine cannot run.

Markers are declared in pytest.ini. To add one that needs something a machine may lack,
add a line to pytest.ini and an entry to SKIP_RULES below.
"""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# marker -> (check that returns True when the tests can run, reason shown when skipped)
SKIP_RULES = {
    "gpu": (cuda_available, "needs CUDA (no GPU here); run on a GPU machine with ./run_tests.sh -m gpu"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, (available, reason) in SKIP_RULES.items():
            if item.get_closest_marker(marker) is not None and not available():
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def reader_held(monkeypatch):
    """Holds every dashboard reader's first pass until the test sets the returned event (set again at
    teardown, so no reader thread is left waiting): what a request sees before the first pass."""
    from dashboard.runs import RunStore

    release = threading.Event()
    real_poll = RunStore.poll_once

    def held_poll(self, *args, **kwargs):
        release.wait(120)
        return real_poll(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, "poll_once", held_poll)
    yield release
    release.set()
