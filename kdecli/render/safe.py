"""Strings from files on their way to a terminal: control characters escaped, long ones cut.

A results file is data, and may come from anyone: a method's ``reason``, a source name or a
parameter value can hold ``ESC[2J`` (clear the screen), ``ESC]0;…`` (set the window title) or a
megabyte of text.  ``printable`` is what every such string passes through before it reaches a
table cell, a note or an error line: each control character (C0, DEL, C1) becomes the literal
escape a Python string would show (``\\x1b``, ``\\n``), so the bytes written are plain text, and a
string longer than ``limit`` characters is cut, ending in ``…``.  The JSON a command writes keeps
every string whole; only what is shown is cut.  (Rich markup such as ``[bold]`` is not touched
here: the renderers draw cells as ``rich.text.Text``, which never reads markup.)
"""

from __future__ import annotations

import re

# Long enough for any name, parameter list or one-line reason; a cut cell ends in "…".
CELL_LIMIT = 240
# A one-line message on stderr quotes file content: at most this much of it.
MESSAGE_LIMIT = 2000
ELLIPSIS = "…"

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def printable(text: object, limit: int | None = CELL_LIMIT) -> str:
    """``text`` (any value, as ``str``) with control characters escaped (``"\\x1b"`` for ESC)
    and, past ``limit`` characters (None: no limit), cut to ``limit`` ending in ``…``.

    It is cut before it is escaped, so a megabyte costs no more than ``limit`` characters, and
    again after, so an escape cannot make it longer than ``limit``."""
    text = text if isinstance(text, str) else str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit]
        cut = True
    else:
        cut = False
    text = _CONTROL.sub(_escape, text)
    if limit is not None and (cut or len(text) > limit):
        text = text[: max(limit - 1, 0)] + ELLIPSIS
    return text


def printable_lines(text: object, limit: int | None = CELL_LIMIT) -> str:
    """``printable`` line by line: a cell of several lines (an estimate over its interval) keeps
    them; each is escaped and cut on its own."""
    text = text if isinstance(text, str) else str(text)
    if limit is not None and len(text) > limit * 4:  # a megabyte is not split into lines first
        text = text[: limit * 4]
    return "\n".join(printable(line, limit) for line in text.split("\n"))
