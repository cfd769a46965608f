"""Any document kdecli writes, read back as its typed report: one entry point for report and plot.

Three kinds, each recognised by what it already holds (nothing is added to what is written):

- ``scale``:   a JSON object with ``"document": "scale"`` (``kdecli scale``) -> ``ScaleReport``;
- ``drift``:   a JSON object with ``"document": "drift"`` (``kdecli drift``) -> ``DriftReport``;
- ``compare``: a JSON object without ``document`` (its ``schema_version``, ``input``, ``floors``,
  ``results``), or a JSONL stream whose first line is ``{"type": "run", ...}``; merged or not
  (``kdecli compare``, ``kdecli merge``) -> ``RunReport``.

``load_any(path)`` reads a file of any kind; ``kdecli.load_document`` stays the reader of compare
documents alone.  Every refusal names the file, and the field at fault where there is one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from kdecli.experiments.compare.records import RunReport, parse_document, read_text
from kdecli.experiments.drift.records import DriftReport
from kdecli.experiments.scale.records import ScaleReport
from kdecli.records import SchemaError

AnyReport = RunReport | ScaleReport | DriftReport

Kind = Literal["compare", "scale", "drift"]
KINDS: tuple[Kind, ...] = ("compare", "scale", "drift")
READS_HINT = (
    "kdecli reads the JSON or JSONL that `kdecli compare` and `kdecli merge` write, and the JSON "
    "of `kdecli scale` and `kdecli drift` (`--format json --output FILE`)."
)


def kind_of(doc: Any) -> Kind | None:
    """The kind of a parsed JSON document, from the fields it already holds; None when it is no
    kdecli document (an inspect report, a list, another program's JSON)."""
    if not isinstance(doc, dict):
        return None
    named = doc.get("document")
    if named in ("scale", "drift"):
        return named
    if named is None and "results" in doc and "schema_version" in doc:
        return "compare"
    return None


def load_any(path: str | os.PathLike) -> AnyReport:
    """Read any kdecli document (module docstring) and return its typed report."""
    path = Path(path)
    return parse_any(read_text(path, READS_HINT), path)


def parse_any(text: str, path: str | os.PathLike) -> AnyReport:
    """``load_any`` of a file's text; ``path`` names it in messages."""
    path = Path(path)
    doc = None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            pass  # a JSONL stream is no single JSON value
    if not isinstance(doc, dict) or doc.get("type") == "run":
        return parse_document(text, path)  # JSONL, CSV, not JSON: compare's reader says which
    kind = kind_of(doc)
    if kind == "scale":
        return ScaleReport.from_dict(doc, str(path))
    if kind == "drift":
        return DriftReport.from_dict(doc, str(path))
    if doc.get("document") is not None:
        raise SchemaError(
            f"{path}: is a document of kind {doc['document']!r}; this kdecli reads "
            f"{', '.join(KINDS)}.",
            hint=READS_HINT,
        )
    return RunReport.from_dict(doc, str(path))  # a compare document, or why it is not one
