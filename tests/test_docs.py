"""The documentation's cross-references resolve: every `README "Section"` or `docs/PAGE.md,
"Section"` named in the code, the presets and the documentation is a heading (or a bold paragraph
lead) of that page, and every page a Markdown link points at exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"README": ROOT / "README.md", "README.md": ROOT / "README.md",
         "benchmarks/README.md": ROOT / "benchmarks" / "README.md",
         **{f"docs/{p.name}": p for p in (ROOT / "docs").glob("*.md")}}
# A page, an optional comma or parenthesis, then a quoted section name ("README, "Does it learn?"", or
# "docs/LEARNING.md "Six epochs instead of four""), after line breaks and comment markers are joined.
REFERENCE = re.compile(r'(docs/[A-Z_]+\.md|benchmarks/README\.md|README(?:\.md)?)[`,]*\s+\(?"([^"]{4,90})"')
SOURCES = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*"),
           *(ROOT / "configs").glob("*.yaml"), *(ROOT / "src" / "unimed").rglob("*.py")]


def _flat(text: str) -> str:
    """The text on one line: each line without its leading comment marker and indentation."""
    return " ".join(re.sub(r"^\s*#?\s*", "", line) for line in text.splitlines())


def _sections(page: Path) -> list[str]:
    """The page's headings and bold paragraph leads, as written."""
    text = page.read_text(encoding="utf-8")
    heads = [m.group(1) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)]
    return heads + [m.group(1) for m in re.finditer(r"^\*\*(.+?)\*\*", text, flags=re.MULTILINE)]


def _references() -> list[tuple[str, str, str]]:
    found = []
    for source in SOURCES:
        if source.is_file() and source.suffix in (".md", ".py", ".yaml", ".sh"):
            for page, section in REFERENCE.findall(_flat(source.read_text(encoding="utf-8"))):
                found.append((source.relative_to(ROOT).as_posix(), page, section))
    return found


def test_the_references_are_found_at_all():
    pages = {page for _, page, _ in _references()}
    assert {"README", "docs/LEARNING.md", "docs/EVALUATION.md"} <= pages


@pytest.mark.parametrize(("source", "page", "section"), _references())
def test_a_named_section_is_on_its_page(source: str, page: str, section: str):
    assert page in PAGES, f"{source} names {page}, which does not exist"
    sections = [" ".join(s.split()) for s in _sections(PAGES[page])]
    name = " ".join(section.split()).rstrip(".")
    assert any(s.startswith(name) for s in sections), f'{source}: {page} has no section "{section}"'


def test_every_linked_page_exists():
    for source in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", source.read_text(encoding="utf-8")):
            assert (source.parent / target).is_file(), f"{source.name} links to a missing {target}"
