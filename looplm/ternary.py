"""Packed ternary weights for inference: 2 bits per weight instead of 32.

A trained ``BitLinear`` (looplm.model.bitlinear) computes with codes c ∈ {−1, 0, +1} [N, K]
and one scale s per matrix.  ``pack_ternary`` stores c + 1 ∈ {0, 1, 2} four to a byte along
K, little end first:

    packed[n, j] = (c[n, 4j] + 1) | (c[n, 4j+1] + 1) << 2 | (c[n, 4j+2] + 1) << 4 | (c[n, 4j+3] + 1) << 6

(K padded to a multiple of 4 with code 0), so a weight costs K/4 bytes per row plus 4 bytes of
scale per matrix: 16× less than float32.  GGUF files keep this layout, or gguf's TQ2_0 blocks
where rows are a multiple of 256 long (looplm.interop.gguf).

``TernaryLinear`` computes the same function as the ``BitLinear`` it came from, two ways:
- ``reference_forward``: unpack the codes to floats, W = c·s, quantise the activations exactly
  as ``BitLinear`` does (per token to int8 levels), ``F.linear``: the definition;
- ``forward``: the integer form y = (levels · cᵀ) · s / factor + bias — the products of int8
  levels and ternary codes summed exactly (in float32: every partial sum is an integer below
  2^24 while K < 2^24 / 128), scaled once per output.  The codes are unpacked per call through
  a 256-entry table (one byte → four codes); the weights never stay unpacked.
Python cannot multiply 2-bit fields without unpacking them; a native kernel that adds and
subtracts activations straight from the packed bytes belongs to the C backends, which do not
run ternary weights yet.

``pack_model`` swaps every ``BitLinear`` of a trained model for a ``TernaryLinear`` in place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from looplm.errors import LoopLMError
from looplm.model.bitlinear import BitLinear, quantize_activations, ternary_codes
from looplm.model.swap import swap_modules

CODES_PER_BYTE = 4
# Byte value → its four codes (−1, 0, +1), lowest bits first.
_TABLE = torch.tensor([[((byte >> (2 * field)) & 3) - 1 for field in range(CODES_PER_BYTE)] for byte in range(256)],
                      dtype=torch.int8)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """codes in {−1, 0, 1} [N, K] → uint8 [N, ceil(K/4)] (module docstring's layout)."""
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise LoopLMError("ternary codes must be -1, 0 or 1")
    rows, width = codes.shape
    padded = torch.ones(rows, -(-width // CODES_PER_BYTE) * CODES_PER_BYTE, dtype=torch.uint8, device=codes.device)
    padded[:, :width] = (codes + 1).to(torch.uint8)
    fields = padded.view(rows, -1, CODES_PER_BYTE)
    return fields[..., 0] | fields[..., 1] << 2 | fields[..., 2] << 4 | fields[..., 3] << 6


def unpack_ternary(packed: torch.Tensor, width: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 [N, ceil(K/4)] → codes [N, K] in ``dtype``."""
    table = _TABLE.to(device=packed.device, dtype=dtype)
    return table[packed.long()].reshape(packed.shape[0], -1)[:, :width]


class TernaryLinear(nn.Module):
    """y = x̂ (c·s)ᵀ + bias with c packed 2 bits per weight (module docstring)."""

    def __init__(self, packed: torch.Tensor, in_features: int, scale: torch.Tensor | float,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-in_features // CODES_PER_BYTE):
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
