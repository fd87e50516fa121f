"""Decode attention for some rows of a batched KV cache, read and written in place.

The batched engine (``looplm.batch``) runs each loop step on the rows that have not exited.
Gathering those rows' keys and values into a compact copy costs two extra passes over the
cache per layer application (read + write, then attention reads the copy again), which on a
small model eats much of what early exit saves.  ``CacheRows`` instead hands an attention
layer the whole slot storage plus the row indices: the new token's keys and values are
written straight into the rows, and attention reads them where they lie.

``rows_attention`` is the fast path (``looplm.kernels.ops``: the C kernel, one task per
query row and head, no copies); ``rows_attention_reference`` is the plain torch version
(gather, then SDPA with the key mask); tests/test_row_attention.py holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from looplm.kernels import ops


class SharedKV(NamedTuple):
    """A cache slot whose keys and values an earlier loop step of the same call wrote
    (append-first K/V, ``looplm.cache``): the layer attends to them and writes nothing.
    keys, values [B, H_kv, max_len, hd] (MLA: its latent and rope-key storage)."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class CacheRows:
    """One attention slot of a batched cache as seen by ``rows`` of it.

    keys, values: the slot's storage [B, H_kv, max_len, hd]; rows [R] (int64): query i belongs
    to cache row ``rows[i]``; starts [R] (int64): the first key position query i may see (the
    pad of right-aligned rows lies before it); shared: an earlier loop step wrote this token's
    entries (append-first, ``SharedKV``), so ``write`` leaves them."""

    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor
    shared: bool = False

    def write(self, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        """Store one token's k, v [R, H_kv, 1, hd] at ``position`` of each row."""
        if self.shared:
            return
        self.keys[self.rows, :, position] = k[:, :, 0]
        self.values[self.rows, :, position] = v[:, :, 0]


def rows_attention(q: torch.Tensor, slot: CacheRows, end: int) -> torch.Tensor:
    """q [R, H, 1, hd] (RoPE applied) → attention output [R, H, 1, hd] over keys
    [starts[i], end) of cache row rows[i], read in place (``looplm.kernels.ops.rows_attention``;
    its torch reference where the kernel does not serve the storage)."""
    return ops.rows_attention(q, slot.keys, slot.values, slot.rows, slot.starts, end)


def rows_attention_reference(q: torch.Tensor, slot: CacheRows, end: int) -> torch.Tensor:
    """The same as ``rows_attention`` with torch ops: gather the rows, mask keys before each
    row's start, ``scaled_dot_product_attention``."""
    return ops.rows_attention_reference(q, slot.keys, slot.values, slot.rows, slot.starts, end)
