"""looplm: looped (recurrent-depth) language models — train, decode with early exit, evaluate depth."""

from __future__ import annotations

from pathlib import Path

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset
from looplm.errors import LoopLMError
from looplm.file_names import TOKENIZER_FILE
from looplm.generate import FixedSteps, QExit, Sampling, generate, stream
from looplm.model import LoopLM, LoopOutput

__version__ = "0.1.0"


def train(run: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None):
    """Train the model described by ``run`` into ``out_dir`` (``looplm.training.trainer.Trainer``);
    returns a ``TrainResult``.  ``stop_after``: stop after this many optimiser steps in total."""
    from looplm.training.trainer import Trainer

    return Trainer(run, out_dir, resume=resume, progress=progress).train(stop_after=stop_after)


def load(path: str | Path, device: str = "cpu") -> LoopLM:
    """Load a model from a checkpoint directory, a run directory (its newest checkpoint) or a
    .gguf file written by ``looplm export gguf``."""
    from looplm.model.loading import load_model

    return load_model(path, device)


def load_tokenizer(path: str | Path):
    """"byte", a tokenizer.json, or the tokenizer saved with a checkpoint / run directory."""
    from looplm.data.tokenizer import load_tokenizer as load_spec
    from looplm.model.loading import load_checkpoint_tokenizer

    if str(path).lower().endswith(".gguf"):
        tokenizer = load_checkpoint_tokenizer(path)
        if tokenizer is None:
            raise LoopLMError(f"no tokenizer saved in {str(path)!r}")
        return tokenizer
    if str(path) != "byte" and Path(path).is_dir() and not (Path(path) / TOKENIZER_FILE).is_file():
        tokenizer = load_checkpoint_tokenizer(path)
        if tokenizer is None:
            raise LoopLMError(f"no {TOKENIZER_FILE} saved with {str(path)!r}")
        return tokenizer
    return load_spec(str(path))


__all__ = ["DataConfig", "FixedSteps", "LoopLM", "LoopLMError", "LoopOutput", "ModelConfig", "QExit",
           "RunConfig", "Sampling", "TrainConfig", "generate", "load", "load_tokenizer", "preset", "stream",
           "train"]
