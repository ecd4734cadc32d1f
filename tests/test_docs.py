"""The repository's documentation is self-contained.

Users get this repository and nothing next to it, so no tracked file may point at the steering
repository's notes (what users need from them lives in docs/), and every relative link between
the markdown docs must lead to a file that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
# Spelled in pieces so that the patterns are not themselves what they forbid.
FORBIDDEN = ("../" + "shared", "shared" + "/reference")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links_to_check(text: str) -> list[str]:
    """Relative markdown links to docs/... or to a .md file (anchors dropped)."""
    targets = []
    for raw in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", raw, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        target = raw.split("#", 1)[0]
        if target.startswith("docs/") or target.endswith(".md"):
            targets.append(target)
    return targets


def test_no_pointers_outside_the_repository_and_doc_links_resolve():
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    outside = []
    for name in filter(None, tracked):
        path = ROOT / name
        if name == THIS or not path.is_file():  # a tracked file may be deleted in the work tree
            continue
        data = path.read_bytes()
        outside += [f"{name}: {needle}" for needle in FORBIDDEN if needle.encode() in data]
    assert not outside, (
        "files pointing outside the repository (move what they need into docs/): " + "; ".join(outside)
    )

    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in _links_to_check(doc.read_text(encoding="utf-8")):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT).as_posix()}: {target}")
    assert not broken, "markdown links to missing files: " + "; ".join(broken)
