"""``--device`` and ``--dtype``: names to torch objects, with usage errors that say what is allowed."""

from __future__ import annotations

import torch

from kdecli.errors import UsageError

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """A ``--dtype`` name to a torch dtype; None stays None (keep the input's own)."""
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {name!r}.") from None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without one is a usage error with the reason."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu or cuda[:i]; got {name!r}.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda was asked for, but torch sees no CUDA device.",
                hint="Use --device cpu or --device auto.",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present."
            )
    elif device.type != "cpu":
        raise UsageError(f"--device must be auto, cpu or cuda[:i]; got {name!r}.")
    return device


def available_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation can take on ``device`` now, or None when it cannot be told.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``).  CPU: the kernel's
    ``MemAvailable`` (free memory plus what it can reclaim without swapping: what a process can
    allocate before the OOM killer acts), else the free physical pages.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
