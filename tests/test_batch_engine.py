"""The depth scheduler batched: generation equals per-prompt generation for every layout, exit
policy and model family, with rows at different loop steps in the same iteration and every row
with its own settings (exit policy, sampling, stop strings); exited rows really skip layers
(counted); q = 1 keeps full depth."""

import pytest
import torch

from looplm.batch import generate_batch
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.exit_policy import ACTExit, FixedSteps, HiddenDiffExit, KLExit, QExit, act_accumulate
from looplm.generate import Sampling, Settings, generate
from looplm.model import LoopLM
from looplm.model.exit import act_weights_reference

from conftest import tiny_config
from test_architectures import VARIANTS, build

PROMPTS = [[1, 5, 9, 2, 7, 3, 11], [4, 8], [6, 2, 9, 9], [3]]


def _exit_model(**overrides) -> LoopLM:
    torch.manual_seed(1)
    model = LoopLM(tiny_config(loop_steps=4, **overrides))
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    model.exit_gate.bias.data.fill_(-1.0)  # exits spread over the steps
    return model.eval()


def _per_prompt(model, policy, layout="last_exited", new=6):
    return [generate(model, prompt, new, exit_policy=policy, backend="reference", layout=layout)
            for prompt in PROMPTS]


@pytest.fixture(params=["in-place", "gathered"])
def row_reads(request, monkeypatch):
    """Run a test with attention reading the running rows in place (the C kernel, where it
    builds) and with the gathered copies (the torch path)."""
    if request.param == "gathered":
        monkeypatch.setattr("looplm.kernels.ops.serves", lambda tensor: False)
    return request.param


@pytest.mark.parametrize("layout", ["last_exited", "full", "last", "first", "avg", "modulo", "append_first"])
def test_batched_equals_per_prompt_for_every_layout(layout, row_reads):
    model = _exit_model(n_coda_layers=1, n_kv_heads=2)
    policy = QExit(0.4)
    batched = generate_batch(model, PROMPTS, 6, exit_policy=policy, layout=layout)
    for single, result in zip(_per_prompt(model, policy, layout), batched.generations):
        assert result.ids == single.ids
        assert result.steps == single.steps
    # Rows stood at different loop steps in one iteration (under ``full`` every token runs every step).
    assert (batched.mixed_depth_iterations > 0) == (layout != "full")


@pytest.mark.parametrize("policy", [FixedSteps(5), QExit(0.5, min_steps=2), HiddenDiffExit(0.3), KLExit(0.05),
                                    ACTExit(0.6), ACTExit(0.9, steps=5)],
                         ids=["fixed-beyond-T", "q-min-steps", "hidden", "kl", "act", "act-beyond-T"])
def test_batched_equals_per_prompt_for_every_policy(policy):
    model = _exit_model(n_prelude_layers=1)
    batched = generate_batch(model, PROMPTS, 6, exit_policy=policy)
    for single, result in zip(_per_prompt(model, policy), batched.generations):
        assert (result.ids, result.steps) == (single.ids, single.steps)


MIXED = [QExit(0.5), FixedSteps(1), HiddenDiffExit(0.3), ACTExit(0.6), KLExit(0.05), FixedSteps()]
MIXED_PROMPTS = PROMPTS + [[2, 4, 6, 8, 10], [7, 7]]


def policies_for(model) -> list:
    """``MIXED`` where the model has what each policy reads: without an exit gate the gate's
    policies give way to other step counts, and a model whose readouts already are ACT mixtures
    (model.act_mixing, which refuses ACT over them) takes a second Q-exit."""
    if model.exit_gate is None:
        return [FixedSteps(2), FixedSteps(1), HiddenDiffExit(0.3), HiddenDiffExit(0.1), KLExit(0.05), FixedSteps()]
    if model.config.act_mixing:
        return [QExit(0.3) if isinstance(policy, ACTExit) else policy for policy in MIXED]
    return MIXED


