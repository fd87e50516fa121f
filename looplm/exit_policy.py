"""Exit policies: how many loop steps each decoded token runs (docs/MATH.md §2, §5).

- ``FixedSteps(n)``       n steps for every token (n may exceed the trained T).
- ``QExit(q)``            the first step n with CDF(n) = 1 − Π_{j≤n}(1 − λ_j) ≥ q (Ouro); q = 1
                          always runs every step.
- ``HiddenDiffExit(ε)``   the first step whose readout moved less than ε relative to the previous
                          step's, ‖r_t − r_{t−1}‖ / ‖r_t‖ < ε (a convergence criterion; no gate needed).
- ``KLExit(ε)``           the first step whose next-token distribution moved less than ε nats from
                          the previous step's, KL(p_t ‖ p_{t−1}) < ε (costs a head matmul per step).
- ``ACTExit``             ACT halting: the halting-weighted readout (every depth still runs).
- ``PerplexityExit(x)``   nanochat's adaptive loop: the first step whose next-token distribution has
                          perplexity exp(H(p_t)) below x (it is confident; a head matmul per step).

Every policy takes ``steps`` (the most steps, default the trained T) and, except fixed steps and
ACT, ``min_steps`` (no exit before it).  ``ExitRule`` applies a policy to a batch of rows step by
step; the batch-1 decoder, the batched engine and prefill all decide through it, so every path
makes the same decision from the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from looplm.config import parse_exit_spec
from looplm.errors import LoopLMError
from looplm.model.exit import hidden_change, readout_kl


def _check_steps(steps: int | None, min_steps: int = 1) -> None:
    if steps is not None and steps < 1:
        raise LoopLMError(f"steps must be >= 1, got {steps}")
    if min_steps < 1:
        raise LoopLMError(f"min_steps must be >= 1, got {min_steps}")
    if steps is not None and min_steps > steps:
        raise LoopLMError(f"min_steps ({min_steps}) must not exceed steps ({steps})")


class _Bounded:
    """The most loop steps a policy runs: its ``steps``, else the trained T."""

    steps: int | None

    def max_steps(self, trained_steps: int) -> int:
        return self.steps or trained_steps


@dataclass(frozen=True)
class FixedSteps(_Bounded):
    """Run exactly ``steps`` loop steps for every token (None = the trained T)."""

    steps: int | None = None

    def __post_init__(self) -> None:
        _check_steps(self.steps)



@dataclass(frozen=True)
class QExit(_Bounded):
    """Exit at the first step whose exit CDF reaches ``threshold`` (Ouro's Q-exit)."""

    threshold: float = 0.5
    steps: int | None = None
    min_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise LoopLMError(f"q must be in [0, 1], got {self.threshold}")
        _check_steps(self.steps, self.min_steps)



@dataclass(frozen=True)
class HiddenDiffExit(_Bounded):
    """Exit at the first step t ≥ 2 with ‖r_t − r_{t−1}‖ / ‖r_t‖ < ``epsilon``."""

    epsilon: float = 0.05
    steps: int | None = None
    min_steps: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise LoopLMError(f"the hidden-difference epsilon must be a finite number >= 0, got {self.epsilon}")
        _check_steps(self.steps, self.min_steps)



@dataclass(frozen=True)
class KLExit(_Bounded):
    """Exit at the first step t ≥ 2 with KL(p_t ‖ p_{t−1}) < ``epsilon`` (nats)."""

    epsilon: float = 0.01
    steps: int | None = None
    min_steps: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise LoopLMError(f"the KL epsilon must be a finite number >= 0, got {self.epsilon}")
        _check_steps(self.steps, self.min_steps)



@dataclass(frozen=True)
class ACTExit(_Bounded):
    """ACT halting (Graves; docs/MATH.md §5): the output is the halting-weighted readout
    Σ_t w_t r_t (``exit.act_weights``, the gate read as halting probability).  Every depth
    still runs so that every step's cache holds every token; the reported steps are the
    halting step.  threshold None = the model's ``act_threshold``."""

    threshold: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise LoopLMError(f"the ACT threshold must be in (0, 1], got {self.threshold}")
        _check_steps(self.steps)


def refuse_act_over_mixing(model) -> None:
    """ACT over the readouts of a model whose readouts already are ACT mixtures (model.act_mixing)
    would mix twice: one line instead."""
    if model.config.act_mixing:
        raise LoopLMError("this model's readouts already are ACT mixtures of its loop states (model.act_mixing):"
                          " decode with fixed steps or Q-exit, not --act")


@dataclass(frozen=True)
class PerplexityExit(_Bounded):
    """Exit at the first step whose readout has perplexity exp(H(p_t)) < ``threshold``, with
    H(p) = −Σ_v p_v log p_v over the vocabulary (nanochat's adaptive loop).  A perplexity is at
    least 1, so a threshold ≤ 1 never exits early."""

    threshold: float = 2.0
    steps: int | None = None
    min_steps: int = 1

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise LoopLMError(f"the perplexity threshold must be > 0, got {self.threshold}")
        _check_steps(self.steps, self.min_steps)


ExitPolicy = FixedSteps | QExit | HiddenDiffExit | KLExit | ACTExit | PerplexityExit
EXIT_KINDS = ("static", "q", "hidden", "kl", "act", "ppl")

# A generation may run at most this many times the trained loop steps: extrapolation costs time
# and memory linearly, and far beyond T a looped model's state can overflow (docs/INFERENCE.md).
MAX_STEPS_FACTOR = 4


def check_depth(policy: ExitPolicy, trained_steps: int) -> None:
    """Refuse a policy that runs more than ``MAX_STEPS_FACTOR`` × the trained loop steps."""
    if policy.max_steps(trained_steps) > MAX_STEPS_FACTOR * trained_steps:
        raise LoopLMError(f"steps must be at most {MAX_STEPS_FACTOR * trained_steps} ({MAX_STEPS_FACTOR} x the trained"
                          f" {trained_steps}), got {policy.max_steps(trained_steps)}")


def readout_perplexity(logits: torch.Tensor) -> torch.Tensor:
    """exp(H(softmax(logits))) over the last dim [..., V] → [...], computed in float32."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return torch.exp(-(log_probs.exp() * log_probs).sum(-1))


def make_exit_policy(q: float | None = None, steps: int | None = None, act: bool = False,
                     hidden: float | None = None, kl: float | None = None, min_steps: int = 1,
                     ppl: float | None = None) -> ExitPolicy:
    """The policy the CLI options name: at most one of ``act``, ``q``, ``hidden``, ``kl``, ``ppl``;
    none of them = fixed steps."""
    chosen = [name for name, value in (("--act", act or None), ("--q", q), ("--exit-hidden", hidden),
                                       ("--exit-kl", kl), ("--exit-ppl", ppl)) if value is not None]
    if len(chosen) > 1:
        raise LoopLMError(f"choose one exit policy, not {' and '.join(chosen)}")
    if act:
        return ACTExit(steps=steps)
    if q is not None:
        return QExit(q, steps, min_steps)
    if hidden is not None:
        return HiddenDiffExit(hidden, steps, min_steps)
    if kl is not None:
        return KLExit(kl, steps, min_steps)
    if ppl is not None:
        return PerplexityExit(ppl, steps, min_steps)
    return FixedSteps(steps)


def parse_exit_policy(spec: str, steps: int | None = None, min_steps: int = 1) -> ExitPolicy:
    """``static`` | ``q:0.5`` | ``hidden:0.05`` | ``kl:0.01`` | ``ppl:3`` | ``act`` (the server's
    and the adapters' one-string form); ``min_steps`` applies to the early-exit policies."""
    name, number = parse_exit_spec(spec)
    if name == "static":
        return FixedSteps(steps)
    if name == "act":
        return ACTExit(steps=steps)
    return make_exit_policy(**{name: number}, steps=steps, min_steps=min_steps)


def default_exit_policy(config) -> ExitPolicy:
    """The policy a model carries for callers that name none (``ModelConfig.default_exit``,
    ``min_loop_steps``, ``max_loop_steps``; a GGUF file records them): fixed T steps unless set."""
    return parse_exit_policy(config.default_exit, config.max_loop_steps or None, config.min_loop_steps)


class ExitRule:
    """A policy applied to ``rows`` sequences one loop step at a time.

    Call ``decide(step, readout, gate_logit, logits)`` after each step with the rows still
    running (``rows`` indexes them); it returns a bool [R] of the rows that exit at this step.
    ``readout`` [R, D]; ``gate_logit`` and ``logits`` are functions of no arguments giving the
    rows' gate logits [R] and next-token logits [R, V], called only when the policy needs them.
    """

    def __init__(self, policy: ExitPolicy, rows: int, trained_steps: int, device=None):
        self.policy = policy
        self.max_steps = policy.max_steps(trained_steps)
        self.min_steps = getattr(policy, "min_steps", 1)
        self.kind = {QExit: "q", HiddenDiffExit: "hidden", KLExit: "kl", PerplexityExit: "ppl"}.get(type(policy),
                                                                                                   "static")
        if self.kind == "q" and policy.threshold >= 1.0:
            self.kind = "static"  # q = 1 runs every step
        # Survival in float64 on every path (decide_one uses Python floats), so batched and batch-1
        # decoding decide the same even where the exit CDF lands next to q (MPS has no float64).
        self.survival_dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
        self.log_survival = torch.zeros(rows, device=device, dtype=self.survival_dtype)
        self.previous: torch.Tensor | None = None  # [rows, D] readouts or [rows, V] logits
        self.scalar_survival = 0.0  # decide_one's log survival

    @property
    def active(self) -> bool:
        """Whether the policy can exit before the last step (and so needs every step's readout)."""
        return self.kind != "static"

    def decide(self, step: int, rows: torch.Tensor | None, readout: torch.Tensor, gate_logit,
               logits) -> torch.Tensor:
        count = readout.shape[0]
        exits = torch.zeros(count, dtype=torch.bool, device=readout.device)
        if self.kind == "q":
            survival = self.log_survival if rows is None else self.log_survival[rows]
            survival = survival + F.logsigmoid(-gate_logit().reshape(count).to(self.survival_dtype))
            exits = -torch.expm1(survival) >= self.policy.threshold
            self._store("log_survival", rows, survival)
        elif self.kind in ("hidden", "kl"):
            current = readout.reshape(count, -1).float() if self.kind == "hidden" else logits().reshape(count, -1)
            if step > 0:
                previous = self.previous if rows is None else self.previous[rows]
                distance = hidden_change(previous, current) if self.kind == "hidden" else readout_kl(previous, current)
                exits = distance < self.policy.epsilon
            if self.previous is None:
                self.previous = torch.zeros(self.log_survival.shape[0], current.shape[-1], device=current.device)
            self._store("previous", rows, current)
        elif self.kind == "ppl":
            exits = readout_perplexity(logits().reshape(count, -1)) < self.policy.threshold
        if step + 1 < self.min_steps:
            exits = torch.zeros_like(exits)
        return exits

    def decide_one(self, step: int, readout: torch.Tensor, gate_logit, logits) -> bool:
        """``decide`` for a single row (the batch-1 decoder): Q-exit in Python floats, since
        tensor ops on one number cost more than the decode step of a small model."""
        if self.kind != "q":
            return bool(self.decide(step, None, readout.reshape(1, -1), gate_logit, logits)[0])
        z = float(gate_logit())
        # log σ(−z) = −softplus(z), computed stably for either sign of z.
        self.scalar_survival -= (z + math.log1p(math.exp(-z))) if z > 0 else math.log1p(math.exp(z))
        return step + 1 >= self.min_steps and -math.expm1(self.scalar_survival) >= self.policy.threshold

    def _store(self, name: str, rows: torch.Tensor | None, value: torch.Tensor) -> None:
        if rows is None:
            setattr(self, name, value.clone())
        else:
            getattr(self, name)[rows] = value

    def reset(self) -> None:
        """Start a new token (the batch-1 decoder reuses one rule)."""
        self.log_survival.zero_()
        self.scalar_survival = 0.0
        self.previous = None
