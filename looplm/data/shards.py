"""Token shards: a tokenized corpus on disk, read back as numpy memmaps.

A shard directory holds:

- ``train.bin``, ``val.bin``: raw little-endian token ids, ``uint16`` when
  ``vocab_size <= 65536`` else ``uint32``; every document is followed by ``eos_id``.
- ``meta.json``: ``{"format": "looplm-shards", "version": 1, "dtype", "vocab_size",
  "train_tokens", "val_tokens", "tokenizer": kind, "tokenizer_sha256", "provenance",
  "corpus_bytes"}``; ``tokenizer_sha256`` (``looplm.data.provenance.tokenizer_digest``),
  ``provenance`` (where the text came from and with which options, ``looplm.data.prepare``) and
  ``corpus_bytes`` (the documents' UTF-8 size, which ``model.auto_size`` reads) are absent from
  directories written before they existed, which still load.
- ``tokenizer.json``: the tokenizer that produced the ids.

Raw documents are read by ``looplm.data.documents`` (``read_documents`` is re-exported here).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from looplm.checkpoint.atomic import atomic_directory, check_replaceable
from looplm.data.documents import read_documents  # noqa: F401  (its home before looplm.data.documents)
from looplm.data.provenance import tokenizer_digest
from looplm.data.tokenizer import Tokenizer
from looplm.errors import JSON_ERRORS, LoopLMError, is_int, is_number
from looplm.file_names import META_FILE, TOKENIZER_FILE

SHARD_FORMAT = "looplm-shards"
SHARD_VERSION = 1
SPLITS = ("train", "val")
# what a shard directory holds (``overwrite`` replaces a directory holding nothing else)
SHARD_FILES = frozenset({*(f"{split}.bin" for split in SPLITS), META_FILE, TOKENIZER_FILE, "stream.bin"})
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Below this many documents a per-document split is too coarse (one document could be
# half the corpus), so the tail of the token stream becomes the validation split instead.
DOCUMENT_SPLIT_MIN_DOCUMENTS = 20
PROGRESS_MIN_CHARACTERS = 4_000_000
ENCODE_BATCH_CHARACTERS = 1_000_000
ENCODE_BATCH_DOCUMENTS = 1024

PathLike = str | os.PathLike


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian ``uint16`` when every id fits in 16 bits, else ``uint32``."""
    return DTYPES["uint16"] if vocab_size <= 2**16 else DTYPES["uint32"]


def write_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: PathLike,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize ``documents`` into a shard directory (format in the module docstring).

    Split: with at least 20 documents, ``round(val_fraction * documents)`` whole documents
    (at least one, chosen by a generator seeded with ``seed``) go to val, keeping corpus
    order within each split; with fewer, the last ``val_fraction`` of the token stream
    does.  Train always gets at least 2 tokens and val at least 1.

    Everything is written into a temporary directory beside ``out_dir`` and renamed into
    place, so ``out_dir`` is either untouched or complete.  An existing non-empty
    ``out_dir`` is refused unless ``overwrite``, which replaces its whole contents.
    ``provenance`` (JSON-ready) is stored in ``meta.json`` as it is.  Returns the meta dict
    written to ``meta.json``.
    """
    out_dir = Path(out_dir)
    _check_val_fraction(val_fraction)
    _check_destination(out_dir, overwrite)
    written = {}
    atomic_directory(out_dir, lambda staging: written.update(_write_into(staging, documents, tokenizer, val_fraction,
                                                                         seed, provenance)),
                     replaceable=SHARD_FILES.__contains__)
    return written


def read_meta(directory: PathLike) -> dict[str, Any]:
    """The validated ``meta.json`` of a shard directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LoopLMError(f"shard directory '{directory}' does not exist: write shards there first or fix the path")
    path = directory / META_FILE
    if not path.is_file():
        raise LoopLMError(f"'{directory}' has no meta.json: point at a directory written by write_shards")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except JSON_ERRORS as error:
        raise LoopLMError(f"'{path}' is not valid JSON ({_one_line(error)}): write the shards again") from None
    _check_meta(meta, path)
    return meta


