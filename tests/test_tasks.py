"""Synthetic tasks: generation, reference answers, splits, knob errors and batching."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.data.tasks import (
    IGNORE_INDEX,
    TASKS,
    AdditionTask,
    BindingTask,
    CapoTask,
    Example,
    ManoTask,
    ModArithTask,
    PHopTask,
    TaskBatches,
    encode_example,
    evaluate,
    make_task,
    split_of,
)
from looplm.errors import LoopLMError


class ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte, then pad, bos, eos."""

    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


TOKENIZER = ByteTokenizer()
STATEMENT = re.compile(r"^([a-z])=([a-z0-9])$")


def resolve_binding(prompt: str) -> tuple[str, int]:
    """Independent reference: (value, depth) of the queried variable; checks definition order."""
    body, query = prompt.split(";")
    assert query.endswith("?") and len(query) == 2
    values: dict[str, tuple[str, int]] = {}
    for statement in body.split(","):
        match = STATEMENT.match(statement)
        assert match, statement
        name, source = match.groups()
        assert name not in values, f"{name} defined twice"
        if source.isdigit():
            values[name] = (source, 1)
        else:
            assert source in values, f"{source} used before it is defined"
            value, depth = values[source]
            values[name] = (value, depth + 1)
    return values[query[0]]


def resolve_offsets(prompt: str) -> tuple[str, int]:
    """Independent reference for refs="offsets": (value, depth) of the last cell."""
    assert prompt.endswith("?") and prompt.count("?") == 1
    values: list[tuple[str, int]] = []
    for index, cell in enumerate(prompt[:-1]):
        if cell in "abcdefghij":
            values.append((cell, 1))
        else:
            assert cell in "123456789" and int(cell) <= index, f"bad reference {cell!r} at {index}"
            value, depth = values[index - int(cell)]
            values.append((value, depth + 1))
    return values[-1]


def all_tasks() -> list:
    return [make_task(name) for name in sorted(TASKS)] + [make_task("binding", refs="offsets")]


def task_id(task) -> str:
    return task.name + ("-offsets" if getattr(task, "refs", None) == "offsets" else "")


@pytest.mark.parametrize("task", all_tasks(), ids=task_id)
def test_examples_are_deterministic_in_the_seed(task):
    assert task.examples(50, seed=3) == task.examples(50, seed=3)
    assert task.examples(50, seed=3) != task.examples(50, seed=4)
    assert task.examples(20, seed=3, split="test") == task.examples(20, seed=3, split="test")


@pytest.mark.parametrize("task", all_tasks(), ids=task_id)
def test_examples_respect_the_length_bounds(task):
    for example in task.examples(500, seed=0):
        assert len(example.prompt) <= task.max_prompt_chars
        assert len(example.answer) <= task.max_answer_chars
        assert example.prompt.isascii() and "\n" not in example.prompt


def test_length_bounds_are_reached():
    binding = BindingTask(hops=3, n_chains=2)
    modarith = ModArithTask(modulus=23, n_ops=2)
    assert max(len(e.prompt) for e in binding.examples(500, seed=0)) == binding.max_prompt_chars
    assert max(len(e.prompt) for e in modarith.examples(2000, seed=0)) == modarith.max_prompt_chars


def test_binding_answers_match_an_independent_resolver():
    task = BindingTask(hops=5, min_hops=2, n_chains=3)
    for example in task.examples(500, seed=1):
        value, depth = resolve_binding(example.prompt)
        assert example.answer == value
        assert example.meta == {"hops": depth}
        assert 2 <= depth <= 5


def test_binding_variables_are_distinct_single_letters():
    task = BindingTask(hops=4, n_chains=6)
    for example in task.examples(200, seed=2):
        names = [statement.split("=")[0] for statement in example.prompt.split(";")[0].split(",")]
        assert len(names) == len(set(names))
        assert all(len(name) == 1 and name.islower() for name in names)


def test_binding_depths_cover_the_range_roughly_uniformly():
    task = BindingTask(hops=6, min_hops=2, n_chains=2)
    depths = Counter(example.meta["hops"] for example in task.examples(2500, seed=5))
    assert set(depths) == {2, 3, 4, 5, 6}
    assert min(depths.values()) > 2500 / 5 / 2


