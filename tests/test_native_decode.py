"""The C decode kernel: equal to the reference decoder (as close to a float64 truth as the fp32 reference is)
for any layer shape, any thread count; falls back or fails clearly where it cannot run; builds once and
caches the library."""

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from looplm.config import ModelConfig
from looplm.errors import LoopLMError
from looplm.generate import Decoder, FixedSteps, QExit
from looplm.kernels import build
from looplm.kernels.native_stepper import native_unsupported

from conftest import well_conditioned


def decode_both(model, policy, tokens, prompt, backend="native", threads=None):
    reference = Decoder(model, policy, len(prompt[0]) + len(tokens) + 1, backend="reference")
    native = Decoder(model, policy, len(prompt[0]) + len(tokens) + 1, backend=backend)
    if threads is not None:
        native.stepper.threads = threads
    pairs = []
    with torch.no_grad():
        reference.prefill(prompt)
        native.prefill(prompt)
        for token in tokens:
            pairs.append((reference.step(token), native.step(token)))
    return reference, native, pairs


def float64_truth(model, policy, tokens, prompt):
    """The reference decoder on a float64 copy of the model: (logits, steps) per token, and its cache."""
    truth = Decoder(copy.deepcopy(model).double(), policy, len(prompt[0]) + len(tokens) + 1, backend="reference")
    with torch.no_grad():
        truth.prefill(prompt)
        return [truth.step(token) for token in tokens], truth.cache


def float32_jitter(model, policy, tokens, prompt):
    """The reference decoder on a copy of the model whose every weight is moved by a random relative
    2⁻²³ (float32's rounding of the weights themselves): how far float32 arithmetic may land from the
    truth on this model.  (logits, steps) per token and its cache."""
    jittered = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in jittered.parameters():
            parameter.mul_(1 + 2.0 ** -23 * torch.randn(parameter.shape, generator=generator))
    decoder = Decoder(jittered, policy, len(prompt[0]) + len(tokens) + 1, backend="reference")
    with torch.no_grad():
        decoder.prefill(prompt)
        return [decoder.step(token) for token in tokens], decoder.cache


def assert_as_accurate_as_reference(native, references, truth):
    """native (fp32 kernel) within 1e-4 (+1e-5 relative) of the float64 truth, plus 4x the largest error
    there of the fp32 references (the reference decoder on the model and on a float32-jittered copy).

    A random model can be ill-conditioned (a norm rescaling a nearly cancelled vector), so that float32
    lands ~1e-3 off the truth; the kernel sums in another order, so it cannot be held tighter than
    float32 arithmetic allows for the model — and one reference run can land close by luck (a draw
    whose reference was 1.4e-5 off had jittered runs 1.5e-4 to 7e-4 off).  Well-conditioned draws keep
    the plain 1e-4 bound.
    """
    truth = truth.double()
    reference_error = max((reference.double() - truth).abs().max().item() for reference in references)
    torch.testing.assert_close(native.double(), truth, atol=1e-4 + 4 * reference_error, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(d_head=st.sampled_from([2, 6, 8, 16, 20]), heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]),
       hidden=st.integers(1, 45), core=st.integers(1, 2), prelude=st.integers(0, 1), coda=st.integers(0, 1),
       norm=st.sampled_from(["pre", "sandwich"]), step_norm=st.booleans(), threads=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_native_equals_reference_for_any_layer_shape(d_head, heads, hidden, core, prelude, coda, norm, step_norm,
                                                     threads, seed):
    # Odd sizes exercise the kernel's tails: rows not a multiple of 4, vectors not of 8.
    n_heads, n_kv_heads = heads
    # d_model 2: an RMSNorm returns the direction of a 2-vector, arbitrarily ill-conditioned near 0.
    assume(d_head * n_heads > 2)
    config = ModelConfig(vocab_size=37, d_model=d_head * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         ffn_hidden=hidden, n_prelude_layers=prelude, n_core_layers=core, n_coda_layers=coda,
                         loop_steps=3, max_seq_len=32, norm=norm, step_norm=step_norm)
    model = well_conditioned(config, seed)
    prompt = torch.randint(0, 37, (1, 4))
    tokens = torch.randint(0, 37, (6,)).tolist()
    reference, native, pairs = decode_both(model, QExit(0.6), tokens, prompt, threads=threads)
    truth, truth_cache = float64_truth(model, QExit(0.6), tokens, prompt)
    jittered, jittered_cache = float32_jitter(model, QExit(0.6), tokens, prompt)
    same_path = [steps for _, steps in jittered] == [steps for _, steps in truth]  # else its errors say nothing
    for ((expected, expected_steps), (logits, steps)), (exact, _), (other, _) in zip(pairs, truth, jittered):
        assert steps == expected_steps
        assert_as_accurate_as_reference(logits, [expected] + [other] * same_path, exact)
    for name in ("keys", "values"):
        references = [getattr(reference.cache, name)] + [getattr(jittered_cache, name)] * same_path
        assert_as_accurate_as_reference(getattr(native.cache, name), references, getattr(truth_cache, name))


def test_native_logits_are_not_overwritten_by_the_next_step(tiny_model):
    decoder = Decoder(tiny_model, FixedSteps(), 20, backend="native")
    with torch.no_grad():
        decoder.prefill(torch.tensor([[1, 2, 3]]))
        first, _ = decoder.step(4)
        kept = first.clone()
        decoder.step(5)
    assert torch.equal(first, kept)
    # logits_view (what ``generate`` asks for): the kernel's buffer itself, the next step's logits.
    decoder = Decoder(tiny_model, FixedSteps(), 20, backend="native")
    decoder.logits_view = True
    with torch.no_grad():
        decoder.prefill(torch.tensor([[1, 2, 3]]))
        first, _ = decoder.step(4)
        assert decoder.fused and torch.equal(first, kept)
        second, _ = decoder.step(5)
    assert second is first and not torch.equal(first, kept)


