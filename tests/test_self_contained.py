"""The project cites only itself: no path outside the repository, no private planning file, and
source systems named by their public names, never by a seed document's number."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("looplm", "tests", "benchmarks", "docs", "examples", "README.md", "pyproject.toml", "setup.py")
SUFFIXES = {".py", ".md", ".c", ".h", ".toml", ".txt", ".json", ".yaml", ".yml", ".cfg"}
# Built from parts so that this file does not match itself.
FORBIDDEN = re.compile("|".join([r"\.\./" + "shared", "REFERENCE" + r"\s*§", "REFERENCE" + r"\.md", "DESIGN" + r"\.md",
                                 "DESIGN" + " practice", "SPEC" + "-lrnn", r"\bseed[- _]?0\d\d\b"]))


def scanned_files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (item for item in path.rglob("*") if item.is_file() and item.suffix in SUFFIXES
                        and "__pycache__" not in item.parts)


def test_nothing_cites_files_outside_the_repository_or_sources_by_number():
    hits = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_the_scan_finds_what_it_forbids(tmp_path):
    for bad in ("see ../" + "shared/X", "REFERENCE" + " §3", "the seed" + "-002 FFN", "DESIGN" + " practice 10"):
        assert FORBIDDEN.search(bad), bad
    assert not FORBIDDEN.search("three seeds, seed 0, 1 and 2; --seed 7")
