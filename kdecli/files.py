"""Checks on files kdecli is asked to write, made before a long run rather than after it."""

from __future__ import annotations

import os
from pathlib import Path

from kdecli.errors import UsageError


def check_writable(path: Path, label: str) -> None:
    """Raise ``UsageError`` (naming ``label``, e.g. "--output out.json") unless ``path`` can be written."""
    if path.is_dir():
        raise UsageError(f"{label}: is a folder; give a file name.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{label}: folder {parent} does not exist.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{label}: not writable.")