def test_binding_interleaves_chains():
    # Chains written one after another would switch chain n_chains - 1 times at most.
    task = BindingTask(hops=4, min_hops=4, n_chains=2)
    interleaved = 0
    for example in task.examples(200, seed=6):
        chain_of: dict[str, int] = {}
        chains = []
        for statement in example.prompt.split(";")[0].split(","):
            name, source = statement.split("=")
            chain_of[name] = len(set(chain_of.values())) if source.isdigit() else chain_of[source]
            chains.append(chain_of[name])
        switches = sum(first != second for first, second in zip(chains, chains[1:]))
        interleaved += switches > 1
    assert interleaved > 50


def test_binding_offsets_answers_match_an_independent_resolver():
    task = BindingTask(refs="offsets", cells=12, hops=4, min_hops=1)
    depths = Counter()
    for example in task.examples(2000, seed=1):
        value, depth = resolve_offsets(example.prompt)
        assert example.answer == value
        assert example.meta == {"hops": depth}
        assert len(example.prompt) == task.max_prompt_chars == 13
        depths[depth] += 1
    assert set(depths) == {1, 2, 3, 4}
    assert min(depths.values()) > 2000 / 4 / 2


def test_binding_offsets_docstring_examples():
    assert resolve_offsets("f1c14dh53c99?") == ("c", 2)
    assert resolve_offsets("e11dbce73a21?") == ("c", 4)


def test_binding_offsets_cells_mix_values_and_references():
    # Distractor cells are values (a-j) and references (1-9) alike, and references reach far.
    cells = Counter(cell for example in BindingTask(refs="offsets").examples(500, seed=2)
                    for cell in example.prompt[:-1])
    assert set(cells) == set("abcdefghij123456789")
    letters = sum(count for cell, count in cells.items() if cell.isalpha())
    assert 0.3 < letters / sum(cells.values()) < 0.6


def test_binding_offsets_names_knobs_do_not_apply():
    # n_chains is a names-style knob: any value leaves offsets prompts alone.
    assert (BindingTask(refs="offsets", n_chains=9).examples(20, seed=4)
            == BindingTask(refs="offsets", n_chains=1).examples(20, seed=4))


def test_binding_offsets_value_position_does_not_give_deep_answers_away():
    # The value of a deep query is not parked at the start of the prompt: over depths 2-4 the
    # first letter of the prompt is the answer about as often as chance (1 in 10) allows.
    task = BindingTask(refs="offsets", cells=12, hops=4, min_hops=2)
    first_letter_right = Counter()
    for example in task.examples(3000, seed=3):
        first = next(cell for cell in example.prompt if cell.isalpha())
        first_letter_right[example.meta["hops"]] += first == example.answer
    assert all(count / 1000 < 0.3 for count in first_letter_right.values())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), hops=st.integers(1, 10), extra=st.integers(0, 12), data=st.data())
def test_binding_offsets_resolver_agrees_for_any_knobs(seed, hops, extra, data):
    min_hops = data.draw(st.integers(1, hops))
    task = BindingTask(refs="offsets", cells=hops + extra, hops=hops, min_hops=min_hops)
    for example in task.examples(10, seed):
        value, depth = resolve_offsets(example.prompt)
        assert (example.answer, example.meta["hops"]) == (value, depth)
        assert min_hops <= depth <= hops
        assert len(example.prompt) == task.max_prompt_chars


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), hops=st.integers(1, 8), n_chains=st.integers(1, 3), data=st.data())
def test_binding_resolver_agrees_for_any_knobs(seed, hops, n_chains, data):
    min_hops = data.draw(st.integers(1, hops))
    task = BindingTask(hops=hops, min_hops=min_hops, n_chains=n_chains)
    for example in task.examples(10, seed):
        value, depth = resolve_binding(example.prompt)
        assert (example.answer, example.meta["hops"]) == (value, depth)
        assert min_hops <= depth <= hops
        assert len(example.prompt) <= task.max_prompt_chars


@pytest.mark.parametrize("expression, modulus, value", [
    ("+ 3 4", 23, 7),
    ("- 3 4", 23, 22),
    ("* 5 6", 23, 7),
    ("+ * 3 4 - 5 6 =", 23, 11),
    ("* - 2 9 + 10 20", 23, 20),
    ("- 0 * 22 22", 23, 22),
    ("* 6 6", 7, 1),
    ("17", 23, 17),
])
def test_modarith_evaluator_on_hand_computed_expressions(expression, modulus, value):
    assert evaluate(expression, modulus) == value


