"""Stage schedules (LoopCached-Reasoning, Ouro): β annealed from a chosen step and logged, RoPE θ
changed by stage (in the checkpoint, exact on resume), and detached memory-caching states."""

import json

import pytest
import torch
from test_trainer import small_run, text_file

from looplm.config import DataConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.loading import load_model
from looplm.model.rope import RotaryEmbedding
from looplm.training.trainer import Trainer

from conftest import tiny_config


def test_beta_holds_until_the_start_then_anneals_linearly():
    config = TrainConfig(steps=21, entropy_beta=0.1, entropy_beta_final=0.05, entropy_beta_anneal_start=10)
    assert [config.entropy_beta_at(step) for step in (0, 5, 10)] == [0.1, 0.1, 0.1]
    assert config.entropy_beta_at(15) == pytest.approx(0.075)
    assert config.entropy_beta_at(20) == pytest.approx(0.05)
    assert TrainConfig(steps=21, entropy_beta_anneal_start=10).entropy_beta_at(20) == 0.1  # no final: constant


def test_rope_schedule_parses_and_refuses_bad_input():
    config = TrainConfig(rope_theta_schedule="0:1e4, 500:1e6")
    assert config.rope_thetas() == [(0, 1e4), (500, 1e6)]
    assert [config.rope_theta_at(step, 7.0) for step in (0, 499, 500, 10_000)] == [1e4, 1e4, 1e6, 1e6]
    assert TrainConfig(rope_theta_schedule="100:1e6").rope_theta_at(99, 7.0) == 7.0  # before it: the model's θ
    for bad in ("10", "a:1", "5:1e4,5:1e5", "9:1,3:2", "0:-1"):
        with pytest.raises(LoopLMError, match="rope_theta_schedule"):
            TrainConfig(rope_theta_schedule=bad)


def test_training_logs_beta_and_switches_rope_theta_exactly_on_resume(tmp_path):
    data = DataConfig(path=str(text_file(tmp_path)))
    options = dict(entropy_beta=0.2, entropy_beta_final=0.1, entropy_beta_anneal_start=4,
                   rope_theta_schedule="0:10000,5:500000", save_every=3)
    straight = Trainer(small_run(data, **options), tmp_path / "a", progress=False).train()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    config = small_run(data, **options).train
    assert [record["entropy_beta"] for record in records] == [config.entropy_beta_at(step) for step in range(8)]
    assert [record["rope_theta"] for record in records] == [1e4] * 5 + [5e5] * 3
    final = load_model(tmp_path / "a")
    assert final.config.rope_theta == 5e5
    torch.testing.assert_close(final.rope.cos, RotaryEmbedding(final.config.rope_dim, 64, 5e5).cos)
    # Stopped after the switch (the checkpoint records θ = 5e5) and resumed: the same losses.
    Trainer(small_run(data, **options), tmp_path / "b", progress=False).train(stop_after=6)
    resumed = Trainer(small_run(data, **options), tmp_path / "b", resume=True, progress=False).train()
    assert resumed.losses == straight.losses[6:]


def test_detached_segment_states_change_gradients_not_values():
    torch.manual_seed(0)
    kept = LoopLM(tiny_config(layer_pattern="G", n_core_layers=1, mc_segment_size=3))
    detached = LoopLM(tiny_config(layer_pattern="G", n_core_layers=1, mc_segment_size=3, mc_detach=True))
    detached.load_state_dict(kept.state_dict())
    ids = torch.randint(0, 64, (2, 11))
    grads = []
    for model in (kept, detached):
        output = model(ids)
        output.logits()[:, -1].sum().backward()
        grads.append(model.core[0].attn.in_proj.weight.grad)
    torch.testing.assert_close(kept(ids).logits(), detached(ids).logits(), atol=0, rtol=0)
    assert (grads[0] - grads[1]).abs().max() > 1e-6
    with pytest.raises(LoopLMError, match="mc_segment_size"):
        tiny_config(mc_detach=True)
