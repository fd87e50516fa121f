"""looplm eval: step records, compute-quality curves, the report files, capo capacity."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch.nn import functional as F

from looplm.cli import main
from looplm.config import ModelConfig
from looplm.data.tasks import CapoTask, EvalSet, TaskBatches
from looplm.data.tokenizer import byte_tokenizer
from looplm.eval.capacity import bits_from_losses, fano_bits, knowledge_bits
from looplm.eval.curves import collect_step_records, curve_point, policy_steps
from looplm.eval.depth import accuracy_by_step, loss_by_step
from looplm.eval.report import build_report
from looplm.exit_policy import FixedSteps, parse_exit
from looplm.generate import Decoder, QExit
from looplm.model import LoopLM

from conftest import tiny_config

STEPS = 5  # tiny_model has T = 3: two extrapolated steps


def random_batches(vocab: int = 64, rows: int = 3, length: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        inputs = torch.randint(0, vocab, (rows, length), generator=generator)
        targets = torch.randint(0, vocab, (rows, length), generator=generator)
        targets[:, :4] = -100  # an unscored prompt
        targets[0, -2:] = -100
        batches.append((inputs, targets))
    return batches


def reference_point(model, batches, policy: str, setting: float, trained: int):
    """Plain loops over positions: exit step, loss and per-row exact match for one policy setting."""
    exits, losses, rows_right = [], [], []
    for inputs, targets in batches:
        output = model(inputs, steps=trained)
        for row in range(inputs.shape[0]):
            right = True
            for position in range(inputs.shape[1]):
                target = int(targets[row, position])
                if target == -100:
                    continue
                readouts = [hidden[row, position] for hidden in output.hidden_states]
                logits = [model.logits(readout) for readout in readouts]
                chosen = trained
                if policy == "static":
                    chosen = int(setting)
                elif policy == "q":
                    survival = 1.0
                    for step in range(1, trained):
                        survival *= 1.0 - float(torch.sigmoid(output.gate_logits[step - 1, row, position]))
                        if 1.0 - survival >= setting:
                            chosen = step
                            break
                else:
                    for step in range(2, trained + 1):
                        if policy == "hidden":
                            now, before = readouts[step - 1], readouts[step - 2]
                            distance = float(torch.sqrt(((now - before) ** 2).sum()) / torch.sqrt((now ** 2).sum()))
                        else:
                            p_now = torch.softmax(logits[step - 1], -1)
                            p_before = torch.softmax(logits[step - 2], -1)
                            distance = float((p_now * (p_now.log() - p_before.log())).sum())
                        if distance < setting:
                            chosen = step
                            break
                exits.append(chosen)
                losses.append(float(-torch.log_softmax(logits[chosen - 1], -1)[target]))
                right = right and int(logits[chosen - 1].argmax()) == target
            rows_right.append(right)
    return sum(exits) / len(exits), sum(losses) / len(losses), sum(rows_right) / len(rows_right)


@torch.no_grad()
@pytest.mark.parametrize("policy, settings", [("q", [0.0, 0.3, 0.5, 0.8, 1.0]), ("static", [1, 2, 3]),
                                              ("hidden", [0.0, 0.5, 0.9, 1.2, 2.0]),
                                              ("kl", [0.0, 0.001, 0.003, 0.005, 10.0])])
def test_curve_points_match_a_plain_loop_reference(tiny_model, policy, settings):
    batches = random_batches()
    records = collect_step_records(tiny_model, batches, STEPS, kl=True)
    trained = tiny_model.config.loop_steps
    mean_steps = set()
    for setting in settings:
        chosen = FixedSteps(setting) if policy == "static" else parse_exit(f"{policy}:{setting}")
        point = curve_point(records, chosen, trained, with_accuracy=True)
        assert (point.policy, point.setting) == (policy, setting)
        expected = reference_point(tiny_model, batches, policy, setting, trained)
        assert point.mean_steps == pytest.approx(expected[0], rel=1e-6)
        assert point.loss == pytest.approx(expected[1], rel=1e-5)
        assert point.accuracy == pytest.approx(expected[2])
        mean_steps.add(round(point.mean_steps, 6))
    assert len(mean_steps) >= 3  # the grid really moves the exit step


@torch.no_grad()
def test_records_agree_with_the_per_depth_evaluation(tiny_model):
    batches = random_batches()
    records = collect_step_records(tiny_model, batches, STEPS)
    report = build_report(records, tiny_model.config.loop_steps, with_accuracy=False)
    expected = loss_by_step(tiny_model, batches, STEPS)
    assert report["loss_by_step"] == pytest.approx(expected["loss_by_step"], rel=1e-5)
    assert [row["perplexity"] for row in report["per_step"]] == pytest.approx(
        [math.exp(loss) for loss in expected["loss_by_step"]], rel=1e-5)
    gate = loss_by_step(tiny_model, batches, tiny_model.config.loop_steps)  # exit statistics over T steps
    assert report["mean_exit_step"] == pytest.approx(gate["mean_exit_step"], rel=1e-5)
    assert report["exit_entropy"] == pytest.approx(gate["exit_entropy"], rel=1e-5)
    histogram = report["exit_histogram"]
    assert sum(row["mean_exit_probability"] for row in histogram) == pytest.approx(1.0, abs=1e-5)
    assert sum(row["q_exit_fraction"] for row in histogram) == pytest.approx(1.0, abs=1e-6)
    q_steps = policy_steps(records, QExit(0.5), tiny_model.config.loop_steps)
    assert [row["q_exit_fraction"] for row in histogram] == pytest.approx(
        [float((q_steps == step).float().mean()) for step in (1, 2, 3)])


@torch.no_grad()
def test_exact_match_by_step_equals_accuracy_by_step(tiny_model):
    # Targets copied from the model's own step-2 argmax on half the rows make accuracy non-trivial.
    inputs = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(1))
    argmax = tiny_model(inputs, steps=2).logits(2).argmax(-1)
    targets = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(2))
    targets[:4] = argmax[:4]
    targets[:, :7] = -100
    eval_set = EvalSet(examples=[None] * 8, prompts=[], answers=[], inputs=inputs, targets=targets,
                       answer_mask=targets != -100)
    records = collect_step_records(tiny_model, [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])], STEPS)
    report = build_report(records, tiny_model.config.loop_steps, with_accuracy=True)
    expected = accuracy_by_step(tiny_model, eval_set, STEPS)
    assert report["accuracy_by_step"] == pytest.approx(expected)
    assert report["accuracy_by_step"][1] >= 0.5


@torch.no_grad()
@pytest.mark.parametrize("q", [0.1, 0.2])
def test_q_exit_curve_equals_decoding_with_full_per_step_caches(tiny_model, q):
    # Each token decoded after a full-depth prefill of its prefix (every earlier token has every
    # step's keys/values) exits where the records say, with the same loss.
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    trained = tiny_model.config.loop_steps
    records = collect_step_records(tiny_model, [(ids, targets)], trained)
    chosen = policy_steps(records, QExit(q), trained)
    assert len(set(chosen.tolist())) > 1
    for position in range(1, 11):
        decoder = Decoder(tiny_model, QExit(q), max_len=12, backend="reference")
        decoder.prefill(ids[:, :position])
        logits, steps = decoder.step(int(ids[0, position]))
        assert steps == int(chosen[position])
        loss = float(F.cross_entropy(logits.unsqueeze(0), targets[0, position:position + 1]))
        assert loss == pytest.approx(float(records.losses[steps - 1, position]), rel=1e-4)


def test_capacity_formulas_on_hand_computed_values():
    # Two attributes, 4 people, 8 values: 12 bits each.  Attribute 0 learned (loss 1 bit per
    # fact: 12 - 4 = 8 bits); attribute 1 worse than uniform (5 bits per fact: floored at 0).
    loss_bits = torch.tensor([1.0, 5.0] * 4)
    attribute = torch.tensor([0, 1] * 4)
    assert bits_from_losses(loss_bits, attribute, 2, 4, 8) == pytest.approx(8.0)
    assert fano_bits(1.0, 10, 8) == pytest.approx(30.0)
    assert fano_bits(0.125, 10, 8) == 0.0  # chance accuracy: nothing known
    assert fano_bits(0.0, 10, 8) == 0.0  # always wrong: the guesses need not be values at all
    expected = 10 * (3 - (-(0.5 * math.log2(0.5)) * 2) - 0.5 * math.log2(7))
    assert fano_bits(0.5, 10, 8) == pytest.approx(expected)


@torch.no_grad()
def test_knowledge_bits_of_a_model_match_an_independent_computation():
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LoopLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_core_layers=1,
                               loop_steps=2, max_seq_len=32)).eval()
    task = CapoTask(people=6, attributes=2, values=4)
    result = knowledge_bits(model, task, tokenizer, steps=2)
    eval_set = TaskBatches(task, tokenizer).eval_set_of(task.facts())
    per_attribute = [0.0, 0.0]
    logits = model(eval_set.inputs, steps=2).logits(2)
    for row, _fact in enumerate(task.facts()):
        position = len(eval_set.prompts[row]) - 1  # the single value digit
        log_probability = torch.log_softmax(logits[row, position], -1)[eval_set.targets[row, position]]
        per_attribute[row % 2] += float(-log_probability) / math.log(2)
    expected = sum(max(0.0, 6 * 2 - bits) for bits in per_attribute)
    assert result["bits"] == pytest.approx(expected) and result["parameters"] == model.num_parameters()
    assert result["prior_bits"] == pytest.approx(24.0)


class OracleModel(torch.nn.Module):
    """Stub looped model: step 1 knows nothing (uniform logits), step 2 puts logit 30 on the true
    next token of every scored position of ``eval_set`` (found by matching the input row)."""

    def __init__(self, eval_set, vocab: int):
        super().__init__()
        self.rows = {tuple(row.tolist()): targets for row, targets in zip(eval_set.inputs, eval_set.targets)}
        self.vocab = vocab
        self.config = ModelConfig(vocab_size=vocab, d_model=32, n_heads=4, n_core_layers=1, loop_steps=2)
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def forward(self, inputs, steps):
        from types import SimpleNamespace

        targets = torch.stack([self.rows[tuple(row.tolist())] for row in inputs])
        knowing = F.one_hot(targets.clamp(min=0), self.vocab).float() * 30.0
        return SimpleNamespace(hidden_states=[torch.zeros_like(knowing), knowing], gate_logits=None)

    def logits(self, readout):
        return readout

    def num_parameters(self):
        return 3


def test_knowledge_bits_of_a_model_that_knows_the_facts():
    tokenizer = byte_tokenizer()
    task = CapoTask(people=7, attributes=3, values=10)
    oracle = OracleModel(TaskBatches(task, tokenizer).eval_set_of(task.facts()), tokenizer.vocab_size)
    result = knowledge_bits(oracle, task, tokenizer, steps=2)
    assert result["bits_by_step"][0] == 0.0  # uniform over 259 tokens is worse than the 10-value prior
    assert result["bits_by_step"][1] == pytest.approx(task.prior_bits, rel=1e-6)
    assert result["bits"] == result["bits_by_step"][1] and result["parameters"] == 3
    assert result["fano_bits_by_step"] == pytest.approx([0.0, task.prior_bits])
    assert result["accuracy_by_step"] == [0.0, 1.0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=tokenizer.vocab_size, loop_steps=2, n_core_layers=1, max_seq_len=48))
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    return model.save(tmp_path_factory.mktemp("eval") / "ckpt", tokenizer)


def test_eval_out_writes_the_report(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", str(checkpoint), "--task", "addition", "--task-options", '{"digits": 2}', "--examples", "16",
                 "--out", str(out), "--kl", "--q-grid", "0.2,0.5,1", "--json", str(tmp_path / "r.json"),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    names = {path.name for path in out.iterdir()}
    assert names == {"per_step.csv", "curves.csv", "exit_histogram.csv", "report.json", "report.md",
                     "per_step.png", "curves.png", "exit_histogram.png"}
    for png in ("per_step.png", "curves.png", "exit_histogram.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert [row["step"] for row in report["per_step"]] == [1, 2, 3, 4]
    assert [row["extrapolated"] for row in report["per_step"]] == [False, False, True, True]
    policies = [point["policy"] for point in report["curves"]]
    assert policies.count("q") == 3 and policies.count("static") == 2 and "kl" in policies
    with (out / "curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert (len(rows) == len(report["curves"])
            and set(rows[0]) == {"policy", "setting", "mean_steps", "loss", "accuracy"})
    with (out / "per_step.csv").open() as handle:
        assert [float(row["loss"]) for row in csv.DictReader(handle)] == pytest.approx(report["loss_by_step"])
    assert "step" in capsys.readouterr().out


def test_eval_out_refuses_a_non_empty_directory_and_bad_grids(checkpoint, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    base = ["eval", str(checkpoint), "--task", "phop", "--examples", "16", "--no-progress"]
    assert main(base + ["--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"
    assert main(base + ["--q-grid", "0.5,2"]) == 2
    assert "--q-grid values must be in [0, 1]" in capsys.readouterr().err
    assert main(base + ["--epsilon-grid", "small"]) == 2
    assert "--epsilon-grid must be comma-separated numbers" in capsys.readouterr().err


def test_eval_capo_reports_knowledge_bits(checkpoint, tmp_path, capsys):
    out = tmp_path / "capo"
    code = main(["eval", str(checkpoint), "--task", "capo", "--task-options", '{"people": 8, "attributes": 2}',
                 "--examples", "16", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    capacity = json.loads((out / "report.json").read_text())["capacity"]
    assert capacity["people"] == 8 and len(capacity["bits_by_step"]) == 4
    assert "Knowledge capacity" in (out / "report.md").read_text()
