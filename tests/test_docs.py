"""The README is the front door and docs/ the depth: every page reachable from the README, no dead relative link or anchor."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
MAX_README_LINES = 220


def links(page: Path) -> list[str]:
    """Targets of the markdown links of `page`, code blocks left out."""
    return [match["target"] for match in LINK.finditer(FENCED.sub("", page.read_text()))]


def relative_links(page: Path) -> list[str]:
    return [target for target in links(page) if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of `page`: lowercase, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+[ \t]+(.+?)[ \t]*$", FENCED.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move the depth to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in relative_links(README)}
    unlinked = [page.relative_to(ROOT).as_posix() for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_every_relative_link_resolves(page):
    dead = [target for target in relative_links(page) if not (page.parent / target.split("#")[0]).exists()]
    assert not dead, f"{page.relative_to(ROOT)}: links to missing files: {dead}"
    targets = [target.partition("#") for target in relative_links(page) if "#" in target]
    no_heading = [f"{path}#{anchor}" for path, _, anchor in targets if anchor not in anchors(page.parent / path)]
    assert not no_heading, f"{page.relative_to(ROOT)}: links to headings that are not there: {no_heading}"


def test_the_storage_layout_is_written_once():
    """docs/data-format.md shows tapeline/storage/layout.py's tree as it is (`python -m tapeline.storage.layout`)."""
    from tapeline.storage.layout import layout_tree

    assert layout_tree() in (ROOT / "docs" / "data-format.md").read_text()
