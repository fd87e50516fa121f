"""Weights as Hugging Face safetensors files: one ``model.safetensors`` or several shards.

Single file: ``model.safetensors``.  Sharded (Hugging Face layout): ``model-00001-of-00003.safetensors``
… plus ``model.safetensors.index.json`` = ``{"metadata": {"total_size": BYTES}, "weight_map":
{tensor name: shard file}}``.  ``read_tensors`` accepts either; ``write_tensors`` shards when
given a maximum shard size (a tensor larger than the limit gets a shard of its own).
Sizes parse like Hugging Face's: ``"2GB"`` = 2·10⁹ bytes, ``"2GiB"`` = 2·2³⁰, a bare number
is bytes.  Every malformed file raises a one-line ``LoopLMError``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from looplm.checkpoint.atomic import save_safetensors
from looplm.errors import JSON_ERRORS, LoopLMError, check_readable
from looplm.file_names import WEIGHTS_FILE

INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' → 2_000_000_000, '512KiB' → 524288, '1000' → 1000 (bytes, > 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise LoopLMError(f"shard size {text!r} is not a size: write e.g. 2GB, 500MB or 4GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    check_readable(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise LoopLMError(f"{str(path)!r} is corrupt or truncated ({str(error).splitlines()[0]})") from None


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a missing or unparsable file raises one line naming ``what``."""
    if not path.is_file():
        raise LoopLMError(f"missing {path.name} in {str(path.parent)!r}: not {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except JSON_ERRORS as error:
        raise LoopLMError(f"{str(path)!r} is not valid JSON ({error.__class__.__name__}):"
                          " the file is corrupt") from None
    if not isinstance(data, dict):
        raise LoopLMError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``directory``'s weights, from ``model.safetensors`` or the sharded index."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        if not (directory / WEIGHTS_FILE).is_file():
            raise LoopLMError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {str(directory)!r}: the weights are missing")
        return _load_one(directory / WEIGHTS_FILE)
    weight_map = read_json(index_path, "a sharded checkpoint").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise LoopLMError(f"{str(index_path)!r} has no weight_map of tensor name → shard file: the index is corrupt")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise LoopLMError(f"{str(index_path)!r} names shard {shard!r} outside the directory")
        if not (directory / shard).is_file():
            raise LoopLMError(f"shard {shard} listed in {INDEX_FILE} is missing from {str(directory)!r}")
        for name, tensor in _load_one(directory / shard).items():
            if weight_map.get(name) != shard:
                raise LoopLMError(f"{shard} holds {name}, which {INDEX_FILE} does not map to it: the index is stale")
            tensors[name] = tensor
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise LoopLMError(f"{INDEX_FILE} lists {absent[0]}, but its shard {weight_map[absent[0]]} does not hold it")
    return tensors


def write_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None) -> list[str]:
    """Write ``tensors`` into ``directory`` (one file, or shards of at most ``max_shard_bytes``
    each plus the index); returns the file names written.  Tensors keep their order."""
    directory = Path(directory)
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes < 1):
        raise LoopLMError(f"max_shard_bytes must be a number of bytes >= 1 (None: one file), got {max_shard_bytes!r}")
    tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + _tensor_bytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += _tensor_bytes(tensor)
    if len(shards) == 1:
        save_safetensors(shards[0], directory / WEIGHTS_FILE, metadata={"format": "pt"})
        return [WEIGHTS_FILE]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        save_safetensors(shard, directory / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(_tensor_bytes(t) for t in tensors.values())},
             "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]
