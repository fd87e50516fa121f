"""Stage II on the demo task: does gate-only training make Q-exit cheaper at equal accuracy?

Starts from a Stage-I demo checkpoint (``looplm demo --out DIR`` writes one to DIR/run; this
script runs the demo first when --stage1 is not given), trains the exit gate alone with Ouro's
Stage II (the LM frozen), then evaluates both models on the same held-out problems: accuracy
at full depth, and for each q the mean loop steps per decision and the accuracy under Q-exit.

    python benchmarks/stage2_demo.py --stage1 runs/demo/run --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from looplm.checkpoint.directory import resolve_checkpoint
from looplm.config import RunConfig
from looplm.data.tasks import TaskBatches, make_task
from looplm.demo import DEMO_TASK, DEMO_TASK_OPTIONS, evaluate_q_exit, run_demo
from looplm.eval.depth import accuracy_by_step
from looplm.model.loading import load_checkpoint_tokenizer, load_model
from looplm.training.trainer import Trainer


def report(name: str, model, task, held_out, tokenizer, qs, examples) -> dict:
    full = accuracy_by_step(model, held_out, steps=model.config.loop_steps)[-1]
    row = {"model": name, "accuracy_full_depth": full}
    for q in qs:
        mean_steps, accuracy, _ = evaluate_q_exit(model, task, held_out, tokenizer, q, examples)
        row[f"q{q}"] = {"mean_steps": mean_steps, "accuracy": accuracy}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", help="Stage-I checkpoint or run directory (default: run the demo)")
    parser.add_argument("--out", default="runs/stage2_demo")
    parser.add_argument("--steps", type=int, default=300, help="Stage II optimiser steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--q", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--examples", type=int, default=512, help="held-out problems for Q-exit generation")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    stage1 = args.stage1 or str(Path(run_demo(out / "demo", progress=False)["checkpoint"]))
    checkpoint = resolve_checkpoint(stage1)
    run = RunConfig.from_dict(json.loads((checkpoint / "run_config.json").read_text()))
    train = dataclasses.replace(run.train, steps=args.steps, lr=args.lr, warmup_steps=0, stage=2, init=str(checkpoint),
                                eval_every=0, save_every=0)
    stage2_run = RunConfig(run.model, train, run.data)
    Trainer(stage2_run, out / "stage2", progress=True).train()

    task = make_task(DEMO_TASK, **DEMO_TASK_OPTIONS)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    held_out = TaskBatches(task, tokenizer, split="test", seed=run.train.seed).eval_set(1024, seed=run.train.seed + 7)
    rows = [report("stage I", load_model(checkpoint), task, held_out, tokenizer, args.q, args.examples),
            report("stage I + II", load_model(out / "stage2"), task, held_out, tokenizer, args.q, args.examples)]
    print(f"\n{'model':<14} {'full depth':>10} " + " ".join(f"{'q=' + str(q) + ' steps/acc':>18}" for q in args.q))
    for row in rows:
        cells = " ".join(f"{row[f'q{q}']['mean_steps']:>9.2f} / {row[f'q{q}']['accuracy']:.3f}" for q in args.q)
        print(f"{row['model']:<14} {row['accuracy_full_depth']:>10.3f} {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
