"""Facts about the running process: library versions, device memory."""

from __future__ import annotations

import importlib.metadata
import platform
import resource

import torch

# What run.json records (`versions`): the libraries whose behaviour a run's numbers depend on.
_LIBRARIES = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "flash-linear-attention",
              "fla-core", "triton", "tokenizers", "safetensors", "deepspeed")


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


def resolve_dtype(name: str, device) -> tuple[str, str]:
    """(dtype name, why) for a configured dtype: an explicit name as is; "auto" -> bfloat16 where the
    device computes bf16 natively (CUDA with bf16 support), float16 on older GPUs, float32 on CPUs.

    CPUs get float32: where a CPU lacks native bf16 (e.g. AMD EPYC with avx2 only) bf16 matmuls are
    emulated and the default MoE QLoRA job stepped 9x slower than in fp32; on an AMD EPYC with
    avx512_bf16 both stepped at the same speed (benchmarks/bench_cpu_dtype.py), so bf16 buys nothing
    there either, and fp32 gives every CPU the same numbers.
    """
    if name != "auto":
        return name, "set in the config"
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):  # is_bf16_supported asks the current device; without emulation
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # (pre-Ampere emulates it)
        if native_bf16:
            return "bfloat16", f"auto: {torch.cuda.get_device_name(device)} computes bf16 natively"
        return "float16", f"auto: {torch.cuda.get_device_name(device)} has no native bf16"
    return "float32", f"auto: float32 on a {device.type} (bf16 is emulated on most CPUs, and was no faster where native)"


def memory_gb(device: torch.device) -> tuple[float, float]:
    """(allocated now, peak) in GiB: CUDA allocator on GPU, process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    rss = rss_pages * resource.getpagesize() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return rss, peak
