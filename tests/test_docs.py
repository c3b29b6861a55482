"""The README and docs/ hold together: every relative link reaches a file (and its #anchor a heading in it), the
README stays a front page, and every file the README names as a module exists."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "device" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # fenced blocks first, then inline code (one line)
FENCED = re.compile(r"```.*?```", re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (inline code in a heading keeps its text; GitHub drops the backticks)."""
    return {anchor(line.lstrip("#")) for line in FENCED.sub("", page.read_text()).splitlines() if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked here (no network)
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(target)
    return broken


def test_the_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        "# Top\n\n## Some `--flag` part\n\n[ok](a.md#some---flag-part) [gone](b.md) [bad](a.md#nowhere)\n"
    )
    assert broken_links(tmp_path / "a.md") == ["b.md", "a.md#nowhere"]


def test_every_relative_link_of_the_readme_and_docs_reaches_its_target() -> None:
    assert len(PAGES) > 5 and all(page.is_file() for page in PAGES)
    assert {str(page.relative_to(ROOT)): broken_links(page) for page in PAGES if broken_links(page)} == {}


def test_the_readme_is_a_front_page_that_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(readme)}
    assert {page.resolve() for page in PAGES[1:]} - linked == set()


def test_every_code_fence_is_closed() -> None:
    """An unclosed ``` turns the rest of a page into code on GitHub (headings, links and all)."""
    fences = {
        str(page.relative_to(ROOT)): sum(line.lstrip().startswith("```") for line in page.read_text().splitlines())
        for page in PAGES
    }
    assert {page: count for page, count in fences.items() if count % 2} == {}