@pytest.mark.parametrize("expression", ["+ 3", "3 4", "+ 3 4 5", ""])
def test_modarith_evaluator_rejects_malformed_expressions(expression):
    with pytest.raises(ValueError):
        evaluate(expression, 23)


def test_modarith_examples_obey_the_knobs():
    task = ModArithTask(modulus=11, ops="-*", n_ops=4, min_ops=2)
    counts = Counter()
    for example in task.examples(1000, seed=7):
        tokens = example.prompt.split(" ")
        assert tokens[-1] == "="
        operators = [token for token in tokens if token in "+-*"]
        operands = [int(token) for token in tokens[:-1] if token not in "+-*"]
        assert set(operators) <= {"-", "*"}
        assert example.meta == {"ops": len(operators)}
        assert len(operands) == len(operators) + 1
        assert all(0 <= operand < 11 for operand in operands)
        assert 0 <= int(example.answer) < 11
        assert example.answer == str(evaluate(example.prompt, 11))
        counts[len(operators)] += 1
    assert set(counts) == {2, 3, 4}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), modulus=st.integers(2, 200), n_ops=st.integers(1, 6))
def test_modarith_answers_are_in_range(seed, modulus, n_ops):
    task = ModArithTask(modulus=modulus, n_ops=n_ops)
    for example in task.examples(10, seed):
        assert 0 <= int(example.answer) < modulus
        assert len(example.prompt) <= task.max_prompt_chars
        assert len(example.answer) <= task.max_answer_chars


def test_score_is_exact_match_after_stripping():
    task = make_task("binding")
    assert task.score(" 7\n", "7")
    assert task.score("7", " 7 ")
    assert not task.score("77", "7")
    assert not task.score("7.", "7")
    assert not task.score("", "7")


def held_out_tasks() -> list:
    """Tasks with a held-out split (capo measures memorisation: both splits ask the same facts)."""
    return [task for task in all_tasks() if task.name != "capo"]


@pytest.mark.parametrize("task", held_out_tasks(), ids=task_id)
def test_train_and_test_splits_are_disjoint(task):
    train = task.examples(2000, seed=0, split="train")
    test = task.examples(300, seed=0, split="test")
    assert all(split_of(example.prompt) == "train" for example in train)
    assert all(split_of(example.prompt) == "test" for example in test)
    assert not {example.prompt for example in train} & {example.prompt for example in test}


def test_split_without_test_prompts_is_reported():
    # "- 0 0 =" .. "- 1 1 =" all hash into the train split.
    task = ModArithTask(modulus=2, ops="-", n_ops=1)
    with pytest.raises(LoopLMError, match="too few distinct prompts"):
        task.examples(1, seed=0, split="test")


def test_make_task_coerces_string_knobs():
    task = make_task("binding", hops="6", min_hops=" 2", n_chains=3)
    assert task == BindingTask(hops=6, min_hops=2, n_chains=3)
    assert make_task("binding", refs="offsets", cells="8") == BindingTask(refs="offsets", cells=8)
    assert make_task("modarith", ops="+", modulus="7").knob_values() == {
        "modulus": 7, "ops": "+", "n_ops": 2, "min_ops": 1}


