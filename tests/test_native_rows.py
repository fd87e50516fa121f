"""Batched decode in C (``NativeRowsStepper``): rows of a batched cache, each at its own loop step,
position and cache row, through a run of layers in one call.  Held to the reference stepper (the
model's own modules over the same rows) for any layer shape and thread count — the states it returns
and the K/V it writes —, its C head, gate and K/V copies to their torch references, and batched
generation through it to batched generation through the reference for every KV layout, with Q-exit
and the other exit policies mixed in one batch, int8 layers included."""

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.batch import generate_batch
from looplm.cache import KVCache
from looplm.config import ModelConfig
from looplm.cpu import cpu_flags
from looplm.errors import LoopLMError
from looplm.exit_policy import ACTExit, FixedSteps, HiddenDiffExit, KLExit, QExit, exit_steps
from looplm.generate import BatchSession, NonFiniteOutput, Sampling, Settings
from looplm.kernels import ops
from looplm.kernels.build import load_kernel
from looplm.kernels.native_stepper import NativeRowsStepper
from looplm.model import LoopLM
from looplm.quant import quantize_model
from looplm.steppers import ModelStepper, Rows

from conftest import tiny_config, well_conditioned

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="the C kernel does not build here")

PROMPTS = [[1, 5, 9, 2, 7, 3, 11], [4, 8], [6, 2, 9, 9], [3], [2, 4, 6, 8, 10], [7, 7]]


def filled_cache(config, rows: int, max_len: int, seed: int, dtype=torch.float32) -> KVCache:
    cache = KVCache(config, rows, max_len, config.loop_steps, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator))
    cache.values.copy_(torch.randn(cache.values.shape, generator=generator))
    return cache


def assert_as_accurate_as_torch(got: torch.Tensor, torch32: torch.Tensor, truth: torch.Tensor) -> None:
    """``got`` (the C kernel's float32) is within 1e-4 of the float64 ``truth`` (relative to its size),
    or within a few times torch's own float32 error where the shape makes float32 itself that far off
    (an RMSNorm of a 2-vector, a 2-unit FFN amplify rounding): a wrong index or term is off by far more."""
    truth = truth.double()
    torch_error = (torch32.double() - truth).abs().max().item()
    error = (got.double() - truth).abs()
    bound = 1e-4 * (1 + truth.abs()) + 8 * torch_error
    assert bool((error <= bound).all()), (error.max().item(), torch_error)


@settings(max_examples=25, deadline=None)
@given(d_head=st.sampled_from([2, 6, 8, 16, 20]), heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]),
       hidden=st.integers(1, 45), prelude=st.integers(0, 1), coda=st.integers(0, 1),
       norm=st.sampled_from(["pre", "sandwich"]), step_norm=st.booleans(), threads=st.integers(1, 3),
       count=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_rows_steps_equal_the_reference_for_any_layer_shape(d_head, heads, hidden, prelude, coda, norm, step_norm,
                                                            threads, count, seed):
    """Embedding (with the prelude), a core step and the readout (with the coda) of up to nine
    rows at random loop steps, positions and cache rows — odd sizes exercise the four-by-four
    kernel's tails — equal the reference stepper's, and so do the K/V they write: as close to the
    reference run in float64 as the reference's own float32 run is, within a few times."""
    n_heads, n_kv_heads = heads
    config = ModelConfig(vocab_size=37, d_model=d_head * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         ffn_hidden=hidden, n_prelude_layers=prelude, n_core_layers=2, n_coda_layers=coda,
                         loop_steps=3, max_seq_len=32, norm=norm, step_norm=step_norm)
    model = well_conditioned(config, seed)
    generator = torch.Generator().manual_seed(seed)
    slots = torch.randperm(10, generator=generator)[:count].tolist()
    rows = Rows(slots, torch.randint(0, 3, (count,), generator=generator).tolist(),
                torch.randint(0, 32, (count,), generator=generator).tolist())
    tokens = torch.randint(0, 37, (count,), generator=generator).tolist()
    h = torch.randn(count, config.d_model, generator=generator)
    results = {}
    double = copy.deepcopy(model).double()
    for name, stepper_class, chosen, dtype in (("reference", ModelStepper, model, torch.float32),
                                               ("float64", ModelStepper, double, torch.float64),
                                               ("native", NativeRowsStepper, model, torch.float32)):
        cache = filled_cache(config, 10, 32, seed, dtype)
        stepper = stepper_class(chosen, cache)
        if name == "native":
            stepper.threads = threads
        with torch.no_grad():
            e = stepper.embed(tokens, Rows(slots, [0] * count, rows.positions))
            stepped = stepper.core_step(h.to(dtype), e, rows)
            readout = stepper.readout(stepped, rows)
            results[name] = (e, stepped, readout, stepper.gate_logits(readout), stepper.logits(readout),
                             cache.keys, cache.values)
    for got, torch32, truth in zip(results["native"], results["reference"], results["float64"], strict=True):
        assert_as_accurate_as_torch(got, torch32, truth)


