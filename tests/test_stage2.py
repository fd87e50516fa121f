"""Ouro Stage II: only the exit gate learns (every other parameter bit-identical), the gate
loss falls, targets follow the measured improvement, and the CLI runs it from a checkpoint."""

import subprocess
import sys

import pytest
import torch

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.loading import load_model
from looplm.training.objectives import stage2_gate_loss
from looplm.training.trainer import Trainer

from conftest import tiny_config


def test_gate_targets_follow_the_improvement_of_the_next_step():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(loop_steps=3))
    ids = torch.randint(0, 64, (2, 8))
    output = model(ids)
    result = stage2_gate_loss(output, ids)
    # Hand computation from the detached per-step losses.
    from looplm.training.objectives import per_step_token_losses
    losses = per_step_token_losses(output, ids, fused=False).detach()
    target = 1.0 - torch.sigmoid(50.0 * ((losses[:-1] - losses[1:]).clamp_min(0) - 0.005))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(output.gate_logits[:-1], target)
    torch.testing.assert_close(result.loss, expected)


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    model = ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_core_layers=1, loop_steps=3, max_seq_len=32)
    run = RunConfig(model, TrainConfig(steps=30, batch_size=16, lr=3e-3, eval_every=0, log_every=10, threads=1),
                    DataConfig(task="binding", task_options={"refs": "offsets", "cells": 6, "hops": 3}))
    Trainer(run, out, progress=False).train()
    return out, run


def test_stage2_trains_only_the_gate_and_lowers_its_loss(stage1_checkpoint, tmp_path):
    out, run = stage1_checkpoint
    before = load_model(out)
    stage2 = RunConfig(run.model, TrainConfig(steps=40, batch_size=16, lr=1e-2, eval_every=0, log_every=5, stage=2,
                                              init=str(out), threads=1, warmup_steps=0), run.data)
    result = Trainer(stage2, tmp_path / "stage2", progress=False).train()
    after = load_model(tmp_path / "stage2")
    changed = {name for name, tensor in after.state_dict().items()
               if not torch.equal(tensor, before.state_dict()[name])}
    assert changed == {"exit_gate.weight", "exit_gate.bias"}
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_stage2_needs_init_and_a_gate():
    with pytest.raises(LoopLMError, match="train.stage=2 trains the exit gate of a trained model: give --init"):
        TrainConfig(stage=2)
    with pytest.raises(LoopLMError, match="has none"):
        stage2_gate_loss(LoopLM(tiny_config(exit_gate=False))(torch.zeros(1, 3, dtype=torch.long)),
                         torch.zeros(1, 3, dtype=torch.long))


def test_cli_stage2_from_a_checkpoint(stage1_checkpoint, tmp_path):
    out, _ = stage1_checkpoint
    result = subprocess.run([sys.executable, "-m", "looplm", "train", "--stage", "2", "--init", str(out), "--out",
                             str(tmp_path / "s2"), "--train.steps", "3", "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert load_model(tmp_path / "s2").config == load_model(out).config


def test_stage2_demo_benchmark_runs(stage1_checkpoint, tmp_path):
    out, _ = stage1_checkpoint
    script = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "stage2_demo.py"
    result = subprocess.run([sys.executable, str(script), "--stage1", str(out), "--out", str(tmp_path / "b"),
                             "--steps", "2", "--examples", "4", "--q", "0.5", "--json", str(tmp_path / "s2.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = __import__("json").loads((tmp_path / "s2.json").read_text())
    assert [row["model"] for row in rows] == ["stage I", "stage I + II"] and "q0.5" in rows[1]
