"""looplm's 2-bit layout of ternary weights, in memory (``looplm.ternary.TernaryLinear``) and in
GGUF files whose rows TQ2_0 cannot hold (``looplm.checkpoint.gguf``).

Codes c ∈ {−1, 0, +1} [N, K] are stored as c + 1 ∈ {0, 1, 2}, four to a byte along K, lowest
bits first:

    packed[n, j] = (c[n, 4j] + 1) | (c[n, 4j+1] + 1) << 2 | (c[n, 4j+2] + 1) << 4 | (c[n, 4j+3] + 1) << 6

with K padded to a multiple of 4 by code 0: K/4 bytes per row, 16× fewer than float32.
"""

from __future__ import annotations

import torch

from looplm.errors import LoopLMError

CODES_PER_BYTE = 4
# Byte value → its four codes (−1, 0, +1), lowest bits first.
_TABLE = torch.tensor([[((byte >> (2 * field)) & 3) - 1 for field in range(CODES_PER_BYTE)] for byte in range(256)],
                      dtype=torch.int8)


def packed_width(width: int) -> int:
    """Bytes per row of ``width`` codes."""
    return -(-width // CODES_PER_BYTE)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """codes in {−1, 0, 1} [N, K] → uint8 [N, ceil(K/4)]."""
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise LoopLMError("ternary codes must be -1, 0 or 1")
    rows, width = codes.shape
    padded = torch.ones(rows, packed_width(width) * CODES_PER_BYTE, dtype=torch.uint8, device=codes.device)
    padded[:, :width] = (codes + 1).to(torch.uint8)
    fields = padded.view(rows, -1, CODES_PER_BYTE)
    return fields[..., 0] | fields[..., 1] << 2 | fields[..., 2] << 4 | fields[..., 3] << 6


def unpack_ternary(packed: torch.Tensor, width: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 [N, ceil(K/4)] → codes [N, K] in ``dtype``."""
    table = _TABLE.to(device=packed.device, dtype=dtype)
    return table[packed.long()].reshape(packed.shape[0], -1)[:, :width]
