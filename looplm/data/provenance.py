"""What prepared shards were made from, so that they are reused only for the same request.

A *request* to prepare shards names three things (``request_record``):

- ``source``: every input in order (``looplm.data.documents``).  A local file is recorded
  with its resolved path, size, mtime and the SHA-256 of its bytes; an ``hf:`` dataset with
  its name, config, split, the fingerprint ``datasets`` keeps for it and the paths, sizes and
  mtimes of its Arrow cache files (``looplm.data.hub.hub_record``); and the text field read.
- ``tokenizer``: ``byte``; ``bpe`` with the vocabulary size asked for (trained on the same
  text, and training is deterministic, so the same source gives the same tokenizer); or a
  tokenizer file, by the digest of its canonical JSON (``tokenizer_digest``).
- ``options``: ``val_fraction`` and the ``seed`` of the document split.

Its ``fingerprint`` is the SHA-256 of the canonical JSON of all that, except a local file's
mtime: touching a file does not force tokenizing again, changing one byte of it does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from looplm.data.documents import expand_inputs
from looplm.data.hub import HubSpec, hub_record
from looplm.data.tokenizer import Tokenizer, load_tokenizer

HASH_CHUNK_BYTES = 1 << 20
BUILT_IN_TOKENIZERS = ("byte", "bpe")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON (the same before and after a save and load)."""
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def source_record(inputs, text_field: str) -> dict[str, Any]:
    """The ``source`` part of a request: each input's record and the text field."""
    records = [hub_record(item) if isinstance(item, HubSpec) else _file_record(item)
               for item in expand_inputs(inputs)]
    return {"inputs": records, "text_field": text_field}


def tokenizer_request(spec: str, bpe_vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer`` part of a request, for ``spec`` = "byte", "bpe" or a tokenizer.json path."""
    if spec == "byte":
        return {"spec": "byte"}
    if spec == "bpe":
        return {"spec": "bpe", "bpe_vocab_size": bpe_vocab_size}
    return {"spec": "file", "path": str(Path(spec).resolve()), "sha256": tokenizer_digest(load_tokenizer(spec))}


def request_record(inputs, text_field: str, tokenizer: str, bpe_vocab_size: int, val_fraction: float,
                   seed: int) -> dict[str, Any]:
    """Everything a request names, with its ``fingerprint``."""
    record = {"source": source_record(inputs, text_field),
              "tokenizer": tokenizer_request(tokenizer, bpe_vocab_size),
              "options": {"val_fraction": val_fraction, "seed": seed}}
    record["fingerprint"] = fingerprint(record)
    return record


def fingerprint(record: dict[str, Any]) -> str:
    """SHA-256 of the parts of ``record`` that decide the shards' contents (module docstring)."""
    identity = {"source": {"inputs": [_identity(entry) for entry in record["source"]["inputs"]],
                           "text_field": record["source"]["text_field"]},
                "tokenizer": {key: value for key, value in record["tokenizer"].items() if key != "path"},
                "options": record["options"]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    status = path.stat()
    return {"kind": "file", "path": str(path.resolve()), "bytes": status.st_size, "mtime_ns": status.st_mtime_ns,
            "sha256": file_digest(path)}


def _identity(entry: dict[str, Any]) -> dict[str, Any]:
    """What of one input's record must match for reuse: all of it but a hashed file's mtime."""
    if entry.get("kind") == "file":
        return {key: value for key, value in entry.items() if key != "mtime_ns"}
    return entry

