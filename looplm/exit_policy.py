"""Exit policies: how many loop steps each decoded token runs (docs/MATH.md §2, §5), one registry.

``EXIT_POLICIES`` maps names to classes: ``static`` (``FixedSteps``), ``q:<q>`` (``QExit``),
``hidden:<ε>`` (``HiddenDiffExit``), ``kl:<ε>`` (``KLExit``), ``act[:<τ>]`` (``ACTExit``),
``ppl:<x>`` (``PerplexityExit``, nanochat's adaptive loop: exit once the next-token distribution's
perplexity exp(H(p_t)) is below x); each takes ``steps`` (the most steps, None = the trained T),
the early-exit ones ``min_steps``.  ``parse_exit`` reads that string form (the CLI's, the server's,
lm-eval's) or a JSON mapping (``{"name": "q", "threshold": 0.5, "steps": 6}``); a mistake is one
``LoopLMError`` line.  ``default_exit_policy`` is the one a model records (``ModelConfig``).

At each loop step a policy reads one ``Signal`` per row (the gate's logit, or the readout's or
the next-token distribution's change from the previous step) and ``decide`` says which rows
exit, the Q-exit survival in float64 so every path decides alike next to the threshold.  The
scheduler decides through it for every decode path; ``exit_steps`` replays it over a full
forward's recorded signals (eval curves, lm-eval).  ACT exits nowhere: ``act_accumulate`` mixes
the readouts with halting weights while every step runs (every depth's cache holds the token).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from torch.nn import functional as F

from looplm.errors import LoopLMError, is_int, is_number
from looplm.registry import Registry

# A generation may run at most this many times the trained loop steps: extrapolation costs time
# and memory linearly, and far beyond T a looped model's state can overflow (docs/INFERENCE.md).
MAX_STEPS_FACTOR = 4


class Signal(enum.Enum):
    """What a policy reads at each loop step."""

    NONE = "none"                       # nothing: it runs its steps
    GATE = "gate"                       # the exit gate's logit z_t
    READOUT_CHANGE = "readout change"   # ‖r_t − r_{t−1}‖ / ‖r_t‖ (model.exit.hidden_change)
    LOGITS_CHANGE = "logits change"     # KL(p_t ‖ p_{t−1}) (model.exit.readout_kl)
    PERPLEXITY = "perplexity"           # exp(H(p_t)) (readout_perplexity)


class ExitPolicy:
    """The registry's base: ``name`` and the ``parameter`` its string form's number sets."""

    name: ClassVar[str]
    parameter: ClassVar[str | None] = None
    parameter_required: ClassVar[bool] = True
    signal: ClassVar[Signal] = Signal.NONE
    needs_gate: ClassVar[bool] = False
    runs_every_step: ClassVar[bool] = False   # ACT: every step runs and is read out
    steps: int | None
    min_steps: int = 1

    def __post_init__(self) -> None:
        for name, value in (("steps", self.steps), ("min_steps", self.min_steps)):
            if value is not None and not is_int(value):
                raise LoopLMError(f"{name} must be a whole number of loop steps, got {value!r}")
        if self.steps is not None and self.steps < 1:
            raise LoopLMError(f"steps must be >= 1, got {self.steps}")
        if self.min_steps < 1:
            raise LoopLMError(f"min_steps must be >= 1, got {self.min_steps}")
        if self.steps is not None and self.min_steps > self.steps:
            raise LoopLMError(f"min_steps ({self.min_steps}) must not exceed steps ({self.steps})")

    def max_steps(self, trained_steps: int) -> int:
        """The most loop steps a token runs: ``steps``, else the trained T."""
        return self.steps or trained_steps

    @property
    def reads_every_step(self) -> bool:
        """Whether the policy reads a signal at every step (and so needs every step's readout)."""
        return self.signal is not Signal.NONE

    def spec(self) -> str:
        """The one-string form (``q:0.5``)."""
        value = getattr(self, self.parameter) if self.parameter else None
        return self.name if value is None else f"{self.name}:{value:g}"

    @classmethod
    def decide(cls, policies: Sequence[ExitPolicy], steps: torch.Tensor, values: torch.Tensor,
               memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rows exit after 0-based loop step ``steps`` [R], each row with its own policy
        of this class (one policy: all rows), from this step's ``values`` [R] of ``signal``;
        ``memory`` [R] float64 is what the policy keeps across a token's steps (returned updated)."""
        return torch.zeros_like(steps, dtype=torch.bool), memory


def _column(policies: Sequence[ExitPolicy], field: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([getattr(policy, field) for policy in policies], dtype=torch.float64, device=like.device)


@dataclass(frozen=True)
class FixedSteps(ExitPolicy):
    """Run exactly ``steps`` loop steps for every token (None = the trained T)."""

    name: ClassVar[str] = "static"
    steps: int | None = None


@dataclass(frozen=True)
class QExit(ExitPolicy):
    """Exit at the first step whose exit CDF reaches ``threshold`` (Ouro's Q-exit)."""

    name: ClassVar[str] = "q"
    parameter: ClassVar[str] = "threshold"
    needs_gate: ClassVar[bool] = True
    threshold: float = 0.5
    steps: int | None = None
    min_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise LoopLMError(f"q must be in [0, 1], got {self.threshold}")
        super().__post_init__()

    @property
    def signal(self) -> Signal:
        return Signal.GATE if self.threshold < 1.0 else Signal.NONE  # q = 1 runs every step

    @classmethod
    def decide(cls, policies, steps, values, memory):
        """log S_t = log S_{t−1} + log σ(−z_t) in float64; exit when 1 − S_t ≥ q."""
        memory = memory + F.logsigmoid(-values.to(torch.float64))
        return -torch.expm1(memory) >= _column(policies, "threshold", memory), memory


@dataclass(frozen=True)
class _Convergence(ExitPolicy):
    """Exit at the first step t ≥ 2 whose change from step t − 1 is below ``epsilon``."""

    epsilon: float = 0.05
    steps: int | None = None
    min_steps: int = 1
    parameter: ClassVar[str] = "epsilon"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise LoopLMError(f"the {self.what} epsilon must be a finite number >= 0, got {self.epsilon}")
        super().__post_init__()

    @classmethod
    def decide(cls, policies, steps, values, memory):
        return (steps > 0) & (values < _column(policies, "epsilon", values)), memory


@dataclass(frozen=True)
class HiddenDiffExit(_Convergence):
    """Exit at the first step t ≥ 2 with ‖r_t − r_{t−1}‖ / ‖r_t‖ < ``epsilon``."""

    name: ClassVar[str] = "hidden"
    what: ClassVar[str] = "hidden-difference"
    signal: ClassVar[Signal] = Signal.READOUT_CHANGE


@dataclass(frozen=True)
class KLExit(_Convergence):
    """Exit at the first step t ≥ 2 with KL(p_t ‖ p_{t−1}) < ``epsilon`` (nats)."""

    name: ClassVar[str] = "kl"
    what: ClassVar[str] = "KL"
    signal: ClassVar[Signal] = Signal.LOGITS_CHANGE
    epsilon: float = 0.01


@dataclass(frozen=True)
class ACTExit(ExitPolicy):
    """ACT halting (Graves): the halting-weighted readout Σ_t w_t r_t (``act_accumulate``); every
    step runs, the reported steps are the halting step; threshold None = the model's."""

    name: ClassVar[str] = "act"
    parameter: ClassVar[str] = "threshold"
    parameter_required: ClassVar[bool] = False
    needs_gate: ClassVar[bool] = True
    runs_every_step: ClassVar[bool] = True
    threshold: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise LoopLMError(f"the ACT threshold must be in (0, 1], got {self.threshold}")
        super().__post_init__()

    reads_every_step = True


def refuse_act_over_mixing(model) -> None:
    """ACT over the readouts of a model whose readouts already are ACT mixtures (model.act_mixing)
    would mix twice: one line instead."""
    if model.config.act_mixing:
        raise LoopLMError("this model's readouts already are ACT mixtures of its loop states (model.act_mixing):"
                          " decode with fixed steps or Q-exit, not the act exit policy")

# name → class: the string and JSON forms' vocabulary (looplm.registry; add a class here to register it).
EXIT_POLICIES = Registry("exit policy")
EXIT_POLICIES.update({kind.name: kind for kind in (FixedSteps, QExit, HiddenDiffExit, KLExit, ACTExit)})


@dataclass(frozen=True)
class PerplexityExit(ExitPolicy):
    """Exit at the first step whose readout has perplexity exp(H(p_t)) < ``threshold``, with
    H(p) = −Σ_v p_v log p_v over the vocabulary (nanochat's adaptive loop; a head matmul per step).
    A perplexity is at least 1, so a threshold ≤ 1 never exits early."""

    name: ClassVar[str] = "ppl"
    parameter: ClassVar[str] = "threshold"
    signal: ClassVar[Signal] = Signal.PERPLEXITY
    threshold: float = 2.0
    steps: int | None = None
    min_steps: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise LoopLMError(f"the perplexity threshold must be a finite number > 0, got {self.threshold}")
        super().__post_init__()

    @classmethod
    def decide(cls, policies, steps, values, memory):
        return values < _column(policies, "threshold", values), memory


EXIT_POLICIES.register("ppl")(PerplexityExit)
EXIT_KINDS = tuple(EXIT_POLICIES)

def act_accumulate(thresholds: torch.Tensor, steps: torch.Tensor, last: torch.Tensor, gate: torch.Tensor,
                   readout: torch.Tensor, total: torch.Tensor, halting: torch.Tensor, state: torch.Tensor):
    """One ACT step of R rows (``model.exit.act_weights`` step by step): a row's weight is p = σ(z)
    until its running ``total`` (float64) would reach its threshold, or at its ``last`` step, where
    it takes the remainder 1 − total, then 0.  steps [R] 0-based; ``halting`` [R] 1-based halting
    steps (0: not yet); ``state`` [R, D] Σ_t w_t r_t.  Returns (total, halting, state)."""
    going = halting == 0
    probability = torch.sigmoid(gate.reshape(-1).to(torch.float64))
    halts = going & ((total + probability >= thresholds) | last)
    weight = torch.where(halts, 1.0 - total, torch.where(going, probability, 0.0))
    total = torch.where(going & ~halts, total + probability, total)
    halting = torch.where(halts, steps + 1, halting)
    return total, halting, state + weight.to(readout.dtype).unsqueeze(-1) * readout


def exit_steps(policy: ExitPolicy, last: int, count: int, signal: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The 1-based step ``policy`` stops at among steps 1..``last``, for ``count`` rows whose
    per-step signals a full forward recorded: ``signal(t)`` [count] at 0-based step t (for a
    change, the change from step t − 1; anything at t = 0).  The same ``decide`` as decoding."""
    chosen = torch.full((count,), last, dtype=torch.long)
    if not policy.reads_every_step or policy.runs_every_step:
        return chosen
    memory = torch.zeros(count, dtype=torch.float64)
    done = torch.zeros(count, dtype=torch.bool)
    for step in range(last - 1):
        steps = torch.full((count,), step, dtype=torch.long)
        exits, memory = type(policy).decide([policy], steps, signal(step).cpu(), memory)
        exits &= ~done & (step + 1 >= policy.min_steps)
        chosen = torch.where(exits, step + 1, chosen)
        done |= exits
    return chosen


def check_depth(policy: ExitPolicy, trained_steps: int) -> None:
    """Refuse a policy that runs more than ``MAX_STEPS_FACTOR`` × the trained loop steps, or whose
    ``min_steps`` exceeds the steps it runs."""
    most = policy.max_steps(trained_steps)
    if most > MAX_STEPS_FACTOR * trained_steps:
        raise LoopLMError(f"steps must be at most {MAX_STEPS_FACTOR * trained_steps} ({MAX_STEPS_FACTOR} x the trained"
                          f" {trained_steps}), got {most}")
    if getattr(policy, "min_steps", 1) > most:  # it would run `most` steps without a word
        raise LoopLMError(f"min_steps ({policy.min_steps}) exceeds the {most} loop steps this policy runs: lower it"
                          " or raise steps")


def readout_perplexity(logits: torch.Tensor) -> torch.Tensor:
    """exp(H(softmax(logits))) over the last dim [..., V] → [...], computed in float32."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return torch.exp(-(log_probs.exp() * log_probs).sum(-1))


USAGE = "use static, q:<q>, hidden:<eps>, kl:<eps>, ppl:<x>, act or act:<threshold>"


def parse_exit(spec: str | Mapping | ExitPolicy, steps: int | None = None, min_steps: int | None = None) -> ExitPolicy:
    """The policy ``spec`` names: ``static`` | ``q:0.5`` | ``hidden:0.05`` | ``kl:0.01`` | ``ppl:3`` |
    ``act`` | ``act:0.9``, or a mapping {"name": …, its fields}; ``steps``/``min_steps`` (None: the
    default) set those fields (``min_steps`` only for the policies that have one)."""
    if isinstance(spec, ExitPolicy):  # the steps asked for still apply
        changes = {name: value for name, value in (("steps", steps), ("min_steps", min_steps)) if value is not None}
        if "min_steps" in changes and not _has_min_steps(spec):
            if changes.pop("min_steps") != 1:
                _refuse_min_steps(spec.name)
        return replace(spec, **changes) if changes else spec
    if isinstance(spec, Mapping):
        values = dict(spec)
        name, number = str(values.pop("name", "")), None
        for field, given in (("steps", steps), ("min_steps", min_steps)):
            if given is not None and field in values and values[field] != given:
                raise LoopLMError(f"{field} is given twice, {values[field]!r} in the exit and {given!r} beside it:"
                                  " give it once")
    else:
        name, colon, number = str(spec).strip().partition(":")
        values, number = {}, number if colon else None
    if name not in EXIT_POLICIES:
        raise LoopLMError(f"unknown exit {spec!r}: {USAGE}")
    kind = EXIT_POLICIES[name]
    known = {field.name for field in fields(kind)}
    if set(values) - known:
        raise LoopLMError(f"exit {name} has no {', '.join(sorted(set(values) - known))}: its fields are"
                          f" {', '.join(sorted(known))}")
    if isinstance(spec, Mapping) and kind.parameter and kind.parameter_required and values.get(kind.parameter) is None:
        raise LoopLMError(f"exit {name} needs its {kind.parameter}, a number: e.g. {{\"name\": \"{name}\","
                          f" \"{kind.parameter}\": ...}}")
    if number is not None or (kind.parameter_required and kind.parameter and kind.parameter not in values):
        if kind.parameter is None:
            raise LoopLMError(f"exit {name} takes no number, got {spec!r}")
        try:
            values[kind.parameter] = float(number)
        except (TypeError, ValueError):
            raise LoopLMError(f"exit {spec!r} needs a number after '{name}:': {USAGE}") from None
    if steps is not None:
        values["steps"] = steps
    if min_steps is not None and (min_steps != 1 or "min_steps" in known):
        if "min_steps" not in known:
            _refuse_min_steps(name)
        values["min_steps"] = min_steps
    wrong = [f"{field}={value!r}" for field, value in values.items()
             if not (value is None or is_number(value))]
    if wrong:
        raise LoopLMError(f"exit {name} takes numbers, got {', '.join(wrong)}")
    try:
        return kind(**values)
    except (TypeError, OverflowError) as error:  # a null where a number belongs, an integer past float's range
        raise LoopLMError(f"exit {name}: {', '.join(f'{k}={v!r}' for k, v in values.items())[:200]} is not a"
                          f" valid setting ({type(error).__name__})") from None


def make_exit_policy(q: float | None = None, steps: int | None = None, act: bool = False,
                     hidden: float | None = None, kl: float | None = None, min_steps: int | None = None,
                     ppl: float | None = None, config=None) -> ExitPolicy:
    """The policy the CLI options name: at most one of ``act``, ``q``, ``hidden``, ``kl``, ``ppl``;
    none of them = fixed steps (``steps``), or, given the model's ``config`` and no ``steps``
    either, the policy the model records (``default_exit_policy``; ``min_steps``, where given,
    then sets its least steps).  A named policy replaces the recorded one whole (``min_steps``
    None: 1).  ``min_steps`` given for a policy that exits at a fixed depth is an error."""
    chosen = [(flag, spec) for flag, spec, value in (("--act", "act", act or None), ("--q", f"q:{q!r}", q),
                                                     ("--exit-hidden", f"hidden:{hidden!r}", hidden),
                                                     ("--exit-kl", f"kl:{kl!r}", kl),
                                                     ("--exit-ppl", f"ppl:{ppl!r}", ppl)) if value is not None]
    if len(chosen) > 1:
        raise LoopLMError(f"choose one exit policy, not {' and '.join(flag for flag, _ in chosen)}")
    if config is not None and not chosen and steps is None:  # none named: the model's own
        recorded = default_exit_policy(config)
        if min_steps is None:
            return recorded
        if not _has_min_steps(recorded):
            raise LoopLMError(f"--min-steps needs an early exit, and this model's default exit is"
                              f" {config.default_exit!r}: add --q, --exit-hidden, --exit-kl or --exit-ppl")
        return replace(recorded, min_steps=min_steps)
    return parse_exit(chosen[0][1] if chosen else "static", steps, min_steps)


def _refuse_min_steps(name: str) -> None:
    """A least number of steps asked of a policy that exits at a fixed depth (it would be dropped)."""
    raise LoopLMError(f"min_steps applies to the early exits q, hidden, kl and ppl (--min-steps), not {name}: drop it"
                      " or choose one of those")


def _has_min_steps(policy) -> bool:
    return "min_steps" in {field.name for field in fields(policy)}


def parse_exit_policy(spec: str, steps: int | None = None, min_steps: int = 1) -> ExitPolicy:
    """``parse_exit`` of the one-string form (``static``, ``q:0.5``, ``ppl:3``, …)."""
    return parse_exit(spec, steps, min_steps)


def default_exit_policy(config) -> ExitPolicy:
    """The policy a model carries for callers that name none (``ModelConfig.default_exit``,
    ``min_loop_steps``, ``max_loop_steps``; a GGUF file records them): fixed T steps unless set."""
    policy = parse_exit(config.default_exit, config.max_loop_steps or None)
    return replace(policy, min_steps=config.min_loop_steps) if _has_min_steps(policy) else policy
