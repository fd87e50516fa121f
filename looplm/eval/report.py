"""The ``looplm eval`` report: quality per loop step, exit statistics and compute-quality curves.

``build_report`` turns ``StepRecords`` (one full forward per batch, ``looplm.eval.curves``)
into a JSON-ready dict:

* ``per_step``: for steps 1..S (S = T + 2 by default: T+1, T+2 extrapolate depth) the mean
  loss over scored tokens, its perplexity exp(loss), and for a task exact-match accuracy;
* ``mean_exit_step`` E_p[t] and ``exit_entropy`` H(p) of the gate's exit distribution over
  the trained T steps, averaged over scored tokens, and ``exit_histogram``: per step the mean
  p(t) and the share of tokens Q-exit at ``histogram_q`` stops at;
* ``curves``: one point per (policy, setting) — mean exit step vs loss (and accuracy).

``write_report`` writes it to a new directory, atomically: per_step.csv, curves.csv,
exit_histogram.csv, report.json, report.md (Markdown tables referencing the PNGs) and the
PNG plots of ``looplm.eval.plots``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from looplm.errors import LoopLMError
from looplm.eval.curves import (
    HIDDEN_CHANGE_GRID,
    KL_GRID,
    Q_GRID,
    StepRecords,
    compute_quality_curves,
    exact_match,
    policy_steps,
)
from looplm.exit_policy import QExit
from looplm.model.exit import exit_distribution, log_exit_distribution

HISTOGRAM_Q = 0.5
PLOTS = {"per_step": "per_step.png", "curves": "curves.png", "exit_histogram": "exit_histogram.png"}
# every file a report directory may hold (--overwrite replaces a directory holding nothing else)
REPORT_FILES = frozenset({"per_step.csv", "curves.csv", "exit_histogram.csv", "report.json", "report.md",
                          *PLOTS.values()})


def build_report(records: StepRecords, trained_steps: int, with_accuracy: bool, description: str = "",
                 q_grid=Q_GRID, hidden_change_grid=HIDDEN_CHANGE_GRID, kl_grid=KL_GRID,
                 histogram_q: float = HISTOGRAM_Q) -> dict:
    trained_steps = min(trained_steps, records.steps)
    per_step = []
    for step in range(1, records.steps + 1):
        loss = float(records.losses[step - 1].mean())
        row = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
               "accuracy": exact_match(records, torch.full((records.positions,), step)) if with_accuracy else None,
               "extrapolated": step > trained_steps}
        per_step.append(row)
    report = {"data": description, "trained_steps": trained_steps, "steps": records.steps,
              "scored_tokens": records.positions, "rows": records.rows, "per_step": per_step,
              "loss_by_step": [row["loss"] for row in per_step],
              "accuracy_by_step": [row["accuracy"] for row in per_step] if with_accuracy else None,
              "mean_exit_step": None, "exit_entropy": None, "histogram_q": histogram_q, "exit_histogram": []}
    if records.gate_logits is not None:
        gates = records.gate_logits[:trained_steps]
        p = exit_distribution(gates)
        index = torch.arange(1, trained_steps + 1, dtype=p.dtype).unsqueeze(1)
        report["mean_exit_step"] = float((p * index).sum(0).mean())
        report["exit_entropy"] = float(-(p * log_exit_distribution(gates)).sum(0).mean())
        chosen = policy_steps(records, QExit(histogram_q), trained_steps)
        report["exit_histogram"] = [{"step": step, "mean_exit_probability": float(p[step - 1].mean()),
                                     "q_exit_fraction": float((chosen == step).float().mean())}
                                    for step in range(1, trained_steps + 1)]
    curves = compute_quality_curves(records, trained_steps, with_accuracy, q_grid, hidden_change_grid, kl_grid)
    report["curves"] = [asdict(point) for point in curves]
    return report


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: "" if row.get(key) is None else row[key] for key in columns} for row in rows)


def _number(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """report.md: summary tables, the PNGs, and what the curves mean."""
    task = report["accuracy_by_step"] is not None
    lines = ["# looplm eval report", ""]
    if report.get("checkpoint"):
        lines.append(f"- checkpoint: `{report['checkpoint']}`")
    lines += [f"- data: {report['data']}", f"- trained loop steps T = {report['trained_steps']};"
              f" evaluated steps 1..{report['steps']}", f"- scored tokens: {report['scored_tokens']:,}"
              f" in {report['rows']:,} rows", "", "## Quality by loop step", "",
              "| step | loss | perplexity |" + (" exact match |" if task else ""),
              "|---|---|---|" + ("---|" if task else "")]
    for row in report["per_step"]:
        note = " (extrapolated)" if row["extrapolated"] else ""
        lines.append(f"| {row['step']}{note} | {row['loss']:.4f} | {row['perplexity']:.3f} |"
                     + (f" {row['accuracy']:.3f} |" if task else ""))
    lines += ["", f"![quality by loop step]({PLOTS['per_step']})", "", "## Exit steps", ""]
    if report["exit_histogram"]:
        lines += [f"Mean exit step E_p[t] = {report['mean_exit_step']:.3f}, exit entropy H(p) ="
                  f" {report['exit_entropy']:.3f} nats (gate over the trained T steps).", "",
                  f"| step | mean p(t) | share exiting at Q-exit q = {report['histogram_q']} |", "|---|---|---|"]
        lines += [f"| {row['step']} | {row['mean_exit_probability']:.4f} | {row['q_exit_fraction']:.4f} |"
                  for row in report["exit_histogram"]]
        lines += ["", f"![exit histogram]({PLOTS['exit_histogram']})"]
    else:
        lines.append("This model has no exit gate.")
    lines += ["", "## Compute vs quality", "",
              "Each point: the mean loop steps per scored token under an exit policy, and the loss"
              + (" and exact-match accuracy" if task else "") + " of the step each token exits at. All points"
              " come from one full forward per batch; they equal decoding with that exit policy when every"
              " earlier token keeps its keys/values at every step (the `full` per-step cache layout, or a"
              " prefill). Decoding with LAST_EXITED caches (an exited token's keys/values copied into the"
              " deeper steps) differs slightly for tokens that attend to earlier early-exited tokens.", "",
              "| policy | setting | mean steps | loss |" + (" exact match |" if task else ""),
              "|---|---|---|---|" + ("---|" if task else "")]
    for point in report["curves"]:
        lines.append(f"| {point['policy']} | {point['setting']:g} | {point['mean_steps']:.3f} |"
                     f" {point['loss']:.4f} |" + (f" {_number(point['accuracy'], 3)} |" if task else ""))
    lines += ["", f"![compute vs quality]({PLOTS['curves']})", ""]
    capacity = report.get("capacity")
    if capacity:
        lines += ["## Knowledge capacity (capo)", "",
                  f"{capacity['people']} people × {capacity['attributes']} attributes × {capacity['values']} values"
                  f" = {capacity['prior_bits']:.0f} bits in the world; {capacity['parameters']:,} parameters.", "",
                  "| step | bits stored (loss) | bits (Fano, accuracy) | bits / parameter | exact match |",
                  "|---|---|---|---|---|"]
        for step, bits in enumerate(capacity["bits_by_step"], start=1):
            lines.append(f"| {step} | {bits:.1f} | {capacity['fano_bits_by_step'][step - 1]:.1f} |"
                         f" {capacity['bits_per_parameter_by_step'][step - 1]:.5f} |"
                         f" {capacity['accuracy_by_step'][step - 1]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def check_report_directory(out_dir: str | Path, overwrite: bool) -> None:
    """What ``write_report`` refuses, for callers to check before the slow part: a file, a
    non-empty directory unless ``overwrite``, and one holding anything but report files."""
    from looplm.checkpoint.atomic import check_replaceable

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LoopLMError(f"--out {str(out_dir)!r} is a file: give a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LoopLMError(f"--out {str(out_dir)!r} is not empty: choose a new directory or pass --overwrite")
    check_replaceable(out_dir, REPORT_FILES.__contains__)


def write_report(report: dict, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the report files into ``out_dir`` (new or empty unless ``overwrite``), atomically."""
    from looplm.checkpoint.atomic import atomic_directory
    from looplm.eval.plots import plot_curves, plot_exit_histogram, plot_per_step

    out_dir = Path(out_dir)
    check_report_directory(out_dir, overwrite)

    def write(staging: Path) -> None:
        _write_csv(staging / "per_step.csv", report["per_step"],
                   ["step", "loss", "perplexity", "accuracy", "extrapolated"])
        _write_csv(staging / "curves.csv", report["curves"], ["policy", "setting", "mean_steps", "loss", "accuracy"])
        _write_csv(staging / "exit_histogram.csv", report["exit_histogram"],
                   ["step", "mean_exit_probability", "q_exit_fraction"])
        plot_per_step(report, staging / PLOTS["per_step"])
        plot_curves(report, staging / PLOTS["curves"])
        if report["exit_histogram"]:
            plot_exit_histogram(report, staging / PLOTS["exit_histogram"])
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(markdown(report))

    return atomic_directory(out_dir, write, replaceable=REPORT_FILES.__contains__)
