"""The README is a map and the docs hold together: README.md is at most 250 lines, every
relative link in README.md and docs/**/*.md reaches a file (and, with #anchor, a heading of
it), and every `cadis <subcommand>` in their command blocks names a subcommand cadis/cli.py
defines. Fast: reads text and cli.py's syntax tree, imports neither cadis nor torch. Each rule
is also shown failing on a made-up broken file, so a rule that stopped looking would fail."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLI = REPO / "cadis" / "cli.py"

# A map, not a manual: nanoGPT's and Optuna's READMEs are about this long (issue 25).
README_MAX_LINES = 250

# Fenced blocks whose lines are commands a reader runs; untagged fences count too.
COMMAND_FENCES = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
# [text](target) and ![alt](target); the target up to the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
# `cadis` as a command word (not cadis/, cadis-cluster or cadis.cli), then its subcommand.
CADIS_COMMAND = re.compile(r"(?<![\w.-])cadis[ \t]+([a-z][\w-]*)")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def documents(repo: Path = REPO) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(prose lines, fenced lines) as (line number, line) and (line number, fence tag, line)."""
    prose, fenced = [], []
    tag = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if opening:
            tag = opening.group(2).lower() if tag is None else None
        elif tag is None:
            prose.append((number, line))
        else:
            fenced.append((number, tag, line))
    return prose, fenced


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, every character
    but letters, digits, underscores, spaces and hyphens dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    for _, line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        anchor = github_anchor(heading.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """``page:line: target (why)`` for each relative link of ``page`` that reaches no file or
    no heading; links inside code (fenced or inline) and to other sites are not links."""
    problems = []
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    for number, line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if target.startswith(EXTERNAL):
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.name}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where} (no heading #{anchor} in {resolved.name})")
    return problems


def cli_subcommands(cli: Path = CLI) -> set[str]:
    """The names passed to ``add_parser`` in cadis/cli.py, read from its syntax tree."""
    names = set()
    for node in ast.walk(ast.parse(cli.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_parser" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def unknown_subcommands(page: Path, known: set[str]) -> list[str]:
    """``page:line: cadis NAME`` for each command-block use of a subcommand cadis lacks."""
    _, fenced = split_fences(page.read_text(encoding="utf-8"))
    return [f"{page.name}:{number}: cadis {name}"
            for number, tag, line in fenced if tag in COMMAND_FENCES
            for name in CADIS_COMMAND.findall(line) if name not in known]


def readme_too_long(readme: Path = README) -> list[str]:
    lines = len(readme.read_text(encoding="utf-8").splitlines())
    return [f"{readme.name} has {lines} lines, more than {README_MAX_LINES}"] \
        if lines > README_MAX_LINES else []


# --------------------------------------------------------------------------- the repository

def test_the_readme_is_at_most_250_lines():
    assert readme_too_long() == []


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = documents()
    assert README in pages and len(pages) > 5
    assert [problem for page in pages for problem in broken_links(page)] == []


def test_every_cadis_subcommand_in_a_command_block_exists():
    known = cli_subcommands()
    assert {"pretrain", "certify", "analyze", "train", "sweep", "compare"} <= known
    assert [problem for page in documents() for problem in unknown_subcommands(page, known)] == []


def test_the_checks_read_cli_py_without_importing_cadis_or_torch():
    import sys

    before = {name for name in sys.modules if name == "torch" or name.startswith("cadis")}
    cli_subcommands()
    after = {name for name in sys.modules if name == "torch" or name.startswith("cadis")}
    assert after == before


# --------------------------------------------------------------------------- each rule can fail

def test_a_readme_of_251_lines_fails(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("line\n" * README_MAX_LINES)
    assert readme_too_long(readme) == []
    readme.write_text("line\n" * (README_MAX_LINES + 1))
    assert readme_too_long(readme) == [f"README.md has {README_MAX_LINES + 1} lines, more than 250"]


def test_a_link_to_a_missing_file_or_heading_fails(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## The same at σ = 0.25\n\n## Twice\n\n## Twice\n")
    (tmp_path / "figure.png").write_bytes(b"")
    good = tmp_path / "good.md"
    good.write_text(
        "# Good\n"
        "[a page](docs/page.md), [a heading](docs/page.md#the-same-at-σ--025), "
        "[the second](docs/page.md#twice-1), ![a figure](figure.png), [a folder](docs/), "
        "[here](#good), [a site](https://example.org/missing)\n"
        "`[in code](missing.md)`\n```\n[in a block](missing.md)\n```\n")
    assert broken_links(good) == []
    bad = tmp_path / "bad.md"
    bad.write_text("# Bad\n[gone](docs/gone.md) and ![gone](gone.png)\n"
                   "[no heading](docs/page.md#not-there) and [nor here](#nowhere)\n")
    assert broken_links(bad) == [
        "bad.md:2: docs/gone.md (no such file)",
        "bad.md:2: gone.png (no such file)",
        "bad.md:3: docs/page.md#not-there (no heading #not-there in page.md)",
        "bad.md:3: #nowhere (no heading #nowhere in bad.md)",
    ]


def test_a_subcommand_cadis_lacks_fails_in_a_command_block_only(tmp_path):
    cli = tmp_path / "cli.py"
    cli.write_text("import argparse\n"
                   "commands = argparse.ArgumentParser().add_subparsers()\n"
                   "certify = commands.add_parser('certify', help='...')\n")
    known = cli_subcommands(cli)
    assert known == {"certify"}
    page = tmp_path / "page.md"
    page.write_text("Prose may say cadis certifies, and `cadis verify` inline.\n"
                    "```bash\n.venv/bin/cadis certify --out x\ncluster/cadis-cluster start\n```\n"
                    "```yaml\ncadis verify: not a command block\n```\n"
                    "```console\n$ cadis verify --out x\n```\n"
                    "```\nray job submit -- cadis sweep sweeps/default.yaml\n```\n")
    assert unknown_subcommands(page, known) == ["page.md:10: cadis verify", "page.md:13: cadis sweep"]
