"""Steppers: what runs one loop step of decode rows, and the registry of decode backends.

A stepper gets ``Rows`` (each row's cache row, loop step and position) and tensors of one row
per entry; ``looplm.scheduler`` drives every stepper alike (``Stepper``).  ``reference``:
``ModelStepper``, the model's own modules, any family and batch; ``torch``: ``FastStepper``
(``looplm.fast_decode``), one row in vector-shaped torch ops; ``native``: C (``looplm.kernels``:
for one row ``NativeStepper``, the fused plain-loop kernel, where it serves, else
``RuntimeStepper``, the C runtime that runs every model family; for a batch
``NativeRowsStepper``, the plain loop's rows in one call).  Tests hold them equal.
A stepper may offer ``whole_token``
(a token's whole loop in one call) for the layouts in ``whole_token_layouts``, ``exit_step`` (a
whole iteration of Q-exit / fixed-depth rows in one call, and with a ``looplm.run_ahead.RunAhead``
the iterations after it while every done row takes its greedy token) for those in
``exit_step_layouts``, and
``logits_argmax`` (the logits and their argmax in one call).  ``BACKENDS`` maps
names to stepper classes in the order ``auto`` tries them; each says why it cannot serve a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from looplm.cache import KVCache, RowsView
from looplm.errors import LoopLMError
from looplm.model.carry import RowCarry


@dataclass
class Rows:
    """The rows a stepper call runs: cache rows (slots), 0-based loop steps, token positions."""

    slots: list[int]
    steps: list[int]
    positions: list[int]

    def tensor(self, name: str, device) -> torch.Tensor:
        return torch.tensor(getattr(self, name), dtype=torch.long, device=device)

    def step(self, device):
        """The rows' loop step as the model takes it: one int when every row is at the same step
        (one loop-index signal, one LoRA scale), else a tensor [R]."""
        return self.steps[0] if len(set(self.steps)) == 1 else self.tensor("steps", device)

    def subset(self, chosen: Sequence[int]) -> Rows:
        return Rows(*([values[i] for i in chosen] for values in (self.slots, self.steps, self.positions)))


class Stepper(Protocol):
    """One loop step of decode rows; h, e, readouts [R, D]."""

    # None, or (token, position, max_steps, min_steps, Q-exit threshold or None) → (steps run,
    # logits [V], their argmax): the token's whole loop in one call (see the module doc).
    whole_token: object

    def embed(self, tokens: list[int], rows: Rows) -> torch.Tensor: ...        # e: embedding + prelude
    def initial_state(self, e: torch.Tensor, rows: Rows) -> torch.Tensor: ...  # h₀
    def core_step(self, h: torch.Tensor, e: torch.Tensor, rows: Rows) -> torch.Tensor: ...  # each at its step
    def readout(self, h: torch.Tensor, rows: Rows) -> torch.Tensor: ...
    def gate_logits(self, readout: torch.Tensor) -> torch.Tensor: ...          # z [R]
    def logits(self, readout: torch.Tensor) -> torch.Tensor: ...               # [R, V]


class ModelStepper:
    """Rows through the model's own modules (the reference stepper): any family, any number of
    rows, each at its own loop step and position; what the global gates and loop-axis memory
    carry across a token's steps is kept per row (``RowCarry``)."""

    whole_token = None
    unsupported = staticmethod(lambda model, cache: None)  # serves every model and cache

    def __init__(self, model, cache: KVCache, compile_steps: bool = False):
        self.model, self.cache = model, cache
        self.device = cache.keys.device
        self.carried: dict = {}  # RowCarry's values per (cache row, step)

    def _call(self, method, h: torch.Tensor, rows: Rows, *args) -> torch.Tensor:
        """``method(h [R, 1, D], steps, positions, view, *args)`` of the model through a ``RowsView``
        (steps: ``Rows.step``)."""
        view = RowsView(self.cache, rows.tensor("slots", self.device))
        out = method(h.unsqueeze(1), rows.step(self.device), rows.tensor("positions", self.device), view, *args)
        view.flush()
        return out[:, 0]

    def embed(self, tokens: list[int], rows: Rows) -> torch.Tensor:
        view = RowsView(self.cache, rows.tensor("slots", self.device))
        ids = torch.tensor(tokens, device=self.device).view(-1, 1)
        e = self.model.embed_input(ids, rows.tensor("positions", self.device), view)
        view.flush()
        return e[:, 0]

    def initial_state(self, e: torch.Tensor, rows: Rows) -> torch.Tensor:
        return self.model.initial_state(e.unsqueeze(1), rows.tensor("positions", self.device))[:, 0]

    def core_step(self, h: torch.Tensor, e: torch.Tensor, rows: Rows) -> torch.Tensor:
        return self._call(self.model.core_step, h, rows, e.unsqueeze(1), self._carry(rows))

    def _carry(self, rows: Rows) -> RowCarry | None:
        if not self.model.needs_carry:
            return None
        return RowCarry(self.carried, rows.tensor("slots", self.device), self.cache.batch_size)

    def readout(self, h: torch.Tensor, rows: Rows) -> torch.Tensor:
        if self.model.config.act_mixing:  # the coda reads each row's ACT mixture of its loop states so far
            return self._call(self.model.readout, h, rows, self._carry(rows))
        return self._call(self.model.readout, h, rows)

    def mixing_gates(self, rows: Rows) -> torch.Tensor:
        """model.act_mixing: the gate logits [R] the rows' ``core_step`` just computed from their states."""
        carry = self._carry(rows)
        carry.step = rows.step(self.device)
        return carry.current(self.model.exit_gate)[0].reshape(-1)

    def gate_logits(self, readout: torch.Tensor) -> torch.Tensor:
        return self.model.gate_logits(readout)

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        return self.model.logits(readout)


