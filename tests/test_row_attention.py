"""Decode attention over rows of a cache read in place, each row at its own slot and position
(``looplm.cache.RowKV``, ``looplm.kernels.ops.rows_attention``): the C kernel equals the torch
reference (gather + SDPA) for GQA, odd head sizes, repeated and unordered rows and per-row ends;
``RowKV.write`` touches only each row's own position; the scheduler's attention takes the
in-place path where the kernel builds; the LAST_EXITED fill of rows at different positions
copies exactly what a plain loop copies."""

import pytest
import torch

from looplm.batch import generate_batch
from looplm.cache import KVCache, RowKV
from looplm.exit_policy import QExit
from looplm.kernels import load_kernel, ops
from looplm.model import LoopLM

from conftest import tiny_config

needs_kernel = pytest.mark.skipif(load_kernel() is None, reason="the C kernel does not build here")


def _rows(heads, kv_heads, head_dim, rows, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(7, kv_heads, 20, head_dim, generator=generator, dtype=dtype)
    values = torch.randn(7, kv_heads, 20, head_dim, generator=generator, dtype=dtype)
    q = torch.randn(len(rows), heads, 1, head_dim, generator=generator, dtype=dtype) * 2
    ends = torch.randint(1, 21, (len(rows),), generator=generator)
    return q, keys, values, torch.tensor(rows), ends


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (4, 2, 12), (6, 1, 64), (2, 2, 7)])
def test_kernel_equals_reference(heads, kv_heads, head_dim):
    q, keys, values, rows, ends = _rows(heads, kv_heads, head_dim, [5, 0, 3, 3, 6])
    for shift in (0, -3, 5):
        ends_now = (ends + shift).clamp(1, 20)
        fast = ops.rows_attention(q, keys, values, rows, ends_now)
        reference = ops.rows_attention_reference(q, keys, values, rows, ends_now)
        assert fast.shape == reference.shape == q.shape
        torch.testing.assert_close(fast, reference, atol=2e-6, rtol=1e-5)
    # A wrong end (one key more) is caught: the comparison can fail.
    longer = (ends + 1).clamp(max=20)
    moved = longer != ends
    difference = ops.rows_attention(q, keys, values, rows, longer) - ops.rows_attention_reference(q, keys, values,
                                                                                                   rows, ends)
    assert difference[moved].abs().max() > 1e-3


def test_other_dtypes_take_the_reference():
    q, keys, values, rows, ends = _rows(4, 2, 8, [1, 4], dtype=torch.float64)
    assert not ops.serves(keys)
    assert torch.equal(ops.rows_attention(q, keys, values, rows, ends),
                       ops.rows_attention_reference(q, keys, values, rows, ends))


def test_write_touches_only_each_rows_own_position():
    _, keys, values, rows, _ = _rows(4, 2, 8, [4, 1])
    store = RowKV(keys, values, rows)
    before_keys, before_values = keys.clone(), values.clone()
    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    store.write(k, v, torch.tensor([9, 3]))
    assert torch.equal(keys[4, :, 9], k[0, :, 0]) and torch.equal(values[1, :, 3], v[1, :, 0])
    changed = (keys != before_keys).any(-1) | (values != before_values).any(-1)
    assert changed.nonzero().tolist() == [[1, 0, 3], [1, 1, 3], [4, 0, 9], [4, 1, 9]]


@needs_kernel
def test_the_scheduler_reads_rows_in_place(monkeypatch):
    """Batched decode of standard attention never takes the gathered reference (the kernel reads
    the rows where they lie); MLA reads its latent rows gathered (``RowKV.read``)."""
    def refuse(*args):
        raise AssertionError("the gathered reference ran")

    model = LoopLM(tiny_config(loop_steps=3)).eval()
    monkeypatch.setattr(ops, "rows_attention_reference", refuse)
    generate_batch(model, [[1, 2, 3], [4, 5]], 4, exit_policy=QExit(0.5))
    mla = LoopLM(tiny_config(loop_steps=2, attention="mla", mla_kv_rank=16, mla_rope_dim=8)).eval()
    generate_batch(mla, [[1, 2, 3], [4, 5]], 4)


def test_fill_of_rows_at_their_own_positions_equals_a_plain_loop():
    """LAST_EXITED: rows that ran ``ran`` steps copy their last step's K/V at their own position
    into every deeper step's slot, and nothing else moves."""
    config = tiny_config(loop_steps=3, n_kv_heads=2)
    cache = KVCache(config, 6, 12, 3)
    generator = torch.Generator().manual_seed(3)
    for tensor in (cache.keys, cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    expected = [tensor.clone() for tensor in (cache.keys, cache.values)]
    rows, positions = torch.tensor([4, 0, 5]), torch.tensor([3, 7, 2])
    cache.finish_rows(torch.tensor([1, 1, 2]), rows[:, None], positions[:, None])
    for row, position, ran in zip(rows.tolist(), positions.tolist(), (1, 1, 2)):
        for layer in range(config.n_core_layers):
            source = cache.index[cache.slot("core", layer, ran - 1)]
            for step in range(ran, 3):
                target = cache.index[cache.slot("core", layer, step)]
                for tensor in expected:
                    tensor[target, row, :, position] = tensor[source, row, :, position]
    assert torch.equal(cache.keys, expected[0]) and torch.equal(cache.values, expected[1])
