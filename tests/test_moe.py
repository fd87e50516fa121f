"""MoE FFN: sorted dispatch equals the dense reference (values and gradients), the balancing
bias evens out a skewed router, the auxiliary loss reaches the router, bad configs fail."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model import moe as moe_module
from looplm.model.moe import MoE
from looplm.training.objectives import compute_loss

from conftest import tiny_config


def moe(**overrides) -> MoE:
    values = dict(ffn="moe", n_experts=6, moe_top_k=2, expert_hidden=12, n_shared_experts=1)
    values.update(overrides)
    layer = MoE(tiny_config(**values))
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return layer


@settings(max_examples=25, deadline=None)
@given(experts=st.integers(1, 7), data=st.data(), shared=st.integers(0, 2), tokens=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_sorted_dispatch_equals_dense_reference(experts, data, shared, tokens, seed):
    top_k = data.draw(st.integers(1, experts))
    torch.manual_seed(seed)
    layer = moe(n_experts=experts, moe_top_k=top_k, n_shared_experts=shared).eval()
    with torch.no_grad():
        layer.balance_bias.normal_()  # the bias changes which experts are chosen, not the weights
    x = torch.randn(2, tokens, 32, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    grad = torch.randn(2, tokens, 32, dtype=torch.float64)
    reference = layer.dense_reference(x)
    reference_grads = torch.autograd.grad(reference, [x, *layer.parameters()], grad, allow_unused=True)
    for limit in (0.0, float("inf")):  # the per-expert slices, then the padded batched matmuls
        moe_module.PADDED_WASTE_LIMIT = limit
        try:
            fast = layer(x)
            fast_grads = torch.autograd.grad(fast, [x, *layer.parameters()], grad)
        finally:
            moe_module.PADDED_WASTE_LIMIT = 2.0
        torch.testing.assert_close(fast, reference)
        for ours, theirs in zip(fast_grads, reference_grads):
            torch.testing.assert_close(ours, torch.zeros_like(ours) if theirs is None else theirs)


def test_balancing_bias_moves_loads_toward_uniform():
    torch.manual_seed(0)
    layer = moe(n_experts=8, moe_top_k=2, moe_bias_update_rate=0.02).train()
    with torch.no_grad():
        layer.router.weight.normal_(std=0.05)
        layer.router.weight[0] += 0.1  # a skewed router: experts 0 and 1 win almost every token
        layer.router.weight[1] += 0.08
    x = torch.randn(512, 32) + 1.0

    def imbalance():
        chosen, _, _ = layer.route(x)
        load = torch.bincount(chosen.reshape(-1), minlength=8).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(300):
        with torch.no_grad():
            layer(x)
        layer.apply_balance()
    after = imbalance()
    assert before > 3.0 and after < 1.5, (before, after)
    assert layer.balance_bias[0] < 0 < layer.balance_bias[2:].max()
    frozen = moe(moe_bias_update_rate=0.0).train()
    frozen(x)
    frozen.apply_balance()
    assert torch.all(frozen.balance_bias == 0)


def test_the_forward_counts_loads_and_the_bias_moves_once_per_optimiser_step():
    """The bias never moves inside a forward (a later loop step would route with loads of the whole
    batch, later tokens included); one ``balance_experts`` call moves it by the rate at most, however
    many loop steps ran."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(ffn="moe", n_experts=4, moe_top_k=1, expert_hidden=16, loop_steps=4,
                               moe_bias_update_rate=0.25)).train()
    model(torch.randint(0, 64, (2, 12)))
    biases = [layer.balance_bias for layer in model.moe_layers]
    assert all(torch.all(bias == 0) for bias in biases)
    model.balance_experts()
    assert all(bias.abs().max() == 0.25 for bias in biases)  # rate × sign, once: not T = 4 times
    model.balance_experts()  # nothing counted since: no move
    assert all(bias.abs().max() == 0.25 for bias in biases)


def test_aux_loss_is_collected_and_trains_the_router():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(ffn="moe", n_experts=4, moe_top_k=2, expert_hidden=16, moe_aux_loss_weight=0.1))
    ids = torch.randint(0, 64, (2, 9))
    output = model(ids)
    assert output.aux_loss is not None and output.aux_loss.item() > 0
    loss = compute_loss(output, ids, "stage1").loss
    loss.backward()
    assert model.core[0].ffn.router.weight.grad.abs().sum() > 0
    assert model.eval()(ids).aux_loss is None  # no balancing work outside training
    without = LoopLM(tiny_config(ffn="moe", n_experts=4, moe_top_k=2, expert_hidden=16))
    assert without(ids).aux_loss is None


def test_moe_parameters_and_dense_default():
    dense = LoopLM(tiny_config())
    sparse = LoopLM(tiny_config(ffn="moe", n_experts=4, moe_top_k=1, expert_hidden=8, n_shared_experts=0))
    per_layer = 32 * 4 + 4 * (32 * 16 + 8 * 32)
    assert sum(p.numel() for p in sparse.core[0].ffn.parameters()) == per_layer
    assert not any(isinstance(m, MoE) for m in dense.modules())


@pytest.mark.parametrize("overrides, message", [
    ({"moe_top_k": 9, "n_experts": 8}, "model.moe_top_k must be in [1, n_experts=8], got 9"),
    ({"n_experts": 0}, "model.n_experts must be >= 1"),
    ({"moe_bias_update_rate": -1.0}, "must be >= 0"),
])
def test_bad_moe_configs_fail_at_construction(overrides, message):
    with pytest.raises(LoopLMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(ffn="moe", **overrides)
    with pytest.raises(LoopLMError, match="model.ffn must be one of dense, moe, channelmix, got 'sparse'"):
        tiny_config(ffn="sparse")
