"""Memory of a process: resident RAM (RSS, now and at its peak) and CUDA memory allocated by torch."""
from __future__ import annotations

import resource
from pathlib import Path


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int | None:
    """A process's resident memory from Linux /proc: VmRSS (now) or VmHWM (peak since its exec); None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def rss_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    """rss_bytes in MiB, NaN where /proc has no figure (a benchmark prints it either way)."""
    found = rss_bytes(pid, field)
    return float("nan") if found is None else found / 2**20


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since its exec (VmHWM). ru_maxrss would not do: Linux carries it over
    from the parent across fork+exec, so a child of a big process would report the parent's peak."""
    peak = rss_bytes("self", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_cuda_allocated_bytes() -> int:
    """Peak CUDA memory allocated by torch's caching allocator in this process (0 without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def peak_memory_gib() -> tuple[float, str]:
    """(GiB, "VRAM") for a CUDA process, else (GiB, "RSS"): the memory that limits a training run there."""
    import torch

    if torch.cuda.is_available():
        return peak_cuda_allocated_bytes() / 2**30, "VRAM"
    return peak_rss_bytes() / 2**30, "RSS"
