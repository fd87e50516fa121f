"""Loop mechanics: what enters each loop step besides the state (docs/MATH.md §5).

One loop step, with e the prelude output of the same position and t the 0-based step::

    h ← h + loop_index_signal(t)            (loop_index_embedding)
    u = inject(h, e)                        (injection kind)
    h ← core(u) + depth_lora(u, t)          (depth_lora_rank > 0)
    h ← norm(h)                             (step_norm, Ouro)

except for ``lti_residual`` (OpenMythos's rule), where the core is a term of the update and
the signal enters only its input:

    x = n(h + loop_index_signal(t) + e)     (n: the injection's own norm)
    y = core(x) + depth_lora(·, t)          (the LoRA reads x, or y with depth_lora_position=output)
    h ← A ⊙ h + B ⊙ e + y                   A = exp(−exp(log_dt + log_A)), one log_dt for all channels

Injection kinds (``ModelConfig.injection``):
- ``identity`` (Ouro): u = h; the input enters only as h₀ = e.
- ``additive``: u = h + e (spectral radius 1: the state can grow with depth).
- ``lti`` (OpenMythos): u = A ⊙ h + B ⊙ e with A = exp(−exp(log_dt + log_A)) ∈ (0, 1).
- ``diagonal`` (Parcae): u = Ā ⊙ h + Δ ⊙ (B e), Ā = exp(−Δ ⊙ exp(A_log)), Δ = softplus(dt),
  B a D×D matrix.
- ``concat`` (Huginn): u = W [h; e], W a D×2D adapter.
- ``lti_residual`` (OpenMythos): the rule above; A starts at e^−1 (log_A = log_dt = 0), B at 0.1.
The decays of ``lti`` and ``diagonal`` are computed in float32 and capped one machine epsilon
of the parameters' dtype below 1, so they stay strictly inside (0, 1) in fp32, fp16 and bf16
(exp(−exp(x)) rounds to exactly 1 for x < −17.3 in fp32, −8.3 in fp16, −6.2 in bf16).

The initial state (``initial_state``) is e (``prelude``) or Gaussian noise (``noise``, Huginn /
Parcae).  Noise is fresh in training; in eval mode it is a fixed table indexed by position, so
a cached decode sees exactly the noise the full forward saw.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.model.norms import make_norm
from looplm.registry import Registry

_EXPONENT_CLAMP = 20.0


def _capped_decay(decay: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """decay (float32, in (0, 1]) capped at 1 − eps(dtype), returned in ``dtype``."""
    return decay.clamp_max(1.0 - torch.finfo(dtype).eps).to(dtype)


INJECTIONS = Registry("injection")  # model.injection → its class; "identity" has none (u = h)


class Injection(nn.Module):
    """u = inject(h, e).  Each kind below is one subclass, registered under its
    ``model.injection`` name; ``make_injection`` builds the configured one."""

    residual = False  # lti_residual: the core is a term of the update (core_input, combine)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.injection

    def reset_extra_parameters(self) -> None:
        """Set the injection's parameters to their starting values (none by default)."""

    def decay(self) -> torch.Tensor | None:
        """The per-channel state decay A (lti) or Ā (diagonal) in the parameters' dtype, else None."""
        return None


def make_injection(config: ModelConfig) -> Injection | None:
    """The configured injection module, or None for ``identity`` (Ouro: u = h)."""
    return None if config.injection == "identity" else INJECTIONS[config.injection](config)


@INJECTIONS.register("additive")
class AdditiveInjection(Injection):
    """u = h + e (spectral radius 1: the state can grow with depth)."""

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + e


@INJECTIONS.register("lti")
class LTIInjection(Injection):
    """u = A ⊙ h + B ⊙ e, A = exp(−exp(log_dt + log_a)) ∈ (0, 1) (OpenMythos)."""

    shared_step = False  # one log_dt for all channels (lti_residual)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        dim = config.d_model
        self.log_a = nn.Parameter(torch.empty(dim))
        self.log_dt = nn.Parameter(torch.empty(1 if self.shared_step else dim))
        self.b = nn.Parameter(torch.empty(dim))
        if self.residual:
            self.input_norm = make_norm(config)
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            self.log_a.fill_(math.log(math.log(2.0)))  # A = exp(−exp(log_a)) = 0.5
            self.log_dt.zero_()
            self.b.fill_(1.0)

    def decay(self) -> torch.Tensor:
        exponent = (self.log_dt.float() + self.log_a.float()).clamp(-_EXPONENT_CLAMP, _EXPONENT_CLAMP)
        return _capped_decay(torch.exp(-torch.exp(exponent)), self.log_a.dtype)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.decay() * h + self.b * e


