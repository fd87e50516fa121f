"""Where training metrics go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when asked.

The trainer hands every record (one dict per ``log_every`` steps, one per evaluation) to a
``MetricsLogger``, which writes it unchanged as a JSON line and, for each sink in
``train.log_to``, as scalars and a histogram at ``global_step = record["step"]``:

    number under KEY            -> scalar KEY (loss, mean_exit_step, exit_entropy, lr, grad_norm,
                                   tokens_per_s, skipped_steps, achieved_tflops, mfu, ...)
    step_losses [T]             -> scalars loss/step_1 .. loss/step_T
    exit_histogram [T]          -> histogram exit_step: mass p(t) at loop step t = 1..T
    eval {loss_by_step [T], accuracy_by_step [T], mean_exit_step, ...}
                                -> eval/loss/step_t, eval/accuracy/step_t, eval/mean_exit_step, ...

TensorBoard event files go to ``OUT/tensorboard``; W&B runs to ``OUT/wandb`` in offline mode
unless the environment sets ``WANDB_MODE`` (``wandb sync OUT/wandb/offline-run-*`` uploads
them later).  A continued run (resume) hides TensorBoard events past the checkpoint it resumed
from (``purge_step``) and reopens the same W&B run: its id is kept in ``OUT/wandb_run_id``.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from pathlib import Path

from looplm.checkpoint.atomic import atomic_write_text
from looplm.errors import LoopLMError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
EXIT_HISTOGRAM_TAG = "exit_step"


def require(sink: str):
    """Import the package a sink needs, or raise one line naming the pip extra."""
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[sink]
    try:
        imported = importlib.import_module(module)
        if sink == "tensorboard":
            imported = importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise LoopLMError(f"train.log_to={sink} needs the {module} package: pip install 'looplm[{sink}]'"
                          f" or drop {sink} from --train.log_to") from None
    return imported


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers as ``tag -> value`` (see the module docstring for the names)."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            values[prefix + key] = float(value)
        elif isinstance(value, dict):
            values.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, list) and (key == "step_losses" or key.endswith("_by_step")):
            name = "loss" if key == "step_losses" else key[:-len("_by_step")]
            values.update({f"{prefix}{name}/step_{t}": float(v) for t, v in enumerate(value, start=1)})
    return values


def exit_edges(steps: int) -> list[float]:
    """Bin edges 0.5, 1.5, ..., T + 0.5: bin t holds the exit mass of loop step t."""
    return [t + 0.5 for t in range(steps + 1)]


class JsonlSink:
    """One JSON line per record, appended.  A resumed run continues the same file from the step
    it resumed at: records of later steps (written after that checkpoint by a run that was then
    killed) are dropped first, so no step appears twice."""

    def __init__(self, path: Path, continuing_from: int = 0):
        self.path = path
        if continuing_from and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _step_of(line) is None or _step_of(line) <= continuing_from]
            atomic_write_text(path, "".join(kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class TensorBoardSink:
    def __init__(self, directory: Path, purge_step: int | None):
        self.writer = require("tensorboard").SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def log(self, record: dict) -> None:
        step = record["step"]
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        mass = record.get("exit_histogram")
        if mass:
            # Weighted histogram of the exit step: bucket t = (t - 0.5, t + 0.5] carries p(t).
            steps = range(1, len(mass) + 1)
            self.writer.add_histogram_raw(EXIT_HISTOGRAM_TAG, min=1, max=len(mass), num=sum(mass),
                                          sum=sum(t * p for t, p in zip(steps, mass)),
                                          sum_squares=sum(t * t * p for t, p in zip(steps, mass)),
                                          bucket_limits=exit_edges(len(mass))[1:], bucket_counts=list(mass),
                                          global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """A W&B run under OUT/wandb (offline unless WANDB_MODE says otherwise)."""

    def __init__(self, out_dir: Path, config: dict, project: str, name: str | None, continuing: bool):
        self.wandb = require("wandb")
        id_file = out_dir / WANDB_ID_FILE
        if continuing and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
            atomic_write_text(id_file, run_id + "\n")
        self.run = self.wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(out_dir),
                                   config=config, mode=os.environ.get("WANDB_MODE") or "offline")

    def log(self, record: dict) -> None:
        values: dict = scalars(record)
        mass = record.get("exit_histogram")
        if mass:
            values[EXIT_HISTOGRAM_TAG] = self.wandb.Histogram(np_histogram=(list(mass), exit_edges(len(mass))))
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fan-out to the sinks; ``close`` flushes them all (also usable as a context manager)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_metrics_logger(out_dir: str | Path, run, continuing_from: int = 0) -> MetricsLogger:
    """JSONL plus the sinks of ``run.train.log_to``; ``continuing_from`` is the step a resumed run
    restarts from (0 for a fresh run)."""
    out_dir = Path(out_dir)
    config = run.train
    logger = MetricsLogger([JsonlSink(out_dir / METRICS_FILE, continuing_from)])
    try:
        for sink in config.log_sinks():
            if sink == "tensorboard":
                purge = continuing_from + 1 if continuing_from else None  # hide events past the checkpoint
                logger.sinks.append(TensorBoardSink(out_dir / TENSORBOARD_DIR, purge))
            else:
                logger.sinks.append(WandbSink(out_dir, run.to_dict(), config.wandb_project, config.run_name,
                                              continuing=continuing_from > 0))
    except BaseException:
        logger.close()
        raise
    return logger
