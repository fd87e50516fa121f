"""Will the run fit?  Checked before the work starts, so a user mistake (a width typed with an
extra zero, a nearly full disk) is one line at once instead of a crash or a lost run hours later.

Memory: training in float32 with AdamW holds about 16 bytes per parameter (weights, gradients
and two moment estimates) before activations.  Disk: a checkpoint holds the weights and the
optimiser's two moments, about 12 bytes per parameter, written beside the previous one before
that is pruned.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from looplm.errors import LoopLMError

TRAINING_BYTES_PER_PARAMETER = 16
CHECKPOINT_BYTES_PER_PARAMETER = 12


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes (built on the meta device: no memory)."""
    from looplm.model.lm import LoopLM

    with torch.device("meta"):
        return LoopLM(config).num_parameters()


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (the machine's RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits(config, device: torch.device) -> int:
    """The parameter count, or one line when training it could not fit in ``device``'s memory."""
    count = parameter_count(config)
    memory = device_memory(device)
    needed = count * TRAINING_BYTES_PER_PARAMETER
    if memory is not None and needed > memory:
        raise LoopLMError(f"the model has {count:,} parameters: training it needs about {needed / 2**30:,.1f} GiB,"
                          f" and {device} has {memory / 2**30:,.1f} GiB; choose smaller model sizes")
    return count


def check_free_disk(directory: Path, parameters: int) -> None:
    """One line when ``directory``'s file system cannot hold another checkpoint of the run."""
    needed = parameters * CHECKPOINT_BYTES_PER_PARAMETER + 2**20
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise LoopLMError(f"{str(directory)!r} has {free / 2**20:,.1f} MiB free; a checkpoint of this run needs about"
                          f" {needed / 2**20:,.1f} MiB: free some disk space or choose another --out")
