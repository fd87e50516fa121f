"""A training step's row passes in C (``csrc/train_kernel.c``: the loss's softmax cross-entropy
and RMSNorm) against their torch references (``looplm.kernels.ops``), and the fused cross-entropy
and the model's norm through them against torch's own."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from looplm.kernels import load_kernel, ops
from looplm.training import fused_ce

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="the C kernel does not build here")


def logits_of(rows: int, vocab: int, spread: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * spread).to(dtype)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), vocab=st.sampled_from([1, 7, 16, 37, 64, 129, 1000]),
       spread=st.sampled_from([0.01, 1.0, 30.0]), bf16=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_softmax_cross_entropy_matches_its_reference(rows, vocab, spread, bf16, seed):
    logits = logits_of(rows, vocab, spread, seed, torch.bfloat16 if bf16 else torch.float32)
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 1))
    fast_probs, reference_probs = torch.empty(rows, vocab), torch.empty(rows, vocab)
    fast_in = logits if bf16 else logits.clone()  # float32 logits are overwritten in place
    fast = ops.softmax_cross_entropy(fast_in if bf16 else fast_probs.copy_(fast_in), targets, fast_probs)
    reference = ops.softmax_cross_entropy_reference(logits, targets, reference_probs)
    torch.testing.assert_close(fast_probs, reference_probs, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=2e-6)
    # and the truth: torch's own cross-entropy in float64
    truth = F.cross_entropy(logits.double(), targets, reduction="none")
    torch.testing.assert_close(fast.double(), truth, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 5])
def test_a_target_outside_the_vocabulary_raises(bad):
    logits = torch.randn(3, 5)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        ops.softmax_cross_entropy(logits, torch.tensor([0, bad, 1]), torch.empty(3, 5))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), vocab=st.sampled_from([1, 7, 16, 37, 129, 1000]), bf16=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_cross_entropy_grad_equals_its_reference_bit_for_bit(rows, vocab, bf16, seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(rows, vocab, generator=generator) * 3, dim=1)
    grad = torch.randn(rows, generator=generator)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    dtype = torch.bfloat16 if bf16 else torch.float32
    fast, reference = torch.empty(rows, vocab, dtype=dtype), torch.empty(rows, vocab, dtype=dtype)
    ops.cross_entropy_grad(probs, grad, targets, fast)
    ops.cross_entropy_grad_reference(probs, grad, targets, reference)
    assert torch.equal(fast, reference)


def test_cross_entropy_grad_keeps_nan_and_infinity():
    probs = torch.tensor([[0.5, float("nan"), float("inf"), 0.25] * 4])
    grad, targets = torch.tensor([1.0]), torch.tensor([0])
    fast, reference = torch.empty(1, 16, dtype=torch.bfloat16), torch.empty(1, 16, dtype=torch.bfloat16)
    ops.cross_entropy_grad(probs, grad, targets, fast)
    ops.cross_entropy_grad_reference(probs, grad, targets, reference)
    # a NaN stays a NaN (its bits may differ: torch's vector rounding keeps the sign), the rest equal
    assert torch.equal(fast.isnan(), reference.isnan()) and fast.isnan().any()
    assert torch.equal(fast[~fast.isnan()], reference[~reference.isnan()])


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_through_the_kernel_matches_the_unfused_loss(autocast):
    torch.manual_seed(0)
    hidden = torch.randn(70, 24, requires_grad=True)
    weight = torch.randn(101, 24, requires_grad=True)
    targets = torch.randint(0, 101, (70,))
    grad = torch.rand(70)
    dtype = torch.bfloat16 if autocast else None
    losses = fused_ce.linear_cross_entropy(hidden, weight, targets, dtype)
    losses.backward(grad)
    fast = (losses.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")
    reference.backward(grad)
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(fast, (reference.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(mine, theirs.float(), **tolerance)


def test_the_probability_buffer_is_reused_only_once_its_graph_is_freed():
    torch.manual_seed(0)
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(32, 16, requires_grad=True)
    targets = torch.randint(0, 32, (8,))
    first = fused_ce.linear_cross_entropy(hidden, weight, targets).sum()
    first.backward(retain_graph=True)
    expected = hidden.grad.clone()
    # a second forward while the first graph lives must not take (and overwrite) its buffer
    second = fused_ce.linear_cross_entropy(hidden * 2, weight, targets).sum()
    hidden.grad = None
    first.backward()
    torch.testing.assert_close(hidden.grad, expected, rtol=0, atol=0)
    del first, second
    # freed graphs hand their buffers back: the next forward reuses one instead of allocating
    pool = fused_ce._POOL
    assert pool._free is not None
    kept = pool._free.data_ptr()
    losses = fused_ce.linear_cross_entropy(hidden, weight, targets)
    assert pool._free is None or pool._free.data_ptr() != kept
    del losses
    assert pool._free is not None and pool._free.data_ptr() == kept


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(1, 1), (3, 7), (2, 5, 16), (4, 33), (2, 3, 256)]), seed=st.integers(0, 2 ** 16),
       need_weight=st.booleans(), threads=st.integers(1, 3))
def test_rms_norm_rows_match_their_references(shape, seed, need_weight, threads):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * 3
    weight = torch.rand(shape[-1], generator=generator) + 0.5
    grad = torch.randn(*shape, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = ops.rms_norm_rows(x, weight, 1e-6)
        fast_grad = ops.rms_norm_grad_rows(grad, fast[1], fast[2], weight, need_weight)
    finally:
        torch.set_num_threads(previous)
    reference = ops.rms_norm_rows_reference(x, weight, 1e-6)
    reference_grad = ops.rms_norm_grad_rows_reference(grad, reference[1], reference[2], weight, need_weight)
    for mine, theirs in zip(fast + fast_grad, reference + reference_grad):
        if theirs is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_the_model_norm_through_the_kernel_matches_torch_rms_norm():
    from looplm.model.norms import rms_norm_fused

    torch.manual_seed(0)
    x = torch.randn(4, 9, 64, requires_grad=True)
    weight = (torch.rand(64) + 0.5).requires_grad_()
    grad = torch.randn(4, 9, 64)
    fused = rms_norm_fused(x, weight, 1e-6)
    reference = F.rms_norm(x, (64,), weight, 1e-6)
    torch.testing.assert_close(fused, reference)
    for mine, theirs in zip(torch.autograd.grad(fused, (x, weight), grad),
                            torch.autograd.grad(reference, (x, weight), grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_rows_in_bf16_match_their_references(threads):
    torch.manual_seed(0)
    x, weight = torch.randn(5, 7, 43) * 3, torch.rand(43) + 0.5  # 43: the vector loop and a scalar tail
    grad = torch.randn(5, 7, 43).bfloat16()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, normed, inverse_rms = ops.rms_norm_rows(x, weight, 1e-6, torch.bfloat16)
        grad_x, grad_weight = ops.rms_norm_grad_rows(grad, normed, inverse_rms, weight, True)
    finally:
        torch.set_num_threads(previous)
    reference_out, reference_normed, _ = ops.rms_norm_rows_reference(x, weight, 1e-6, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # the C norm's float32 output, rounded as a cast rounds it
    assert torch.equal(out, ops.rms_norm_rows(x, weight, 1e-6)[0].bfloat16())
    torch.testing.assert_close(out.float(), reference_out.float(), rtol=8e-3, atol=1e-6)
    for mine, theirs in zip((grad_x, grad_weight),
                            ops.rms_norm_grad_rows_reference(grad, normed, inverse_rms, weight, True)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_a_pre_norm_hands_bf16_to_its_projection_with_the_same_values_and_gradients():
    """Under CPU bf16 autocast a layer's pre-norms give their projections bf16 directly: the loss
    and every gradient equal those of the float32 output cast by autocast."""
    from looplm.model import LoopLM
    from looplm.model.norms import RMSNorm

    from conftest import tiny_config

    torch.manual_seed(0)
    model = LoopLM(tiny_config())
    flagged = [module for module in model.modules() if isinstance(module, RMSNorm) and module.feeds_matmul]
    assert len(flagged) == 2 * model.config.n_core_layers
    batch = torch.randint(0, 64, (2, 9))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(batch[:, :-1]).logits().flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]

    loss, grads = loss_and_grads()
    for module in flagged:
        module.feeds_matmul = False
    plain_loss, plain_grads = loss_and_grads()
    assert torch.equal(loss, plain_loss)
    for mine, theirs in zip(grads, plain_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_bf16_rounding_breaks_ties_to_even_as_torch_does():
    """Values exactly halfway between two bf16 numbers (low 16 bits 0x8000), either side of the
    even one, and just below or above halfway: the gradient's and the norm's bf16 outputs round
    each as torch's cast does (random inputs almost never hit a tie)."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000,
                         0x40008000, 0x40018000] * 4, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)[None]  # [1, 32]: the vector loop and the scalar tail both see them
    values = torch.cat([values, values[:, :5]], dim=1)
    fast, reference = torch.empty(1, 37, dtype=torch.bfloat16), torch.empty(1, 37, dtype=torch.bfloat16)
    grad, targets = torch.tensor([1.0]), torch.tensor([36])
    ops.cross_entropy_grad(values, grad, targets, fast)
    ops.cross_entropy_grad_reference(values, grad, targets, reference)
    assert torch.equal(fast.view(torch.int16), reference.view(torch.int16))
    # the norm: a weight equal to the values over a unit-RMS row rounds the same numbers
    row = torch.ones(1, 37)
    out = ops.rms_norm_rows(row, values[0], 0.0, torch.bfloat16)[0]
    assert torch.equal(out.view(torch.int16), values.bfloat16().view(torch.int16))


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(1, 2), (3, 14), (2, 5, 32), (4, 70), (2, 3, 1408)]), bf16=st.booleans(),
       seed=st.integers(0, 2 ** 16), threads=st.integers(1, 3))