@pytest.mark.parametrize("name, knobs, words", [
    ("sorting", {}, ["unknown task 'sorting'", "binding", "modarith"]),
    ("binding", {"hop": 3}, ["unknown knob 'hop'", "hops, min_hops, n_chains"]),
    ("binding", {"hops": 0}, ["binding task: hops must be >= 1, got 0"]),
    ("binding", {"hops": "four"}, ["binding task: hops must be an integer, got 'four'"]),
    ("binding", {"hops": True}, ["hops must be an integer"]),
    ("binding", {"hops": 3, "min_hops": 4}, ["min_hops must be in [1, hops=3], got 4"]),
    ("binding", {"n_chains": 0}, ["n_chains must be >= 1"]),
    ("binding", {"hops": 10, "n_chains": 3}, ["n_chains * hops must be <= 26", "3 * 10 = 30"]),
    ("binding", {"hop": 3}, ["refs, cells"]),
    ("binding", {"refs": "numbers"}, ["refs must be one of names, offsets, got 'numbers'"]),
    ("binding", {"refs": "offsets", "hops": 5, "cells": 4}, ["cells must be >= hops=5", "got 4"]),
    ("binding", {"refs": "offsets", "hops": 11, "cells": 20}, ["hops must be <= 10 with refs=offsets"]),
    ("binding", {"refs": "offsets", "cells": "many"}, ["cells must be an integer"]),
    ("modarith", {"modulus": 1}, ["modarith task: modulus must be >= 2, got 1"]),
    ("modarith", {"ops": "+/"}, ["ops must be distinct characters"]),
    ("modarith", {"ops": "++"}, ["ops must be distinct characters"]),
    ("modarith", {"ops": ""}, ["ops must be distinct characters"]),
    ("modarith", {"ops": 3}, ["ops must be a string"]),
    ("modarith", {"n_ops": 0}, ["n_ops must be in [1, 256], got 0"]),
    ("modarith", {"n_ops": 2, "min_ops": 3}, ["min_ops must be in [1, n_ops=2], got 3"]),
    ("mano", {"modulus": 21}, ["mano task: modulus must be a prime (the paper uses 23), got 21"]),
    ("mano", {"max_depth": -1}, ["mano task: max_depth must be >= 0, got -1"]),
    ("mano", {"max_depth": 2, "n_ops": 4}, ["n_ops must be <= 2^max_depth - 1 = 3", "got 4"]),
    ("mano", {"n_ops": 0}, ["n_ops must be in [1, 256], got 0"]),
    ("phop", {"hops": 0}, ["phop task: hops must be in [1, 99], got 0"]),
    ("phop", {"hops": 2, "min_hops": 3}, ["min_hops must be in [1, hops=2], got 3"]),
    ("phop", {"alphabet": 2}, ["alphabet must be in [3, 26], got 2"]),
    ("phop", {"hops": 3, "length": 3}, ["length must be > hops=3", "got 3"]),
    ("phop", {"length": "long"}, ["length must be an integer"]),
    ("addition", {"digits": 0}, ["addition task: digits must be in [1, 40], got 0"]),
    ("addition", {"digits": 2, "min_digits": 3}, ["min_digits must be in [1, digits=2], got 3"]),
    ("addition", {"reverse": 2}, ["reverse must be true or false, got 2"]),
    ("capo", {"people": 0}, ["capo task: people must be in [1, 100000], got 0"]),
    ("capo", {"attributes": 9}, ["attributes must be in [1, 8], got 9"]),
    ("capo", {"values": 1}, ["values must be in [2, 1000], got 1"]),
    ("capo", {"_facts": []}, ["unknown knob '_facts'"]),
])
def test_make_task_errors_are_one_line(name, knobs, words):
    with pytest.raises(LoopLMError) as raised:
        make_task(name, **knobs)
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_encode_example_trains_only_answer_and_eos():
    inputs, targets = encode_example(Example("a=7;a?", "7", {}), TOKENIZER)
    assert inputs == [257, *b"a=7;a?", *b"7"]
    assert targets == [IGNORE_INDEX] * 6 + [ord("7"), 258]


@pytest.mark.parametrize("task", all_tasks(), ids=task_id)
def test_batches_mask_prompt_and_padding(task):
    batches = TaskBatches(task, TOKENIZER)
    assert batches.seq_len == task.max_prompt_chars + task.max_answer_chars + 1
    generator = torch.Generator().manual_seed(0)
    inputs, targets = batches.batch(32, generator)
    assert inputs.shape == targets.shape == (32, batches.seq_len)
    assert inputs.dtype == targets.dtype == torch.long
    end_of_prompt = "=" if task.name in ("modarith", "mano", "addition") else "?"
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        length = row_inputs.index(TOKENIZER.pad_id) if TOKENIZER.pad_id in row_inputs else len(row_inputs)
        assert row_inputs[0] == TOKENIZER.bos_id
        assert all(token == TOKENIZER.pad_id for token in row_inputs[length:])
        text = bytes(row_inputs[1:length]).decode()
        prompt, answer = text[: text.index(end_of_prompt) + 1], text[text.index(end_of_prompt) + 1:]
        assert split_of(prompt) == "train" or task.name == "capo"
        trained = [position for position, target in enumerate(row_targets) if target != IGNORE_INDEX]
        # Positions len(prompt) .. length - 1 predict the answer and eos; nothing else is trained.
        assert trained == list(range(len(prompt), length))
        assert row_targets[len(prompt):length] == [*answer.encode(), TOKENIZER.eos_id]


