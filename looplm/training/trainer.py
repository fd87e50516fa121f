"""The training loop: plain code a reader can follow top to bottom.

AdamW (β 0.9/0.95, weight decay on matrices only; or Muon for the layers' matrices, see
``looplm.training.optim``), linear warmup then cosine decay to
``min_lr_ratio``·lr, gradient clipping, gradient accumulation, bf16 autocast or fp32 as
``train.precision`` chooses (``looplm.precision``: auto = bf16 on CUDA and, for wide enough
models, on CPUs with native bf16; the choice and its reason are logged); activation
checkpointing, ``torch.compile`` and DDP/FSDP are applied from outside the model
(``looplm.training.wrapping``).  Every ``save_every``
steps (and at the end, and on Ctrl-C) a checkpoint directory is written atomically with the
model, tokenizer, run config and the full training state, so ``resume=True`` continues with
exactly the losses an uninterrupted run would have produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from looplm.checkpoint.atomic import atomic_directory, atomic_write_text
from looplm.checkpoint.directory import checkpoint_entry, write_model_files
from looplm.checkpoint.lock import DirectoryLock
from looplm.config import FITTED_TOKENIZERS, DataConfig, RunConfig
from looplm.config.model import model_differences
from looplm.data.provenance import tokenizer_digest
from looplm.data.source import TrainingData, open_training_data, prepared_directory
from looplm.data.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer
from looplm.device import resolve_device
from looplm.errors import LoopLMError, is_int, listed
from looplm.eval.depth import accuracy_by_step, loss_by_step
from looplm.file_names import RUN_CONFIG_FILE, TRAIN_STATE_FILE
from looplm.model.lm import LoopLM
from looplm.model.loading import load_checkpoint_tokenizer, load_model
from looplm.precision import training_precision
from looplm.training.auto_size import apply_auto_size
from looplm.training.curriculum import loop_curriculum_depth
from looplm.training.distill import distillation_kl, loop_penalty_weight
from looplm.training.distributed import Distributed
from looplm.training.loggers import MetricsLogger, open_metrics_logger, require
from looplm.training.mfu import device_peak_tflops, model_flops_utilization
from looplm.training.objectives import (
    IGNORE_INDEX,
    compute_loss,
    exit_collapse_warning,
    expected_exit_step,
    stage2_gate_loss,
)
from looplm.training.optim import (  # AdamW, or Muon + AdamW as one optimiser
    check_optimizer_state,
    keep_implementation,
    make_optimizer,
    skips_on_device,
)
from looplm.training.resources import check_free_disk, check_model_fits
from looplm.training.run_directory import prepare_run_directory
from looplm.training.state import read_train_state, restore_generators, train_state
from looplm.training.upcycle import upcycle_state_dict
from looplm.training.wrapping import wrap_for_training


@dataclass
class TrainResult:
    model: LoopLM
    tokenizer: object
    data: TrainingData
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    steps_done: int = 0
    seconds: float = 0.0


def lr_factor(step: int, config) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based): warmup, then cosine."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


class Trainer:
    def __init__(self, run: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 data: TrainingData | None = None, fit_vocab: bool = False, overwrite: bool = False):
        """fit_vocab: set model.vocab_size to the tokenizer's (when the user did not choose one).
        A fresh run (not ``resume``) needs an empty or new ``out_dir``; ``overwrite`` empties one
        first, unless it holds one of this run's inputs."""
        self.run = run
        self.train_config = run.train
        self.out_dir = Path(out_dir)
        self.progress = progress
        config = run.train
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device, "train.device", "use --train.device cpu")
        self.precision = training_precision(config.precision, self.device, run.model.d_model)
        self.dist = Distributed(config.parallel, self.device)
        if self.dist.main:  # only rank 0 logs: fail before the work if a logging package is missing
            for sink in config.log_sinks():
                require(sink)
        self.peak_tflops = config.peak_tflops or device_peak_tflops(self.device)  # 0 = unknown: no MFU
        self.metrics = MetricsLogger([])
        if self.device.type == "cuda" and self.dist.active:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if config.batch_size % self.dist.world:
            raise LoopLMError(f"train.batch_size={config.batch_size} is the global batch: it must divide by the"
                              f" {self.dist.world} processes")
        existed = self.out_dir.exists()
        made = [path for path in self.out_dir.absolute().parents if not path.exists()]  # made with the run's directory
        self.lock = DirectoryLock(self.out_dir)  # held from here to the end of ``train`` (rank 0)
        if self.dist.main:
            if existed and self.out_dir.is_dir():  # (a new directory is made, and locked, once it is checked)
                self.lock.acquire()
            prepare_run_directory(self.out_dir, run, resume, overwrite)
        fresh = not resume and not (existed and any(self.out_dir.iterdir()))
        try:
            if self.dist.main and not existed:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()
            self._set_up(run, resume, data, fit_vocab)
        except BaseException:
            if fresh and self.dist.main:  # a run that failed before it began leaves the directory as it was
                for path in [self.out_dir] if not existed else list(self.out_dir.iterdir()):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                for path in made:  # and the parents made for it (deepest first), while empty
                    with contextlib.suppress(OSError):
                        path.rmdir()
            self.lock.release()
            raise

    def _set_up(self, run: RunConfig, resume: bool, data: TrainingData | None, fit_vocab: bool) -> None:
        """The data, the model, the optimiser and (resuming) the saved state."""
        config = run.train
        _seed_everything(config.seed)
        source = None if resume else config.init or config.upcycle_from  # a checkpoint to start from
        if data is None and not resume:
            run.data = byte_by_name(run.data)
            if source:
                check_prepared_data(source, run.data)  # before anything is tokenized
        if data is None and not self.dist.main:
            self.dist.barrier()  # rank 0 tokenizes the data into the run directory first
        recorded = run.data.path
        if (resume and data is None and recorded and not str(recorded).startswith("hf:")
                and not Path(recorded).is_absolute() and not Path(recorded).exists()):
            raise LoopLMError(f"this run's data {recorded!r} is recorded relative to the directory the run was started"
                              " from, and is not found from here: resume from that directory")
        shards = self.out_dir / "data"

        def shard_directories() -> set[str]:
            """The shard directories the run tokenized its text into (data/<fingerprint>; looplm 0.1
            wrote its shards into data/ itself, and a resume tokenizes them anew)."""
            return {entry.name for entry in shards.iterdir() if entry.is_dir()} if shards.is_dir() else set()

        before = shard_directories() if resume else set()
        self.data = data or open_training_data(run.data, config.batch_size, config.seq_len, config.eval_batches,
                                               self.out_dir, config.seed)
        if before and (new := shard_directories() - before):  # tokenized anew
            for name in new:  # this call's own directory: the run is left as it was
                shutil.rmtree(shards / name, ignore_errors=True)
            raise LoopLMError(f"--data {run.data.path} has changed since this run started (its text tokenizes to"
                              f" new shards, not {listed(sorted(before))} in {str(shards)!r}): resuming would go on"
                              " with other data; restore it, or start the run again with --overwrite")
        if data is None and self.dist.main and self.dist.active:
            self.dist.barrier()
        self.tokenizer = self.data.tokenizer
        if source:
            check_source_tokenizer(source, self.tokenizer, run.data)
        if run.model.auto_size:  # sizes from the corpus (looplm.training.auto_size); saved with auto_size off
            run.model = apply_auto_size(run.model, self.data.corpus_bytes, self.tokenizer.kind, self.data.seq_len)
        if fit_vocab and run.model.vocab_size != self.tokenizer.vocab_size:
            run.model = dataclasses.replace(run.model, vocab_size=self.tokenizer.vocab_size)
        if self.tokenizer.vocab_size > run.model.vocab_size:
            raise LoopLMError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is"
                              f" {run.model.vocab_size}: set --model.vocab_size {self.tokenizer.vocab_size}")
        if self.data.seq_len > run.model.max_seq_len:
            raise LoopLMError(f"training sequences of {self.data.seq_len} tokens exceed model.max_seq_len="
                              f"{run.model.max_seq_len}: raise it or lower --train.seq_len")
        self.parameters = check_model_fits(run.model, self.device)
        if self.dist.main:  # before the work: a disk too full for one checkpoint would lose the run at its end
            self.out_dir.mkdir(parents=True, exist_ok=True)
            check_free_disk(self.out_dir, self.parameters)
        self.model = LoopLM(run.model).to(self.device)
        if config.init and not resume:
            self._initialise_from(config.init)
        if config.upcycle_from and not resume:  # a checkpoint of another shape (looplm.training.upcycle)
            self.model.load_state_dict(upcycle_state_dict(load_model(config.upcycle_from, self.device), run.model,
                                                          config.upcycle_order, self.model.state_dict()))
        if config.stage == 2:  # Stage II: the LM is frozen, only the exit gate learns
            if self.model.exit_gate is None:
                raise LoopLMError("train.stage=2 trains the exit gate, but the model has none")
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith("exit_gate."))
        self.forward_model = wrap_for_training(self.model, config, self.dist)  # before the optimiser: FSDP shards
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.skipped_steps = 0
        self.skipped_on_device: torch.Tensor | int = 0  # skips not yet read back (see ``_loop``)
        self.spike_skips = 0
        self.recent_losses: list[float] = []  # for the loss-spike guard (saved, so resume is exact)
        self.warned_collapse = False  # Stage I's exit distribution on step 1: said once a run
        if resume:
            self._load_latest()
        self.teacher = None
        if config.distill_teacher:
            self.teacher = load_model(config.distill_teacher, self.device).eval().requires_grad_(False)
            if self.teacher.config.vocab_size != run.model.vocab_size:
                raise LoopLMError(f"the teacher's vocabulary ({self.teacher.config.vocab_size}) differs from the"
                                  f" student's ({run.model.vocab_size}): distil between models sharing a tokenizer")
        self.forward_loss = self._forward_loss

    def _initialise_from(self, path: str) -> None:
        """Start from a checkpoint's weights (its config must match the run's model config)."""
        source = load_model(path, self.device)
        if source.config != self.run.model:
            raise LoopLMError(f"--init {path!r} is another model than this run's"
                              f" ({model_differences(source.config, self.run.model)}): leave out the --preset,"
                              " config-file model section or --model.* options that changed it (--init on the"
                              " command line takes the checkpoint's model config), or use --upcycle to start from it"
                              " with more layers or loop steps")
        self.model.load_state_dict(source.state_dict())

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, beta: float, steps: int | None = None,
                      backprop_steps: int | None = None):
        config = self.train_config
        output = self.forward_model(inputs, steps=steps, backprop_steps=backprop_steps)
        if config.stage == 2:
            return stage2_gate_loss(output, targets, config.stage2_k, config.stage2_gamma)
        result = compute_loss(output, targets, config.objective, beta, config.act_ponder_weight)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(inputs, steps=config.distill_teacher_steps).logits()
            kl = distillation_kl(output.logits(), teacher_logits, targets, config.distill_temperature)
            loss = (1 - config.distill_alpha) * result.loss + config.distill_alpha * kl
            penalty = loop_penalty_weight(config.distill_loop_penalty, self.step, config.steps)
            if penalty and output.gate_logits is not None:
                mask = (targets != IGNORE_INDEX).to(loss.dtype)
                loss = loss + penalty * expected_exit_step(output.exit_distribution, mask) / output.steps
            result.loss = loss
        return result

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run until train.steps (or ``stop_after`` optimiser steps in total, to simulate a stop)."""
        if stop_after is not None and (not is_int(stop_after) or stop_after < 1):
            raise LoopLMError(f"stop_after must be a number of optimiser steps >= 1 (None: train.steps), got"
                              f" {stop_after!r}")
        config = self.train_config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.main and not self.lock.held:  # train() called again: the lock went with the first
            self.lock.acquire()
        try:
            return self._train(config, stop_after)
        finally:
            self.lock.release()

    def _train(self, config, stop_after: int | None) -> TrainResult:
        if self.dist.main:
            atomic_write_text(self.out_dir / RUN_CONFIG_FILE, json.dumps(self.run.to_dict(), indent=2) + "\n")
        result = TrainResult(self.model, self.tokenizer, self.data, self.out_dir)
        if self.dist.main:
            self.metrics = open_metrics_logger(self.out_dir, self.run, continuing_from=self.step)
        last = min(config.steps, stop_after) if stop_after is not None else config.steps
        bar = _progress_bar(self.step, config.steps, self.progress and self.dist.main)
        autocast = self.precision.autocast(self.device.type)
        tokens_per_step = config.batch_size * config.grad_accum * self.data.seq_len
        started = window_start = time.perf_counter()
        self.model.train()
        try:
            with terminate_as_interrupt():
                self._loop(last, result, bar, autocast, tokens_per_step, window_start)
        except KeyboardInterrupt:
            bar.close()
            path = self.save()
            print(f"\ninterrupted at step {self.step}: saved {path}; continue with --resume", file=sys.stderr)
            raise
        finally:
            self.metrics.close()  # flush TensorBoard / finish the W&B run, also on Ctrl-C and errors
        bar.close()
        if not config.save_every or self.step % config.save_every:
            self.save()
        result.steps_done = self.step
        result.seconds = time.perf_counter() - started
        return result

    def _loop(self, last: int, result: TrainResult, bar, autocast, tokens_per_step: int, window_start: float) -> None:
        """Optimiser steps until ``last``.  The host waits for the device only at log steps (and
        at every step when the loss-spike guard or an optimiser without an on-device skip needs
        the numbers): losses are kept as tensors until then, and a step whose gradient norm is
        not finite is skipped on the device (``found_inf``, as mixed-precision scaling does)."""
        config = self.train_config
        window_tokens, pending = 0, []
        on_device = config.spike_factor == 0 and skips_on_device(self.optimizer)
        while self.step < last:
            beta = config.entropy_beta_at(self.step)
            theta = config.rope_theta_at(self.step, self.run.model.rope_theta)
            if theta != self.model.config.rope_theta:  # a new stage of train.rope_theta_schedule
                self.model.set_rope_theta(theta)
            depth = loop_curriculum_depth(config, self.model.config.loop_steps, self.step,
                                          sample_depth(config, self.model.config.loop_steps, self.step))
            grad_steps = min(config.backprop_steps, depth) if config.backprop_steps else depth
            for _ in range(config.grad_accum):
                inputs, targets = self.data.train_batch(config.batch_size, self.data_generator)
                inputs, targets = (to_device(self.dist.rows(tensor), self.device) for tensor in (inputs, targets))
                with autocast:
                    loss_result = self.forward_loss(inputs, targets, beta, depth, grad_steps)
                (loss_result.loss / config.grad_accum).backward()
            grad_norm = self.dist.clip_gradients(self.model.parameters(), config.grad_clip or float("inf"))
            loss = loss_result.loss.detach()
            if on_device:
                not_finite = ~torch.isfinite(grad_norm)
                self.optimizer.found_inf = not_finite.to(torch.float32)
                self.optimizer.step()
                self.skipped_on_device = self.skipped_on_device + not_finite.to(torch.int64)
            else:
                loss_value = self.dist.mean(float(loss))  # the same on every rank
                if not torch.isfinite(grad_norm):
                    self.skipped_steps += 1
                elif is_loss_spike(loss_value, self.recent_losses, config.spike_factor):
                    self.spike_skips += 1
                else:
                    self.optimizer.step()
                self.recent_losses = [*self.recent_losses, loss_value][-SPIKE_WINDOW:]
            self.model.balance_experts()  # MoE balancing bias: once per optimiser step, from the loads counted
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            window_tokens += tokens_per_step
            pending.append(loss)
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == last:
                losses = self._settle(pending, result)
                now = time.perf_counter()
                speed = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                record = {"step": self.step, "loss": losses[-1],
                          "step_losses": [round(v, 5) for v in loss_result.step_losses.tolist()],
                          "mean_exit_step": float(loss_result.mean_exit_step),
                          "exit_entropy": float(loss_result.exit_entropy),
                          "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "entropy_beta": beta, "rope_theta": self.model.config.rope_theta,
                          "tokens_per_s": speed, "skipped_steps": self.skipped_steps,
                          "spike_skips": self.spike_skips,
                          "loop_steps": depth, "grad_steps": grad_steps, "precision": self.precision.label,
                          **matmul_flops_per_token(self.model, depth, grad_steps)}
                if loss_result.exit_histogram is not None:
                    record["exit_histogram"] = [round(v, 5) for v in loss_result.exit_histogram.tolist()]
                    self._check_exit_collapse(record)
                # Achieved matmul throughput, and MFU where the device's peak is known (looplm.training.mfu).
                record["achieved_tflops"] = speed * (record["forward_flops_per_token"]
                                                     + record["backward_flops_per_token"]) / 1e12
                if self.peak_tflops:
                    record["peak_tflops"] = self.peak_tflops
                    record["mfu"] = model_flops_utilization(record["achieved_tflops"], self.peak_tflops,
                                                            self.dist.world)
                self._log(record)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", exit=f"{record['mean_exit_step']:.2f}",
                                tok_s=f"{speed:,.0f}")
            if config.eval_every and (self.step % config.eval_every == 0 or self.step == config.steps):
                result.last_eval = self.evaluate()
                self._log({"step": self.step, "eval": result.last_eval})
            if config.save_every and self.step % config.save_every == 0:
                self.save()
        self._settle(pending, result)

    def _check_exit_collapse(self, record: dict) -> None:
        """Warn once a run when Stage I's exit distribution has collapsed onto loop step 1, after
        the warm-up (early steps move fast) and on the main process only."""
        config = self.train_config
        if (self.warned_collapse or config.objective != "stage1" or config.stage != 1
                or self.step < config.warmup_steps or not self.dist.main):
            return  # (a one-step run has nothing to collapse: ``exit_collapse_warning`` says None)
        message = exit_collapse_warning(self.step, record["exit_histogram"], record["step_losses"],
                                        record["entropy_beta"])
        if message:
            self.warned_collapse = True
            warnings.warn(message, stacklevel=2)

    def _settle(self, pending: list[torch.Tensor], result: TrainResult) -> list[float]:
        """Bring the losses of the steps since the last log to the host (one wait), averaged over
        ranks, into ``result.losses``; fold the skips counted on the device into ``skipped_steps``."""
        if not pending:
            return result.losses[-1:]
        losses = [self.dist.mean(value) for value in torch.stack(pending).tolist()]
        pending.clear()
        result.losses.extend(losses)
        if isinstance(self.skipped_on_device, torch.Tensor):
            self.skipped_steps += int(self.skipped_on_device)
            self.skipped_on_device = 0
        return losses

    def evaluate(self) -> dict:
        """Per-step validation loss and exit statistics; per-step accuracy on task data."""
        report = loss_by_step(self.model, self.data.validation)
        if self.data.eval_set is not None:
            report["accuracy_by_step"] = accuracy_by_step(self.model, self.data.eval_set.to(self.device))
        self.dist.reshard(self.model)
        return report

    def _log(self, record: dict) -> None:
        self.metrics.log(record)  # rank 0 only: the other ranks hold an empty MetricsLogger

    def save(self) -> Path:
        """Write checkpoints/step_NNNNNNN atomically, then prune to the newest keep_last."""
        if isinstance(self.skipped_on_device, torch.Tensor):
            self.skipped_steps += int(self.skipped_on_device)
            self.skipped_on_device = 0
        target = self.out_dir / "checkpoints" / f"step_{self.step:07d}"
        if self.dist.main:
            check_free_disk(self.out_dir, self.parameters)
        weights = self.dist.full_model_state(self.model)  # FSDP: every rank gathers, rank 0 holds
        weights = self.model.state_dict() if weights is None else weights
        optimizer_state = self.dist.full_optimizer_state(self.model, self.optimizer)
        if not self.dist.main:
            self.dist.barrier()
            return target

        def write(directory: Path) -> None:
            write_model_files(self.model.config, weights, directory, self.tokenizer)
            (directory / RUN_CONFIG_FILE).write_text(json.dumps(self.run.to_dict(), indent=2) + "\n")
            torch.save(train_state(self, optimizer_state), directory / TRAIN_STATE_FILE)

        atomic_directory(target, write, replaceable=checkpoint_entry)
        kept = sorted((self.out_dir / "checkpoints").glob("step_*"))
        for old in kept[:-self.train_config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return target

    def _load_latest(self) -> None:
        checkpoints = sorted((self.out_dir / "checkpoints").glob("step_*"))
        if not checkpoints:
            raise LoopLMError(f"nothing to resume in {str(self.out_dir)!r}: no checkpoints/step_* found")
        latest = checkpoints[-1]
        loaded = load_model(latest, self.device)
        # A RoPE schedule leaves its current stage's θ in the checkpoint; the step restores it.
        recorded = dataclasses.replace(loaded.config, rope_theta=self.run.model.rope_theta) \
            if self.train_config.rope_theta_schedule else loaded.config
        if recorded != self.run.model:
            raise LoopLMError(f"the model config differs from the one in {str(latest)!r}: resume with the same config")
        self.dist.load_model_state(self.model, loaded.state_dict())
        state = read_train_state(latest / TRAIN_STATE_FILE, self.device)
        try:
            self.dist.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            keep_implementation(self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError, IndexError) as error:  # e.g. Muon + AdamW state offered to AdamW
            raise LoopLMError(f"the optimiser state in {str(latest)!r} does not fit this run's optimiser"
                              f" ({type(error).__name__}): resume with the same train.optimizer") from None
        check_optimizer_state(self.optimizer, str(latest))
        restore_generators(state, self.data_generator, latest / TRAIN_STATE_FILE)
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.spike_skips = state["spike_skips"]
        self.recent_losses = state["recent_losses"]


SPIKE_WINDOW = 20


def is_loss_spike(loss: float, history: list[float], factor: float) -> bool:
    """The loss-spike guard: with factor > 0, a step whose loss exceeds factor × the mean of the
    last ``SPIKE_WINDOW`` losses (once that many exist) is not applied.  The loss is the mean
    over ranks, so every rank decides the same."""
    if factor <= 0 or len(history) < SPIKE_WINDOW:
        return False
    recent = history[-SPIKE_WINDOW:]
    return loss > factor * sum(recent) / len(recent)


def sample_depth(config, trained_steps: int, step: int) -> int:
    """Loop steps for optimiser step ``step`` (train.depth_sampling): ``fixed`` = the trained T;
    ``uniform`` in [depth_min, depth_max or T]; ``poisson`` with mean depth_mean (default T)
    clamped to [depth_min, depth_max or 2 × mean].  Drawn from a generator seeded by (seed,
    step) alone, so every rank of a distributed run draws the same depth (different depths
    would make ranks run different collectives and deadlock)."""
    if config.depth_sampling == "fixed":
        return trained_steps
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    if config.depth_sampling == "uniform":
        high = config.depth_max or max(trained_steps, config.depth_min)
        return int(torch.randint(config.depth_min, high + 1, (), generator=generator))
    mean = config.depth_mean or float(trained_steps)
    high = config.depth_max or max(int(math.ceil(2 * mean)), config.depth_min)
    return int(min(max(torch.poisson(torch.tensor(mean), generator=generator).item(), config.depth_min), high))


def matmul_flops_per_token(model: LoopLM, steps: int, grad_steps: int) -> dict:
    """Matmul FLOPs per token of one training step (2 per multiply-add; attention scores left
    out): the forward runs prelude once and core + readout + head at every step; backward
    (2× forward) covers only the steps with gradients (and the prelude when gradients reach it)."""
    def parameters(modules) -> int:
        return sum(p.numel() for module in modules for p in module.parameters())

    per_step = parameters(model.core) + parameters(model.coda) + model.head_weight.numel()
    prelude = parameters(model.prelude)
    forward = 2 * (prelude + steps * per_step)
    reaches_prelude = grad_steps == steps or model.injection is not None
    backward = 4 * (grad_steps * per_step + (prelude if reaches_prelude else 0))
    return {"forward_flops_per_token": forward, "backward_flops_per_token": backward}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto ``device``: to a GPU through pinned memory without the host waiting."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a scheduler or ``kill`` ending the job) stops training like Ctrl-C: the trainer
    saves a checkpoint before exiting.  Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def byte_by_name(data: DataConfig) -> DataConfig:
    """``data`` with a tokenizer file that holds the byte tokenizer named "byte" (a run started from
    a byte-level checkpoint then records no path to that checkpoint); anything else as it is."""
    if data.tokenizer in ("byte", *FITTED_TOKENIZERS):
        return data
    if tokenizer_digest(load_tokenizer(data.tokenizer)) != tokenizer_digest(byte_tokenizer()):
        return data
    return dataclasses.replace(data, tokenizer="byte")


def check_prepared_data(source: str, data: DataConfig) -> None:
    """A prepared data directory given to a run started from checkpoint ``source`` must hold ids
    of the tokenizer the checkpoint was trained with (one line naming both, else)."""
    shard_dir = prepared_directory(data)
    if shard_dir is not None:
        _refuse_another_tokenizer(source, Tokenizer.from_file(shard_dir), f"--data {data.path} was prepared with a"
                                  " tokenizer", "give raw text, or data prepared with the checkpoint's tokenizer.json")


def check_source_tokenizer(source: str, tokenizer: Tokenizer, data: DataConfig) -> None:
    """A run started from checkpoint ``source`` (--init, --upcycle) must feed it ids of the
    tokenizer it was trained with: refuse data tokenized otherwise, in one line naming both."""
    what = f"--data {data.path}" if data.path else f"--task {data.task}" if data.task else "the training data"
    _refuse_another_tokenizer(source, tokenizer, f"{what} is tokenized with {data.tokenizer!r}",
                              "leave out --data.tokenizer to use the checkpoint's")


def _refuse_another_tokenizer(source: str, tokenizer: Tokenizer, what: str, fix: str) -> None:
    trained_with = load_checkpoint_tokenizer(source)
    if trained_with is None or tokenizer_digest(trained_with) == tokenizer_digest(tokenizer):
        return
    raise LoopLMError(f"{what} ({tokenizer.kind}, vocab {tokenizer.vocab_size}), but the checkpoint {source!r} was"
                      f" trained with another tokenizer ({trained_with.kind}, vocab {trained_with.vocab_size}): {fix}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _SilentBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(initial: int, total: int, enabled: bool):
    if not enabled:
        return _SilentBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