def test_swiglu_rows_match_their_references(shape, bf16, seed, threads):
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    gate_up = (torch.randn(*shape, generator=generator) * 4).to(dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=generator).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grad_in = ops.swiglu_rows(gate_up), ops.swiglu_grad_rows(gate_up, grad)
    finally:
        torch.set_num_threads(previous)
    # float32 truth from the same (rounded) inputs; bf16 outputs round it once (within 2^-8)
    truth = ops.swiglu_rows_reference(gate_up.float())
    truth_grad = ops.swiglu_grad_rows_reference(gate_up.float(), grad.float())
    tolerance = dict(rtol=2 ** -8, atol=1e-6) if bf16 else dict(rtol=2e-6, atol=1e-6)
    assert out.dtype == grad_in.dtype == dtype
    torch.testing.assert_close(out.float(), truth, **tolerance)
    torch.testing.assert_close(grad_in.float(), truth_grad, **tolerance)


def test_the_model_swiglu_through_the_kernel_matches_torch():
    from looplm.model.ffn import SwiGLU

    torch.manual_seed(0)
    ffn = SwiGLU(24, 40)
    x = torch.randn(3, 5, 24, requires_grad=True)
    grad = torch.randn(3, 5, 24)
    fast = ffn(x)
    fast_grads = torch.autograd.grad(fast, (x, *ffn.parameters()), grad)
    gate, up = ffn.gate_up(x).split(40, dim=-1)
    reference = ffn.down(F.silu(gate) * up)
    reference_grads = torch.autograd.grad(reference, (x, *ffn.parameters()), grad)
    torch.testing.assert_close(fast, reference)
    for mine, theirs in zip(fast_grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 5), length=st.integers(1, 9), head_dim=st.sampled_from([2, 8, 16, 64]),
       partial=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 2 ** 16), threads=st.integers(1, 3))
