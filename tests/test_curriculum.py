"""Loop-step curriculum: the depth per optimiser step follows the hand-computed line from
loop_curriculum_start to T, caps sampled depths, is logged, and a resumed run repeats it exactly."""

import json

import pytest

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.training.curriculum import loop_curriculum_depth
from looplm.training.trainer import Trainer, sample_depth


def test_depth_follows_the_schedule():
    config = TrainConfig(loop_curriculum_start=1, loop_curriculum_steps=6)
    # cap(s) = 1 + floor(3 s / 6) for s < 6, then the sampled depth (T = 4 under fixed sampling)
    assert [loop_curriculum_depth(config, 4, s, 4) for s in range(9)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    config = TrainConfig(loop_curriculum_start=2, loop_curriculum_steps=4)
    assert [loop_curriculum_depth(config, 6, s, 6) for s in range(6)] == [2, 3, 4, 5, 6, 6]
    assert [loop_curriculum_depth(config, 6, s, 3) for s in range(6)] == [2, 3, 3, 3, 3, 3]  # a cap, not a floor
    assert loop_curriculum_depth(config, 6, 4, 9) == 9  # uncapped after the curriculum (depth_max may exceed T)
    assert [loop_curriculum_depth(TrainConfig(), 4, s, 7) for s in range(3)] == [7, 7, 7]  # off
    with pytest.raises(LoopLMError, match="loop_curriculum_start=5 exceeds model.loop_steps=4"):
        loop_curriculum_depth(TrainConfig(loop_curriculum_start=5, loop_curriculum_steps=3), 4, 0, 4)
    with pytest.raises(LoopLMError, match="needs train.loop_curriculum_steps >= 1"):
        TrainConfig(loop_curriculum_start=1)


def run_config(tmp_path, **train) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the looped model reads the same layers again and again. " * 40 + "\n") * 3)
    values = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1,
                  eval_batches=1, seed=3, threads=1, loop_curriculum_start=1, loop_curriculum_steps=6)
    values.update(train)
    model = ModelConfig(d_model=32, n_heads=4, n_core_layers=1, loop_steps=3, max_seq_len=64)
    return RunConfig(model, TrainConfig(**values), DataConfig(path=str(corpus)))


def logged_depths(run_dir) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loop_steps"] for r in records if "loop_steps" in r]


def test_training_follows_the_curriculum_and_resumes_exactly(tmp_path):
    straight = Trainer(run_config(tmp_path, save_every=4), tmp_path / "a", progress=False).train()
    assert logged_depths(tmp_path / "a") == [1, 1, 1, 2, 2, 2, 3, 3]  # 1 + floor(2 s / 6), then T = 3
    Trainer(run_config(tmp_path, save_every=4), tmp_path / "b", progress=False).train(stop_after=4)
    resumed = Trainer(run_config(tmp_path, save_every=4), tmp_path / "b", resume=True, progress=False).train()
    assert resumed.losses == straight.losses[4:]
    assert logged_depths(tmp_path / "b") == logged_depths(tmp_path / "a")


def test_curriculum_caps_sampled_depths(tmp_path):
    train = dict(steps=5, depth_sampling="uniform", depth_min=1, depth_max=5, loop_curriculum_start=1,
                 loop_curriculum_steps=4)
    run = run_config(tmp_path, **train)
    Trainer(run, tmp_path / "run", progress=False).train()
    config = run.train
    sampled = [sample_depth(config, 3, s) for s in range(5)]
    caps = [1, 1, 2, 2]  # 1 + floor(2 s / 4), then none
    assert logged_depths(tmp_path / "run") == [min(d, c) for d, c in zip(sampled, caps)] + [sampled[4]]
    assert any(d > c for d, c in zip(sampled, caps))  # the cap did bite