def test_auto_falls_back_to_torch_where_native_cannot_run(tiny_model):
    model = tiny_model.double()
    assert "float32" in native_unsupported(model, Decoder(model, FixedSteps(), 8, backend="reference").cache)
    assert Decoder(model, FixedSteps(), 8).backend == "torch"
    with pytest.raises(LoopLMError, match="native backend cannot run here: .*float32.*use backend 'torch'"):
        Decoder(model, FixedSteps(), 8, backend="native")


def test_unknown_backend_is_a_one_line_error(tiny_model):
    with pytest.raises(LoopLMError, match="backend must be one of auto, native, torch, reference, got 'c'"):
        Decoder(tiny_model, FixedSteps(), 8, backend="c")


def test_kernel_disabled_or_without_compiler_reports_why(monkeypatch):
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("LOOPLM_NATIVE", "0")
    assert build.load_kernel() is None
    assert build.unavailable_reason() == "disabled by LOOPLM_NATIVE=0"
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.delenv("LOOPLM_NATIVE")
    monkeypatch.setattr(build, "_compiler", lambda: None)
    assert build.load_kernel() is None
    assert "no C compiler" in build.unavailable_reason()


def test_kernel_builds_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path))
    compiler = build._compiler()
    first = build._build(compiler)
    stamp = first.stat().st_mtime_ns
    assert build._build(compiler) == first and first.stat().st_mtime_ns == stamp
    # no temp files left: the library and the manifest holding its hash
    assert sorted(path.name for path in (tmp_path / "native").iterdir()) == sorted([first.name, build.MANIFEST])


@pytest.mark.parametrize("policy", [QExit(0.5), QExit(0.3, min_steps=2), FixedSteps(5)],
                         ids=["q", "q-min-steps", "fixed-beyond-T"])
def test_one_call_token_loop_equals_the_per_step_path(tiny_model, policy):
    """The kernel's whole-token loop (steps, gate, Q-exit, LAST_EXITED copy in one call) gives
    exactly the per-step native path's logits, steps and cache."""
    if build.load_kernel() is None:
        pytest.skip(build.unavailable_reason())
    torch.nn.init.normal_(tiny_model.exit_gate.weight, std=2.0)
    prompt = torch.randint(0, 64, (1, 5))
    tokens = torch.randint(0, 64, (20,)).tolist()
    fused = Decoder(tiny_model, policy, 32, backend="native")
    stepwise = Decoder(tiny_model, policy, 32, backend="native")
    assert fused.fused
    steps = []
    with torch.no_grad():
        fused.prefill(prompt)
        stepwise.prefill(prompt)
        stepwise.fused = False  # after the (same) prefill: only the token loop differs
        for token in tokens:
            (a, used), (b, expected) = fused.step(token), stepwise.step(token)
            assert used == expected
            assert fused.greedy == int(a.argmax()) == stepwise.greedy  # the kernel's argmax, and the scheduler's
            steps.append(used)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if isinstance(policy, QExit):
        assert min(steps) >= policy.min_steps and min(steps) < 4  # tokens really exit early
    torch.testing.assert_close(fused.cache.keys, stepwise.cache.keys, rtol=0, atol=0)
    torch.testing.assert_close(fused.cache.values, stepwise.cache.values, rtol=0, atol=0)


@pytest.mark.parametrize("policy", [FixedSteps(), QExit(0.5)], ids=["static", "q"])
def test_a_prompt_prefilled_in_the_kernel_equals_the_forward(tiny_model, policy, monkeypatch):
    """A batch-1 prompt is prefilled through the C rows (at most ``PREFILL_ROWS`` tokens, its
    positions as rows), else by the kernel one token at a time (a small model's short prompt, within
    ``NATIVE_PREFILL_BYTES``), else by the model's batched forward: each gives the same logits, exit
    decision and cache contents, and the same decoded tokens."""
    if build.load_kernel() is None:
        pytest.skip(build.unavailable_reason())
    from looplm.kernels import native_stepper

    torch.nn.init.normal_(tiny_model.exit_gate.weight, std=2.0)
    prompt = torch.randint(0, 64, (1, 9))
    decoders = {}
    with torch.no_grad():
        for name, budget, rows in (("rows", 0, 64), ("tokens", native_stepper.NATIVE_PREFILL_BYTES, 0),
                                   ("forward", 0, 0)):
            monkeypatch.setattr(native_stepper, "NATIVE_PREFILL_BYTES", budget)
            monkeypatch.setattr(native_stepper, "PREFILL_ROWS", rows)
            decoder = Decoder(tiny_model, policy, 32, backend="native")
            assert decoder.stepper.prefills_tokens(9, policy.max_steps(3)) == (name == "tokens")
            assert decoder.stepper.prefills_rows(9) == (name == "rows")
            logits, steps = decoder.prefill(prompt)
            tokens = [int(logits.argmax())]
            for _ in range(6):
                logits, _ = decoder.step(tokens[-1])
                tokens.append(int(logits.argmax()))
            decoders[name] = (decoder, logits, steps, tokens)
    forward, forward_logits, forward_steps, forward_tokens = decoders.pop("forward")
    for decoder, logits, steps, tokens in decoders.values():
        assert steps == forward_steps and tokens == forward_tokens
        torch.testing.assert_close(logits, forward_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(decoder.cache.keys, forward.cache.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(decoder.cache.values, forward.cache.values, rtol=0, atol=1e-5)