@pytest.mark.parametrize("d_model", [48, 160])  # 160: the head's inputs in two chunks (panel_rows)
def test_the_head_and_its_argmax_in_one_c_call_equal_torch(d_model):
    """Any number of rows — full groups of four and the one to three left over — gives torch's
    logits and argmax; where the head runs from panels (AVX-512) a row's logits are the same bits
    whatever rows share its call, since every output sums its products in one order."""
    torch.manual_seed(0)
    model = well_conditioned(tiny_config(vocab_size=300, d_model=d_model, n_heads=4), 0)
    stepper = NativeRowsStepper(model, KVCache(model.config, 16, 16, 3))
    readouts = torch.randn(13, d_model)
    alone = [stepper.logits_argmax(readouts[row:row + 1])[0][0] for row in range(13)]
    for count in (1, 2, 3, 4, 5, 6, 7, 8, 13):
        readout = readouts[:count]
        logits, best = stepper.logits_argmax(readout)
        torch.testing.assert_close(logits, torch.nn.functional.linear(readout, model.head_weight),
                                   atol=1e-5, rtol=1e-5)
        assert best == logits.argmax(-1).tolist()
        if "avx512f" in cpu_flags():
            assert all(torch.equal(logits[row], alone[row]) for row in range(count)), count


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_copying_skipped_steps_kv_in_c_equals_indexing(heads):
    """The K/V a row that left early gives its skipped steps: one C call of small copies (keys and
    values of one shape together, of two shapes — MLA — each alone) equals advanced indexing."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 5, heads[1], 12, 8, generator=generator)
    values = torch.randn(6, 5, heads[1], 12, 8 if heads[0] == heads[1] else 5, generator=generator)
    source, target, rows, positions = [0, 1, 1, 4], [2, 3, 5, 5], [4, 0, 2, 2], [11, 0, 3, 7]
    expected = [tensor.clone() for tensor in (keys, values)]
    ops.copy_positions_reference(expected, source, target, rows, positions)
    ops.copy_positions((keys, values), source, target, rows, positions)
    assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])


def test_auto_runs_batches_in_c_where_the_model_allows_and_the_reference_elsewhere():
    plain = LoopLM(tiny_config()).eval()
    assert isinstance(BatchSession(plain, 4, 16).scheduler.stepper, NativeRowsStepper)
    assert isinstance(BatchSession(plain, 4, 16, backend="reference").scheduler.stepper, ModelStepper)
    gated = LoopLM(tiny_config(layer_pattern="AG")).eval()  # a Gated DeltaNet layer: not the C rows path
    session = BatchSession(gated, 4, 16)
    assert isinstance(session.scheduler.stepper, ModelStepper) and session.scheduler.backend == "reference"


def _exit_model(**overrides) -> LoopLM:
    model = well_conditioned(tiny_config(loop_steps=4, **overrides), 1)
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    model.exit_gate.bias.data.fill_(-1.0)  # exits spread over the steps
    return model


@pytest.mark.parametrize("layout", ["last_exited", "full", "last", "first", "avg", "modulo"])
def test_batched_generation_in_c_equals_the_reference_for_every_layout(layout):
    """Six rows with six exit policies (Q-exit, one step, hidden change, ACT, KL, full depth) in
    one batch, at different loop steps in the same iterations: the C rows give the reference
    stepper's tokens and steps under every layout the C path serves."""
    model = _exit_model(n_coda_layers=1, n_kv_heads=2)
    mixed = [Settings(policy, layout) for policy in (QExit(0.4), FixedSteps(1), HiddenDiffExit(0.3), ACTExit(0.6),
                                                       KLExit(0.05), FixedSteps())]
    native = generate_batch(model, PROMPTS, 6, settings=mixed, layout=layout)
    reference = generate_batch(model, PROMPTS, 6, settings=mixed, layout=layout, backend="reference")
    assert native.mixed_depth_iterations > 0 or layout == "full"
    for got, expected in zip(native.generations, reference.generations):
        assert (got.ids, got.steps) == (expected.ids, expected.steps)


