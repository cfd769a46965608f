"""One width-aware table for every document kind: columns, the fitter, ``--columns``, drawing.

A table is a list of rows (any record: a compare setting, a drift result, a scale point) and a
``Layout``: every ``Column`` it can show, in display order, the keys that are always shown, and
the optional keys in the order they join.  The fitter keeps names and numbers whole: a column is
either drawn at the width of its widest cell or left out, never cut (only a ``wraps`` column, a
status sentence, folds onto more lines, and counts as at most ``wrap_room`` wide; one with a
short form is drawn as its codes instead, one row per line, when its sentences would not fit on
one line, and a legend under the table says what the codes mean).  Optional
columns join, in order, while the table fits the width; a one-line note under the table names the
ones left out and how to get them.  ``--columns a,b,c`` (or ``all``) chooses instead.  A table
asked for explicitly, or one whose required columns alone are wider than the terminal, is drawn
whole, past the terminal's edge rather than with a name or number cut.

The same columns give the Markdown table (``markdown_rows``), so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli.errors import UsageError
from kdecli.render.safe import MESSAGE_LIMIT, printable, printable_lines

Row = TypeVar("Row")

ALL = "all"
# A table written to a file or a pipe is not squeezed into 80 columns.
FILE_WIDTH = 200


@dataclass(frozen=True)
class Column(Generic[Row]):
    """One column: its ``--columns`` name, its header (lines split by ``\\n``), how a row fills
    it, its alignment, and whether it is a sentence that may wrap (a status) or is kept whole.

    ``justify`` aligns the Markdown column; in the terminal every cell is drawn as it is, at the
    left (rich does not pad a cell it must never cut, ``overflow="ignore"``), as tables always
    were."""

    key: str
    header: str
    cell: Callable[[Row], str]
    justify: str = "right"
    wraps: bool = False
    flat: str | None = None  # the header on one line (Markdown), when it differs
    # A sentence column's short form (a status code), drawn when the table would not fit the
    # width with the sentences on one line; ``legend`` then gives the lines under the table that
    # say what the codes mean (and the reasons they stand for).
    short: Callable[[Row], str] | None = None
    legend: Callable[[Sequence[Row]], list[str]] | None = None

    def __post_init__(self) -> None:
        # Every cell of every table (terminal and Markdown) is made here, from strings that may
        # come from a file: control characters escaped, long strings cut (``render.safe``).
        fill = self.cell
        object.__setattr__(self, "cell", lambda row: printable_lines(fill(row)))

    @property
    def one_line_header(self) -> str:
        return self.flat or self.header.replace("\n", " ")

    def width(self, rows: Sequence[Row]) -> int:
        """The widest line of its header and cells, in terminal cells (µ, ±, ≈ are one)."""
        texts = (*(self.cell(row) for row in rows), self.header)
        return max(cell_len(line) for text in texts for line in text.split("\n"))

    def shortened(self) -> Column[Row]:
        """The column drawn with its short form, kept whole."""
        return replace(self, cell=self.short, wraps=False, short=None)

    def least_width(self, rows: Sequence[Row]) -> int:
        """The narrowest it can be drawn: whole, or, for a sentence that wraps, its longest word
        (it folds between words, never inside one)."""
        if not self.wraps:
            return self.width(rows)
        texts = (*(self.cell(row) for row in rows), self.header)
        return max((cell_len(word) for text in texts for word in text.split()), default=1)


@dataclass(frozen=True)
class Layout(Generic[Row]):
    """What a table can show: ``columns`` in display order, the ``required`` keys (shown whenever
    the column exists), the ``optional`` keys by priority (joined in this order while they fit),
    and the most room a wrapping column is counted at."""

    columns: tuple[Column[Row], ...]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    wrap_room: int = 25

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(column.key for column in self.columns)


@dataclass(frozen=True)
class Choice(Generic[Row]):
    """The columns to draw, in display order, and the optional keys left out for lack of room.

    ``width`` is the width asked for; ``drawn_width`` the least the columns need (a wrapping one
    at its longest word; every column whole when ``--columns`` chose them).  Where that is more,
    as when the required columns alone are wider than a narrow terminal, the table is drawn that
    wide, past the terminal's edge, rather than cut."""

    columns: list[Column[Row]]
    left_out: list[str]
    width: int
    drawn_width: int
    legend: list[str] = field(default_factory=list)  # under the table: what short codes mean


def parse_columns(text: str | None, keys: Sequence[str]) -> tuple[str, ...] | None:
    """``--columns a,b,c`` or ``all`` -> the keys asked for; None (not given) means fit the width.
    Unknown keys are refused with the list of those allowed."""
    if text is None:
        return None
    if text.strip() == ALL:
        return tuple(keys)
    asked = tuple(key.strip() for key in text.split(",") if key.strip())
    unknown = [key for key in asked if key not in keys]
    if unknown or not asked:
        raise UsageError(
            f"--columns: unknown column {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(keys)}, or {ALL}."
        )
    return asked


def table_width(columns: Iterable[Column[Row]], widths: dict[str, int]) -> int:
    """A rich table's width: each column its cells, 2 of padding and a border; one more border."""
    return 1 + sum(3 + widths[column.key] for column in columns)