def test_batches_reproducible_from_generator_state():
    batches = TaskBatches(make_task("binding"), TOKENIZER)
    generator = torch.Generator().manual_seed(123)
    batches.batch(8, generator)
    state = generator.get_state()
    first = [batches.batch(8, generator) for _ in range(3)]
    resumed = torch.Generator()
    resumed.set_state(state)
    second = [batches.batch(8, resumed) for _ in range(3)]
    for (inputs_a, targets_a), (inputs_b, targets_b) in zip(first, second):
        assert torch.equal(inputs_a, inputs_b) and torch.equal(targets_a, targets_b)
    assert not torch.equal(first[0][0], first[1][0])
    other_seed = TaskBatches(make_task("binding"), TOKENIZER, seed=1)
    resumed.set_state(state)
    assert not torch.equal(other_seed.batch(8, resumed)[0], first[0][0])


def test_batches_seq_len_and_split_validation():
    task = make_task("binding")
    assert TaskBatches(task, TOKENIZER, seq_len=64).batch(2, torch.Generator())[0].shape == (2, 64)
    for bad in (35, 0, "36", True):
        with pytest.raises(LoopLMError, match="seq_len must be an integer >= 36"):
            TaskBatches(task, TOKENIZER, seq_len=bad)
    with pytest.raises(LoopLMError, match="split must be 'train' or 'test'"):
        TaskBatches(task, TOKENIZER, split="validation")
    with pytest.raises(LoopLMError, match="batch_size must be an integer >= 1"):
        TaskBatches(task, TOKENIZER).batch(0, torch.Generator())


@pytest.mark.parametrize("task", all_tasks(), ids=task_id)
def test_eval_set_masks_exactly_answer_and_eos(task):
    eval_set = TaskBatches(task, TOKENIZER).eval_set(40, seed=9)
    assert len(eval_set) == 40
    assert eval_set.examples == task.examples(40, seed=9, split="test")
    assert eval_set.answers == [example.answer for example in eval_set.examples]
    for row, example in enumerate(eval_set.examples):
        prompt_ids = eval_set.prompts[row]
        assert prompt_ids == [TOKENIZER.bos_id, *example.prompt.encode()]
        answer_ids = [*example.answer.encode(), TOKENIZER.eos_id]
        masked = eval_set.answer_mask[row].nonzero().flatten().tolist()
        start = len(prompt_ids) - 1
        assert masked == list(range(start, start + len(answer_ids)))
        assert eval_set.targets[row, masked].tolist() == answer_ids
        assert eval_set.inputs[row, : len(prompt_ids)].tolist() == prompt_ids


def test_eval_set_correct_is_teacher_forced_exact_match():
    eval_set = TaskBatches(make_task("modarith"), TOKENIZER).eval_set(8, seed=0)
    vocab = 259
    # Logits that put all mass on the target at trained positions score every example correct.
    perfect = torch.zeros(*eval_set.targets.shape, vocab)
    perfect.scatter_(-1, eval_set.targets.clamp(min=0).unsqueeze(-1), 1.0)
    assert eval_set.correct(perfect).all()
    # Breaking one answer position of one row fails only that row; prompt positions don't count.
    broken = perfect.clone()
    row = 3
    position = int(eval_set.answer_mask[row].nonzero()[0])
    broken[row, position] = 0.0
    broken[row, position, (int(eval_set.targets[row, position]) + 1) % vocab] = 1.0
    broken[:, 0] = 0.0
    broken[:, 0, 0] = 1.0
    assert eval_set.correct(broken).tolist() == [index != row for index in range(8)]


def test_eval_set_examples_never_appear_in_training_batches():
    task = BindingTask(hops=2, n_chains=1)
    batches = TaskBatches(task, TOKENIZER)
    held_out = {example.prompt for example in batches.eval_set(50, seed=0).examples}
    generator = torch.Generator().manual_seed(0)
    inputs, _ = batches.batch(2000, generator)
    seen = {bytes(row[1: row.index(ord("?")) + 1]).decode() for row in inputs.tolist()}
    assert seen and not seen & held_out


