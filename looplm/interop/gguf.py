"""GGUF export and import of looplm models: the model side of ``looplm.checkpoint.gguf``.

The file format (metadata keys, tensor names, f32/f16/q8_0 storage) is described there and in
docs/INTEROP.md; here a ``LoopLM`` is written from its config and state dict, and read back into
one (``looplm.load`` reads .gguf files the same way).
"""

from __future__ import annotations

from pathlib import Path

from looplm.checkpoint.gguf import (DTYPES, gguf_name, is_gguf_path, read_gguf, read_gguf_tokenizer, read_metadata,
                                    write_gguf)
from looplm.errors import LoopLMError
from looplm.model.loading import build_model, matrix_names


def export_gguf(model, path: str | Path, dtype: str = "f32", tokenizer=None, force: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) to a GGUF file; atomic, and an existing file is only
    replaced with ``force``.  ``dtype``: f32, f16 or q8_0."""
    from looplm.quant import is_quantized

    if is_quantized(model):
        raise LoopLMError("export the float32 model: an int8 (looplm.quant) model is for inference only;"
                          " use --dtype q8_0 for int8 weights in the file")
    return write_gguf(path, model.config, model.state_dict(), matrix_names(model), dtype, tokenizer, force)


def load_gguf(path: str | Path, int8: bool = False):
    """A LoopLM and its tokenizer (or None) from a GGUF file written by ``export_gguf``; with
    ``int8`` the Linear layers keep a Q8_0 file's exact int8 values and scales (Int8Linear)."""
    return build_model(read_gguf(path), int8=int8), read_gguf_tokenizer(path)


__all__ = ["DTYPES", "export_gguf", "gguf_name", "is_gguf_path", "load_gguf", "read_metadata"]
