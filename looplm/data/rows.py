"""Rows of tabular inputs (JSON lines, parquet files, ``datasets`` datasets): the text field of a
row, and the optional libraries that read parquet and datasets (the extra ``data``)."""

from __future__ import annotations

import importlib

from looplm.errors import LoopLMError


def require_text(value: object, where: str, field: str) -> str:
    """``value`` if it is a string, else one line naming ``where`` (e.g. "line 3 of 'a.jsonl'")."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise LoopLMError(f"{where}: field {field!r} is {kind}, not a string: store the document text as a string")
    return value


def import_data_extra(module: str, purpose: str):
    """``module`` of the optional ``data`` extra (datasets, pyarrow), or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoopLMError(f"{purpose} needs {module.split('.')[0]}: pip install 'looplm[data]'") from None
