"""The repository stands on its own: no tracked file points outside it, and the docs it links exist.

A user has the clone and nothing else: a pointer to the workspace it was built in (its shared folder), a
Markdown link that leaves the repository or names a file that is not there, or a docs page nobody links to
is a dead end for them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the workspace this project is built in: its shared folder beside the clone, the clone's own path, the tools
SHARED, WORK, TOOLS = "shared", "work", "library"
OUTSIDE = re.compile(rf"\.\./{SHARED}|/{WORK}/(main|{SHARED})|\.{TOOLS}/")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(#[^)]*)?\)")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for name in names:
        path = REPO / name
        if path.suffix in {".png", ".npz", ".tar", ".model", ".bin", ".safetensors", ".pt"} or not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        out.append(path)
    return out


def test_no_tracked_file_points_outside_the_repository():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "pointers outside the repository:\n" + "\n".join(found)


def test_markdown_links_resolve_inside_the_repository():
    broken = []
    for path in (p for p in tracked_text_files() if p.suffix == ".md"):
        for target, _ in MD_LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):  # http(s):, mailto: ...
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{path.relative_to(REPO)}: ({target})")
    assert not broken, "links that leave the repository or name nothing:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {(REPO / target).resolve() for target, _ in MD_LINK.findall(readme)}
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
