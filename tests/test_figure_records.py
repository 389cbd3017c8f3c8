"""Every figure in README.md and docs/ comes from committed records: docs/figures.tsv (one row
a figure or measured table: figure, doc, records, command) names the pages that show it, its
records under docs/ and the command that regenerates it from them, and this test fails when

- a row's records (a file, or a folder holding a non-empty file) are missing or empty;
- a row's figure (a png under docs/) is missing;
- an image linked from README.md or docs/**/*.md has no row, or its row does not name that
  page; a png under docs/ has no row;
- a row whose records were not kept (records ``-``) is shown in a section that does not say so.

The columns: ``figure`` is a png's path relative to docs/ or ``table:NAME``; ``doc`` the pages
that show it (repository paths, space-separated, each optionally ``#anchor``: the section
holding it; a table whose records were not kept names its sections); ``records`` paths relative
to docs/, space-separated, or ``-``; ``command`` what regenerates it, run from the repository
root. Fast: reads text, imports neither cadis nor torch. Each rule is also shown failing on a
made-up broken tree, so a rule that stopped looking would fail."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_docs import INLINE_CODE, LINK, REPO, anchors, documents, github_anchor, split_fences

REGISTRY = Path("docs") / "figures.tsv"
COLUMNS = ["figure", "doc", "records", "command"]
TABLE = "table:"
# The records column of a figure whose records were not kept, and what the section showing
# such a figure must then say (case aside).
NOT_KEPT = "-"
NOTE = "records were not kept"
HEADING = r"^#{1,6}\s+(.*?)\s*#*\s*$"


@dataclass(frozen=True)
class Row:
    """One registry row: ``pages`` as (repository path, anchor or "") pairs."""

    figure: str
    pages: tuple[tuple[str, str], ...]
    records: tuple[str, ...]
    command: str

    @property
    def kept(self) -> bool:
        return self.records != (NOT_KEPT,)


def read_registry(repo: Path = REPO) -> tuple[list[Row], list[str]]:
    """(rows, problems): the registry's rows, and what makes it unreadable (no file, another
    header, a row without four non-empty fields, a figure twice or neither png nor table)."""
    path = repo / REGISTRY
    if not path.is_file():
        return [], [f"{REGISTRY} is missing"]
    with path.open(encoding="utf-8", newline="") as handle:
        lines = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines or lines[0] != COLUMNS:
        return [], [f"{REGISTRY}: the header must be {' '.join(COLUMNS)}"]
    rows, problems, seen = [], [], set()
    for number, fields in enumerate(lines[1:], start=2):
        if len(fields) != len(COLUMNS) or not all(field.strip() for field in fields):
            problems.append(f"{REGISTRY}:{number}: not four non-empty tab-separated fields")
            continue
        figure, doc, records, command = (field.strip() for field in fields)
        if figure in seen or not (figure.endswith(".png") or figure.startswith(TABLE)):
            problems.append(
                f"{REGISTRY}:{number}: {figure} (twice, or neither a png nor {TABLE}NAME)")
            continue
        seen.add(figure)
        pages = []
        for entry in doc.split():
            name, _, anchor = entry.partition("#")
            pages.append((name, anchor))
        rows.append(Row(figure, tuple(pages), tuple(records.split()), command))
    return rows, problems


def sections(page: Path) -> dict[str, list[str]]:
    """A page's prose, section by section: each heading's anchor (repeats numbered as GitHub
    numbers them; "" before the first heading) to the prose lines under it, up to the next
    heading of any level."""
    found: dict[str, list[str]] = {"": []}
    seen: dict[str, int] = {}
    current = ""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    for _, line in prose:
        heading = re.match(HEADING, line)
        if heading:
            anchor = github_anchor(heading.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            current = anchor if count == 0 else f"{anchor}-{count}"
            found[current] = []
        else:
            found[current].append(line)
    return found


def linked_pngs(page: Path, lines: list[str]) -> set[Path]:
    """The pngs ``lines`` of ``page`` link to (as images or links), resolved."""
    return {(page.parent / target.partition("#")[0]).resolve()
            for line in lines for target in LINK.findall(INLINE_CODE.sub("", line))
            if target.partition("#")[0].endswith(".png") and "://" not in target}


def is_empty(path: Path) -> bool:
    """A file of no bytes, or a folder holding no file of some bytes."""
    if path.is_file():
        return path.stat().st_size == 0
    return not any(child.is_file() and child.stat().st_size > 0 for child in path.rglob("*"))


def row_problems(row: Row, repo: Path = REPO) -> list[str]:
    """What is wrong with one row: its pages, its figure, its records or its note."""
    docs = (repo / "docs").resolve()
    problems = []
    png = (docs / row.figure).resolve() if not row.figure.startswith(TABLE) else None
    if png is not None and (not png.is_file() or is_empty(png)):
        problems.append(f"{row.figure}: no such figure under docs/")
    for name, anchor in row.pages:
        page = repo / name
        if not page.is_file():
            problems.append(f"{row.figure}: no page {name}")
            continue
        if anchor and anchor not in anchors(page):
            problems.append(f"{row.figure}: no heading #{anchor} in {name}")
    if row.kept:
        for record in row.records:
            path = (docs / record).resolve()
            if not path.is_relative_to(docs) or not path.exists():
                problems.append(f"{row.figure}: no records docs/{record}")
            elif is_empty(path):
                problems.append(f"{row.figure}: records docs/{record} are empty")
    else:
        problems += unsaid_notes(row, repo)
    return problems


def unsaid_notes(row: Row, repo: Path) -> list[str]:
    """The sections showing a figure whose records were not kept that do not say so: for a
    png every section of its pages that links it, for a table the sections its pages name."""
    docs = (repo / "docs").resolve()
    problems = []
    for name, anchor in row.pages:
        page = repo / name
        if not page.is_file():
            continue
        found = sections(page)
        if row.figure.startswith(TABLE):
            if not anchor:
                problems.append(f"{row.figure}: {name} names no section (#anchor) holding it")
                continue
            showing = [anchor] if anchor in found else []
        else:
            showing = [key for key, lines in found.items()
                       if (docs / row.figure).resolve() in linked_pngs(page, lines)]
        for key in showing:
            if NOTE not in " ".join(found[key]).lower():
                problems.append(f"{row.figure}: {name}#{key} does not say its {NOTE}")
    return problems


def unregistered_figures(rows: list[Row], repo: Path = REPO) -> list[str]:
    """Every png linked from README.md or docs/**/*.md without a row, or from a page its row
    does not name (``page: png``), and every png under docs/ without a row."""
    docs = (repo / "docs").resolve()
    pages_of = {(docs / row.figure).resolve(): {name for name, _ in row.pages} for row in rows}
    problems = []
    for page in documents(repo):
        name = page.relative_to(repo).as_posix()
        prose, _ = split_fences(page.read_text(encoding="utf-8"))
        for png in sorted(linked_pngs(page, [line for _, line in prose])):
            if name not in pages_of.get(png, ()):
                why = "" if png in pages_of else " (no row)"
                problems.append(f"{name}: {png.relative_to(repo.resolve()).as_posix()}{why}")
    problems += [f"{png.relative_to(repo).as_posix()} (a png under docs/ without a row)"
                 for png in sorted((repo / "docs").rglob("*.png")) if png.resolve() not in pages_of]
    return problems


# --------------------------------------------------------------------------- the repository

ROWS, REGISTRY_PROBLEMS = read_registry()


def test_the_registry_is_well_formed():
    assert REGISTRY_PROBLEMS == []
    assert len(ROWS) > 20


@pytest.mark.parametrize("row", ROWS, ids=[row.figure for row in ROWS])
def test_each_figure_has_its_records_and_command(row):
    assert row_problems(row) == []


def test_every_figure_in_the_docs_has_a_row():
    assert unregistered_figures(ROWS) == []


# --------------------------------------------------------------------------- each rule can fail

def made_up_tree(root: Path) -> Path:
    """A repository with one figure, one table, their records and a registry naming them."""
    (root / "docs" / "results" / "run").mkdir(parents=True)
    (root / "docs" / "results" / "run" / "records.tsv").write_text("idx\tradius\n0\t0.5\n")
    (root / "docs" / "results" / "run.png").write_bytes(b"\x89PNG")
    (root / "README.md").write_text("# Tree\n\n![a run](docs/results/run.png)\n")
    (root / "docs" / "page.md").write_text(
        "# Page\n\n## Measured\n\n| r | a |\n|---|---|\n| 0 | 0.9 |\n\n"
        "## Unkept\n\n| r | b |\n|---|---|\n| 0 | 0.8 |\n\nIts records were not kept.\n")
    (root / "docs" / "figures.tsv").write_text(
        "figure\tdoc\trecords\tcommand\n"
        "results/run.png\tREADME.md\tresults/run\tcadis analyze docs/results/run --plot x.png\n"
        "table:measured\tdocs/page.md#measured\tresults/run/records.tsv\t"
        "cadis analyze docs/results/run\n"
        "table:unkept\tdocs/page.md#unkept\t-\tcadis sweep s.yaml\n")
    return root


def all_problems(root: Path) -> list[str]:
    rows, problems = read_registry(root)
    return problems + [p for row in rows for p in row_problems(row, root)] \
        + unregistered_figures(rows, root)


def test_the_made_up_tree_passes(tmp_path):
    assert all_problems(made_up_tree(tmp_path)) == []


def test_missing_or_empty_records_fail(tmp_path):
    root = made_up_tree(tmp_path)
    (root / "docs" / "results" / "run" / "records.tsv").write_text("")
    assert all_problems(root) == ["results/run.png: records docs/results/run are empty",
                                  "table:measured: records docs/results/run/records.tsv are empty"]
    (root / "docs" / "results" / "run" / "records.tsv").unlink()
    (root / "docs" / "results" / "run").rmdir()
    assert all_problems(root) == ["results/run.png: no records docs/results/run",
                                  "table:measured: no records docs/results/run/records.tsv"]


def test_an_image_without_a_row_and_a_row_without_its_image_fail(tmp_path):
    root = made_up_tree(tmp_path)
    (root / "docs" / "other.png").write_bytes(b"\x89PNG")
    (root / "docs" / "page.md").write_text(
        (root / "docs" / "page.md").read_text() + "\n![other](other.png)\n")
    assert all_problems(root) == ["docs/page.md: docs/other.png (no row)",
                                  "docs/other.png (a png under docs/ without a row)"]
    (root / "docs" / "results" / "run.png").unlink()
    assert "results/run.png: no such figure under docs/" in all_problems(root)


def test_unkept_records_must_be_said_where_the_figure_is_shown(tmp_path):
    root = made_up_tree(tmp_path)
    page = root / "docs" / "page.md"
    page.write_text(page.read_text().replace("Its records were not kept.\n", ""))
    assert all_problems(root) == [
        "table:unkept: docs/page.md#unkept does not say its records were not kept"]
    registry = root / "docs" / "figures.tsv"
    registry.write_text(registry.read_text().replace("docs/page.md#unkept", "docs/page.md"))
    assert all_problems(root) == [
        "table:unkept: docs/page.md names no section (#anchor) holding it"]


def test_an_unkept_figure_must_be_said_in_each_section_that_links_it(tmp_path):
    root = made_up_tree(tmp_path)
    registry = root / "docs" / "figures.tsv"
    registry.write_text(registry.read_text().replace("README.md\tresults/run\t", "README.md\t-\t"))
    unsaid = "results/run.png: README.md#{} does not say its records were not kept"
    assert all_problems(root) == [unsaid.format("tree")]
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "Its records were\nnot kept.\n\n"
                      "## Again\n\n![](docs/results/run.png)\n")
    assert all_problems(root) == [unsaid.format("again")]


def test_a_missing_heading_page_or_malformed_row_fails(tmp_path):
    root = made_up_tree(tmp_path)
    registry = root / "docs" / "figures.tsv"
    text = registry.read_text()
    registry.write_text(text.replace("#measured", "#gone").replace("README.md\t", "GONE.md\t"))
    assert all_problems(root) == ["results/run.png: no page GONE.md",
                                  "table:measured: no heading #gone in docs/page.md",
                                  "README.md: docs/results/run.png"]
    registry.write_text(text + "table:measured\tdocs/page.md\t-\n")
    assert read_registry(root)[1] == [f"{REGISTRY}:5: not four non-empty tab-separated fields"]