def test_sampling_uses_only_the_given_rng():
    task = make_task("modarith")
    random.seed(0)
    first = task.examples(20, seed=1)
    random.seed(99)
    assert task.examples(20, seed=1) == first


def test_the_project_byte_tokenizer_batches_like_the_stand_in():
    tokenizer = pytest.importorskip("looplm.data.tokenizer").byte_tokenizer()
    task = make_task("binding")
    ours = TaskBatches(task, tokenizer).batch(16, torch.Generator().manual_seed(4))
    stand_in = TaskBatches(task, TOKENIZER).batch(16, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(ours, stand_in))


def evaluate_prefix_by_stack(expression: str, modulus: int) -> tuple[int, int]:
    """Independent reference: (value, tree depth) of a prefix expression, scanning right to left."""
    stack: list[tuple[int, int]] = []
    for token in reversed(expression.split()[:-1]):  # drop the trailing "="
        if token in "+-*":
            (left, left_depth), (right, right_depth) = stack.pop(), stack.pop()
            value = {"+": left + right, "-": left - right, "*": left * right}[token]
            stack.append((value % modulus, 1 + max(left_depth, right_depth)))
        else:
            stack.append((int(token), 0))
    assert len(stack) == 1
    return stack[0]


def test_modarith_stream_is_unchanged_by_the_depth_limit():
    # Examples drawn before tree depths were tracked (the same seed and knobs).
    assert [e.prompt + e.answer for e in ModArithTask(n_ops=6).examples(4, seed=11)] == [
        "* - * 5 * 20 19 5 3 =4", "- + 19 12 - 19 + 1 1 =14", "+ 14 - 18 6 =3", "+ - 21 + 20 8 - 22 - 7 16 =1"]


def test_mano_docstring_example_and_defaults():
    assert evaluate_prefix_by_stack("* + 7 3 - 20 * 4 9 =", 23) == (1, 3)
    task = ManoTask()
    assert (task.modulus, task.ops, task.n_ops, task.min_ops, task.max_depth) == (23, "+-*", 10, 1, 0)


def test_mano_answers_and_depths_match_an_independent_evaluator():
    task = ManoTask(n_ops=12, min_ops=3)
    ops = Counter()
    for example in task.examples(1000, seed=2):
        value, depth = evaluate_prefix_by_stack(example.prompt, 23)
        assert example.answer == str(value)
        assert example.meta == {"ops": sum(token in "+-*" for token in example.prompt.split()), "depth": depth}
        ops[example.meta["ops"]] += 1
    assert set(ops) == set(range(3, 13))


@pytest.mark.parametrize("max_depth, n_ops", [(1, 1), (2, 3), (3, 5), (3, 7)])
def test_mano_respects_the_depth_limit(max_depth, n_ops):
    task = ManoTask(n_ops=n_ops, max_depth=max_depth)
    depths = set()
    for example in task.examples(300, seed=3):
        value, depth = evaluate_prefix_by_stack(example.prompt, 23)
        assert depth <= max_depth and example.meta["depth"] == depth and example.answer == str(value)
        depths.add(depth)
    assert max(depths) == max_depth


def phop_reference(prompt: str) -> tuple[str, int]:
    """Independent reference for p-hop: (answer, p) with str.rfind for each hop."""
    hops, sequence = prompt[:-1].split(":")
    position = len(sequence) - 1
    for _ in range(int(hops)):
        previous = sequence.rfind(sequence[position], 0, position)
        assert previous >= 0, "undefined hop"
        position = previous + 1
    return sequence[position], int(hops)


def test_phop_docstring_example():
    assert phop_reference("2:abcbdacbd?") == ("b", 2)
    assert phop_reference("1:abcbdacbd?") == ("a", 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), hops=st.integers(1, 5), alphabet=st.integers(3, 6), data=st.data())
def test_phop_answers_match_an_independent_reference(seed, hops, alphabet, data):
    min_hops = data.draw(st.integers(1, hops))
    task = PHopTask(hops=hops, min_hops=min_hops, length=40, alphabet=alphabet)
    for example in task.examples(10, seed):
        answer, p = phop_reference(example.prompt)
        assert (example.answer, example.meta["hops"]) == (answer, p)
        assert min_hops <= p <= hops
        sequence = example.prompt.split(":")[1][:-1]
        assert set(sequence) <= set("abcdef"[:alphabet]) and len(sequence) == 40
        assert all(first != second for first, second in zip(sequence, sequence[1:]))
        assert len(example.prompt) <= task.max_prompt_chars