@pytest.mark.parametrize("name", VARIANTS)
def test_rows_at_their_own_depths_equal_per_prompt_for_every_family(name):
    """Every architecture variant and family preset: six rows with six exit policies in one batch
    (Q-exit, one step, hidden-state change, ACT, KL, full depth), each decoding at its own loop
    step — iterations really hold rows at different depths — and each row's tokens and steps
    equal its per-prompt decode.  Noise starts (Huginn, Parcae) read the noise table at each
    row's own position; loop-axis memory and the global gates read each row's own earlier
    steps; recurrent states, ChannelMix shifts and memory-caching segments are per row."""
    model = build(name)
    settings = [Settings(policy) for policy in policies_for(model)]
    batched = generate_batch(model, MIXED_PROMPTS, 5, settings=settings)
    assert batched.mixed_depth_iterations > 0
    for prompt, chosen, result in zip(MIXED_PROMPTS, settings, batched.generations):
        single = generate(model, prompt, 5, exit_policy=chosen.exit_policy, backend="reference")
        assert (result.ids, result.steps) == (single.ids, single.steps), chosen.exit_policy


def test_one_batch_mixes_exit_policies_sampling_and_stop_strings():
    """Per-row settings in one batch: each row's exit policy, steps and min_steps, temperature,
    top-k/top-p with its own seed (its draws never depend on the other rows) and stop strings;
    every row equals its per-prompt generation, text and stop reason included."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(4)
    model = LoopLM(tiny_config(vocab_size=259, loop_steps=4, n_coda_layers=1))
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    model.eval()
    settings = [Settings(QExit(0.5), sampling=Sampling(0.9, top_k=20, seed=1)),
                Settings(FixedSteps(2), sampling=Sampling(1.2, top_p=0.8, seed=2), stop=("e", "q")),
                Settings(HiddenDiffExit(0.2, steps=6)),
                Settings(KLExit(0.02), sampling=Sampling(0.7, seed=3)),
                Settings(ACTExit(0.7), stop=("a",)),
                Settings(QExit(0.3, min_steps=2), sampling=Sampling(1.0, top_k=5, top_p=0.9, seed=4))]
    prompts = [[tokenizer.bos_id] + tokenizer.encode(text) for text in ("a loop", "b", "depth", "cc", "x y", "z")]
    batched = generate_batch(model, prompts, 12, tokenizer=tokenizer, settings=settings, stop_ids=[])
    assert batched.mixed_depth_iterations > 0
    for prompt, chosen, result in zip(prompts, settings, batched.generations):
        single = generate(model, prompt, 12, chosen.sampling, chosen.exit_policy, tokenizer, chosen.stop, stop_ids=[],
                          backend="reference")
        assert (result.ids, result.steps, result.text, result.stop_reason) == (
            single.ids, single.steps, single.text, single.stop_reason), chosen


@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.99, 1.0])
def test_act_halting_step_by_step_gives_the_reference_weights(threshold):
    """act_accumulate fed one step at a time (readout t = the t-th unit vector, so the state is
    the weight vector) equals the plain per-position loop of exit.act_weights_reference."""
    steps, rows = 5, 64
    logits = torch.randn(steps, rows, generator=torch.Generator().manual_seed(3)) * 2
    total, halting = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.long)
    state = torch.zeros(rows, steps)
    for step in range(steps):
        total, halting, state = act_accumulate(
            torch.full((rows,), threshold, dtype=torch.float64), torch.full((rows,), step),
            torch.full((rows,), step + 1 == steps), logits[step], torch.eye(steps)[step].expand(rows, steps),
            total, halting, state)
    weights, halts = act_weights_reference(logits, threshold)
    torch.testing.assert_close(state, weights.T, atol=1e-6, rtol=0)
    assert torch.equal(halting, halts) and len(set(halts.tolist())) > 1


def test_batched_act_runs_every_step_and_reports_halting_steps():
    model = _exit_model()
    result = generate_batch(model, PROMPTS, 6, exit_policy=ACTExit(0.6))
    assert result.layer_applications == result.full_depth_applications  # ACT skips no layer
    steps = [step for generation in result.generations for step in generation.steps[1:]]
    assert min(steps) < 4 and set(steps) <= {1, 2, 3, 4}


SHIFTED_FFN = [name for name in VARIANTS if build(name).config.ffn.kind == "channelmix"]


@pytest.mark.parametrize("name", SHIFTED_FFN)
@pytest.mark.parametrize("layout", ["last_exited", "full"])
def test_batched_channelmix_keeps_each_rows_token_shift(name, layout, row_reads):
    """ChannelMix FFNs (lrnnSMDDS's lrnn) carry the previous position's FFN input per row and
    slot: batched decode (rows read in place or gathered) equals per-prompt decode."""
    model = build(name)
    if model.exit_gate is not None:
        torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    policy = QExit(0.5) if model.exit_gate is not None else FixedSteps()
    batched = generate_batch(model, PROMPTS, 6, exit_policy=policy, layout=layout)
    for single, result in zip(_per_prompt(model, policy, layout, new=6), batched.generations):
        assert (result.ids, result.steps) == (single.ids, single.steps)
    assert len({step for result in batched.generations for step in result.steps}) > 1 or model.exit_gate is None


CARRIES = [name for name in VARIANTS if build(name).needs_carry]


def _centre_halting(model) -> None:
    """ACT mixing's gate reads the un-normed loop state, whose component shared by all tokens can
    push every token out at the same step: centre its step-1 logits on the prompts' tokens so
    that tokens exit at different steps."""
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([prompt])).gate_logits[0, 0] for prompt in PROMPTS])
        model.exit_gate.bias -= logits.median()


@pytest.mark.parametrize("name", CARRIES)
@pytest.mark.parametrize("layout", ["last_exited", "full"])
def test_batched_loop_carry_follows_the_running_rows(name, layout):
    """Loop-axis memory and global gates read the same token's earlier loop steps (LoopCarry):
    when rows exit, the carry keeps only the rows still running; batched equals per-prompt."""
    model = build(name)
    if model.exit_gate is not None:
        torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    if model.config.act_mixing:
        _centre_halting(model)
    policy = QExit(0.5) if model.exit_gate is not None else HiddenDiffExit(0.5)
    batched = generate_batch(model, PROMPTS, 6, exit_policy=policy, layout=layout)
    for single, result in zip(_per_prompt(model, policy, layout, new=6), batched.generations):
        assert (result.ids, result.steps) == (single.ids, single.steps)
    assert len({step for result in batched.generations for step in result.steps}) > 1


@pytest.mark.parametrize("layout", ["last_exited", "full"])
def test_batched_memory_caching_closes_each_rows_segments_at_its_own_positions(layout, row_reads):
    """Memory caching (segments of 3 positions): right-aligned rows sit at different positions,
    so each row reads only its own completed segments and closes segments at its own steps;
    batched equals per-prompt decode over enough tokens for several segments to close."""
    model = build("gdn-memory-caching")
    policy = QExit(0.5)
    batched = generate_batch(model, PROMPTS, 9, exit_policy=policy, layout=layout)
    for single, result in zip(_per_prompt(model, policy, layout, new=9), batched.generations):
        assert (result.ids, result.steps) == (single.ids, single.steps)


def test_early_exit_skips_layer_applications_and_q1_keeps_full_depth():
    model = _exit_model()
    model.exit_gate.bias.data.fill_(0.5)  # most tokens exit early at q = 0.5
    full = generate_batch(model, PROMPTS, 8, exit_policy=QExit(1.0))
    assert full.layer_applications == full.full_depth_applications > 0
    assert all(steps == 4 for result in full.generations for steps in result.steps)
    early = generate_batch(model, PROMPTS, 8, exit_policy=QExit(0.5))
    mean_steps = sum(sum(result.steps) for result in early.generations) / early.decoded_tokens
    assert mean_steps < 3
    # Every exited token skipped its deeper core layers: the count follows the steps exactly
    # (tokens decoded = tokens emitted minus each row's first, which prefill produced).
    decoded_steps = sum(sum(result.steps[1:]) for result in early.generations)
    assert early.layer_applications == decoded_steps * model.config.n_core_layers
    assert early.saved_fraction > 0.25
    # The full layout computes every step (exact, no saving) but reports the same exits.
    exact = generate_batch(model, PROMPTS, 8, exit_policy=QExit(0.5), layout="full")
    assert exact.layer_applications == exact.full_depth_applications


def test_rows_stop_independently_and_bad_input_is_refused():
    model = _exit_model()
    result = generate_batch(model, PROMPTS, 5, stop_ids=[int(generate(model, PROMPTS[1], 1).ids[0])])
    assert result.generations[1].stop_reason == "stop_token" and result.generations[1].ids == []
    assert all(len(r.ids) <= 5 for r in result.generations)
    with pytest.raises(LoopLMError, match="prompt 1 is empty"):
        generate_batch(model, [[1], []], 2)
    with pytest.raises(LoopLMError, match="longer than the context"):
        generate_batch(model, [[1] * 100], 2)


@pytest.mark.parametrize("layout", ["last_exited", "full", "modulo"])
def test_rows_joining_a_running_batch_and_reusing_freed_slots_equal_per_prompt(layout, row_reads):
    """Continuous batching: two slots; prompts join at later decode steps (right-aligned at the
    running write index) and take the slot of a finished row, whose stale keys must stay masked.
    Each row's tokens and steps equal per-prompt generation; GDN layers check that a reused
    slot's recurrent state is replaced."""
    from looplm.batch import BatchSession

    model = _exit_model(n_coda_layers=1, layer_pattern="GA")
    policy = QExit(0.4)
    limits = {0: 3, 1: 9, 2: 3, 3: 4}
    session = BatchSession(model, rows=2, max_len=40, exit_policy=policy, stop_ids=[], layout=layout)
    rows = dict(zip([0, 1], session.admit([PROMPTS[0], PROMPTS[1]], [limits[0], limits[1]])))
    assert session.free_slots == 0 and not session.fits(PROMPTS[2], 3)
    steps, later = 0, [2, 3]
    while session.active:
        session.step()
        steps += 1
        while later and session.fits(PROMPTS[later[0]], limits[later[0]]):
            rows[later[0]] = session.admit([PROMPTS[later[0]]], [limits[later[0]]])[0]
            later.pop(0)
    assert not later and session.joined_late == 2
    for index, row in rows.items():
        single = generate(model, PROMPTS[index], limits[index], exit_policy=policy, backend="reference",
                          layout=layout, stop_ids=[])
        assert (row.generation.ids, row.generation.steps) == (single.ids, single.steps), index


def test_a_prompt_joins_when_its_row_has_room_for_it_and_its_tokens():
    """Rows are left-aligned, each with its own length: a prompt longer than the running rows'
    joins at once; a prompt with more tokens than a row holds is refused."""
    from looplm.batch import BatchSession

    session = BatchSession(_exit_model(), rows=3, max_len=30, stop_ids=[])
    session.admit([[4, 8]], [5])
    assert session.fits(PROMPTS[0], 2)
    assert session.fits([3], 5) and not session.fits([3], 40)   # room for its tokens
    with pytest.raises(LoopLMError, match="does not fit"):
        session.admit([[3]], [40])
    session.admit([PROMPTS[0]], [2])


def test_batched_and_single_row_q_exit_agree_next_to_the_threshold():
    """A gate whose exit CDF lands just under q (σ(z) = 0.5 − 2e-9 at q = 0.5): float32 survival
    rounds it up to q and would exit; the one Q-exit rule (every path's, batch 1 or batched,
    and the C kernel's double) keeps float64."""
    z = torch.tensor([-8e-9, -8e-9])
    exits, _ = QExit.decide([QExit(0.5)], torch.zeros(2, dtype=torch.long), z, torch.zeros(2, dtype=torch.float64))
    assert not exits.any()
    assert -torch.expm1(torch.nn.functional.logsigmoid(-z[0])) >= 0.5  # float32 would have exited
