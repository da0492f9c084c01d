"""The documentation against the code: docs/architecture.md's tree against the package, and the
README's length and links.

The tree is the first fenced block under "## The tree" in docs/architecture.md. Each entry is one
line: two spaces of indent per level, the file or folder name (a folder ends with "/"), then its
description; a line indented past the level it could sit at continues the description above.
Every listed path must exist, and every module and folder under ``fastvq/`` must be listed, except
``UNLISTED`` (package markers, compiled extensions, caches). A move that this page does not follow
fails here with the paths that differ; fix the page (or, for a new kind of unlisted file, the
allow-list).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"
README_MAX_LINES = 250
# Names under fastvq/ the tree need not list.
UNLISTED = ("__init__.py", "__pycache__", "*.pyc", "_C*.so", "_C*.pyd")
ENTRY = re.compile(r"^[\w.\-]+/?$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def tree_block(text: str) -> str:
    """The first fenced block after the "## The tree" heading."""
    _, heading, rest = text.partition("\n## The tree\n")
    match = re.search(r"^```[^\n]*\n(.*?)^```", rest, re.MULTILINE | re.DOTALL)
    if not heading or match is None:
        raise ValueError('no fenced block under a "## The tree" heading')
    return match.group(1)


def listed_paths(block: str) -> list[str]:
    """The paths the tree lists, relative to the repository root ("fastvq/ops/search.py"); folders
    without the trailing slash."""
    paths, folders = [], []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        depth, odd = divmod(indent, 2)
        entry = line.split()[0]
        if odd or depth > len(folders) or not ENTRY.match(entry):
            continue  # the description of the entry above, wrapped
        folders = folders[:depth]
        paths.append("/".join([*folders, entry.rstrip("/")]))
        if entry.endswith("/"):
            folders.append(entry.rstrip("/"))
    return paths


def package_paths(root: Path, package: str = "fastvq") -> set[str]:
    """Every module and folder under ``root/package`` the tree must list."""
    found = set()
    for path in (root / package).rglob("*"):
        relative = path.relative_to(root)
        if any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in UNLISTED):
            continue
        if path.is_dir() or path.suffix == ".py":
            found.add(relative.as_posix())
    return found


def tree_mismatches(doc: str, root: Path, package: str = "fastvq") -> tuple[list[str], list[str]]:
    """``(listed but missing, present but unlisted)`` between a document's tree and ``root``."""
    listed = listed_paths(tree_block(doc))
    missing = [path for path in listed if not (root / path).exists()]
    unlisted = sorted(package_paths(root, package) - set(listed))
    return missing, unlisted


def test_the_architecture_tree_is_the_package():
    missing, unlisted = tree_mismatches(ARCHITECTURE.read_text(), ROOT)
    assert not missing, f"docs/architecture.md lists paths that do not exist: {missing}"
    assert not unlisted, f"docs/architecture.md's tree lacks these modules or folders of fastvq/: {unlisted}"


def test_the_tree_check_catches_a_moved_module(tmp_path):
    doc = ("# Architecture\n\n## The tree\n\n```\nfastvq/\n  __init__.py   the names\n  ops/          the fronts,\n"
           "                one per family\n    search.py   nearest_code\n  cli.py        the command\n"
           "tests/        the tests\n```\n")
    for name in ("fastvq/__init__.py", "fastvq/ops/search.py", "fastvq/cli.py", "fastvq/_C.so",
                 "fastvq/__pycache__/cli.cpython-312.pyc", "tests/test_x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert tree_mismatches(doc, tmp_path) == ([], [])
    (tmp_path / "fastvq/ops/search.py").rename(tmp_path / "fastvq/search.py")
    (tmp_path / "fastvq/nn").mkdir()
    assert tree_mismatches(doc, tmp_path) == (["fastvq/ops/search.py"], ["fastvq/nn", "fastvq/search.py"])


def test_the_tree_parser_reads_wrapped_descriptions_as_descriptions():
    block = "fastvq/\n  ops/                 one file per family:\n                       see below\n    a.py\n  b.py\n"
    assert listed_paths(block) == ["fastvq", "fastvq/ops", "fastvq/ops/a.py", "fastvq/b.py"]
    with pytest.raises(ValueError, match="The tree"):
        tree_block("# no tree here\n")


def test_the_readme_is_a_front_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the manual belongs in docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"^#{1,6} ", line)}


def _broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading in {linked.name})")
    return broken


@pytest.mark.parametrize("document", [README, *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(document):
    assert not _broken_links(document), f"{document.name}: {_broken_links(document)}"


def test_the_readme_links_into_every_docs_page():
    linked = {target.partition("#")[0] for target in LINK.findall(README.read_text())}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"README.md does not link to {sorted(pages - linked)}"


def test_the_link_check_catches_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The ops\n\n```bash\n# not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/a.md#the-ops) [gone](docs/b.md) [bad](docs/a.md#not-a-heading) [web](https://x.y)\n")
    assert _broken_links(readme) == ["docs/b.md (no such file)", "docs/a.md#not-a-heading (no such heading in a.md)"]
