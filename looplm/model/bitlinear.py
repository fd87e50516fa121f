"""Ternary weights with int8 activations, trained through a straight-through estimator
(BitNet b1.58, as nanochat-rs trains its loop block).

A ``BitLinear`` keeps an ordinary float32 weight W [N, K] (the *shadow* weight the optimiser
updates, saved in checkpoints like any ``nn.Linear`` weight) and computes with

    s   = mean |W|                                  one scale per matrix (absmean)
    Wt  = clamp(round(W / s), −1, 1) · s             ternary: every entry is −s, 0 or +s
    a   = max_k |x_k|  per token,  x̂ = clamp(round(x · 127 / a), −128, 127) · a / 127
    y   = x̂ Wtᵀ + bias

so a trained model's layer is exactly a ternary matrix times int8 activations
(``looplm.ternary.TernaryLinear`` runs it on 2-bit packed weights).  The rounding has no
useful gradient, so training uses the straight-through estimator: the forward value is Wt
(x̂) exactly but the gradient passes to W (x) as if the rounding were the identity.  Training
and evaluation compute the same function; the per-token
scale a never mixes positions, so the layer stays causal.

``ternary_layers(module)`` swaps the ``nn.Linear`` layers inside a module for ``BitLinear``
(``model.ternary`` picks the token mixers and FFNs of the core layers or of all layers;
routers keep float weights: their outputs are decisions).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from looplm.model.swap import swap_modules

SCALE_FLOOR = 1e-5  # a matrix or token of zeros would otherwise divide by zero
ACTIVATION_LEVELS = 127.0
KEPT_FLOAT = ("router",)


def ternary_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..] → codes in {−1, 0, 1} (W's dtype) and the absmean scale s (0-d, float32)."""
    scale = weight.detach().float().abs().mean().clamp_min(SCALE_FLOOR)
    codes = torch.clamp(torch.round(weight / scale.to(weight.dtype)), -1, 1)
    return codes, scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] → integer levels in [−128, 127] (as x's dtype) and the per-token factor
    127 / max|x| [..., 1] that maps x onto them (levels / factor ≈ x)."""
    factor = ACTIVATION_LEVELS / x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR)
    return torch.clamp(torch.round(x * factor), -128, 127), factor


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        return gradient, None


def straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` exactly in the forward pass (not value + (rounded − value), which rounds), and
    the identity's gradient into ``value`` in backward."""
    return _StraightThrough.apply(value, rounded)


class BitLinear(nn.Linear):
    """``nn.Linear`` with ternary weights and int8 per-token activations (module docstring)."""

    def ternary_weight(self) -> torch.Tensor:
        """Wt = codes · s [N, K], the weight this layer computes with."""
        codes, scale = ternary_codes(self.weight)
        return codes * scale.to(codes.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels, factor = quantize_activations(x)
        weight = straight_through(self.weight, self.ternary_weight())
        return F.linear(straight_through(x, levels / factor), weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BitLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.weight.device.type != "meta":
            with torch.no_grad():
                layer.weight.copy_(linear.weight)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + ", ternary"


def ternary_layers(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (routers excepted) by a ``BitLinear`` with
    the same weights, in place; returns ``module``."""
    swap_modules(module, lambda name, child: type(child) is nn.Linear and not set(name.split(".")) & set(KEPT_FLOAT),
                 lambda name, child: BitLinear.from_linear(child))
    return module