@INJECTIONS.register("lti_residual")
class LTIResidualInjection(LTIInjection):
    """OpenMythos's rule: the core reads x = n(h + signal + e) and h ← A ⊙ h + B ⊙ e + core(x);
    one log_dt for all channels; A starts at e^−1 (log_a = log_dt = 0), B at 0.1."""

    residual = True
    shared_step = True

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():  # OpenMythos's values: A = e^−1, B = 0.1
            self.log_a.zero_()
            self.log_dt.zero_()
            self.b.fill_(0.1)

    def core_input(self, h: torch.Tensor, e: torch.Tensor, signal: torch.Tensor | None) -> torch.Tensor:
        """x = n(h + signal + e), what the core reads (h itself stays unsignalled)."""
        return self.input_norm(h + e if signal is None else h + signal + e)

    def combine(self, h: torch.Tensor, e: torch.Tensor, core_output: torch.Tensor) -> torch.Tensor:
        """h ← A ⊙ h + B ⊙ e + y."""
        return self.decay() * h + self.b * e + core_output


@INJECTIONS.register("diagonal")
class DiagonalInjection(Injection):
    """u = Ā ⊙ h + Δ ⊙ (B e), Ā = exp(−Δ ⊙ exp(A_log)), Δ = softplus(dt), B a D×D matrix (Parcae)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        dim = config.d_model
        self.a_log = nn.Parameter(torch.empty(dim))
        self.dt = nn.Parameter(torch.empty(dim))
        self.b = nn.Linear(dim, dim, bias=False)
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            self.a_log.zero_()
            self.dt.fill_(math.log(math.expm1(math.log(2.0))))  # Δ = softplus(dt) = log 2 → Ā = 0.5
            nn.init.eye_(self.b.weight)

    def decay(self) -> torch.Tensor:
        step = F.softplus(self.dt.float())
        rate = torch.exp(self.a_log.float().clamp(-_EXPONENT_CLAMP, _EXPONENT_CLAMP))
        return _capped_decay(torch.exp(-step * rate), self.a_log.dtype)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.decay() * h + F.softplus(self.dt) * self.b(e)


@INJECTIONS.register("concat")
class ConcatInjection(Injection):
    """u = W [h; e], W a D×2D adapter that starts as [I I] (Huginn)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.adapter = nn.Linear(2 * config.d_model, config.d_model, bias=False)
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            dim = self.adapter.out_features
            self.adapter.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)], dim=1))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.adapter(torch.cat([h, e], dim=-1))


def loop_index_signal(step: int | torch.Tensor, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[dim] sinusoid of the loop step (base 10000) on the first dim/8 channels, zero elsewhere;
    [R, 1, dim] for per-row steps [R]."""
    channels = dim // 8
    half = channels // 2
    frequencies = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / max(half, 1))
    steps = torch.as_tensor(step, dtype=torch.float64).cpu().reshape(-1, 1)
    angles = steps * frequencies
    signal = torch.zeros(len(steps), dim, dtype=torch.float64)
    signal[:, :half] = angles.sin()
    signal[:, half:2 * half] = angles.cos()
    signal = signal.to(device=device, dtype=dtype)
    return signal[0] if not isinstance(step, torch.Tensor) else signal.unsqueeze(1)


class DepthLoRA(nn.Module):
    """delta(x, t) = (down(x) ⊙ scale[min(t, T − 1)]) @ up: one low-rank adapter shared by all
    steps, modulated by a per-step scale vector (the clamped index extrapolates past T).
    ``reads_output``: x is the core's output (OpenMythos), not its input."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.trained_steps = config.loop_steps
        self.down = nn.Linear(config.d_model, config.depth_lora_rank, bias=False)
        self.up = nn.Linear(config.depth_lora_rank, config.d_model, bias=False)
        self.scale = nn.Parameter(torch.ones(config.loop_steps, config.depth_lora_rank))
        self.init_std = config.init_std
        self.reads_output = config.depth_lora_position == "output"
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=self.init_std)
        nn.init.zeros_(self.up.weight)  # starts as no change
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        """x [B, S, D]; step: the loop step, or [B] per row."""
        if isinstance(step, torch.Tensor):
            scale = self.scale[step.clamp(max=self.trained_steps - 1)]  # [B, r] → broadcast over x's middle dims
            return self.up(self.down(x) * scale.view(len(step), *(1,) * (x.dim() - 2), -1))
        return self.up(self.down(x) * self.scale[min(step, self.trained_steps - 1)])


class NoiseState(nn.Module):
    """h₀ ~ N(0, σ²): fresh in training; a fixed per-position table in eval (seeded, not saved)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.std = config.initial_noise_std
        generator = torch.Generator().manual_seed(0)
        width = config.d_model * config.residual_streams  # the state: one row per mHC stream
        table = torch.randn(config.max_seq_len, width, generator=generator) * self.std
        self.register_buffer("table", table, persistent=False)

    def forward(self, e: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """e [B, S, D] (for shape, dtype, device) → h₀ [B, S, D].  ``start`` [B]: each row's own
        position of a one-token step (rows that sit at different positions)."""
        if self.training:
            return torch.randn_like(e) * self.std
        if isinstance(start, torch.Tensor):
            return self.table[start].view(-1, 1, e.shape[-1]).to(e.dtype).expand_as(e)
        return self.table[start:start + e.shape[-2]].to(e.dtype).expand_as(e)
