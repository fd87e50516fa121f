"""``hf:NAME[:SPLIT]`` and ``hf:NAME:CONFIG:SPLIT``: documents from a Hugging Face ``datasets`` dataset.

NAME is a Hub dataset id (``owner/name``), a local directory that ``datasets.load_dataset``
reads (data files, a Hub-style layout), or a directory written by ``save_to_disk``.  SPLIT
defaults to ``train`` and may carry ``datasets``' slicing (``train[:10%]``); a directory saved
from a single ``Dataset`` has no splits, so SPLIT is not used there.

``datasets`` looks in its local cache first (``HF_DATASETS_CACHE``, by default under
``~/.cache/huggingface``).  A dataset that is not there while the Hub cannot be reached (no
network, or ``HF_DATASETS_OFFLINE=1``) is one error line, as is a missing library:
``datasets`` is the optional extra ``data`` (``pip install 'looplm[data]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from looplm.data.rows import import_data_extra, require_text
from looplm.errors import LoopLMError, one_line

HUB_PREFIX = "hf:"
DEFAULT_SPLIT = "train"
BATCH_ROWS = 1024
# A colon separates NAME, CONFIG and SPLIT, except inside the brackets of a split slice ("train[:10]").
FIELD_SEPARATOR = re.compile(r":(?![^\[]*\])")


@dataclass(frozen=True)
class HubSpec:
    """One ``hf:`` input: dataset name (or local directory), optional config, split."""

    name: str
    config: str | None = None
    split: str = DEFAULT_SPLIT

    @staticmethod
    def names(raw: object) -> bool:
        """Whether ``raw`` is an ``hf:`` input rather than a path."""
        return isinstance(raw, str) and raw.startswith(HUB_PREFIX)

    @classmethod
    def parse(cls, raw: str) -> HubSpec:
        fields = FIELD_SEPARATOR.split(raw[len(HUB_PREFIX):])
        if not fields[0] or len(fields) > 3 or not all(fields):
            raise LoopLMError(f"{raw!r} is not a dataset name: write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
        if len(fields) == 3:
            return cls(fields[0], fields[1], fields[2])
        return cls(fields[0], None, fields[1] if len(fields) == 2 else DEFAULT_SPLIT)

    def __str__(self) -> str:
        return HUB_PREFIX + ":".join(part for part in (self.name, self.config, self.split) if part)


def load_hub_dataset(spec: HubSpec):
    """The ``datasets.Dataset`` that ``spec`` names, from disk, the local cache or the Hub."""
    datasets = import_data_extra("datasets", "hf: data")
    try:
        if _saved_to_disk(Path(spec.name)):
            return _split_of(datasets.load_from_disk(spec.name), spec, datasets)
        with _quiet_hub():
            return datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except LoopLMError:
        raise
    except ConnectionError:  # also huggingface_hub's OfflineModeIsEnabled
        offline = " (offline mode: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set)" if _offline() else ""
        raise LoopLMError(f"dataset {spec.name!r} is not in the local Hugging Face cache and the Hub cannot be"
                          f" reached{offline}: download it once with network access, or give local files") from None
    except FileNotFoundError:
        raise LoopLMError(f"dataset {spec.name!r} was found neither on the Hub nor as a local directory:"
                          " check the name") from None
    except Exception as error:  # datasets raises ValueError, KeyError… for a bad split or config
        raise LoopLMError(f"cannot load {spec} ({type(error).__name__}: {one_line(error)[:300]})") from None


def hub_documents(spec: HubSpec, field: str) -> Iterator[str]:
    """The ``field`` strings of the dataset, one document per row."""
    dataset = load_hub_dataset(spec)
    if field not in dataset.column_names:
        raise LoopLMError(f"{spec} has no column {field!r} (it has {', '.join(dataset.column_names)}): name the"
                          " column that holds the text (--text-field / --data.text_field)")
    row = 0
    for batch in dataset.select_columns([field]).iter(batch_size=BATCH_ROWS):
        for value in batch[field]:
            row += 1
            yield require_text(value, f"row {row} of {spec}", field)
    if row == 0:
        raise LoopLMError(f"{spec} has no rows: choose another split or dataset")


def hub_record(spec: HubSpec) -> dict:
    """What identifies the dataset's contents: its name, config and split, the fingerprint
    ``datasets`` keeps for it, and the size and mtime of its Arrow cache files."""
    dataset = load_hub_dataset(spec)
    files = []
    for entry in dataset.cache_files:
        path = Path(entry["filename"])
        status = path.stat()
        files.append({"path": str(path.resolve()), "bytes": status.st_size, "mtime_ns": status.st_mtime_ns})
    return {"kind": "hf", "name": spec.name, "config": spec.config, "split": spec.split,
            "rows": dataset.num_rows, "fingerprint": getattr(dataset, "_fingerprint", None), "cache_files": files}


def _saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _split_of(loaded, spec: HubSpec, datasets):
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if spec.split not in loaded:
        raise LoopLMError(f"{spec.name!r} has no split {spec.split!r} (it has {', '.join(loaded)}):"
                          f" write hf:{spec.name}:SPLIT")
    return loaded[spec.split]


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """The Hub client's retry warnings (a dozen lines while the network is unreachable) held back
    meanwhile: what failed is said in one line afterwards."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "urllib3")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
