"""Decode attention over rows of a batched cache read in place (``looplm.model.row_attention``):
the C kernel equals the torch reference (gather + SDPA) for GQA, odd head sizes, repeated and
unordered rows and per-row starts; ``CacheRows.write`` touches only its rows' position; the
batched engine takes the in-place path where the kernel builds."""

import pytest
import torch

from looplm.batch import BatchDecoder
from looplm.exit_policy import QExit
from looplm.model import LoopLM
from looplm.kernels import ops
from looplm.model.row_attention import CacheRows, rows_attention, rows_attention_reference
from looplm.kernels import load_kernel

from conftest import tiny_config

needs_kernel = pytest.mark.skipif(load_kernel() is None, reason="the C kernel does not build here")


def _slot(heads, kv_heads, head_dim, rows, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(7, kv_heads, 20, head_dim, generator=generator, dtype=dtype)
    values = torch.randn(7, kv_heads, 20, head_dim, generator=generator, dtype=dtype)
    q = torch.randn(len(rows), heads, 1, head_dim, generator=generator, dtype=dtype) * 2
    starts = torch.randint(0, 12, (len(rows),), generator=generator)
    return q, CacheRows(keys, values, torch.tensor(rows), starts)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (4, 2, 12), (6, 1, 64), (2, 2, 7)])
def test_kernel_equals_reference(heads, kv_heads, head_dim):
    q, slot = _slot(heads, kv_heads, head_dim, [5, 0, 3, 3, 6])
    for end in (13, 17, 20):
        fast, reference = rows_attention(q, slot, end), rows_attention_reference(q, slot, end)
        assert fast.shape == reference.shape == q.shape
        torch.testing.assert_close(fast, reference, atol=2e-6, rtol=1e-5)
    # A wrong start (one key more) is caught: the comparison can fail.
    shifted = CacheRows(slot.keys, slot.values, slot.rows, slot.starts - 1)
    assert (rows_attention(q, shifted, 17) - rows_attention_reference(q, slot, 17)).abs().max() > 1e-3


def test_other_dtypes_take_the_reference():
    q, slot = _slot(4, 2, 8, [1, 4], dtype=torch.float64)
    assert not ops.serves(slot.keys)
    assert torch.equal(rows_attention(q, slot, 15), rows_attention_reference(q, slot, 15))


def test_write_touches_only_its_rows_at_the_position():
    _, slot = _slot(4, 2, 8, [4, 1])
    before_keys, before_values = slot.keys.clone(), slot.values.clone()
    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    slot.write(k, v, 9)
    assert torch.equal(slot.keys[4, :, 9], k[0, :, 0]) and torch.equal(slot.values[1, :, 9], v[1, :, 0])
    changed = (slot.keys != before_keys).any(-1) | (slot.values != before_values).any(-1)
    assert changed.nonzero().tolist() == [[1, 0, 9], [1, 1, 9], [4, 0, 9], [4, 1, 9]]


@needs_kernel
def test_the_batched_engine_reads_rows_in_place():
    model = LoopLM(tiny_config(loop_steps=3)).eval()
    assert BatchDecoder(model, QExit(0.5), 3, 16).in_place
    mla = LoopLM(tiny_config(loop_steps=2, attention="mla", mla_kv_rank=16, mla_rope_dim=8)).eval()
    assert not BatchDecoder(mla, QExit(0.5), 3, 16).in_place


@needs_kernel
def test_copy_rows_kernel_equals_torch_indexing(monkeypatch):
    """LAST_EXITED's copy of exited rows' K/V into deeper slots: the C call equals torch's
    advanced-indexing copy, and touches nothing but those rows' positions."""
    from looplm.cache import KVCache

    config = tiny_config(loop_steps=3, n_kv_heads=2)
    caches = [KVCache(config, 6, 12, 3) for _ in range(2)]
    generator = torch.Generator().manual_seed(3)
    for tensor in (caches[0].keys, caches[0].values):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    for mine, theirs in ((caches[1].keys, caches[0].keys), (caches[1].values, caches[0].values)):
        mine.copy_(theirs)
    rows = torch.tensor([4, 0, 5])
    caches[0]._copy_positions(0, 2, rows, 3, 7)
    monkeypatch.setattr("looplm.kernels.ops.serves", lambda tensor: False)
    before = caches[1].keys.clone()
    caches[1]._copy_positions(0, 2, rows, 3, 7)
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)
    changed = (caches[1].keys != before).any(-1).nonzero()[:, :2].unique(dim=0).tolist()
    assert changed == [[2, 0], [2, 4], [2, 5]]
