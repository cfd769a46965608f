"""The one table renderer (``kdecli.render``): the fitter never cuts a name or number, leaves out
optional columns by priority and says so, ``--columns`` chooses and refuses unknown names with the
allowed ones; Markdown and CSV writers; how numbers read."""

import io
import math
from dataclasses import dataclass

import pytest
from rich.cells import cell_len
from rich.console import Console

from kdecli.errors import UsageError
from kdecli.render import table
from kdecli.render.cells import fmt_flops, fmt_speedup, fmt_time
from kdecli.render.table import Column, Layout
from kdecli.render.writers import csv_text


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    note: str


ROWS = [
    Row("a-method-with-a-long-name", 0.123456, "ok"),
    Row("short", 12345.678, "failed: a reason that is a whole sentence long"),
]
COLUMNS = (
    Column("name", "name", lambda r: r.name, "left"),
    Column("value", "value\nmean", lambda r: f"{r.value:.6g}"),
    Column("double", "twice", lambda r: f"{2 * r.value:.6g}"),
    Column("square", "square", lambda r: f"{r.value**2:.6g}"),
    Column("note", "status", lambda r: r.note, "left", wraps=True),
)
LAYOUT = Layout(COLUMNS, required=("name", "value", "note"), optional=("square", "double"),
                wrap_room=10)  # fmt: skip


def drawn(width, asked=None):
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, soft_wrap=False)
    table.draw(console, "title", table.choose(LAYOUT, ROWS, width, asked), ROWS)
    return buffer.getvalue()


def test_columns_parse_all_a_list_or_nothing_and_refuse_unknown_names():
    assert table.parse_columns(None, LAYOUT.keys) is None
    assert table.parse_columns("all", LAYOUT.keys) == LAYOUT.keys
    assert table.parse_columns(" value , name", LAYOUT.keys) == ("value", "name")
    with pytest.raises(UsageError) as err:
        table.parse_columns("name,speed,colour", LAYOUT.keys)
    assert "unknown column 'speed', 'colour'" in err.value.message
    assert "choose from name, value, double, square, note, or all" in err.value.message
    with pytest.raises(UsageError, match="none given"):
        table.parse_columns(" , ", LAYOUT.keys)


def test_optional_columns_join_by_priority_while_they_fit():
    widths = {c.key: c.width(ROWS) for c in COLUMNS}
    widths["note"] = 10  # a wrapping column counts at most wrap_room
    base = table.table_width([c for c in COLUMNS if c.key in ("name", "value", "note")], widths)
    with_square = base + 3 + widths["square"]
    wide = table.choose(LAYOUT, ROWS, 10_000)
    assert [c.key for c in wide.columns] == list(LAYOUT.keys) and wide.left_out == []
    middle = table.choose(LAYOUT, ROWS, with_square)  # room for square, which comes first
    assert [c.key for c in middle.columns] == ["name", "value", "square", "note"]
    assert middle.left_out == ["double"]
    narrow = table.choose(LAYOUT, ROWS, 20)  # too narrow even for the required ones: they stay
    assert [c.key for c in narrow.columns] == ["name", "value", "note"]
    assert narrow.left_out == ["square", "double"]


@pytest.mark.parametrize("width", [30, 60, 80, 120])
def test_the_table_fits_cuts_no_name_or_number_and_says_what_it_left_out(width):
    text = drawn(width)
    choice = table.choose(LAYOUT, ROWS, width)
    assert "…" not in text
    body = text.split("Not shown")[0].splitlines()[1:]  # below the title
    # within the width or, narrower than the columns always shown, as wide as they need
    assert max(cell_len(line) for line in body) <= max(width, choice.drawn_width)
    if choice.drawn_width > width:
        assert len({cell_len(line) for line in body if line[0] in "┏│└"}) == 1  # whole, uncut
    for row in ROWS:
        assert row.name in text and f"{row.value:.6g}" in text
    for word in ROWS[1].note.split():  # the status folds between words, never inside one
        assert word in text
    if choice.left_out:
        note = " ".join(text.split("Not shown")[1].split())
        assert note.startswith(f"at width {width}: {', '.join(choice.left_out)}")
        assert "--columns all" in note
    else:
        assert "Not shown" not in text


def test_asked_columns_are_drawn_whole_in_display_order_past_the_width():
    text = drawn(30, asked=("square", "name", "double"))
    header = text.splitlines()[2]
    assert header.index("name") < header.index("twice") < header.index("square")
    assert "status" not in text and "Not shown" not in text and "…" not in text
    assert "1.52416e+08" in text and len(text.splitlines()[1]) > 30  # whole, though past 30


def test_asking_only_for_columns_the_table_lacks_is_refused_with_what_it_has():
    layout = Layout(COLUMNS[:2], ("name",), ())
    with pytest.raises(UsageError) as err:
        table.choose(layout, ROWS, 80, ("square",))
    assert "has none of square" in err.value.message and "it has name, value" in err.value.message


def test_markdown_escapes_pipes_and_keeps_cells_on_one_line():
    columns = [Column("a", "a\nb", lambda r: r, "left"), Column("n", "n", lambda r: "1|2\n3")]
    lines = table.markdown_rows(columns, ["x|y"])
    assert lines == ["| a b | n |", "|---|---:|", "| x\\|y | 1\\|2 3 |"]
    assert table.markdown_table(LAYOUT, ROWS, "t|itle")[0] == "**t\\|itle**"


def test_csv_writes_non_finite_numbers_empty_unless_asked_to_keep_them():
    rows = [{"a": 1.5, "b": math.nan}, {"a": math.inf, "b": None}]
    assert csv_text(["a", "b"], rows) == "a,b\n1.5,\n,\n"
    assert csv_text(["a", "b"], rows, header=False, finite=False) == "1.5,nan\ninf,\n"


def test_numbers_read_the_same_in_every_table():
    assert [fmt_time(t) for t in (None, 2.5e-5, 0.0123, 3.456)] == [
        "—",
        "25 µs",
        "12.3 ms",
        "3.46 s",
    ]
    assert [fmt_flops(f) for f in (None, 512, 2.13e6, 4e12)] == ["—", "512", "2.13 M", "4 T"]
    assert fmt_speedup(None) == fmt_speedup(0.0) == "—" and fmt_speedup(14.06) == "14.1×"
