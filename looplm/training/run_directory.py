"""A run directory before training starts: new, resumed, or emptied on request — never reused
by accident, never emptied when it holds one of the run's inputs.

A run directory holds ``run_config.json``, ``metrics.jsonl``, ``checkpoints/step_N`` and, for raw
text data, the tokenized copy in ``data/``.  A fresh run into a directory that already holds
anything would mix two runs (the old data reused under the new name, metrics appended to the
old ones), so it is refused unless ``resume`` (continue it) or ``overwrite`` (start clean).
Staging directories left by a process killed while saving are removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from looplm.checkpoint.atomic import refuse_overlap, remove_stale_staging
from looplm.config import FITTED_TOKENIZERS, RunConfig
from looplm.errors import LoopLMError


def run_inputs(run: RunConfig) -> list[str | None]:
    """The paths a run reads: its data, the checkpoints it starts from or distils from, a tokenizer file."""
    return [run.data.path, run.train.init, run.train.upcycle_from, run.train.distill_teacher,
            run.data.tokenizer if run.data.tokenizer not in ("byte", *FITTED_TOKENIZERS) else None]


def prepare_run_directory(out_dir: Path, run: RunConfig, resume: bool, overwrite: bool) -> None:
    """Check (and with ``overwrite`` empty) ``out_dir`` for a run; see the module docstring."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LoopLMError(f"--out {str(out_dir)!r} is a file: give a directory for the run")
    if resume and overwrite:
        raise LoopLMError("choose --resume (continue the run in --out) or --overwrite (start it again), not both")
    occupied = out_dir.is_dir() and any(out_dir.iterdir())
    if occupied and not resume:
        if not overwrite:
            raise LoopLMError(f"{str(out_dir)!r} already holds a run: pass --resume to continue it, --overwrite to"
                              " start it again, or choose another --out")
        refuse_overlap(out_dir, run_inputs(run), "--overwrite")
        for path in out_dir.iterdir():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    remove_stale_staging(out_dir / "checkpoints")
