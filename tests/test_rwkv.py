"""RWKV-style slot-memory mixer (lrnnSMDDS): chunked closed form equals the
recurrence (values, state, gradients), the read-before-write rule by hand, outputs are
weighted averages of values, and the slot gates pass gradient to the layer input (the seed's
defect B1 is not reproduced)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.model.rwkv import RWKVSlotMixer, wkv_chunked, wkv_recurrent

from conftest import tiny_config


def random_wkv_inputs(batch, length, dim, slots, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    k = randn(batch, length, dim).clamp(-3, 3).exp()
    v = randn(batch, length, dim)
    log_decay = torch.nn.functional.logsigmoid(randn(batch, length, dim) + 1.0)
    bonus = randn(dim).exp()
    write, read = torch.softmax(randn(batch, length, slots), -1), torch.softmax(randn(batch, length, slots), -1)
    state = (randn(batch, slots, dim).abs(), randn(batch, slots, dim).abs() + 0.5)
    return [k.requires_grad_(), v.requires_grad_(), log_decay.requires_grad_(), bonus.requires_grad_(),
            write.requires_grad_(), read.requires_grad_()], state


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 30), chunk=st.sampled_from([1, 3, 8, 16]), dim=st.integers(1, 6),
       slots=st.integers(1, 4), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_equals_recurrent_with_gradients(length, chunk, dim, slots, with_state, seed):
    inputs, state = random_wkv_inputs(2, length, dim, slots, seed)
    state = state if with_state else None
    fast, (fast_n, fast_d) = wkv_chunked(*inputs, state, chunk=chunk)
    reference, (ref_n, ref_d) = wkv_recurrent(*inputs, state)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_n, ref_n, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_d, ref_d, atol=1e-4, rtol=1e-4)
    weights = torch.randn_like(reference)
    ours = torch.autograd.grad((fast * weights).sum() + fast_d.sum(), inputs)
    theirs = torch.autograd.grad((reference * weights).sum() + ref_d.sum(), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_read_before_write_by_hand():
    # One channel, one slot, two tokens. t=0 reads the empty memory: wkv = u k v / (u k) = v₀.
    # t=1 reads N = k₀v₀, D = k₀ (written at t=0, not yet decayed): (k₀v₀ + u k₁v₁)/(k₀ + u k₁).
    k, v = torch.tensor([[[2.0], [3.0]]]), torch.tensor([[[5.0], [7.0]]])
    log_decay = torch.log(torch.tensor([[[0.5], [0.5]]]))
    bonus, gate = torch.tensor([0.25]), torch.ones(1, 2, 1)
    wkv, (numerator, denominator) = wkv_recurrent(k, v, log_decay, bonus, gate, gate)
    expected = torch.tensor([5.0, (2 * 5 + 0.25 * 3 * 7) / (2 + 0.25 * 3)])
    torch.testing.assert_close(wkv.view(-1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(numerator.view(-1), torch.tensor([0.5 * 10 + 21.0]))
    torch.testing.assert_close(denominator.view(-1), torch.tensor([0.5 * 2 + 3.0]))


def test_outputs_are_weighted_averages_of_values():
    inputs, _ = random_wkv_inputs(1, 20, 4, 3, seed=5)
    wkv, _ = wkv_chunked(*inputs)
    v = inputs[1]
    low = torch.cummin(v, dim=1).values
    high = torch.cummax(v, dim=1).values
    assert torch.all(wkv >= low - 1e-4) and torch.all(wkv <= high + 1e-4)


def test_slot_gates_pass_gradient_to_the_input():
    torch.manual_seed(0)
    mixer = RWKVSlotMixer(tiny_config(layer_pattern="R", rwkv_slots=3))
    with torch.no_grad():
        mixer.write_gate.weight.normal_()  # gates that matter
        mixer.read_gate.weight.normal_()
    z = torch.randn(1, 9, 32, requires_grad=True)
    grad_full = torch.autograd.grad(mixer(z).sum(), z)[0]
    frozen = RWKVSlotMixer(tiny_config(layer_pattern="R", rwkv_slots=3))
    frozen.load_state_dict(mixer.state_dict())
    original = frozen.write_gate.forward
    frozen.write_gate.forward = lambda x: original(x.detach())  # cut the gate path to the input
    frozen.read_gate.forward = lambda x, f=frozen.read_gate: torch.nn.functional.linear(x.detach(), f.weight)
    grad_without_gates = torch.autograd.grad(frozen(z).sum(), z)[0]
    assert (grad_full - grad_without_gates).abs().max() > 1e-4
