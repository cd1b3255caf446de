"""The algorithm reference is the repository's own: docs/algorithms.md.

No tracked file outside tests/ points at a reference outside the repository (the project's old
notes, which users of the library cannot open), and every anchor of docs/algorithms.md that code
or docs cite is one of its headings, under GitHub's rule for heading anchors. Code that cites the
page once may name further sections by a bare anchor, "(#tip-axes)": those count too.
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "algorithms.md"
# Spelled in pieces, so that searching the repository for them finds nothing, this file included.
OUTSIDE_REFERENCES = ("ALGORITHMS" + ".md", "/".join(("..", "shared")))
CITED_ANCHOR = re.compile(r"algorithms\.md#([\w-]+)")
IN_PAGE_ANCHOR = re.compile(r"\]\(#([\w-]+)\)")
# "#tip-axes" standing alone (not after a word, a path or another #): in code and recipes only,
# since a markdown page's bare anchors are its own.
BARE_ANCHOR = re.compile(r"(?<![\w/#&])#([a-z][a-z0-9]*(?:-[a-z0-9]+)*)\b")
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".sbatch")
THIS_FILE = "tests/test_references.py"  # its examples of bad citations are meant to be bad


def tracked_texts() -> dict[str, str]:
    """Every tracked file that is text, by its path in the repository."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for name in filter(None, listing.decode().split("\0")):
        path = ROOT / name
        if path.is_file():  # a file deleted in the working tree but not yet in the index
            try:
                texts[name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # images
    return texts


def heading_slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, marks,
    underscores, hyphens and spaces stay), each space a hyphen."""
    kept = "".join(ch for ch in title.strip().lower() if ch in "-_ " or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """Anchors of every heading outside code blocks; a repeated slug gets -1, -2, ... as on GitHub."""
    anchors, counts, in_code = set(), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading and not in_code:
            slug = heading_slug(heading.group(1))
            anchors.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
            counts[slug] = counts.get(slug, 0) + 1
    return anchors


def cited_anchors(texts: dict[str, str]) -> list[tuple[str, str]]:
    """(file, anchor) for every link into docs/algorithms.md, its own in-page links included."""
    cited = [(name, anchor) for name, text in texts.items() for anchor in CITED_ANCHOR.findall(text)]
    cited += [
        (name, anchor)
        for name, text in texts.items()
        if name.endswith(CODE_SUFFIXES) and "docs/algorithms.md" in text
        for anchor in BARE_ANCHOR.findall(text)
    ]
    own = texts.get("docs/algorithms.md", "")
    return cited + [("docs/algorithms.md", anchor) for anchor in IN_PAGE_ANCHOR.findall(own)]


def test_no_tracked_file_points_outside_the_repository():
    mentions = [
        f"{name}: {needle}"
        for name, text in tracked_texts().items()
        if not name.startswith("tests/")
        for needle in OUTSIDE_REFERENCES
        if needle in text
    ]
    assert mentions == [], "cite docs/algorithms.md instead:\n" + "\n".join(mentions)


def test_every_cited_anchor_is_a_heading_of_the_reference():
    anchors = heading_anchors(REFERENCE.read_text(encoding="utf-8"))
    texts = {name: text for name, text in tracked_texts().items() if name != THIS_FILE}
    missing = [f"{name}: #{anchor}" for name, anchor in cited_anchors(texts) if anchor not in anchors]
    assert missing == [], "no such heading in docs/algorithms.md:\n" + "\n".join(missing)


def test_slugs_follow_github():
    assert heading_slug("Length shaping (`algorithm.length_penalty`)") == "length-shaping-algorithmlength_penalty"
    assert heading_slug("Dr. GRPO") == "dr-grpo"
    assert heading_slug("TEMPO — prefix values") == "tempo--prefix-values"
    assert heading_anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_the_checks_catch_a_bad_citation():
    link = "docs/algorithms.md#"
    texts = {
        "efficient_rl/x.py": f"see {link}no-such-heading and {link}dler, then (#dler, #gone-too)\n# a comment",
        "docs/algorithms.md": "## DLER\n[up](#dler) [gone](#missing)\n",
        "docs/other.md": f"[{link}dler] and its own [section](#own-heading)",
    }
    anchors = heading_anchors(texts["docs/algorithms.md"])
    assert sorted((name, a) for name, a in cited_anchors(texts) if a not in anchors) == [
        ("docs/algorithms.md", "missing"),
        ("efficient_rl/x.py", "gone-too"),
        ("efficient_rl/x.py", "no-such-heading"),
    ]