def test_int8_layers_decode_in_batched_c_like_the_reference():
    """Weight-only Q8_0 layers (float activations: the same products as the reference, summed in
    another order) through the rows' projections, exits included."""
    model = quantize_model(_exit_model(n_prelude_layers=1, d_model=64, ffn_hidden=96), activations="float")
    assert isinstance(BatchSession(model, 2, 16).scheduler.stepper, NativeRowsStepper)
    native = generate_batch(model, PROMPTS, 6, exit_policy=QExit(0.5))
    reference = generate_batch(model, PROMPTS, 6, exit_policy=QExit(0.5), backend="reference")
    assert [g.ids for g in native.generations] == [g.ids for g in reference.generations]
    assert [g.steps for g in native.generations] == [g.steps for g in reference.generations]


def _session_tokens(model, prompts, settings, limits, backend, threads=None):
    session = BatchSession(model, 4, 24, backend=backend)
    if threads is not None:  # a tiny model's decode picks one thread
        session.scheduler.stepper.threads = threads
    requests, waiting = [], list(zip(prompts, settings, limits))
    with torch.inference_mode():
        while waiting or session.active:
            while waiting and session.fits(waiting[0][0], waiting[0][2], waiting[0][1]):
                prompt, chosen, limit = waiting.pop(0)
                requests += session.admit([prompt], [limit], settings=[chosen])
            session.step()
    return [(r.generation.ids, r.generation.steps) for r in requests], session.scheduler


@pytest.mark.parametrize("threads", [1, 2])
def test_one_call_iterations_of_q_exit_and_fixed_rows_equal_the_reference(threads):
    """Rows that all exit by Q-exit (thresholds and min_steps of their own) or at a fixed depth
    (shallower than the cache: their deeper steps get the LAST_EXITED copies) run each iteration in
    one C call (``exit_step``); a row with another policy sends the iterations it is in through the
    general path.  Either way, with rows joining as others leave, the tokens and steps equal the
    reference stepper's — also with two threads, where one computes the small head while the other
    makes the copies."""
    model = _exit_model()
    policies = [QExit(0.3), QExit(0.7, min_steps=2), FixedSteps(2), QExit(0.5), FixedSteps(), QExit(0.9),
                HiddenDiffExit(0.3), QExit(0.4)]
    settings_ = [Settings(policy) for policy in policies]
    limits = [9, 4, 6, 11, 3, 8, 2, 7]
    prompts = PROMPTS + [[9, 1, 2], [5]]
    native, scheduler = _session_tokens(model, prompts, settings_, limits, "auto", threads)
    reference, _ = _session_tokens(model, prompts, settings_, limits, "reference")
    assert native == reference
    assert 0 < scheduler.exit_step_iterations < scheduler.iterations  # both paths ran
    assert scheduler.mixed_depth_iterations > 0


@pytest.mark.parametrize("chunk", [4, 64])
@pytest.mark.parametrize("layout", ["last_exited", "full", "last", "first", "avg", "modulo"])
@pytest.mark.parametrize("shape", [dict(), dict(n_prelude_layers=1, n_coda_layers=1), dict(step_norm=True)],
                         ids=["plain", "prelude-coda", "step-norm"])
