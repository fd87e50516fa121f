"""Tokenizing documents into shard directories that remember where they came from.

``prepare_corpus`` is ``looplm prepare``: documents in, one shard directory out, with the
request it answered (``looplm.data.provenance``) in its ``meta.json``.

``prepared_shards`` is what ``looplm train --data`` and ``looplm eval --data`` use for raw
inputs: it keeps prepared directories under a root, one per request, named by the first 16
hex digits of the request's fingerprint, and reuses one only when the fingerprint recorded in
it equals the request's in full.  Other inputs, another tokenizer or other options give
another fingerprint and so a fresh directory: nothing left by an earlier (or failed) run with
other data can be picked up.  Shards are written atomically, so a directory is either
complete or absent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from looplm.data.documents import read_documents
from looplm.data.hub import HubSpec
from looplm.data.provenance import request_record, tokenizer_digest
from looplm.data.shards import read_meta, write_shards
from looplm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from looplm.errors import LoopLMError

FINGERPRINT_DIGITS = 16


def prepare_corpus(inputs, out_dir: str | Path, tokenizer: str = "byte", bpe_vocab_size: int = 4096,
                   val_fraction: float = 0.05, seed: int = 0, text_field: str = "text",
                   overwrite: bool = False) -> dict[str, Any]:
    """Tokenize ``inputs`` (files, directories, ``hf:`` names) into the shard directory ``out_dir``.

    ``tokenizer`` is "byte", "bpe" (trained here on the inputs, ``bpe_vocab_size``), "word",
    "char" or "auto" (fitted to the inputs, ``looplm.data.word_char``) or a tokenizer.json path.
    ``out_dir`` must be new or empty unless ``overwrite``; it may neither
    be nor hold nor lie inside an input.  Returns the meta dict written.
    """
    _check_apart(inputs, Path(out_dir))
    request = request_record(inputs, text_field, tokenizer, bpe_vocab_size, val_fraction, seed)
    return _write(inputs, Path(out_dir), request, overwrite)


def prepared_shards(inputs, root: str | Path, tokenizer: str = "byte", bpe_vocab_size: int = 4096,
                    val_fraction: float = 0.05, seed: int = 0, text_field: str = "text") -> Path:
    """The shard directory under ``root`` made for exactly this request, tokenized now if there is none."""
    request = request_record(inputs, text_field, tokenizer, bpe_vocab_size, val_fraction, seed)
    directory = Path(root) / request["fingerprint"][:FINGERPRINT_DIGITS]
    if recorded_fingerprint(directory) == request["fingerprint"]:
        return directory
    # Under root every directory is looplm's own, so one that does not match in full (damaged,
    # or sharing the 16-digit prefix) is replaced.
    _write(inputs, directory, request, overwrite=directory.exists())
    return directory


def recorded_fingerprint(directory: Path) -> str | None:
    """The request fingerprint stored in a shard directory, or None (absent, damaged, or older)."""
    try:
        provenance = read_meta(directory).get("provenance")
    except LoopLMError:
        return None
    return provenance.get("fingerprint") if isinstance(provenance, dict) else None


def check_tokenizer(shard_dir: Path, expected: Tokenizer, expected_name: str, other_fix: str = "") -> None:
    """Refuse, in one line, shards whose ids come from another tokenizer than ``expected``
    (``other_fix``: one more way out, appended to the message)."""
    found = Tokenizer.from_file(shard_dir)
    if tokenizer_digest(found) != tokenizer_digest(expected):
        raise LoopLMError(
            f"'{shard_dir}' was tokenized with another tokenizer ({found.kind}, vocab {found.vocab_size}) than"
            f" {expected_name} ({expected.kind}, vocab {expected.vocab_size}): give the raw text instead, or"
            f" prepare it with --tokenizer {expected_name}{other_fix}")


def _write(inputs, out_dir: Path, request: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    spec = request["tokenizer"]["spec"]
    text_field = request["source"]["text_field"]
    tokenizer = build_tokenizer(request["tokenizer"]["path"] if spec == "file" else spec,
                                lambda: read_documents(inputs, text_field),
                                request["tokenizer"].get("bpe_vocab_size", 0))
    options = request["options"]
    return write_shards(read_documents(inputs, text_field), tokenizer, out_dir, val_fraction=options["val_fraction"],
                        seed=options["seed"], overwrite=overwrite, provenance=request)


def build_tokenizer(spec: str, documents: Callable[[], Iterable[str]], bpe_vocab_size: int = 4096) -> Tokenizer:
    """The tokenizer ``spec`` names: "byte", "bpe" (trained on ``documents()``, ``bpe_vocab_size``),
    "word", "char" or "auto" (fitted to ``documents()``: ``looplm.data.word_char``), or a
    tokenizer.json path.  ``documents`` is called only when the corpus is needed."""
    from looplm.data.word_char import KINDS, fit_tokenizer

    if spec == "bpe":
        return train_bpe(documents(), bpe_vocab_size)
    if spec in KINDS:
        return fit_tokenizer(spec, documents())[0]
    return load_tokenizer(spec)


def _check_apart(inputs, out_dir: Path) -> None:
    """The output must not be, hold or lie inside an input: replacing it could delete the input."""
    output = out_dir.resolve()
    for raw in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        if HubSpec.names(raw):
            continue
        source = Path(raw).resolve()
        if output == source or output in source.parents or source in output.parents:
            raise LoopLMError(f"--out '{out_dir}' overlaps the input '{raw}': write the shards to a directory"
                              " outside the inputs")
