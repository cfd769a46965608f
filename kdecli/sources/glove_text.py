"""The GloVe text format, ``word x1 x2 ... xd`` per line, parsed a few MB at a time.

Stanford's files are plain text: one word and ``d`` numbers per line, separated by single spaces.
glove.840B has words that hold spaces, some lines end in a space or in CRLF, and word2vec-style
files start with a ``<rows> <dim>`` header; every one of these reads here.  Every problem raises
``InputError`` naming the source and the line.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from kdecli.download import NullProgress, Progress
from kdecli.errors import InputError

PARSE_CHUNK_BYTES = 4 << 20  # text parsed per block


def iter_glove_blocks(
    stream: BinaryIO,
    *,
    source: str,
    dim: int | None = None,
    max_rows: int | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """Yield (words, float32 vectors) blocks from a GloVe text stream, a few MB at a time.

    Each block goes through ``np.loadtxt`` (C speed, about 5x a float() per token) when every line
    has exactly ``dim`` spaces; other blocks (words with spaces, as in glove.840B, or odd spacing)
    are split line by line from the right.  ``dim`` None: taken from the first line.  A first line
    ``<rows> <dim>`` (word2vec text header) is skipped.
    """
    progress = progress or NullProgress()
    tail, line_no, rows, first = b"", 1, 0, True
    while True:
        chunk = stream.read(PARSE_CHUNK_BYTES)
        progress.advance(len(chunk))
        data = tail + chunk
        if chunk:
            cut = data.rfind(b"\n")
            if cut < 0:
                tail = data
                continue
            data, tail = data[:cut], data[cut + 1 :]
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").removesuffix(b"\r")
        if data:
            lines = data.split(b"\n")
            if first:
                first = False
                head = lines[0].split()
                if len(head) == 2 and head[0].isdigit() and head[1].isdigit():
                    dim = dim or int(head[1])
                    data, lines, line_no = data[len(lines[0]) + 1 :], lines[1:], 2
                if dim is None:
                    dim = len(head) - 1
                    if dim < 1:
                        raise InputError(
                            f"{source}: line 1 is not `word x1 x2 ...`; is this a GloVe text file?"
                        )
            if lines:
                words, block = _parse_lines(lines, data, dim, source, line_no)
                if max_rows is not None and rows + len(words) >= max_rows:
                    keep = max_rows - rows
                    yield words[:keep], block[:keep]
                    return
                rows += len(words)
                line_no += len(lines)
                yield words, block
        if not chunk:
            return


def _parse_lines(lines: list[bytes], data: bytes, dim: int, source: str, line_no: int):
    if b"" not in lines and data.count(b" ") == len(lines) * dim:
        try:
            block = np.loadtxt(
                io.BytesIO(data),
                dtype=np.float32,
                usecols=range(1, dim + 1),
                delimiter=" ",
                comments=None,
                quotechar=None,
                encoding="latin-1",
                ndmin=2,
            )
        except ValueError:
            block = None
        if block is not None and block.shape == (len(lines), dim):
            words = [line.partition(b" ")[0] for line in lines]
            return words, _finite(block, source, line_no, list(range(len(lines))))
    words, rows, kept = [], [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        # From the right: the word itself may hold spaces (glove.840B) or be a blank character.
        parts = line.rsplit(b" ", dim)
        if len(parts) != dim + 1 or b"" in parts[1:]:
            parts = line.rsplit(None, dim)
        try:
            if len(parts) != dim + 1 or _numeric_tail(parts[0]):
                raise ValueError
            rows.append(np.array(parts[1:], dtype=np.float32))
        except ValueError:
            found = len(line.split()) - 1
            raise InputError(
                f"{source}, line {line_no + i}: expected a word and {dim} numbers; "
                f"found a word and {found} fields."
            ) from None
        words.append(parts[0])
        kept.append(i)
    block = np.stack(rows) if rows else np.empty((0, dim), np.float32)
    return words, _finite(block, source, line_no, kept)


def _numeric_tail(word: bytes) -> bool:
    """A "word" like ``w 0.1 0.2``: the line has more numbers than ``dim``, not a word with spaces."""
    tail = word.split()[1:]
    try:
        return bool(tail) and all(np.isfinite(float(t)) for t in tail)
    except ValueError:
        return False


def _finite(block: np.ndarray, source: str, line_no: int, line_offsets: list[int]) -> np.ndarray:
    ok = np.isfinite(block).all(axis=1)
    if not ok.all():
        bad = line_no + line_offsets[int(np.argmin(ok))]
        raise InputError(f"{source}, line {bad}: a value is not a finite number.")
    return block


def parse_glove_text(
    stream: BinaryIO, *, source: str, dim: int | None = None, max_rows: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """All vectors (float32, rows × dim) and words of a GloVe text stream, in memory."""
    words: list[bytes] = []
    blocks: list[np.ndarray] = []
    for w, block in iter_glove_blocks(stream, source=source, dim=dim, max_rows=max_rows):
        words += w
        blocks.append(block)
    if not words:
        raise InputError(f"{source} holds no vectors.")
    return np.concatenate(blocks), [w.decode("utf-8", "replace") for w in words]
