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
