"""Documents, as strings, from local files and Hugging Face datasets.

An *input* is one of:

- a ``.jsonl`` file: one document per non-blank line, the string under ``text_field``;
- a ``.parquet`` file: one document per row, the string column ``text_field`` (read with
  pyarrow, which the ``data`` extra installs);
- any other file (``.txt``, ``.md``, ``.csv`` and the rest): the whole file is one document,
  if it is UTF-8 text;
- a directory: its ``.txt``, ``.jsonl`` and ``.parquet`` files (not sub-directories), sorted
  by name;
- ``hf:NAME[:SPLIT]`` or ``hf:NAME:CONFIG:SPLIT``: a dataset loaded through the ``datasets``
  library (``looplm.data.hub``).

Files must be UTF-8 and hold more than whitespace; a leading byte-order mark is dropped.

A file named directly is refused, before anything is read, when its suffix says it is not text
to read whole (``refusal``): ``.json`` (one JSON value, not one document per line: convert it to
JSON Lines), compressed files and archives (``COMPRESSED_SUFFIXES``: decompress them first) and
known binary formats (``BINARY_SUFFIXES``: documents, spreadsheets, images, tensors, pickles).
Other suffixes are read as text, and a file that is not UTF-8 is refused when it is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from looplm.data.hub import HubSpec, hub_documents
from looplm.data.rows import import_data_extra, require_text
from looplm.errors import LoopLMError, one_line

DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".lzma", ".zst", ".zstd", ".lz4", ".br", ".zip", ".7z", ".rar",
                       ".tar")
BINARY_SUFFIXES = (".pdf", ".doc", ".docx", ".odt", ".rtf", ".epub", ".xls", ".xlsx", ".ods", ".png", ".jpg", ".jpeg",
                   ".gif", ".webp", ".bin", ".npy", ".npz", ".pt", ".pth", ".pkl", ".pickle", ".safetensors", ".gguf",
                   ".arrow", ".feather", ".h5", ".hdf5", ".sqlite", ".db")
PARQUET_BATCH_ROWS = 1024
UTF8_BOM = b"\xef\xbb\xbf"

PathLike = str | os.PathLike
Input = Path | HubSpec


def read_documents(inputs: PathLike | Sequence[PathLike], text_field: str = "text") -> Iterator[str]:
    """The documents of ``inputs`` (see the module docstring), in order.

    Paths and ``hf:`` names are checked now; contents as the iterator reaches them.
    """
    return _documents_in(expand_inputs(inputs), text_field)


def expand_inputs(inputs: PathLike | Sequence[PathLike]) -> list[Input]:
    """The files (directories expanded) and ``hf:`` datasets that ``inputs`` name; every path must exist."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    expanded: list[Input] = []
    for raw in inputs:
        if HubSpec.names(raw):
            expanded.append(HubSpec.parse(str(raw)))
            continue
        path = Path(raw)
        if path.is_dir():
            expanded.extend(_document_files_in(path))
        elif path.is_file():
            expanded.append(_readable_file(path))
        else:
            raise LoopLMError(f"data path '{path}' does not exist: check the path")
    if not expanded:
        raise LoopLMError("no data paths given: name at least one .txt, .jsonl or .parquet file, a directory of"
                          " them, or hf:NAME")
    return expanded


def refusal(path: Path) -> str | None:
    """Why ``path``, named as a data file, cannot be read (its suffix says JSON, compressed or
    binary), as the end of a one-line error; None for a file read as JSON Lines, parquet or text."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return ("is a JSON file, which looplm does not read: convert it to JSON Lines (.jsonl: one object per line,"
                " each with a text field), or rename it to .jsonl if it already holds one object per line")
    if suffix in COMPRESSED_SUFFIXES:
        return (f"is compressed ({suffix}): decompress it first and give the .txt, .jsonl or .parquet file(s) it"
                " holds")
    if suffix in BINARY_SUFFIXES:
        return (f"is a {suffix} file, not text: give .txt (or other UTF-8 text), .jsonl or .parquet files, or a"
                " directory written by 'looplm prepare'")
    return None


def _readable_file(path: Path) -> Path:
    """``path``, unless its suffix says it cannot be read as data (``refusal``): then a one-line error."""
    reason = refusal(path)
    if reason is not None:
        raise LoopLMError(f"data file '{path}' {reason}")
    return path


def _document_files_in(directory: Path) -> list[Path]:
    found = sorted(
        path for path in directory.iterdir() if path.is_file() and path.suffix.lower() in DOCUMENT_SUFFIXES
    )
    if not found:
        raise LoopLMError(f"directory '{directory}' has no .txt, .jsonl or .parquet files: add some or name the"
                          " files directly")
    return found


def _documents_in(inputs: list[Input], text_field: str) -> Iterator[str]:
    for item in inputs:
        if isinstance(item, HubSpec):
            yield from hub_documents(item, text_field)
        elif item.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(item, text_field)
        elif item.suffix.lower() == ".parquet":
            yield from _parquet_documents(item, text_field)
        else:
            yield _text_document(item)


def _text_document(file: Path) -> str:
    data = file.read_bytes()
    offset = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    text = _decode_utf8(data[offset:], file, offset)
    if not text.strip():
        raise LoopLMError(f"data file '{file}' is empty: give a file with text in it")
    return text


def _jsonl_documents(file: Path, field: str) -> Iterator[str]:
    """The ``field`` strings of a JSON-lines file, streamed line by line."""
    offset = 0
    found_any = False
    with open(file, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            skip = len(UTF8_BOM) if line_number == 1 and raw.startswith(UTF8_BOM) else 0
            line = _decode_utf8(raw[skip:], file, offset + skip)
            offset += len(raw)
            if line.strip():
                found_any = True
                yield _jsonl_text(line, file, line_number, field)
    if not found_any:
        raise LoopLMError(f"data file '{file}' is empty: give a file with JSON lines in it")


def _jsonl_text(line: str, file: Path, line_number: int, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise LoopLMError(
            f"line {line_number} of '{file}' is not valid JSON ({error.msg} at column {error.colno}): "
            "fix or remove that line"
        ) from None
    if not isinstance(record, dict) or field not in record:
        raise LoopLMError(
            f"line {line_number} of '{file}' has no {field!r} field: "
            f"give every line a {field!r} string, or name the field that holds the text"
        )
    return require_text(record[field], f"line {line_number} of '{file}'", field)


def _parquet_documents(file: Path, field: str) -> Iterator[str]:
    """The ``field`` strings of a parquet file, one per row, streamed in row batches."""
    parquet = import_data_extra("pyarrow.parquet", f"reading '{file}'")
    try:
        table = parquet.ParquetFile(file)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError… for a damaged file
        raise LoopLMError(f"data file '{file}' is not a readable parquet file ({one_line(error)})") from None
    columns = table.schema_arrow.names
    if field not in columns:
        raise LoopLMError(f"parquet file '{file}' has no column {field!r} (it has {', '.join(columns)}):"
                          " name the column that holds the text (--text-field / --data.text_field)")
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield require_text(value, f"row {row} of '{file}'", field)
    if row == 0:
        raise LoopLMError(f"data file '{file}' is empty: give a parquet file with rows in it")


def _decode_utf8(data: bytes, file: Path, offset: int) -> str:
    """``data`` as UTF-8; ``offset`` is where ``data`` starts in ``file``, for the message."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LoopLMError(
            f"data file '{file}' is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{offset + error.start}): convert it to UTF-8"
        ) from None

