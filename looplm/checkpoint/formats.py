"""Checkpoint formats by name: recognise a path's format and read it (configs and tensors only)."""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from looplm.checkpoint.directory import read_directory, read_directory_tokenizer
from looplm.checkpoint.stored import StoredModel
from looplm.device import resolve_device


@dataclass(frozen=True)
class Format:
    """A checkpoint format: ``matches(path)`` recognises it, ``read(path, device)`` gives the
    stored model, ``read_tokenizer(path)`` the tokenizer stored with it (or None)."""

    name: str
    matches: Callable[[Path], bool]
    read: Callable[..., StoredModel]
    read_tokenizer: Callable[[Path], object]


def _gguf_matches(path: Path) -> bool:
    from looplm.checkpoint.gguf import is_gguf_path

    return is_gguf_path(path)


def _read_gguf(path: Path, device="cpu") -> StoredModel:
    from looplm.checkpoint.gguf import read_gguf

    return read_gguf(path, device)


def _read_gguf_tokenizer(path: Path):
    from looplm.checkpoint.gguf import read_gguf_tokenizer

    return read_gguf_tokenizer(path)


# Tried in order; the directory format is the fallback (it says what is missing).
FORMATS: dict[str, Format] = {
    "gguf": Format("gguf", _gguf_matches, _read_gguf, _read_gguf_tokenizer),
    "directory": Format("directory", lambda path: True, read_directory, read_directory_tokenizer),
}


def format_of(path: str | Path) -> Format:
    """The format of a checkpoint path (a .gguf file, else a checkpoint or run directory)."""
    return next(fmt for fmt in FORMATS.values() if fmt.matches(Path(path)))


def read_model(path: str | Path, device="cpu") -> StoredModel:
    """The config and tensors stored at ``path``, whatever its format."""
    return format_of(path).read(Path(path), resolve_device(device, instead="load on the cpu"))


def read_tokenizer(path: str | Path):
    """The tokenizer stored with a checkpoint (or inside a .gguf file), or None."""
    return format_of(path).read_tokenizer(Path(path))
