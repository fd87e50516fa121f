"""The training state saved beside a checkpoint (``train_state.pt``) for an exact resume.

It holds the optimiser and scheduler state, the step counters, the recent losses of the spike
guard, and every random generator's state (the data stream's, torch's, Python's, NumPy's, and
CUDA's).  Everything is tensors, numbers, strings, lists and dicts, so it is read with
``torch.load(weights_only=True)``: a crafted file cannot run code.  Files written before NumPy's
state was stored as a list hold a NumPy array; only the NumPy constructors of plain arrays are
admitted for those.  A file that lacks a field or has one of the wrong type is one line.
"""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from looplm.errors import LoopLMError, is_number

# field → the types it may hold
FIELDS = {"step": (int,), "skipped_steps": (int,), "spike_skips": (int,), "recent_losses": (list,),
          "optimizer": (dict,), "scheduler": (dict,), "data_generator": (torch.Tensor,), "torch_rng": (torch.Tensor,),
          "python_rng": (tuple, list), "numpy_rng": (tuple, list), "cuda_rng": (list, type(None))}


def train_state(trainer, optimizer_state: dict) -> dict:
    """What ``read_train_state`` restores: see the module docstring."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"step": trainer.step, "skipped_steps": trainer.skipped_steps, "spike_skips": trainer.spike_skips,
            "recent_losses": list(trainer.recent_losses),
            "optimizer": optimizer_state, "scheduler": trainer.scheduler.state_dict(),
            "data_generator": trainer.data_generator.get_state(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "numpy_rng": [name, keys.tolist(), int(position), int(has_gauss), float(gauss)],
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _numpy_array_globals() -> list:
    """The constructors a pickled plain NumPy array needs (older train_state.pt files)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_train_state(path: Path, device) -> dict:
    """The state in ``path``, checked field by field (one line for a missing, damaged or crafted file)."""
    if not path.is_file():
        raise LoopLMError(f"missing {path.name} in {str(path.parent)!r}: cannot resume from it")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            # a foreign pickle's protocol warning would print a second line before the refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).splitlines()[0][:160]
        raise LoopLMError(f"{str(path)!r} holds something other than training state ({detail}); it was not"
                          " loaded: resume from a checkpoint looplm wrote") from None
    except Exception as error:  # torch.load raises several types for a damaged file
        raise LoopLMError(f"{str(path)!r} is corrupt ({type(error).__name__}):"
                          " resume from an older checkpoint") from None
    if not isinstance(state, dict):
        raise LoopLMError(f"{str(path)!r} does not hold a training state mapping:"
                          " resume from a checkpoint looplm wrote")
    for field, types in FIELDS.items():
        if field not in state:
            raise LoopLMError(f"{str(path)!r} lacks {field!r}: it is damaged; resume from an older checkpoint")
        if not isinstance(state[field], types) or isinstance(state[field], bool):
            raise LoopLMError(f"{str(path)!r}: {field!r} is {type(state[field]).__name__}, not"
                              f" {' or '.join(t.__name__ for t in types)}: it is damaged;"
                              " resume from an older checkpoint")
    counts = [field for field in ("step", "skipped_steps", "spike_skips") if state[field] < 0]
    losses = [loss for loss in state["recent_losses"] if not is_number(loss)]
    if counts or losses:
        problem = f"{counts[0]!r} is negative" if counts else "'recent_losses' holds non-numbers"
        raise LoopLMError(f"{str(path)!r}: {problem}: it is damaged; resume from an older checkpoint")
    try:
        name, keys, position, has_gauss, gauss = state["numpy_rng"]
        state["numpy_rng"] = (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss)
        version, internal, gauss_next = state["python_rng"]
        state["python_rng"] = (version, tuple(internal), gauss_next)
    except (ValueError, TypeError, OverflowError):
        raise LoopLMError(f"{str(path)!r}: its random generator states are damaged; resume from an older"
                          " checkpoint") from None
    return state


def restore_generators(state: dict, data_generator: torch.Generator, path: Path) -> None:
    """Set the data stream's, torch's, Python's and NumPy's generators from ``state`` (one line,
    not a generator's own error, for a state of the wrong size or type)."""
    try:
        data_generator.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
    except (RuntimeError, ValueError, TypeError, OverflowError) as error:
        raise LoopLMError(f"{str(path)!r}: its random generator states are damaged ({type(error).__name__}); resume"
                          " from an older checkpoint") from None