class NativeBackend:
    """The ``native`` backend: the fused plain-loop kernel where it serves, else the C runtime."""

    @staticmethod
    def unsupported(model, cache: KVCache) -> str | None:
        from looplm.kernels.native_stepper import native_unsupported
        from looplm.kernels.runtime_stepper import runtime_unsupported

        return None if native_unsupported(model, cache) is None else runtime_unsupported(model, cache)

    def __new__(cls, model, cache: KVCache, compile_steps: bool = False):
        from looplm.kernels.native_stepper import NativeRowsStepper, NativeStepper, native_unsupported
        from looplm.kernels.runtime_stepper import RuntimeStepper

        if native_unsupported(model, cache) is not None:
            return RuntimeStepper(model, cache)
        return NativeStepper(model, cache) if cache.batch_size == 1 else NativeRowsStepper(model, cache)


def _native():
    return NativeBackend


def _torch():
    from looplm.fast_decode import FastStepper

    return FastStepper


# name → a function giving the stepper class (imports stay lazy), in the order ``auto`` tries them.
BACKENDS = {"native": _native, "torch": _torch, "reference": lambda: ModelStepper}


def register_backend(name: str, stepper_class, first: bool = False) -> None:
    """Add a decode backend: ``stepper_class()`` gives a class with ``unsupported(model, cache)``
    and ``(model, cache, compile_steps)`` construction; ``first``: ``auto`` tries it first."""
    global BACKENDS
    BACKENDS = {name: stepper_class, **BACKENDS} if first else {**BACKENDS, name: stepper_class}


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def make_stepper(backend: str, model, cache: KVCache, compile_steps: bool = False, dtype: str = "fp32"):
    """(the stepper, its backend name, the model it reads, its ``Precision``) for ``backend``: a
    name of ``BACKENDS``, or ``auto`` (the first that supports the model and cache: for a batched
    cache ``native``'s rows stepper, else the reference).  ``dtype``
    (``looplm.precision.decode_precision``): "fp32" (the model as given), "bf16" (bf16 copies of
    the projections, ``looplm.bf16``: the native backend reads them
    and a bf16 head where its C path does — a batch's rows too —, else float32 with the reason; the
    reference backend runs
    torch's bf16 matmuls; the torch backend reads float32 only) or "auto" (bf16 where the native
    backend runs and the C kernel has the native bf16 dot product — for a batch, where the CPU
    multiplies bf16 natively —, else fp32)."""
    from looplm.bf16 import bf16_weights
    from looplm.precision import Precision, decode_precision

    if backend not in backend_names():
        raise LoopLMError(f"backend must be one of {', '.join(backend_names())}, got {backend!r}")
    precision = decode_precision(dtype, batched=cache.batch_size > 1)
    if precision.name == "bf16":
        copy = bf16_weights(model)
        native = backend in ("auto", "native") and not compile_steps
        refused = NativeBackend.unsupported(copy, cache) if native else "not asked"
        if refused is None:  # one row or a batch's rows in C, reading the bf16 copy
            return NativeBackend(copy, cache), "native", copy, precision
        if cache.batch_size > 1:
            return ModelStepper(copy, cache), "reference", copy, precision
        if native:
            if (reason := NativeBackend.unsupported(model, cache)) is None:
                precision = Precision("fp32", f"bf16 weights are not read by this model's C path ({refused})")
                return NativeBackend(model, cache), "native", model, precision
            if backend == "native":
                raise LoopLMError(f"the native backend cannot run here: {reason}; use backend 'torch'")
        if dtype == "auto":
            precision = Precision("fp32", f"auto: the {'torch' if backend == 'auto' else backend} backend decodes"
                                          " in float32")
        elif backend == "torch":
            raise LoopLMError("dtype bf16 decodes with backend 'native' or 'reference' (the torch backend reads"
                              " float32 weights): drop --backend torch or use dtype fp32")
        else:
            return ModelStepper(copy, cache), "reference", copy, precision
    stepper, name = _first_stepper(backend, model, cache, compile_steps)
    return stepper, name, model, precision


def _first_stepper(backend: str, model, cache: KVCache, compile_steps: bool):
    if compile_steps and backend in ("auto", "native"):
        backend = "torch"  # compiling applies to the torch stepper
    names = list(BACKENDS) if backend == "auto" else [backend]
    for name in names:
        stepper_class = BACKENDS[name]()
        reason = stepper_class.unsupported(model, cache)
        if reason is None:
            return stepper_class(model, cache, compile_steps), name
        if name == backend:
            following = list(BACKENDS)[min(list(BACKENDS).index(name) + 1, len(BACKENDS) - 1)]
            raise LoopLMError(f"the {name} backend cannot run here: {reason}; use backend {following!r}")
    raise LoopLMError("no decode backend can run this model")