def test_phop_answers_are_not_just_the_last_symbol():
    task = PHopTask(hops=3, min_hops=3)
    same = sum(example.answer == example.prompt[-2] for example in task.examples(1000, seed=1))
    assert same < 500  # about 1 in 4 by chance with 4 symbols


def test_phop_reports_impossible_knobs():
    # Ten hops back through twelve symbols of 26 almost never exist.
    with pytest.raises(LoopLMError, match="no sequence with 10 defined hops in 1000 draws"):
        PHopTask(hops=10, min_hops=10, length=12, alphabet=26).examples(1, seed=0)


@pytest.mark.parametrize("reverse", [False, True])
def test_addition_answers_match_integer_arithmetic(reverse):
    task = AdditionTask(digits=5, min_digits=2, reverse=reverse)
    widths = Counter()
    for example in task.examples(1000, seed=4):
        match = re.fullmatch(r"([1-9][0-9]*)\+([1-9][0-9]*)=", example.prompt)
        assert match, example.prompt
        first, second = match.groups()
        total = str(int(first) + int(second))
        assert example.answer == (total[::-1] if reverse else total)
        # Carries by column sums, independently of the generator's digit loop.
        columns = [int(a) + int(b) for a, b in zip(first.zfill(6)[::-1], second.zfill(6)[::-1])]
        carry, carried = 0, 0
        for column in columns:
            carry = (column + carry) >= 10
            carried += carry
        assert example.meta == {"digits": max(len(first), len(second)), "carries": carried}
        widths[len(first)] += 1
    assert set(widths) == {2, 3, 4, 5}


def test_addition_docstring_example_and_one_digit_operands():
    from looplm.data.tasks.addition import carries

    assert carries(358, 74) == 2 and carries(999, 1) == 3 and carries(0, 0) == 0
    digits = {int(e.prompt.split("+")[0]) for e in AdditionTask(digits=1).examples(300, seed=0)}
    assert digits == set(range(10))


def test_make_task_coerces_boolean_knobs():
    assert make_task("addition", reverse="true").reverse is True
    assert make_task("addition", reverse="0").reverse is False
    with pytest.raises(LoopLMError, match="addition task: reverse must be true or false, got 'maybe'"):
        make_task("addition", reverse="maybe")


def test_capo_world_is_fixed_by_its_knobs_and_covers_every_fact():
    task = CapoTask(people=30, attributes=3, values=100)
    facts = task.facts()
    assert len(facts) == 90 and len({fact.prompt for fact in facts}) == 90
    assert facts == CapoTask(people=30, attributes=3, values=100).facts()
    assert facts != CapoTask(people=30, attributes=3, values=100, world=1).facts()
    names = {fact.prompt.split()[0] for fact in facts}
    assert len(names) == 30 and all(re.fullmatch(r"([bdfgklmnprstvz][aeiou]){3}", name) for name in names)
    assert all(len(fact.answer) == 2 and 0 <= int(fact.answer) < 100 for fact in facts)
    truth = {fact.prompt: fact.answer for fact in facts}
    for example in task.examples(200, seed=5):
        assert truth[example.prompt] == example.answer  # every question asks a fact of the world
    # Values are uniform: over 3000 facts each of 10 values takes about a tenth.
    counts = Counter(fact.answer for fact in CapoTask(people=1000, attributes=3).facts())
    assert set(counts) == set("0123456789") and min(counts.values()) > 200


def test_capo_splits_ask_the_same_facts():
    task = CapoTask(people=20, attributes=2)
    train = {e.prompt for e in task.examples(400, seed=0, split="train")}
    test = {e.prompt for e in task.examples(400, seed=1, split="test")}
    assert train == test == {fact.prompt for fact in task.facts()}
    with pytest.raises(LoopLMError, match="split must be"):
        task.examples(1, seed=0, split="validation")


@pytest.mark.parametrize("name", ["mano", "phop", "addition", "capo"])
def test_new_tasks_score_by_exact_match(name):
    task = make_task(name)
    example = task.examples(1, seed=0)[0]
    assert task.score(f" {example.answer}\n", example.answer)
    assert not task.score(example.answer + "0", example.answer)
