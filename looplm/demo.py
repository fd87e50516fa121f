"""``looplm demo``: watch accuracy rise with loop depth, then exit early where it is safe.

Trains a tiny looped model (Stage I objective) on multi-hop variable binding, where each
extra loop step can follow one more link of a chain, then reports on held-out problems:
exact-match accuracy at steps 1..T and T+1, T+2 (extrapolation), the mean exit step and
accuracy under Q-exit, a PNG plot, and a few generated answers with the steps each token used.

The task is binding with relative references (``refs="offsets"``, see
``looplm.data.tasks.binding``): in ``e11dbce73a21?`` the last cell ``1`` points at the ``2``
before it, that at the ``3`` two cells back, that at ``c``, so the answer is ``c`` after 4
hops.  A 70 k-parameter model (d_model 64, one core layer x T 4) learns it in 3,000 steps of
batch 32, about two minutes of training on two CPU cores; it trains on one thread, which is
nearly as fast for a model this small and does not slow down many times over when another
process holds the second core.  Lookups by variable name are far slower to learn than the
10-minute budget allows at this size, so the demo does not use them.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from looplm.checkpoint.atomic import atomic_write_text
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError, is_int, listed
from looplm.eval.depth import accuracy_by_step
from looplm.generate import QExit, generate
from looplm.training.trainer import Trainer

DEMO_TASK = "binding"
DEMO_TASK_OPTIONS = {"refs": "offsets", "cells": 12, "hops": 4, "min_hops": 1}
DEMO_TRAIN_STEPS = 3000
DEMO_Q = 0.5
DEMO_EVAL_EXAMPLES = 1024
DEMO_GENERATED_EXAMPLES = 256


def demo_run_config(train_steps: int = DEMO_TRAIN_STEPS, seed: int = 0) -> RunConfig:
    model = ModelConfig(vocab_size=259, d_model=64, n_heads=4, n_core_layers=1, loop_steps=4, max_seq_len=32)
    train = TrainConfig(steps=train_steps, batch_size=32, lr=3e-3, warmup_steps=50, eval_every=0,
                        eval_batches=4, log_every=50, objective="stage1", entropy_beta=0.1, seed=seed,
                        threads=1)
    data = DataConfig(task=DEMO_TASK, task_options=dict(DEMO_TASK_OPTIONS))
    return RunConfig(model, train, data)


def plot_by_steps(values: dict[int, float], trained_steps: int, q_point: tuple[float, float] | None, path: Path,
                  ylabel: str = "exact-match accuracy (held out)",
                  title: str = "looplm demo: what depth buys on multi-hop binding",
                  ylim: tuple[float, float] | None = (0, 1.02), legend: str = "lower right") -> Path:
    """One quality figure per loop step (steps past T extrapolate), the trained T marked, and the
    Q-exit point (mean exit step, its quality) in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    steps = sorted(values)
    axes.plot(steps, [values[s] for s in steps], marker="o", label="fixed steps")
    axes.axvline(trained_steps, color="grey", linestyle=":", label=f"trained T = {trained_steps}")
    if q_point is not None:
        axes.scatter([q_point[0]], [q_point[1]], color="tab:red", zorder=3, label="Q-exit (mean steps)")
    axes.set_xlabel("loop steps")
    axes.set_ylabel(ylabel)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_xticks(steps)
    axes.grid(alpha=0.3)
    axes.legend(loc=legend)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def demo_train_steps(train_steps: int | None, default: int) -> int:
    """The demo's optimiser steps: ``default`` for None, else ``train_steps``, which must be >= 1."""
    if train_steps is None:
        return default
    if not is_int(train_steps) or train_steps < 1:
        raise LoopLMError(f"--train-steps must be a positive number of optimiser steps, got {train_steps!r}:"
                          f" give 1 or more, or leave it out for the demo's {default}")
    return train_steps


def refuse_existing_run(out: Path) -> Path:
    """``out/run``, the demo's run directory, where ``out`` is new or empty: the demo writes its
    report files there (results.json, plots) and would replace any of the user's, or mix with an
    earlier demo's.  Refused too where ``out`` (or the nearest part of it that exists) is a file."""
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == out else f"lies under {str(existing)!r}, which is a file"
        raise LoopLMError(f"--out {str(out)!r} {where}, not a directory: choose a directory for the demo's output")
    run_dir = out / "run"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise LoopLMError(f"{str(out)!r} already holds a demo run: choose another --out or delete it")
    if out.is_dir() and (entries := sorted(entry.name for entry in out.iterdir())):
        raise LoopLMError(f"--out {str(out)!r} holds {listed(entries)}: choose a new or empty directory for the demo"
                          " (it writes its report there)")
    return run_dir


