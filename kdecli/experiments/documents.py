"""Any document kdecli writes, read back as its typed report: one entry point for report and plot.

Three kinds, each named by its ``"kind"`` (``kdecli.records.document_kind``: documents before
kdecli 0.8 said ``"document"``, and compare documents nothing):

- ``scale``:   a JSON object with ``"kind": "scale"`` (``kdecli scale``) -> ``ScaleReport``;
- ``drift``:   a JSON object with ``"kind": "drift"`` (``kdecli drift``) -> ``DriftReport``;
- ``compare``: a JSON object with ``"kind": "compare"``, or, before 0.8, none (its
  ``schema_version``, ``input``, ``floors``, ``results``), or a JSONL stream whose first line is
  ``{"type": "run", ...}``; merged or not (``kdecli compare``, ``kdecli merge``) -> ``RunReport``.

``load_any(path)`` reads a file of any kind; ``kdecli.load_document`` stays the reader of compare
documents alone (``load_compare`` is it for the commands).  Every refusal names the file, and the
field at fault where there is one; a document nested too deeply for Python's parser to follow is
refused the same way (``SchemaError``), never a ``RecursionError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from kdecli.experiments.compare.records import RunReport, load_document, parse_document, read_text
from kdecli.experiments.drift.records import DriftReport
from kdecli.experiments.scale.records import ScaleReport
from kdecli.records import SchemaError, document_kind

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
    named = document_kind(doc)
    if named in KINDS:
        return named
    if named is None and "results" in doc and "schema_version" in doc:
        return "compare"
    return None


def load_any(path: str | os.PathLike) -> AnyReport:
    """Read any kdecli document (module docstring) and return its typed report."""
    path = Path(path)
    return _within_depth(path, lambda: parse_any(read_text(path, READS_HINT), path))


def load_compare(path: str | os.PathLike) -> RunReport:
    """``kdecli.load_document``: a compare document (JSON or JSONL, merged or not)."""
    return _within_depth(Path(path), lambda: load_document(path))


def cut_short(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a JSONL stream whose last line a stopped run cut short: the readers
    drop that line and keep the records before it, and a command says so."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if not data.lstrip().startswith(b'{"type": "run"') or data.endswith(b"\n"):
        return False
    last = data[data.rfind(b"\n") + 1 :]
    if not last.strip() or len(last) == len(data):
        return False
    try:
        json.loads(last)
    except (ValueError, RecursionError):
        return True
    return False


def _within_depth(path: Path, read: Callable[[], AnyReport]) -> AnyReport:
    # kdecli writes documents a few levels deep; a file nested thousands deep is no document of
    # its kind, and Python's parser gives up on it with a RecursionError
    try:
        return read()
    except RecursionError:
        raise SchemaError(
            f"{path}: is nested too deeply to be a kdecli document.", hint=READS_HINT
        ) from None


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
    named = document_kind(doc)
    if named is not None and named not in (*KINDS, "inspect"):  # inspect: compare's reader says
        raise SchemaError(
            f"{path}: is a document of kind {named!r}; this kdecli reads {', '.join(KINDS)}.",
            hint=READS_HINT,
        )
    return RunReport.from_dict(doc, str(path))  # a compare document, or why it is not one
