"""What a checkpoint format reads: a model config and its tensors, by looplm state-dict name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from looplm.config import ModelConfig


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
