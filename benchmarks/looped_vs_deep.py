"""Looped vs deep vs shallow at one training budget: what does looping buy on a depth-bound task?

Trains three models of the same width on the same task with the same optimiser steps and batch:

* looped   — L core layers applied T times (L·T layer applications per token, L layers of weights);
* shallow  — the same L layers applied once (equal parameters, 1/T of the compute);
* deep     — L·T distinct layers applied once (equal compute, T times the layer weights).

and prints a Markdown table of held-out exact-match accuracy, parameters and compute (layer
applications per token), so the looped model is compared with the deep one at equal compute
and with the shallow one at equal parameters.  The default task is the demo's multi-hop
binding with relative references (``looplm/demo.py``), where each extra layer application
can follow one more link of a chain.

    python benchmarks/looped_vs_deep.py --threads 1 --json runs/looped_vs_deep.json
    python benchmarks/looped_vs_deep.py --task phop --task-options '{"hops": 3}' --steps 1500

Accuracy is teacher-forced exact match on held-out problems, which equals greedy generation
(``looplm.data.tasks.EvalSet``).  Training runs on CPU in float32; the default (3,000 steps of
batch 32 per model) takes several minutes on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import looplm
from looplm import train
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.data.tasks import TaskBatches, make_task
from looplm.demo import DEMO_TASK, DEMO_TASK_OPTIONS
from looplm.eval.depth import accuracy_by_step


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    layers: int
    loop_steps: int

    @property
    def layer_applications(self) -> int:
        return self.layers * self.loop_steps


def variants(layers: int, loop_steps: int) -> list[Variant]:
    return [Variant("looped", layers, loop_steps), Variant("shallow", layers, 1),
            Variant("deep", layers * loop_steps, 1)]


def run_config(variant: Variant, args, task_options: dict) -> RunConfig:
    model = ModelConfig(vocab_size=259, d_model=args.d_model, n_heads=args.heads, n_core_layers=variant.layers,
                        loop_steps=variant.loop_steps, max_seq_len=args.max_seq_len)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=50, eval_every=0,
                        eval_batches=1, log_every=max(args.steps // 10, 1), objective="stage1",
                        entropy_beta=0.1, seed=args.seed, threads=args.threads, save_every=0, keep_last=1)
    return RunConfig(model, train, DataConfig(task=args.task, task_options=dict(task_options)))


def train_and_score(variant: Variant, args, task_options: dict, held_out, work: Path) -> dict:
    started = time.perf_counter()
    result = train(run_config(variant, args, task_options), work / variant.name, progress=args.progress)
    seconds = time.perf_counter() - started
    accuracy = accuracy_by_step(result.model, held_out, steps=variant.loop_steps)
    return {"model": variant.name, "layers": variant.layers, "loop_steps": variant.loop_steps,
            "parameters": result.model.num_parameters(), "layer_applications_per_token": variant.layer_applications,
            "accuracy": accuracy[-1], "accuracy_by_step": accuracy, "train_seconds": round(seconds, 1)}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | layers × steps | parameters | layer applications / token | held-out exact match |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['layers']} × {row['loop_steps']} | {row['parameters']:,} |"
                     f" {row['layer_applications_per_token']} | {row['accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=DEMO_TASK, help=f"task name (default: {DEMO_TASK})")
    parser.add_argument("--task-options", default=None,
                        help=f"task knobs as JSON (default for {DEMO_TASK}:"
                             f" the demo's {json.dumps(DEMO_TASK_OPTIONS)})")
    parser.add_argument("--layers", type=int, default=1, help="L: core layers of the looped and shallow models")
    parser.add_argument("--loop-steps", type=int, default=4, help="T: loop steps of the looped model")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-examples", type=int, default=1024, help="held-out problems scored")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--out", help="keep the three runs under this directory (default: a temporary one)")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args(argv)

    if args.task_options is None:
        task_options = dict(DEMO_TASK_OPTIONS) if args.task == DEMO_TASK else {}
    else:
        task_options = json.loads(args.task_options)
    torch.set_num_threads(args.threads)
    task = make_task(args.task, **task_options)
    tokenizer = looplm.load_tokenizer("byte")
    held_out = TaskBatches(task, tokenizer, split="test", seed=args.seed).eval_set(args.eval_examples,
                                                                                   seed=args.seed + 7)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.out) if args.out else Path(scratch)
        for variant in variants(args.layers, args.loop_steps):
            print(f"training {variant.name}: {variant.layers} layers x {variant.loop_steps} steps,"
                  f" {args.steps} steps of batch {args.batch_size}", file=sys.stderr)
            rows.append(train_and_score(variant, args, task_options, held_out, work))
    report = {"task": args.task, "task_options": task_options, "d_model": args.d_model, "steps": args.steps,
              "batch_size": args.batch_size, "threads": args.threads, "held_out_examples": len(held_out),
              "rows": rows}
    print(f"\n{args.task} {json.dumps(task_options)}, d_model {args.d_model}, {args.steps} steps of batch"
          f" {args.batch_size}, {len(held_out)} held-out problems\n")
    print(markdown_table(rows))
    looped = rows[0]["accuracy_by_step"]
    print("\nlooped model by loop step: " + ", ".join(f"{step + 1}: {value:.3f}" for step, value in enumerate(looped)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
