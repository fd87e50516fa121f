"""Compute-quality curves of exit policies, from one full forward per batch.

One forward with ``steps`` loop steps gives, at every scored position (a target ≠ −100), what
each step would predict: its cross-entropy L_t, whether its argmax is the target, the exit
gate logit z_t, the relative readout change ‖r_t − r_{t−1}‖ / ‖r_t‖ and the readout KL
KL(p_t ‖ p_{t−1}) (``StepRecords``).  An exit policy (``looplm.exit_policy``, the decoders'
own objects and ``decide``, replayed over the recorded signals by ``exit_policy.exit_steps``)
then picks a step e per position, and the step-e prediction is the one that counts:

* ``q``       first step whose exit CDF 1 − Π_{j≤n}(1 − λ_j) reaches q (q = 1: T steps);
* ``static``  always step t;
* ``hidden``  first step t ≥ 2 whose relative readout change is below ε (Ouro §5.4);
* ``kl``      first step t ≥ 2 whose readout KL is below ε (Huginn).

A curve point is (mean exit step over the scored positions = compute, quality): the mean
loss for text, and for a task also exact-match accuracy (an example is right iff every answer
position's step-e argmax is its target; teacher forcing equals greedy generation, see
``looplm.data.tasks.EvalSet``).  Policies see only the first ``trained_steps`` steps, as a
decoder with T = trained steps does.

Why this equals decoding.  A token's readouts at every step depend only on the tokens before
it and their per-step keys/values.  When every earlier token has every step's keys/values —
the ``full`` per-step cache layout, or a prefill — a token decoded with early exit at step e
produces exactly the step-e readout of the full forward, so choosing e after the fact gives
the same losses and answers (``tests/test_eval_report.py`` holds this against ``Decoder``).
The ``Decoder``'s LAST_EXITED layout differs slightly: a token that exited at e has its
step-e keys/values copied into steps e+1..T, so a later token that goes deeper attends to
those copies instead of the states the full forward computed; the curves here are the
full-cache numbers, the baseline such cache sharing is measured against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from looplm.errors import LoopLMError
from looplm.exit_policy import ExitPolicy, FixedSteps, Signal, exit_steps, parse_exit
from looplm.model.exit import hidden_change, readout_kl

IGNORE_INDEX = -100
Q_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
HIDDEN_CHANGE_GRID = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0)
KL_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0)


@dataclass
class StepRecords:
    """What each of S loop steps gives at N scored positions.

    losses [S, N] cross-entropy (nats) of step t's readout; hits [S, N] argmax == target;
    gate_logits [S, N] (None without an exit gate); hidden_change [S−1, N] and
    readout_kl [S−1, N] (None unless asked) compare step t with step t−1 for t = 2..S;
    example [N] the row each position belongs to; rows: how many rows were scored.
    """

    losses: torch.Tensor
    hits: torch.Tensor
    gate_logits: torch.Tensor | None
    hidden_change: torch.Tensor
    readout_kl: torch.Tensor | None
    example: torch.Tensor
    rows: int

    @property
    def steps(self) -> int:
        return self.losses.shape[0]

    @property
    def positions(self) -> int:
        return self.losses.shape[1]


@dataclass(frozen=True)
class CurvePoint:
    """One setting of one policy: mean exit step (compute) and the quality it buys."""

    policy: str
    setting: float
    mean_steps: float
    loss: float
    accuracy: float | None


@torch.no_grad()
def collect_step_records(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                         kl: bool = False, progress=None) -> StepRecords:
    """Run each (inputs, targets [B, S]) batch once with ``steps`` loop steps; keep per-step
    results at the positions whose target is not −100 (see ``StepRecords``).  ``progress`` is
    called with each finished batch's row count (e.g. a tqdm bar's ``update``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("losses", "hits", "gates", "change", "kl", "example")}
    rows = 0
    for inputs, targets in batches:
        output = model(inputs.to(device), steps=steps)
        targets = targets.to(device)
        mask = targets != IGNORE_INDEX
        wanted = targets[mask]
        readouts = [hidden[mask] for hidden in output.hidden_states]  # S × [n, D]
        losses, hits, divergences, previous = [], [], [], None
        for readout in readouts:
            logits = model.logits(readout).float()
            losses.append(F.cross_entropy(logits, wanted, reduction="none"))
            hits.append(logits.argmax(-1) == wanted)
            if kl and previous is not None:
                divergences.append(readout_kl(previous, logits))
            previous = logits
        parts["losses"].append(torch.stack(losses).cpu())
        parts["hits"].append(torch.stack(hits).cpu())
        changes = [hidden_change(before, after) for before, after in zip(readouts, readouts[1:])]
        parts["change"].append(torch.stack(changes).float().cpu() if changes else torch.zeros(0, len(wanted)))
        if kl:
            parts["kl"].append(torch.stack(divergences).reshape(steps - 1, -1).cpu() if divergences
                               else torch.zeros(0, len(wanted)))
        if output.gate_logits is not None:
            parts["gates"].append(output.gate_logits[:, mask].float().cpu())
        row_of = torch.arange(inputs.shape[0], device=device).unsqueeze(1).expand_as(mask)[mask]
        parts["example"].append(row_of.cpu() + rows)
        rows += inputs.shape[0]
        if progress is not None:
            progress(inputs.shape[0])
    model.train(was_training)
    if not parts["losses"]:
        raise LoopLMError("nothing to evaluate: the evaluation data gave no batches")
    return StepRecords(losses=torch.cat(parts["losses"], 1), hits=torch.cat(parts["hits"], 1),
                       gate_logits=torch.cat(parts["gates"], 1) if parts["gates"] else None,
                       hidden_change=torch.cat(parts["change"], 1),
                       readout_kl=torch.cat(parts["kl"], 1) if kl else None,
                       example=torch.cat(parts["example"]), rows=rows)


