"""GGUF export and import of looplm models: the model side of ``looplm.checkpoint.gguf``.

The file format (metadata keys, tensor names, f32/f16/q8_0/ternary storage) is described there
and in docs/INTEROP.md; here a ``LoopLM`` is written from its config, state dict and ternary
layers' codes, and read back into one (``looplm.load`` reads .gguf files the same way; packed
ternary weights come back as ``looplm.ternary.TernaryLinear`` layers).
"""

from __future__ import annotations

from pathlib import Path

from looplm.checkpoint.gguf import (
    DTYPES,
    gguf_name,
    is_gguf_path,
    read_gguf,
    read_gguf_tokenizer,
    read_metadata,
    write_gguf,
)
from looplm.errors import LoopLMError
from looplm.model.loading import build_model, derived_tensors, matrix_names


def export_gguf(model, path: str | Path, dtype: str = "f32", tokenizer=None, force: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) to a GGUF file; atomic, and an existing file is only
    replaced with ``force``.  ``dtype``: f32, f16, q8_0 or ternary (a ternary model's codes)."""
    from looplm.model.bitlinear import BitLinear, ternary_codes
    from looplm.quant import is_quantized
    from looplm.ternary import is_packed

    if is_quantized(model) or is_packed(model):
        raise LoopLMError("export the trained float32 model: an int8 (looplm.quant) or packed ternary model is for"
                          " inference only; use --dtype q8_0 or --dtype ternary for packed weights in the file")
    ternary = {f"{name}.weight": ternary_codes(module.weight.detach().float().cpu())
               for name, module in model.named_modules() if isinstance(module, BitLinear)}
    weights = {**model.state_dict(), **derived_tensors(model)}
    return write_gguf(path, model.config, weights, matrix_names(model), dtype, tokenizer, force, ternary)


def load_gguf(path: str | Path, int8: bool = False):
    """A LoopLM and its tokenizer (or None) from a GGUF file written by ``export_gguf``; with
    ``int8`` the Linear layers keep a Q8_0 file's exact int8 values and scales (Int8Linear);
    packed ternary weights become ``TernaryLinear`` layers with their exact codes."""
    return build_model(read_gguf(path), int8=int8), read_gguf_tokenizer(path)


__all__ = ["DTYPES", "derived_tensors", "export_gguf", "gguf_name", "is_gguf_path", "load_gguf", "read_metadata"]
