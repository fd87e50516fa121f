"""Where looplm keeps what it can rebuild (compiled kernels, tokenized evaluation data).

``$LOOPLM_CACHE`` when set, else ``~/.cache/looplm``.  Everything under it may be deleted at
any time; looplm rebuilds it on demand.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_path(*parts: str) -> Path:
    """``$LOOPLM_CACHE/part/…`` (not created here)."""
    return Path(os.environ.get("LOOPLM_CACHE") or Path.home() / ".cache" / "looplm", *parts)
