"""What a checkpoint format reads: a model config and its tensors, by looplm state-dict name."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from looplm.config import ModelConfig
from looplm.errors import LoopLMError, listed


@dataclass
class StoredModel:
    """config: the model's ``ModelConfig``; weights: state-dict name → tensor (float32 on the
    device asked for); int8: for Q8_0-stored Linear weights, name → (int8 values [N, K], float32
    scales [N, K/32]) exactly as stored; ternary: for packed ternary weights, name → (codes in
    {−1, 0, 1} [N, K] int8, float32 scale) exactly as stored (their ``weights`` entry is
    codes · scale); source: the file or directory read; stored_name: the name a tensor has in
    the file (for error messages)."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    source: Path
    int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stored_name: Callable[[str], str] = str
    metadata: dict = field(default_factory=dict)
    ternary: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def first_missing_layer(names, prefix: str, count: int) -> int | None:
    """The first layer index below ``count`` of which no tensor name starts with ``{prefix}{index}.``,
    or None: a config asking for more layers than the file holds is refused before the model is
    built (building a million layers, even on the meta device, takes hours).  One pass over
    ``names``, whatever ``count`` is."""
    present = set()
    for name in names:
        index = name[len(prefix):].partition(".")[0] if name.startswith(prefix) else ""
        if index.isdigit():
            present.add(int(index))
    return next((index for index in range(count) if index not in present), None)


def meta_model(build: Callable, source: str):
    """``build()`` on the meta device (no memory): the shapes a stored config asks for.  A config
    whose sizes multiply past torch's int64 shapes is one line, not torch's overflow error."""
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, OverflowError, TypeError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise LoopLMError(f"{source}: its config asks for tensors too large to build ({detail}): the config is"
                          " damaged") from None


def warn_non_finite(tensors: dict[str, torch.Tensor], subject: str, names: Callable[[str], str] = str,
                    stacklevel: int = 3) -> None:
    """One warning when any of ``tensors`` holds NaN or inf: "``subject`` (the first's name, and how
    many more): the model's outputs will be NaN or inf" (``names``: a tensor's name as the file
    spells it; ``stacklevel``: as the caller would give it)."""
    broken = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        warnings.warn(f"{subject} ({listed(map(names, broken), 1)}): the model's outputs will be NaN or inf",
                      stacklevel=stacklevel + 1)
