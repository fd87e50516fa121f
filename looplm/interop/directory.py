"""What every converter does with directories: refuse to overwrite, copy tokenizer files.

A converter reads SRC whole, then writes DST atomically (``atomic_directory``: a temporary
sibling renamed into place).  DST must not exist, or be an empty directory, unless the
caller passes ``force`` — an existing checkpoint is never replaced silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from looplm.checkpoint.atomic import refuse_overlap
from looplm.checkpoint.directory import HF_TOKENIZER_FILES
from looplm.errors import LoopLMError, one_line
from looplm.file_names import TOKENIZER_FILE


def check_source(source: str | Path) -> Path:
    """SRC as a Path; it must be a directory."""
    source = Path(source)
    if not source.is_dir():
        raise LoopLMError(f"{str(source)!r} is not a directory: give the checkpoint directory to convert")
    return source


def check_destination(source: Path, destination: str | Path, force: bool) -> Path:
    """DST as a Path, refused when it holds something (unless ``force``), or is, holds or lies
    inside SRC (replacing it would delete the source)."""
    destination = Path(destination)
    refuse_overlap(destination, [source], "--force" if force else "")
    occupied = destination.exists() and (not destination.is_dir() or any(destination.iterdir()))
    if occupied and not force:
        raise LoopLMError(f"{str(destination)!r} already exists: choose a new DST or pass --force to replace it")
    return destination


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files present in ``source`` into ``destination``; returns their names."""
    copied = [name for name in HF_TOKENIZER_FILES if (Path(source) / name).is_file()]  # copied through unchanged
    for name in copied:
        shutil.copyfile(Path(source) / name, Path(destination) / name)
    if TOKENIZER_FILE in copied:  # one looplm cannot read would fail only later, at generate
        from looplm.data.tokenizer import Tokenizer

        try:
            Tokenizer.from_file(Path(destination))
        except Exception as error:  # noqa: BLE001 - whatever the tokenizers library says of it
            raise LoopLMError(f"{str(Path(source) / TOKENIZER_FILE)!r} is not a tokenizer looplm can read"
                              f" ({one_line(error)[:200]}): fix it, or convert without it") from None
    return copied
