"""CSV for other tools: one writer for every document kind.

Rows are dicts in the order of ``fields``; a value that is not a finite number (NaN, ±inf) is
written empty by default, as ``None`` is, so a spreadsheet or pandas reads the column as numbers.  Lines end
in ``\\n`` on every platform.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any


def finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def csv_text(
    fields: Sequence[str],
    rows: Iterable[dict[str, Any]],
    *,
    header: bool = True,
    finite: bool = True,
) -> str:
    """The rows as CSV under a header line of ``fields`` (``header=False``: the rows alone, to
    append to another file's).  ``finite=False`` keeps ``inf`` as written (drift: a figure that
    diverged), rather than an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: finite_or_none(v) for k, v in row.items()} if finite else row)
    return buffer.getvalue()
