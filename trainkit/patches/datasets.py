"""Patches of datasets / huggingface_hub internals. Checked on datasets 3-5 and huggingface_hub 0.3x-2.4.

``datasets.offline`` (``hub_offline()``)
    Both libraries read ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` once, at import, into module
    globals (``datasets.config.HF_HUB_OFFLINE``, ``datasets.config.HF_DATASETS_OFFLINE``,
    ``huggingface_hub.constants.HF_HUB_OFFLINE``); neither ``load_dataset`` nor the hub client
    takes an offline argument. For ``local_files_only`` / offline loading, those globals are set
    for the duration of one call and restored after, so a missing dataset fails at once instead
    of retrying the network. Missing globals are an error: offline loading would silently go
    online.
"""

from __future__ import annotations

import contextlib

from trainkit.patches import Patch

__all__ = ["hub_offline"]

OFFLINE = Patch(
    "datasets.offline", "datasets",
    "datasets.config.HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE set for "
    "one offline load (no offline argument exists)", checked="3.x-5.2 (huggingface_hub 0.3x-2.4)")
_GLOBALS = (("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"),
            ("huggingface_hub.constants", "HF_HUB_OFFLINE"))


@contextlib.contextmanager
def hub_offline(enabled: bool = True):
    """Within the block, datasets and huggingface_hub do not touch the network."""
    if not enabled:
        yield
        return
    import importlib

    modules = {name: importlib.import_module(name) for name in {m for m, _ in _GLOBALS}}
    missing = [f"{m}.{attr}" for m, attr in _GLOBALS if not hasattr(modules[m], attr)]
    if missing:
        raise OFFLINE.error(f"{', '.join(missing)} not found: offline loading cannot be switched on")
    saved = [(modules[m], attr, getattr(modules[m], attr)) for m, attr in _GLOBALS]
    for module, attr, _ in saved:
        setattr(module, attr, True)
    OFFLINE.mark_applied()
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
