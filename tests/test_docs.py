"""The project carries its own docs: docs/ explains every method, the README is a front page whose
commands work, every link resolves, and nothing cites notes the repository does not hold."""

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.cli.methods_command import LONG_FORM, method_math
from kdecli.methods.registry import method_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))
runner = CliRunner()

# A link into docs/ as the README and the package write it: docs/NAME.md, docs/fig.png, …
DOCS_LINK = re.compile(r"docs/[\w.-]+\.(?:md|png|json)(?:#[\w-]+)?")
# A relative Markdown link inside docs/: [text](target) or ![alt](target)
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def package_texts() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted((ROOT / "kdecli").rglob("*.py"))}


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # a `# comment` in code is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_nothing_cites_notes_outside_the_repository():
    cited = {
        str(path.relative_to(ROOT))
        for path, text in [*package_texts().items(), (ROOT / "README.md", README)]
        if re.search(r"ALGORITHMS\.md|DESIGN\.md", text)
    }
    assert not cited, f"cite docs/ instead: {sorted(cited)}"


@pytest.mark.parametrize("source", ["README.md", "kdecli"])
def test_every_docs_link_resolves_to_a_file_and_its_heading(source):
    texts = {ROOT / "README.md": README} if source == "README.md" else package_texts()
    links = {m.group(0) for text in texts.values() for m in DOCS_LINK.finditer(text)}
    assert links, "no link into docs/ found"
    for link in links:
        target, _, anchor = link.partition("#")
        assert (ROOT / target).is_file(), f"{link} names no file"
        if anchor:
            assert anchor in anchors((ROOT / target).read_text(encoding="utf-8")), link


def test_links_between_the_docs_resolve():
    assert {p.name for p in DOCS} >= {"methods.md", "metrics.md", "design.md", "commands.md"}
    for page in DOCS:
        for target in MD_LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            name, _, anchor = target.partition("#")
            linked = page if not name else (page.parent / name)
            assert linked.is_file(), f"{page.name}: {target} names no file"
            if anchor:
                assert anchor in anchors(linked.read_text(encoding="utf-8")), (page.name, target)


def test_methods_md_has_a_section_for_every_registered_method():
    headings = anchors((ROOT / "docs" / "methods.md").read_text(encoding="utf-8"))
    missing = [n for n in method_names() if n not in headings and f"{n}-oracle" not in headings]
    assert not missing, f"docs/methods.md has no section for {missing}"


@pytest.mark.parametrize("name", method_names())
def test_methods_name_shows_the_math_from_the_package_itself(name):
    """A wheel has no docs/: the estimator comes from the package, the long form is named."""
    math = method_math(name)
    assert "=" in math and len(math.splitlines()) >= 2, math
    res = runner.invoke(app, ["methods", name], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    first_line = next(line for line in math.splitlines() if line.strip())
    assert " ".join(first_line.split()) in " ".join(res.stdout.split())
    assert LONG_FORM in " ".join(res.stdout.split())
    assert "docs/methods.md" in LONG_FORM


def test_the_list_of_methods_points_to_one_method_and_to_the_long_form():
    res = runner.invoke(app, ["methods"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    flat = " ".join(res.stdout.split())
    assert "kdecli methods NAME" in flat and LONG_FORM in flat


def test_readme_quick_start_is_the_two_commands_after_the_cpu_torch_hint():
    main_job = (
        "pip install -e . && kdecli compare sample:glove --methods "
        "exact,mean,kdeformer,performer,reformer,scatterbrain --budgets 64,128,256,512"
    )
    tests = 'pip install -e ".[dev]" && python -m pytest -q'
    assert main_job in README and tests in README
    cpu = README.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu < README.index(main_job), "the CPU build must come before the install"
    assert "pytorch.org/get-started" in README
    assert '"torch>=2.2"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_readme_is_a_front_page_whose_commands_table_names_every_command():
    assert len(README.splitlines()) < 200, "the long sections belong in docs/"
    group = __import__("typer").main.get_command(app)
    for command in group.commands:
        assert f"`kdecli {command}" in README, f"README's table lacks {command}"


def test_readme_main_job_names_methods_that_exist():
    job = re.search(r"kdecli compare sample:glove --methods (\S+)", README)
    assert job is not None
    assert set(job.group(1).split(",")) <= set(method_names())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
