"""The command line's own surface: --version, help that reads well at 80 columns, and every usage
error (a missing or unknown option, a bad value, an unknown command) in the one-line style."""

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import kdecli
from kdecli.cli import app
from kdecli.cli.app import unwrap

runner = CliRunner()
NARROW = {"COLUMNS": "80"}
BOX = "╭╮╰╯│"


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(autouse=True)
def narrow_help(monkeypatch):
    """Help at 80 columns, whatever width an earlier test left: Typer reads TERMINAL_WIDTH once,
    when it first renders help, and keeps it for the process."""
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 80)


def test_version_prints_the_package_version():
    res = invoke("--version")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"kdecli {kdecli.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", kdecli.__version__)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["drift", "some-model"], "Error: Missing option '--text'."),
        (["compare", "sample:glove", "--bogus"], "Error: No such option: --bogus"),
        (["methods", "--budget", "abc"], "Error: Invalid value for '--budget'"),
        (["no-such-command"], "Error: No such command 'no-such-command'."),
    ],
)
def test_a_command_line_mistake_is_one_error_line_and_a_hint(args, message):
    res = invoke(*args, env=NARROW)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(message), res.stderr
    assert len(lines) == 2 and lines[1].startswith("Hint: Run `kdecli"), res.stderr
    assert "--help" in lines[1]
    assert not any(ch in res.output for ch in BOX), res.output  # no boxed panel
    assert "Usage:" not in res.output
    assert res.stdout == ""


def test_the_hint_names_the_command_that_was_mistyped():
    res = invoke("drift", "some-model", env=NARROW)
    assert "`kdecli drift --help`" in res.stderr


def test_a_library_usage_error_keeps_its_own_message():
    res = invoke("compare", "no-such-file.npz", env=NARROW)
    assert res.exit_code == 2
    assert res.stderr.startswith("Error: no-such-file.npz")
    assert not any(ch in res.output for ch in BOX)


def test_compare_help_lists_the_bundled_sample_among_the_inputs():
    res = invoke("compare", "--help", env=NARROW)
    assert res.exit_code == 0, res.output
    assert "sample:glove" in res.stdout


def test_unwrap_joins_the_lines_of_each_paragraph_and_keeps_paragraphs():
    text = "First line of a\n    sentence that goes on.\n\n    Second paragraph\n    here."
    assert unwrap(text) == "First line of a sentence that goes on.\n\nSecond paragraph here."
    assert unwrap(None) is None


def _command_panel(text: str) -> dict[str, list[str]]:
    """The root help's Commands panel: each command's description, line by line."""
    rows: dict[str, list[str]] = {}
    inside, name = False, None
    for line in text.splitlines():
        if "Commands" in line and line.lstrip().startswith("╭"):
            inside = True
            continue
        if inside and line.lstrip().startswith("╰"):
            break
        if inside:
            body = line.strip().strip("│").rstrip()
            match = re.match(r" (\S+)(\s+)(.*)", body)
            if match and not body.startswith("  "):
                name = match.group(1)
                rows[name] = [match.group(3).strip()]
            elif name is not None:
                rows[name].append(body.strip())
    return rows


def test_help_wraps_at_the_terminal_not_at_the_source_lines():
    """A description line ends early only when its next word would not fit: no line of the
    Commands panel breaks where the docstring's source line happened to break."""
    res = invoke("--help", env=NARROW)
    assert res.exit_code == 0, res.output
    panel = _command_panel(res.stdout)
    assert {"compare", "drift", "scale", "inspect"} <= set(panel)
    width = max(len(line) for lines in panel.values() for line in lines)
    for name, lines in panel.items():
        for line, following in zip(lines, lines[1:]):
            next_word = following.split()[0]
            assert len(line) + 1 + len(next_word) > width, (name, line, following)


def test_every_command_help_renders_at_80_columns():
    group = __import__("typer").main.get_command(app)
    for name in group.commands:
        res = invoke(name, "--help", env=NARROW)
        assert res.exit_code == 0, (name, res.output)
        assert max(len(line) for line in res.stdout.splitlines()) <= 80, name


def test_help_and_version_import_neither_torch_nor_numpy():
    """`kdecli --help`, `--version` and every `COMMAND --help` build the whole application and
    render it without importing torch (seconds of start-up): the library loads when a command
    runs.  Checked in a fresh interpreter, by what it imported, not by a clock."""
    code = """if True:
        import sys
        from typer.main import get_command
        from typer.testing import CliRunner
        from kdecli.cli import app
        runner = CliRunner()
        names = list(get_command(app).commands)
        for args in (["--help"], ["--version"], *([name, "--help"] for name in names)):
            res = runner.invoke(app, args)
            assert res.exit_code == 0, (args, res.output)
        print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy"}))
    """
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_groups_name_every_shared_option_of_their_classes_in_order():
    """RUN and INPUT name their fields without importing their classes (which import torch);
    a field that is also a shared option must be in its group, in the class's order."""
    from dataclasses import fields

    from kdecli.cli.options import INPUT, OPTIONS, OUTPUT, RUN, SWEEP

    for group in (INPUT, RUN, OUTPUT, SWEEP):
        cls = type(group.make())
        assert group.names == tuple(f.name for f in fields(cls) if f.name in OPTIONS), cls