class TokenShards:
    """One split of a shard directory, memory-mapped read-only.

    Attributes:
        directory, split: where it came from.
        tokens: 1-D ``np.memmap`` of token ids (dtype from meta.json).
        vocab_size: from meta.json.
        meta: the whole validated meta.json.
    """

    def __init__(self, directory: PathLike, split: str = "train") -> None:
        if split not in SPLITS:
            raise LoopLMError(f"unknown split {split!r}: use 'train' or 'val'")
        self.directory = Path(directory)
        self.split = split
        self.meta = read_meta(self.directory)
        self.vocab_size: int = self.meta["vocab_size"]
        self.tokens: np.memmap = _open_split(self.directory, split, self.meta)
        # One pass over the ids (fast next to training on them): an id outside the vocabulary
        # would index past the embedding, a crash deep inside the model or silent garbage on GPU.
        largest = int(self.tokens.max())
        if largest >= self.vocab_size:
            raise LoopLMError(f"shard file '{self.directory / f'{split}.bin'}' holds token id {largest}, outside the"
                              f" vocabulary of {self.vocab_size} that meta.json gives: the shards are damaged;"
                              " write them again")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return f"TokenShards('{self.directory}', split={self.split!r}, tokens={len(self)})"

    def random_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows starting uniformly at random, as int64 (x, y), each [B, S].

        ``y[:, t]`` is the token after ``x[:, t]``.  Only ``generator`` (a CPU
        ``torch.Generator``) drives the draw, so saving ``generator.get_state()`` and
        restoring it later reproduces the same next batch.
        """
        self._check_window(batch_size, seq_len)
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator)
        windows = np.stack([self.tokens[start : start + seq_len + 1] for start in starts.tolist()])
        return _inputs_and_targets(windows)

    def sequential_batches(self, batch_size: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in corpus order, as int64 (x, y) batches, each [B, S].

        Window k is ``x = tokens[k*S : (k+1)*S]`` with ``y`` one token later.  Every batch
        has ``batch_size`` rows except perhaps the last, which holds the windows left over;
        tokens after the last whole window are dropped.
        """
        self._check_window(batch_size, seq_len)
        return self._sequential_batches(batch_size, seq_len)

    def _sequential_batches(self, batch_size: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        windows = (len(self) - 1) // seq_len
        for first in range(0, windows, batch_size):
            rows = min(batch_size, windows - first)
            chunk = np.asarray(self.tokens[first * seq_len : (first + rows) * seq_len + 1], dtype=np.int64)
            x = torch.from_numpy(chunk[:-1].reshape(rows, seq_len).copy())
            y = torch.from_numpy(chunk[1:].reshape(rows, seq_len).copy())
            yield x, y

    def _check_window(self, batch_size: int, seq_len: int) -> None:
        _check_positive_int(batch_size, "batch_size")
        _check_positive_int(seq_len, "seq_len")
        if len(self) < seq_len + 1:
            fix = f"use seq_len <= {len(self) - 1} or give more text" if len(self) > 1 else "give more text"
            raise LoopLMError(
                f"the {self.split} split in '{self.directory}' has {len(self)} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}: {fix}"
            )


def _check_val_fraction(val_fraction: float) -> None:
    if not is_number(val_fraction) or not 0 < val_fraction < 1:
        raise LoopLMError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")


def _check_positive_int(value: int, name: str) -> None:
    if not is_int(value) or value < 1:
        raise LoopLMError(f"{name} must be a positive integer, got {value!r}")


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, a non-empty directory unless ``overwrite``, and one
    holding anything but shard files even then (before any tokenizing)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LoopLMError(f"output path '{out_dir}' is a file, not a directory: choose another output directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LoopLMError(
            f"output directory '{out_dir}' is not empty: choose a new directory, or replace its contents"
            " (--overwrite on the command line, overwrite=True in Python)"
        )
    check_replaceable(out_dir, SHARD_FILES.__contains__)


def _write_into(
    staging: Path, documents: Iterable[str], tokenizer: Tokenizer, val_fraction: float, seed: int,
    provenance: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write all shard files into ``staging``; return the meta dict."""
    dtype = token_dtype(tokenizer.vocab_size)
    stream_path = staging / "stream.bin"
    lengths, corpus_bytes = _tokenize_to_file(documents, tokenizer, dtype, stream_path)
    spans = _split_spans(lengths, val_fraction, seed)
    stream = np.memmap(stream_path, dtype=dtype, mode="r")
    counts = {split: _copy_spans(stream, spans[split], staging / f"{split}.bin") for split in SPLITS}
    del stream
    stream_path.unlink()
    meta = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "tokenizer": tokenizer.kind,
        "tokenizer_sha256": tokenizer_digest(tokenizer),
        "corpus_bytes": corpus_bytes,
    }
    if provenance is not None:
        meta["provenance"] = provenance
    tokenizer.save(staging)
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _tokenize_to_file(documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype,
                      path: Path) -> tuple[np.ndarray, int]:
    """Append every document's ids and an eos to ``path``; return each document's length (eos
    included) and the documents' UTF-8 bytes."""
    lengths: list[int] = []
    corpus_bytes = 0
    progress = _Progress()
    try:
        with open(path, "wb") as out:
            for batch in _batches(documents):
                stream: list[int] = []
                for ids in tokenizer.encode_batch(batch):
                    stream.extend(ids)
                    stream.append(tokenizer.eos_id)
                    lengths.append(len(ids) + 1)
                np.asarray(stream, dtype=dtype).tofile(out)
                progress.advance(sum(len(text) for text in batch))
                corpus_bytes += sum(len(text.encode("utf-8", errors="replace")) for text in batch)
    finally:
        progress.close()
    return np.asarray(lengths, dtype=np.int64), corpus_bytes


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """Group documents so the tokenizer sees enough text per call to run in parallel."""
    batch: list[str] = []
    characters = 0
    for index, text in enumerate(documents):
        if not isinstance(text, str):
            raise LoopLMError(f"document {index} is a {type(text).__name__}, not a string: pass documents as text")
        batch.append(text)
        characters += len(text)
        if len(batch) >= ENCODE_BATCH_DOCUMENTS or characters >= ENCODE_BATCH_CHARACTERS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def _split_spans(lengths: np.ndarray, val_fraction: float, seed: int) -> dict[str, list[tuple[int, int]]]:
    """Token ranges [start, end) of the stream that go to each split."""
    if len(lengths) == 0:
        raise LoopLMError("no documents to write: give at least one document with text in it")
    total = int(lengths.sum())
    if len(lengths) >= DOCUMENT_SPLIT_MIN_DOCUMENTS:
        spans = _document_spans(lengths, val_fraction, seed)
    else:
        spans = _tail_spans(total, val_fraction)
    train_tokens = sum(end - start for start, end in spans["train"])
    if train_tokens < 2:
        raise LoopLMError(
            f"the training split would get only {train_tokens} token(s): give more text or a smaller val_fraction"
        )
    return spans


def _tail_spans(total: int, val_fraction: float) -> dict[str, list[tuple[int, int]]]:
    if total < 3:
        raise LoopLMError(
            f"the corpus has only {total} token(s): need at least 3 (2 to train on, 1 to validate); give more text"
        )
    val_tokens = min(max(1, round(total * val_fraction)), total - 2)
    return {"train": [(0, total - val_tokens)], "val": [(total - val_tokens, total)]}


def _document_spans(lengths: np.ndarray, val_fraction: float, seed: int) -> dict[str, list[tuple[int, int]]]:
    documents = len(lengths)
    val_documents = min(max(1, round(documents * val_fraction)), documents - 1)
    is_val = np.zeros(documents, dtype=bool)
    is_val[np.random.default_rng(seed).choice(documents, size=val_documents, replace=False)] = True
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # One span per run of neighbouring documents headed for the same split.
    boundaries = [0, *(np.flatnonzero(is_val[1:] != is_val[:-1]) + 1).tolist(), documents]
    spans: dict[str, list[tuple[int, int]]] = {split: [] for split in SPLITS}
    for first, last in zip(boundaries[:-1], boundaries[1:]):
        split = "val" if is_val[first] else "train"
        spans[split].append((int(offsets[first]), int(offsets[last])))
    return spans


def _copy_spans(stream: np.ndarray, spans: list[tuple[int, int]], path: Path) -> int:
    """Write ``stream[start:end]`` for each span to ``path``; return the token count."""
    with open(path, "wb") as out:
        for start, end in spans:
            stream[start:end].tofile(out)
        out.flush()
        os.fsync(out.fileno())
    return sum(end - start for start, end in spans)


def _check_meta(meta: Any, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise LoopLMError(f"'{path}' does not describe looplm shards: point at a directory written by write_shards")
    if meta.get("version") != SHARD_VERSION:
        raise LoopLMError(
            f"'{path}' has shard format version {meta.get('version')!r}, but this looplm reads version "
            f"{SHARD_VERSION}: write the shards again"
        )
    if meta.get("dtype") not in DTYPES:
        raise LoopLMError(f"'{path}' has dtype {meta.get('dtype')!r}, not uint16 or uint32: write the shards again")
    for key in ("vocab_size", "train_tokens", "val_tokens"):
        value = meta.get(key)
        if not is_int(value) or value < 0:
            raise LoopLMError(f"'{path}' has a bad {key!r} ({value!r}): write the shards again")
    wanted = token_dtype(meta["vocab_size"])
    if wanted != DTYPES[meta["dtype"]]:
        raise LoopLMError(
            f"'{path}' says dtype {meta['dtype']}, but vocab_size {meta['vocab_size']} calls for "
            f"{wanted.name}: write the shards again"
        )


def _open_split(directory: Path, split: str, meta: dict[str, Any]) -> np.memmap:
    path = directory / f"{split}.bin"
    if not path.is_file():
        raise LoopLMError(f"shard file '{path}' is missing: write the shards again")
    dtype = DTYPES[meta["dtype"]]
    expected = meta[f"{split}_tokens"]
    size = path.stat().st_size
    if size != expected * dtype.itemsize:
        raise LoopLMError(
            f"shard file '{path}' has {size} bytes but meta.json promises {expected} {dtype.name} tokens "
            f"({expected * dtype.itemsize} bytes): the shards are damaged; write them again"
        )
    if expected == 0:
        raise LoopLMError(f"shard file '{path}' holds no tokens: write the shards again from more text")
    return np.memmap(path, dtype=dtype, mode="r")


def _inputs_and_targets(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S+1] windows -> int64 inputs [B, S] and next-token targets [B, S]."""
    stacked = torch.from_numpy(windows.astype(np.int64))
    return stacked[:, :-1].contiguous(), stacked[:, 1:].contiguous()


class _Progress:
    """A tqdm bar of characters tokenized that appears only once the corpus passes a few MB."""

    def __init__(self) -> None:
        self.characters = 0
        self.bar: tqdm | None = None

    def advance(self, characters: int) -> None:
        self.characters += characters
        if self.bar is not None:
            self.bar.update(characters)
        elif self.characters >= PROGRESS_MIN_CHARACTERS:
            # disable=None hides the bar when stderr is not a terminal.
            self.bar = tqdm(desc="tokenizing", unit="char", unit_scale=True, initial=self.characters, disable=None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
