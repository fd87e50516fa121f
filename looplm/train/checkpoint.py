"""Checkpoints: a directory with ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

Training checkpoints add ``run_config.json`` and ``train_state.pt`` (optimiser, scheduler,
step, RNG and data-stream state) so ``--resume`` continues bit-exactly.  Every directory is
written into a temporary sibling and renamed into place, so a crash mid-write never leaves a
half checkpoint and never touches an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from looplm.config import model_config_from_json
from looplm.errors import LoopLMError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
RUN_CONFIG_FILE = "run_config.json"
CHECKPOINT_FORMAT = "looplm"
CHECKPOINT_VERSION = 1


def model_state(model) -> dict[str, torch.Tensor]:
    """Weights to save: a tied head shares the embedding, so it is stored once."""
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}


def write_model_files(model, directory: Path, tokenizer=None, weights: dict | None = None) -> None:
    """Write config.json, model.safetensors and tokenizer.json into an existing directory
    (``weights``: the full state dict when the model holds only shards, as under FSDP)."""
    config = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **asdict(model.config)}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(model_state(model) if weights is None else weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)


def atomic_directory(target: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then rename tmp_dir to ``target`` (replacing an old one last)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        write(staging)
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_model(model, directory: str | Path, tokenizer=None) -> Path:
    """Save a model (and tokenizer) as a loadable directory, atomically."""
    return atomic_directory(Path(directory), lambda tmp: write_model_files(model, tmp, tokenizer))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose newest checkpoint is used."""
    path = Path(path)
    if not path.exists():
        raise LoopLMError(f"checkpoint {str(path)!r} not found: give a directory written by looplm")
    if (path / CONFIG_FILE).is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    steps = [s for s in steps if (s / CONFIG_FILE).is_file()]
    if not steps:
        raise LoopLMError(f"{str(path)!r} holds no config.json and no checkpoints/: not a looplm checkpoint")
    return steps[-1]


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a LoopLM from a checkpoint directory (or a .gguf file written by ``looplm export
    gguf``); one-line errors for every broken file."""
    from looplm.interop.gguf import is_gguf_path, load_gguf
    from looplm.model.lm import LoopLM

    if is_gguf_path(path):
        return load_gguf(path)[0].to(device)
    directory = resolve_checkpoint(path)
    config = model_config_from_json(directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise LoopLMError(f"missing {WEIGHTS_FILE} in {str(directory)!r}: the checkpoint is incomplete")
    try:
        weights = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise LoopLMError(f"{str(weights_path)!r} is corrupt or truncated ({str(error).splitlines()[0]})") from None
    with torch.device("meta"):
        model = LoopLM(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise LoopLMError(f"{str(weights_path)!r} does not match its config.json ({detail})")
    for name, tensor in weights.items():
        wanted = model.state_dict()[name].shape
        if tensor.shape != wanted:
            raise LoopLMError(f"{str(weights_path)!r}: {name} has shape {tuple(tensor.shape)}, config says {tuple(wanted)}")
    model.load_state_dict(weights, assign=True)
    model.rebuild_derived_buffers(device)
    return model.eval()


def load_checkpoint_tokenizer(path: str | Path):
    """The tokenizer saved beside a checkpoint (or inside a .gguf file), or None."""
    from looplm.data.tokenizer import Tokenizer
    from looplm.interop.gguf import is_gguf_path, load_gguf_tokenizer

    if is_gguf_path(path):
        return load_gguf_tokenizer(path)
    directory = resolve_checkpoint(path)
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(directory)
    return None
