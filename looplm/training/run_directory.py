"""A run directory before training starts: new, resumed, or emptied on request — never reused
by accident, never emptied when it holds one of the run's inputs.

A run directory holds ``run_config.json``, ``metrics.jsonl``, ``checkpoints/step_N`` and, for raw
text data, the tokenized copy in ``data/``.  A fresh run into a directory that already holds
anything would mix two runs (the old data reused under the new name, metrics appended to the
old ones), so it is refused unless ``resume`` (continue it) or ``overwrite`` (start clean: the run's own
entries removed, ``RUN_ENTRIES``).  A directory holding anything else is not a run and is
refused even with ``overwrite``: emptying it would delete the user's files.
Staging directories left by a process killed while saving are removed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from looplm.checkpoint.atomic import STAGING, refuse_overlap, remove_stale_staging
from looplm.config import FITTED_TOKENIZERS, RunConfig
from looplm.errors import LoopLMError, listed
from looplm.file_names import RUN_CONFIG_FILE
from looplm.training.loggers import METRICS_FILE, TENSORBOARD_DIR, WANDB_ID_FILE


def run_inputs(run: RunConfig) -> list[str | None]:
    """The paths a run reads: its data, the checkpoints it starts from or distils from, a tokenizer file."""
    return [run.data.path, run.train.init, run.train.upcycle_from, run.train.distill_teacher,
            run.data.tokenizer if run.data.tokenizer not in ("byte", *FITTED_TOKENIZERS) else None]


# what a run writes into its directory (``--overwrite`` removes these and nothing else)
RUN_ENTRIES = frozenset({RUN_CONFIG_FILE, METRICS_FILE, "checkpoints", "data", TENSORBOARD_DIR, WANDB_ID_FILE})
# ... and into two of those: checkpoints/step_N, and data/<fingerprint> (a prepared shard directory,
# with its meta.json); staging entries of an interrupted save in either
CHECKPOINT_ENTRY = re.compile(r"^step_\d+$")
LEGACY_DATA_FILES = frozenset({"meta.json", "tokenizer.json", "train.bin", "val.bin"})


def _run_written(directory: Path, entry: Path) -> bool:
    """Whether ``entry`` in the run's ``checkpoints`` or ``data`` directory is one a run writes there."""
    if STAGING.match(entry.name):
        return True
    if directory.name == "checkpoints":
        return bool(CHECKPOINT_ENTRY.match(entry.name)) and entry.is_dir() and not entry.is_symlink()
    if entry.name in LEGACY_DATA_FILES and entry.is_file():  # looplm 0.1 wrote its shards into data/ itself
        return True
    return entry.is_dir() and not entry.is_symlink() and (entry / "meta.json").is_file()


def foreign_entries(out_dir: Path, entries: list[Path]) -> list[str]:
    """The entries of ``out_dir`` (and of its ``checkpoints`` and ``data``) that no run writes."""
    foreign = [entry.name for entry in entries if entry.name not in RUN_ENTRIES]
    for name in ("checkpoints", "data"):
        directory = out_dir / name
        if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
            foreign.append(name)
        elif directory.is_dir():
            foreign += [f"{name}/{entry.name}" for entry in sorted(directory.iterdir())
                        if not _run_written(directory, entry)]
    return foreign


def prepare_run_directory(out_dir: Path, run: RunConfig, resume: bool, overwrite: bool) -> None:
    """Check (and with ``overwrite`` empty) ``out_dir`` for a run; see the module docstring.  A
    directory holding anything a run does not write is never emptied: it is not a run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LoopLMError(f"--out {str(out_dir)!r} is a file: give a directory for the run")
    if resume and overwrite:
        raise LoopLMError("choose --resume (continue the run in --out) or --overwrite (start it again), not both")
    saved = any((out_dir / "checkpoints").glob("step_*"))
    if resume and not saved:  # before anything is written there
        raise LoopLMError(f"nothing to resume in {str(out_dir)!r}: no checkpoints/step_* found (start the run"
                          " without --resume)")
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not resume:
        if overwrite:
            refuse_overlap(out_dir, run_inputs(run), "--overwrite")
        foreign = foreign_entries(out_dir, entries)
        if foreign:
            raise LoopLMError(f"--out {str(out_dir)!r} holds {listed(foreign)}, which no run writes: choose a new or"
                              " empty directory for the run (--overwrite only replaces a run)")
        if not overwrite and not saved:  # nothing --resume could take
            raise LoopLMError(f"{str(out_dir)!r} holds the start of a run that saved no checkpoint: pass --overwrite"
                              " to start it again, or choose another --out")
        if not overwrite:
            raise LoopLMError(f"{str(out_dir)!r} already holds a run: pass --resume to continue it, --overwrite to"
                              " start it again, or choose another --out")
        for path in entries:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    remove_stale_staging(out_dir / "checkpoints")
