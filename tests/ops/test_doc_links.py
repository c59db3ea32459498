"""README.md and docs/: every link to a file points into this repository, at a file that exists
(and, with a #fragment, at a heading of it). Web links (http/https/mailto) are not checked."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return out


def test_every_file_link_stays_inside_the_repository_and_resolves():
    bad = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # a web address
            path_part, _, fragment = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(ROOT)} -> {target}"
            if not path.is_relative_to(ROOT):
                bad.append(f"{where}: outside the repository")
            elif not path.exists():
                bad.append(f"{where}: no such file")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path.read_text()):
                bad.append(f"{where}: no heading #{fragment}")
    assert not bad, "\n".join(bad)


def test_no_document_points_to_the_development_workspace():
    for doc in DOCUMENTS:
        assert "../shared" not in doc.read_text(), doc