def policy_steps(records: StepRecords, policy: ExitPolicy, trained_steps: int) -> torch.Tensor:
    """Per scored position, the 1-based step ``policy`` exits at, among steps 1..trained_steps."""
    if not 1 <= trained_steps <= records.steps:
        raise LoopLMError(f"trained_steps must be in [1, {records.steps}], got {trained_steps}")
    signals = {Signal.GATE: records.gate_logits, Signal.READOUT_CHANGE: records.hidden_change,
               Signal.LOGITS_CHANGE: records.readout_kl}
    recorded = signals.get(policy.signal)
    if recorded is None and policy.reads_every_step:
        raise LoopLMError(f"exit {policy.spec()} needs " + ("a model with an exit gate" if policy.needs_gate else
                                                            "records collected with kl=True"))
    changes = policy.signal is not Signal.GATE  # entry t − 1 compares step t with step t − 1

    def signal(step: int) -> torch.Tensor:
        return recorded[step] if not changes else (recorded[step - 1] if step else torch.zeros(records.positions))

    return exit_steps(policy, min(policy.max_steps(trained_steps), trained_steps), records.positions, signal)


def exact_match(records: StepRecords, steps: torch.Tensor) -> float:
    """Fraction of rows whose every scored position is right at its exit step ``steps`` [N]."""
    hits = records.hits.gather(0, (steps - 1).unsqueeze(0)).squeeze(0)
    wrong = torch.zeros(records.rows).index_add_(0, records.example, (~hits).float())
    return float((wrong == 0).float().mean())


def curve_point(records: StepRecords, policy: ExitPolicy, trained_steps: int, with_accuracy: bool) -> CurvePoint:
    steps = policy_steps(records, policy, trained_steps)
    loss = float(records.losses.gather(0, (steps - 1).unsqueeze(0)).mean())
    accuracy = exact_match(records, steps) if with_accuracy else None
    setting = getattr(policy, policy.parameter) if policy.parameter else policy.steps
    return CurvePoint(policy.name, float(setting), float(steps.float().mean()), loss, accuracy)


def compute_quality_curves(records: StepRecords, trained_steps: int, with_accuracy: bool,
                           q_grid=Q_GRID, hidden_change_grid=HIDDEN_CHANGE_GRID,
                           kl_grid=KL_GRID) -> list[CurvePoint]:
    """Every policy over its grid: Q-exit (if the model has a gate), static steps 1..T,
    hidden change, and KL (if the records have it)."""
    policies = [FixedSteps(steps) for steps in range(1, trained_steps + 1)]
    policies += [parse_exit(f"hidden:{epsilon!r}") for epsilon in hidden_change_grid]
    if records.gate_logits is not None:
        policies = [parse_exit(f"q:{q!r}") for q in q_grid] + policies
    if records.readout_kl is not None:
        policies += [parse_exit(f"kl:{epsilon!r}") for epsilon in kl_grid]
    return [curve_point(records, policy, trained_steps, with_accuracy) for policy in policies]