def test_a_prompt_prefilled_through_the_c_rows_equals_the_forward(layout, shape, chunk):
    """A small model's prompt goes into its cache row through the C rows (positions as rows,
    ``chunk`` a call, each step's layout rules applied by the row's view): the K/V of
    every step and group, and the last position's readout after every step, equal the model's
    forward into the same row — also when the prompt runs fewer steps than the cache is deep."""
    model = well_conditioned(tiny_config(loop_steps=4, n_kv_heads=2, **shape), 3)
    prompt = torch.randint(0, 64, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    for steps in (4, 2):
        expected_cache = KVCache(model.config, 4, 24, 4, layout=layout)
        view = expected_cache.row(2)
        with torch.no_grad():
            output = model(torch.tensor([prompt]), steps=steps, cache=view)
        expected = [readout[0, -1:] for readout in output.hidden_states]
        cache = KVCache(model.config, 4, 24, 4, layout=layout)
        stepper = NativeRowsStepper(model, cache)
        assert stepper.prefills_rows(len(prompt))
        stepper.prefill_chunk = chunk  # 4: three calls a step, the last part-full; 64: one
        with torch.no_grad():
            readouts = stepper.prefill_rows(prompt, 2, steps, cache.row(2))
        for got, want in zip(readouts, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.keys, expected_cache.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.values, expected_cache.values, atol=1e-4, rtol=1e-4)


def test_which_prompts_the_c_rows_prefill():
    """A prompt that fits one C call goes to the C rows where the kernel has SIMD products, longer
    ones to the torch forward; layers in other forms than float32 only on a small model
    (``ROWS_PREFILL_BYTES``), and a scalar kernel never."""
    from looplm.kernels import native_stepper

    model = well_conditioned(tiny_config(loop_steps=2), 3)
    stepper = NativeRowsStepper(model, KVCache(model.config, 2, 64, 2))
    assert stepper.float32_layers and stepper.prefill_chunk == native_stepper.PREFILL_ROWS
    stepper.simd, stepper.token_step_bytes = True, 2**30  # a large model
    assert stepper.prefills_rows(stepper.prefill_chunk) and not stepper.prefills_rows(stepper.prefill_chunk + 1)
    stepper.float32_layers = False
    assert not stepper.prefills_rows(1)
    stepper.token_step_bytes = native_stepper.ROWS_PREFILL_BYTES
    assert stepper.prefills_rows(1)
    stepper.simd = False
    assert not stepper.prefills_rows(1)
    quantised = NativeRowsStepper(quantize_model(model), KVCache(model.config, 2, 64, 2))
    assert not quantised.float32_layers


@settings(max_examples=60, deadline=None)
@given(gates=st.lists(st.floats(-6, 6), min_size=1, max_size=8), threshold=st.floats(0, 1),
       min_steps=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_a_prefilled_prompts_q_exit_in_c_equals_the_policys_decide(gates, threshold, min_steps, seed):
    """The C rows decide a prefilled prompt's last token by Q-exit from its readouts after every step
    (``q_exit_replay``), as ``exit_steps`` (the policy's ``decide``) does over the same gate logits:
    the same exit step for any gates, threshold and min_steps.  The gate reads one coordinate with
    weight 1 and no bias, so its logit is exactly that coordinate on both sides."""
    model = _exit_model()
    with torch.no_grad():
        model.exit_gate.weight.zero_()
        model.exit_gate.weight[0, 0] = 1.0
        model.exit_gate.bias.zero_()
    stepper = NativeRowsStepper(model, KVCache(model.config, 2, 8, 4))
    readouts = torch.randn(len(gates), model.config.d_model, generator=torch.Generator().manual_seed(seed))
    readouts[:, 0] = torch.tensor(gates)
    policy = QExit(threshold, steps=len(gates), min_steps=min(min_steps, len(gates)))
    signals = stepper.gate_logits(readouts)
    assert signals.tolist() == readouts[:, 0].tolist()
    expected = int(exit_steps(policy, len(gates), 1, lambda step: signals[step:step + 1])[0])
    assert stepper.q_exit_replay(readouts, policy.min_steps, threshold) == expected


def test_greedy_rows_in_c_stop_on_non_finite_scores_like_the_reference():
    """The one-call iterations hand greedy sampling the largest logit with its index, so it checks
    that logit is finite without reading the logits: a token whose embedding is NaN (every id but
    the prompts') makes every later score NaN, and decoding stops with the non-finite error in the
    one-call iterations as through the reference — after the prompts' first tokens, so in decoding."""
    model = _exit_model(tie_embeddings=False)
    prompts = [[1, 2, 3], [3, 2]]
    with torch.no_grad():
        keep = model.embed.weight[[1, 2, 3]].clone()
        model.embed.weight.fill_(float("nan"))
        model.embed.weight[[1, 2, 3]] = keep
    for backend in ("auto", "reference"):
        emitted: list[int] = []
        with pytest.raises(NonFiniteOutput):
            generate_batch(model, prompts, 6, exit_policy=QExit(0.5), backend=backend,
                           on_token=lambda row, token, steps, text, emitted=emitted: emitted.append(token))
        assert emitted, backend  # the prompts' first tokens came out: the scores went NaN in decoding


def test_the_one_call_iterations_report_each_done_rows_largest_logit():
    """``exit_step``'s last output is, for each done row, its logit at its argmax."""
    model = _exit_model()
    cache = KVCache(model.config, 4, 16, 4)
    stepper = NativeRowsStepper(model, cache)
    states, inputs = torch.zeros(4, model.config.d_model), torch.zeros(4, model.config.d_model)
    survival = torch.zeros(4, dtype=torch.float64)
    rows = Rows([0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 0, 0])
    ran, logits, best, top, _ = stepper.exit_step(states, rows, [1, 1, 2, 1], [1] * 4, [float("inf")] * 4, survival,
                                               [3, 5, 7, 9], inputs)
    assert ran == [1, 1, 0, 1] and len(best) == len(top) == logits.shape[0] == 3
    assert best == logits.argmax(-1).tolist()
    assert top == [float(logits[k, best[k]]) for k in range(3)]


def _run_ahead_tokens(model, work, run_ahead, stop_ids=(), rows=4, threads=None, standby=0, stream=True):
    """``work``: (prompt, settings, limit) joining a ``rows``-row session (``standby`` slots more)
    as slots free up; each request's (ids, steps, layer applications, full-depth applications,
    streamed (id, steps) where ``stream``), the scheduler's counts and how many steps ran."""
    session = BatchSession(model, rows, 32, stop_ids=list(stop_ids), run_ahead=run_ahead, standby=standby)
    if threads is not None:  # a tiny model's decode picks one thread
        session.scheduler.stepper.threads = threads
    requests, waiting, steps_run = [], list(work), 0
    with torch.inference_mode():
        while waiting or session.active:
            while waiting and session.fits(waiting[0][0], waiting[0][2], waiting[0][1]):
                prompt, chosen, limit = waiting.pop(0)
                streamed: list[tuple[int, int]] = []
                callback = (lambda token, steps, text, out=streamed: out.append((token, steps))) if stream else None
                requests += [(request, streamed) for request in session.admit([prompt], [limit], [callback],
                                                                              settings=[chosen])]
            session.step()
            steps_run += 1
    scheduler = session.scheduler
    outcome = [(r.generation.ids, r.generation.steps, r.generation.layer_applications,
                r.generation.full_depth_applications, r.generation.stop_reason, streamed) for r, streamed in requests]
    return outcome, (scheduler.iterations, scheduler.mixed_depth_iterations), steps_run


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_running_ahead_in_c_give_the_tokens_of_one_iteration_a_step(threads):
    """Greedy rows run on in one C call (``run_ahead``): each row done with a token takes its
    argmax there and enters the next iteration, until a row cannot (a sampled row's token, a token
    that ends its request, a stop id) — that row's token comes back to Python as before.  With
    rows joining as others leave, Q-exit of several thresholds, fixed depths, a sampled row and a
    stop id, every request's tokens, steps, layer counts, stop reason and streamed tokens, and the
    scheduler's iteration counts, equal those of one iteration a step — with far fewer steps."""
    model = _exit_model()
    policies = [QExit(0.3), QExit(0.7, min_steps=2), FixedSteps(2), QExit(0.5), FixedSteps(), QExit(0.9),
                QExit(0.4), FixedSteps(3)]
    work = [(prompt, Settings(policy), limit) for prompt, policy, limit in
            zip(PROMPTS + [[9, 1, 2], [5]], policies, [19, 4, 16, 21, 3, 18, 12, 17])]
    work[5] = (work[5][0], Settings(QExit(0.6), sampling=Sampling(temperature=0.8, seed=3)), work[5][2])
    plain, counts, steps_plain = _run_ahead_tokens(model, work, 0.0, threads=threads)
    ahead, counts_ahead, steps_ahead = _run_ahead_tokens(model, work, 10.0, threads=threads)
    assert ahead == plain and counts_ahead == counts
    assert steps_ahead * 3 < steps_plain == counts[0]  # one iteration a step, or several
    # A stop id met mid-generation ends its row there, in both.
    stop = next(ids[len(ids) // 2] for ids, *_ in plain if len(ids) > 4)
    stopped, counts, _ = _run_ahead_tokens(model, work, 0.0, [stop], threads=threads)
    ahead_stopped, counts_ahead, _ = _run_ahead_tokens(model, work, 10.0, [stop], threads=threads)
    assert ahead_stopped == stopped and counts_ahead == counts
    assert any(reason == "stop_token" for *_, reason, _ in stopped)


def test_a_run_ahead_stops_after_its_seconds():
    """``run_ahead`` bounds how long one step runs on: a bound below one iteration's time runs one
    iteration a step, as 0 does."""
    model = _exit_model()
    work = [(prompt, Settings(QExit(0.5)), 10) for prompt in PROMPTS]
    _, counts, steps_run = _run_ahead_tokens(model, work, 1e-12)
    assert steps_run == counts[0]


def test_run_ahead_must_be_seconds_at_least_zero():
    model = _exit_model()
    for bad in (-1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(LoopLMError, match="run_ahead must be seconds >= 0"):
            BatchSession(model, 2, 16, run_ahead=bad)


def test_a_row_that_took_its_most_tokens_in_a_call_goes_on_through_python(monkeypatch):
    """A row takes at most RUN_AHEAD_TOKENS in one call (the buffer's bound); its next token then
    comes back to Python like a sampled one, and the tokens are those of one iteration a step."""
    import looplm.scheduler

    model = _exit_model()
    work = [(prompt, Settings(QExit(0.5)), 12) for prompt in PROMPTS]
    plain, counts, _ = _run_ahead_tokens(model, work, 0.0)
    unbounded_steps = _run_ahead_tokens(model, work, 10.0)[2]
    monkeypatch.setattr(looplm.scheduler, "RUN_AHEAD_TOKENS", 2)
    bounded, counts_bounded, bounded_steps = _run_ahead_tokens(model, work, 10.0)
    assert bounded == plain and counts_bounded == counts
    assert unbounded_steps < bounded_steps < counts[0]


@functools.cache
def _run_ahead_model() -> LoopLM:
    return _exit_model()  # one for every example (the workloads vary, not the model)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 4),
       requests=st.lists(st.tuples(st.lists(st.integers(1, 63), min_size=1, max_size=6),
                                   st.sampled_from(["q0.3", "q0.6", "q0.9", "fixed1", "fixed2", "fixed", "hot"]),
                                   st.integers(0, 14)), min_size=1, max_size=7),
       stop=st.sampled_from([None, 5, 17, 33]), standby=st.integers(0, 3))
def test_any_workload_runs_ahead_to_the_tokens_of_one_iteration_a_step(rows, requests, stop, standby):
    """For any batch size, standby slots, prompts, limits (0 included), policies (a sampled row
    among them) and stop id, running ahead gives every request the tokens, steps, counts and
    stream of one iteration a step, and the scheduler's counts of it, with or without standby
    slots (a batch of one row without them runs on the one-row stepper, counted otherwise)."""
    kinds = {"q0.3": Settings(QExit(0.3)), "q0.6": Settings(QExit(0.6, min_steps=2)), "q0.9": Settings(QExit(0.9)),
             "fixed1": Settings(FixedSteps(1)), "fixed2": Settings(FixedSteps(2)), "fixed": Settings(FixedSteps()),
             "hot": Settings(QExit(0.5), sampling=Sampling(temperature=1.0, seed=7))}
    work = [(prompt, kinds[kind], limit) for prompt, kind, limit in requests]
    stops = [] if stop is None else [stop]
    plain = _run_ahead_tokens(_run_ahead_model(), work, 0.0, stops, rows=rows)
    waiting = _run_ahead_tokens(_run_ahead_model(), work, 0.0, stops, rows=rows, standby=standby)
    ahead = _run_ahead_tokens(_run_ahead_model(), work, 10.0, stops, rows=rows, standby=standby)
    assert ahead[:2] == waiting[:2] and ahead[0] == plain[0]


@pytest.mark.parametrize("stream", [True, False])
def test_standby_rows_take_the_places_of_requests_ending_in_a_c_call(stream):
    """With ``standby`` slots, requests admitted while every row is busy are prefilled and wait; a
    greedy request that ends inside a run-ahead call (its last token taken there) hands its place
    to the next of them in the same call.  Tokens, steps, counts, stop reasons, streams and the
    scheduler's iteration counts equal those of no standby slots and one iteration a step, in far
    fewer steps than running ahead without them (a mutant that swaps in the wrong row, or brings
    one in at the wrong iteration, changes the tokens or the counts)."""
    model = _exit_model()
    policies = [QExit(0.3), QExit(0.7, min_steps=2), FixedSteps(2), QExit(0.5), FixedSteps(), QExit(0.9),
                QExit(0.4), FixedSteps(3)]
    work = [(prompt, Settings(policy), limit) for prompt, policy, limit in
            zip(PROMPTS + [[9, 1, 2], [5]], policies, [5, 4, 6, 3, 3, 7, 2, 9])] * 2
    plain, counts, steps_plain = _run_ahead_tokens(model, work, 0.0, rows=3, stream=stream)
    waiting, counts_waiting, _ = _run_ahead_tokens(model, work, 0.0, rows=3, standby=2, stream=stream)
    ahead, counts_ahead, steps_ahead = _run_ahead_tokens(model, work, 10.0, rows=3, stream=stream)
    both, counts_both, steps_both = _run_ahead_tokens(model, work, 10.0, rows=3, standby=2, stream=stream)
    assert waiting == plain and ahead == plain and both == plain
    assert counts_waiting == counts_ahead == counts_both == counts
    assert steps_both < steps_ahead < steps_plain


def test_standby_rows_wait_their_turn_on_every_path():
    """Standby slots under policies that no C call runs (KL, hidden-state change, ACT) and sampled
    rows: a waiting request enters when a row frees up, after the rows in the middle of their
    requests, and every request's tokens, steps, counts and stream are those without standby
    slots (a mutant that lets new rows in first fails it)."""
    model = _exit_model()
    policies = [KLExit(0.05), HiddenDiffExit(0.05), ACTExit(), QExit(0.5), FixedSteps(2), KLExit(0.2)]
    work = [(prompt, Settings(policy), limit) for prompt, policy, limit in zip(PROMPTS, policies, [6, 3, 5, 4, 7, 2])]
    work += [(prompt, Settings(QExit(0.6), sampling=Sampling(temperature=0.9, seed=2)), 4) for prompt in PROMPTS[:3]]
    plain = _run_ahead_tokens(model, work, 0.0, rows=2)
    for run_ahead in (0.0, 10.0):  # the scheduler's iteration counts too: a row enters when one would without
        assert _run_ahead_tokens(model, work, run_ahead, rows=2, standby=3)[:2] == plain[:2]


def test_standby_must_be_a_count_of_slots():
    model = _exit_model()
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(LoopLMError, match="standby must be an int >= 0"):
            BatchSession(model, 2, 16, standby=bad)
    session = BatchSession(model, 2, 16, standby=3)  # 2 rows decode, 3 more slots wait
    assert session.free_slots == 5 and session.scheduler.width == 2


def test_once_nothing_more_is_admitted_ending_rows_leave_inside_the_call():
    """With every request admitted (``admitting`` False, as ``generate_batch`` sets it), a greedy
    request that ends in a C call leaves the batch there and the call runs on: greedy Q-exit and
    fixed-depth requests of different lengths decode in one step, to the tokens, steps and counts of
    one iteration a step."""
    model = _exit_model()
    policies = [QExit(0.3), FixedSteps(2), QExit(0.7, min_steps=2), FixedSteps(), QExit(0.5), QExit(0.9)]

    def run(run_ahead, admitting):
        session = BatchSession(model, len(PROMPTS), 32, stop_ids=[], run_ahead=run_ahead)
        requests = session.admit(PROMPTS, [9, 2, 6, 4, 11, 3], settings=[Settings(policy) for policy in policies])
        session.admitting, steps = admitting, 0
        with torch.inference_mode():
            while session.active:
                session.step()
                steps += 1
        outcome = [(r.generation.ids, r.generation.steps, r.generation.layer_applications,
                    r.generation.full_depth_applications, r.generation.stop_reason) for r in requests]
        return outcome, (session.scheduler.iterations, session.scheduler.mixed_depth_iterations), steps

    plain, counts, _ = run(0.0, True)
    ahead, counts_ahead, steps_ahead = run(10.0, True)
    closed, counts_closed, steps_closed = run(10.0, False)
    assert ahead == closed == plain and counts_ahead == counts_closed == counts
    assert steps_closed == 1 < steps_ahead