def choose(
    layout: Layout[Row], rows: Sequence[Row], width: int, asked: Sequence[str] | None = None
) -> Choice[Row]:
    """The columns of ``layout`` to draw at ``width`` (``asked``: exactly those, in display order;
    one asked for that this table cannot show, e.g. a metric no row has, is skipped).  Every
    required column is drawn; each optional one joins, by priority, if the table still fits."""
    available = {column.key: column for column in layout.columns}
    widths = {key: column.width(rows) for key, column in available.items()}
    if asked is not None:
        chosen = [column for column in layout.columns if column.key in asked]
        if not chosen:
            raise UsageError(
                f"--columns: this table has none of {', '.join(asked)}; "
                f"it has {', '.join(available)}."
            )
        return Choice(chosen, [], width, table_width(chosen, widths))
    keys = [key for key in layout.required if key in available]
    shortened = [
        key for key, column in available.items() if column.short is not None and column.wraps
    ]
    if shortened and table_width((available[k] for k in keys), widths) > width:
        # a sentence would wrap onto more lines: one row per line, codes explained underneath
        for key in shortened:
            available[key] = available[key].shortened()
            widths[key] = available[key].width(rows)
    else:
        shortened = []
    for key, column in available.items():
        if column.wraps:
            widths[key] = min(widths[key], layout.wrap_room)
    left_out = []
    for key in layout.optional:
        if key not in available:
            continue
        if table_width((available[k] for k in [*keys, key]), widths) <= width:
            keys.append(key)
        else:
            left_out.append(key)
    chosen = [available[column.key] for column in layout.columns if column.key in keys]
    least = {column.key: column.least_width(rows) for column in chosen}
    legend = [
        line
        for column in layout.columns
        if column.key in shortened and column.key in keys and column.legend is not None
        for line in column.legend(rows)
    ]
    return Choice(chosen, left_out, width, table_width(chosen, least), legend)


def left_out_note(width: int, left_out: Sequence[str]) -> str:
    return (
        f"Not shown at width {width}: {', '.join(left_out)} "
        "(--columns all shows every column; --columns a,b,... chooses)."
    )


def draw(
    console: Console,
    title: str,
    choice: Choice[Row],
    rows: Sequence[Row],
    style: Callable[[Row], str | None] = lambda row: None,
) -> None:
    """Print the table (and the note of what was left out) on ``console``.  Cells are plain text,
    never read as markup; ``style`` colours a whole row (red: failed, yellow: no better than a
    floor)."""
    console.width = max(console.width, choice.drawn_width)  # past the edge rather than cut
    table = Table(title=Text(printable(title, None)), title_justify="left")
    for column in choice.columns:
        table.add_column(
            column.header,
            justify=column.justify,
            no_wrap=not column.wraps,
            overflow="fold" if column.wraps else "ignore",
            min_width=None if column.wraps else column.width(rows),
        )
    for row in rows:
        table.add_row(*(Text(column.cell(row)) for column in choice.columns), style=style(row))
    console.print(table)
    for line in choice.legend:
        console.print(line, highlight=False, markup=False)
    if choice.left_out:
        console.print(left_out_note(choice.width, choice.left_out), highlight=False, markup=False)


def console_for(stream, width: int | None, colour: bool) -> Console:
    """A rich console writing to ``stream``: ``width`` columns (a file or pipe: ``FILE_WIDTH``),
    ANSI styles only when ``colour`` (a terminal)."""
    if width is None and not stream.isatty():
        width = FILE_WIDTH
    return _Console(file=stream, width=width, soft_wrap=False, force_terminal=colour or None)


class _Console(Console):
    """Every string a report prints (a footer naming the device, the resolved parameters) may
    quote a file: its control characters are escaped and a long one cut (``render.safe``) before
    rich reads it, here, in the one place strings become text."""

    def render_str(self, text: str, **options) -> Text:
        return super().render_str(printable_lines(text, MESSAGE_LIMIT), **options)


# ---- Markdown ----------------------------------------------------------------------------------


def escape_markdown(text: str) -> str:
    """A cell on one line, its pipes escaped (and any control character, ``render.safe``)."""
    return printable(text.replace("\n", " "), None).replace("|", "\\|")


def markdown_rows(columns: Sequence[Column[Row]], rows: Iterable[Row]) -> list[str]:
    """A GitHub Markdown table: the header, the alignment line, one line per row."""
    lines = [
        "| " + " | ".join(escape_markdown(c.one_line_header) for c in columns) + " |",
        "|" + "|".join("---:" if c.justify == "right" else "---" for c in columns) + "|",
    ]
    lines += [
        "| " + " | ".join(escape_markdown(c.cell(row)) for c in columns) + " |" for row in rows
    ]
    return lines


def markdown_table(
    layout: Layout[Row], rows: Sequence[Row], title: str, asked: Sequence[str] | None = None
) -> list[str]:
    """The bold title and the table, every column (``asked``: those chosen)."""
    choice = choose(layout, rows, 10**6, asked)
    return [f"**{escape_markdown(title)}**", "", *markdown_rows(choice.columns, rows)]
