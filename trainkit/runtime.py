"""Facts about the running process: library versions, device memory."""

from __future__ import annotations

import importlib.metadata
import platform
import resource

import torch

_LIBRARIES = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "flash-linear-attention", "deepspeed")


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def memory_gb(device: torch.device) -> tuple[float, float]:
    """(allocated now, peak) in GiB: CUDA allocator on GPU, process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    rss = rss_pages * resource.getpagesize() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return rss, peak