def test_rope_matches_its_reference_on_strided_views(heads, length, head_dim, partial, bf16, seed, threads):
    """A projection's output viewed as [B, H, L, hd] (heads and positions swapped, a slice of
    the heads: as attention hands queries and keys over) rotates as the torch reference does —
    bit for bit in float32 — and the inverse rotation undoes it."""
    from looplm.model.rope import RotaryEmbedding

    generator = torch.Generator().manual_seed(seed)
    rotary = head_dim // 2 if partial and head_dim >= 4 else head_dim
    cos, sin = RotaryEmbedding(rotary, 16).tables(2, length)
    dtype = torch.bfloat16 if bf16 else torch.float32
    projected = torch.randn(2, length, heads + 1, head_dim, generator=generator).to(dtype)
    x = projected.transpose(1, 2)[:, :heads]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = ops.rope(x, cos.contiguous(), sin.contiguous())
        back = ops.rope(fast, cos.contiguous(), sin.contiguous(), inverse=True)
    finally:
        torch.set_num_threads(previous)
    truth = ops.rope_reference(x.float(), cos, sin)
    if bf16:
        torch.testing.assert_close(fast.float(), truth, rtol=2 ** -8, atol=1e-6)
    else:
        assert torch.equal(fast, ops.rope_reference(x, cos, sin))
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_rope_gradients_through_the_kernel_match_torch():
    from looplm.model.rope import RotaryEmbedding, apply_rope

    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(16, 32).tables(0, 7)
    x = torch.randn(2, 3, 7, 16, requires_grad=True)
    grad = torch.randn(2, 3, 7, 16)
    (fast,) = torch.autograd.grad(apply_rope(x, cos, sin), x, grad)
    (reference,) = torch.autograd.grad(ops.rope_reference(x, cos, sin), x, grad)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
