"""PNG plots of an evaluation report (matplotlib, Agg backend: no display needed).

``plot_per_step``: loss (and exact-match accuracy for a task) by loop step, the trained T
marked.  ``plot_curves``: mean exit step (compute) against quality, one line per exit policy.
``plot_exit_histogram``: the gate's mean exit distribution p(t) and the share of positions
Q-exit stops at each step.
"""

from __future__ import annotations

from pathlib import Path

POLICY_LABELS = {"q": "Q-exit (threshold q)", "static": "static steps", "hidden": "hidden change < ε",
                 "kl": "readout KL < ε"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(axis, xlabel: str, ylabel: str, title: str | None = None) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    if title:
        axis.set_title(title)


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_per_step(report: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = report["per_step"]
    steps = [row["step"] for row in rows]
    has_accuracy = rows[0].get("accuracy") is not None
    figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 6, 4), dpi=110,
                                squeeze=False)
    panels = [("loss", "loss (nats / token)")] + ([("accuracy", "exact-match accuracy")] if has_accuracy else [])
    for axis, (key, label) in zip(axes[0], panels):
        axis.plot(steps, [row[key] for row in rows], marker="o")
        axis.axvline(report["trained_steps"], color="grey", linestyle=":",
                     label=f"trained T = {report['trained_steps']}")
        axis.set_xticks(steps)
        _label(axis, "loop steps", label)
    figure.suptitle("quality by loop step")
    return _save(plt, figure, path)


def plot_curves(report: dict, path: Path) -> Path:
    plt = _pyplot()
    points = report["curves"]
    key = "accuracy" if points and points[0]["accuracy"] is not None else "loss"
    figure, axis = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for policy in dict.fromkeys(point["policy"] for point in points):
        chosen = sorted((point for point in points if point["policy"] == policy), key=lambda point: point["mean_steps"])
        axis.plot([point["mean_steps"] for point in chosen], [point[key] for point in chosen], marker="o",
                  markersize=3, label=POLICY_LABELS.get(policy, policy))
    _label(axis, "mean loop steps per scored token (compute)",
           "exact-match accuracy" if key == "accuracy" else "loss (nats / token)", "compute vs quality by exit policy")
    return _save(plt, figure, path)


def plot_exit_histogram(report: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = report["exit_histogram"]
    steps = [row["step"] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4), dpi=110)
    width = 0.4
    axis.bar([step - width / 2 for step in steps], [row["mean_exit_probability"] for row in rows], width,
             label="mean exit distribution p(t)")
    axis.bar([step + width / 2 for step in steps], [row["q_exit_fraction"] for row in rows], width,
             label=f"share exiting under Q-exit q = {report['histogram_q']}")
    axis.set_xticks(steps)
    _label(axis, "exit step", "share of scored tokens", "exit steps")
    return _save(plt, figure, path)