def train_demo(trainer: Trainer, run_dir: Path) -> None:
    """Train; when interrupted (the trainer has saved a checkpoint), say how the user can go on:
    ``looplm demo`` has no resume, ``looplm train --resume`` finishes the training run."""
    try:
        trainer.train()
    except KeyboardInterrupt:
        print(f"looplm demo: stopped; the demo cannot resume, but 'looplm train --out {shlex.quote(str(run_dir))}"
              " --resume' finishes its training run (without the demo's report), or run 'looplm demo' again with"
              " another --out", file=sys.stderr)
        raise


def run_demo(out: str | Path = "runs/demo", train_steps: int | None = None, q: float | None = None,
             seed: int = 0, progress: bool = True, eval_examples: int = DEMO_EVAL_EXAMPLES,
             generated_examples: int = DEMO_GENERATED_EXAMPLES) -> dict:
    out = Path(out)
    q = DEMO_Q if q is None else q
    QExit(q)  # validates q before any training starts
    run = demo_run_config(demo_train_steps(train_steps, DEMO_TRAIN_STEPS), seed)
    run_dir = refuse_existing_run(out)
    started = time.perf_counter()
    trainer = Trainer(run, run_dir, progress=progress)
    model = trainer.model
    print(f"looplm demo: training a {model.num_parameters():,}-parameter looped model"
          f" ({run.model.n_core_layers} layers x {run.model.loop_steps} steps) on {DEMO_TASK}"
          f" {DEMO_TASK_OPTIONS} for {run.train.steps} steps", file=sys.stderr)
    train_demo(trainer, run_dir)
    train_seconds = time.perf_counter() - started

    from looplm.data.tasks import TaskBatches, make_task

    task = make_task(DEMO_TASK, **DEMO_TASK_OPTIONS)
    held_out = TaskBatches(task, trainer.tokenizer, split="test", seed=seed).eval_set(eval_examples, seed=seed + 7)
    trained = run.model.loop_steps
    accuracy_list = accuracy_by_step(model, held_out, steps=trained + 2)
    accuracy = {step: accuracy_list[step - 1] for step in range(1, trained + 3)}

    mean_exit, q_accuracy, samples = evaluate_q_exit(model, task, held_out, trainer.tokenizer, q, generated_examples)

    out.mkdir(parents=True, exist_ok=True)
    plot = plot_by_steps(accuracy, trained, (mean_exit, q_accuracy), out / "accuracy_by_steps.png")
    results = {
        "task": DEMO_TASK, "task_options": DEMO_TASK_OPTIONS,
        "accuracy_by_steps": {str(step): value for step, value in accuracy.items()},
        "trained_steps": trained,
        "mean_exit_steps": mean_exit,
        "q": q,
        "q_exit_accuracy": q_accuracy,
        "held_out_examples": len(held_out),
        "train_steps": run.train.steps,
        "train_seconds": round(train_seconds, 1),
        "parameters": model.num_parameters(),
        "checkpoint": str(sorted((run_dir / "checkpoints").glob("step_*"))[-1]),
        "plot": str(plot),
        "samples": samples,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    _print_report(results, trained)
    return results


def evaluate_q_exit(model, task, held_out, tokenizer, q: float, examples: int) -> tuple[float, float, list[dict]]:
    """Generate answers for the first ``examples`` held-out problems under Q-exit: mean loop
    steps per decision (answer tokens and the stop token), exact-match accuracy, six samples."""
    samples, exit_steps, correct = [], [], 0
    count = min(examples, len(held_out))
    for index in range(count):
        generation = generate(model, held_out.prompts[index], 8, exit_policy=QExit(q), tokenizer=tokenizer)
        exit_steps.extend(generation.decision_steps)
        is_right = task.score(generation.text, held_out.answers[index])
        correct += is_right
        if len(samples) < 6:
            samples.append({"prompt": held_out.examples[index].prompt, "answer": held_out.answers[index],
                            "generated": generation.text, "steps_per_token": generation.decision_steps,
                            "hops": held_out.examples[index].meta.get("hops"), "correct": bool(is_right)})
    return sum(exit_steps) / max(len(exit_steps), 1), correct / max(count, 1), samples


def _print_report(results: dict, trained: int) -> None:
    print(f"\nheld-out exact-match accuracy by loop steps ({results['held_out_examples']} problems):")
    for step, value in results["accuracy_by_steps"].items():
        note = " (trained T)" if int(step) == trained else " (extrapolated)" if int(step) > trained else ""
        bar = "#" * round(value * 40)
        print(f"  steps {step}: {value:6.3f} {bar}{note}")
    print(f"Q-exit q={results['q']}: mean exit step {results['mean_exit_steps']:.2f} of {trained},"
          f" accuracy {results['q_exit_accuracy']:.3f}")
    print("samples (steps each generated token used):")
    for sample in results["samples"]:
        mark = "ok " if sample["correct"] else "BAD"
        print(f"  [{mark}] {sample['prompt']} -> {sample['generated']!r} (answer {sample['answer']},"
              f" {sample['hops']} hops, steps {sample['steps_per_token']})")
    print(f"plot: {results['plot']}\nresults: {Path(results['plot']).parent / 'results.json'}")
