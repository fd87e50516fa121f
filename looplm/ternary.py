"""Packed ternary weights for inference: 2 bits per weight instead of 32.

A trained ``BitLinear`` (looplm.model.bitlinear) computes with codes c ∈ {−1, 0, +1} [N, K]
and one scale s per matrix.  ``TernaryLinear`` holds c in looplm's 2-bit layout
(``looplm.checkpoint.ternary``: c + 1, four codes to a byte along K) plus s: K/4 bytes per row
and 4 bytes of scale per matrix, 16× less than float32.  GGUF files keep this layout, or gguf's
TQ2_0 blocks where rows are a multiple of 256 long (looplm.checkpoint.gguf).

``TernaryLinear`` computes the same function as the ``BitLinear`` it came from, two ways:
- ``reference_forward``: unpack the codes to floats, W = c·s, quantise the activations exactly
  as ``BitLinear`` does (per token to int8 levels), ``F.linear``: the definition;
- ``forward``: the integer form y = (levels · cᵀ) · s / factor + bias — the products of int8
  levels and ternary codes summed exactly (in float32: every partial sum is an integer below
  2^24 while K < 2^24 / 128), scaled once per output.  The codes are unpacked per call through
  a 256-entry table (one byte → four codes); the weights never stay unpacked.
Python cannot multiply 2-bit fields without unpacking them; the C runtime (kernels/csrc/matvec.h,
``backend="native"`` and ``looplm-run``) runs the same integer form from the packed bytes.

``pack_model`` swaps every ``BitLinear`` of a trained model for a ``TernaryLinear`` in place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from looplm.checkpoint.ternary import pack_ternary, packed_width, unpack_ternary
from looplm.errors import LoopLMError
from looplm.model.bitlinear import BitLinear, quantize_activations, ternary_codes
from looplm.model.swap import swap_modules


class TernaryLinear(nn.Module):
    """y = x̂ (c·s)ᵀ + bias with c packed 2 bits per weight (module docstring)."""

    def __init__(self, packed: torch.Tensor, in_features: int, scale: torch.Tensor | float,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_width(in_features):
            raise LoopLMError(f"TernaryLinear needs uint8 packed codes [N, ceil({in_features}/4)], got"
                              f" {packed.dtype} {tuple(packed.shape)}")
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.in_features, self.out_features = in_features, packed.shape[0]

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale, bias: torch.Tensor | None = None) -> "TernaryLinear":
        return cls(pack_ternary(codes), codes.shape[1], scale, bias)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "TernaryLinear":
        codes, scale = ternary_codes(layer.weight.detach().float())
        return cls.from_codes(codes.to(torch.int8), scale, layer.bias)

    def codes(self) -> torch.Tensor:
        """The ternary codes [N, K] (int8)."""
        return unpack_ternary(self.packed, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight c·s [N, K] this layer computes with (unpacked on each access)."""
        return self.codes().float() * self.scale

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unpack, quantise the activations as ``BitLinear`` does, ``F.linear``."""
        levels, factor = quantize_activations(x)
        return F.linear(levels / factor, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels, factor = quantize_activations(x)
        codes = unpack_ternary(self.packed, self.in_features, x.dtype)
        out = F.linear(levels, codes) * (self.scale.to(x.dtype) / factor)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None},"
                " ternary 2-bit")


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every ``BitLinear`` of ``model`` by a ``TernaryLinear`` holding its packed codes,
    in place; returns the model in eval mode (packed weights have no gradients).  A model
    without ternary layers (``model.ternary`` = none) is a one-line error."""
    if not swap_modules(model, lambda name, module: isinstance(module, BitLinear),
                        lambda name, module: TernaryLinear.from_bitlinear(module)):
        raise LoopLMError("the model has no ternary layers (model.ternary is none): nothing to pack")
    return model.eval()


def is_packed(model: nn.Module) -> bool:
    """True when any layer of ``model`` holds packed ternary weights."""
    return any(isinstance(module, TernaryLinear) for module in model.modules())
