import json

import pytest
import torch

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.model.loading import load_model
from looplm.training.trainer import Trainer, lr_factor


def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(("the looped model reads the same layers again and again. " * 40 + "\n") * 3)
    return path


def small_run(data: DataConfig, **train) -> RunConfig:
    values = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1,
                  eval_batches=1, seed=3)
    values.update(train)
    model = ModelConfig(d_model=32, n_heads=4, n_core_layers=1, loop_steps=3, max_seq_len=64)
    return RunConfig(model, TrainConfig(**values), data)


def test_resume_continues_exactly(tmp_path):
    data = DataConfig(path=str(text_file(tmp_path)))
    straight = Trainer(small_run(data, save_every=4), tmp_path / "a", progress=False).train()
    Trainer(small_run(data, save_every=4), tmp_path / "b", progress=False).train(stop_after=4)
    resumed = Trainer(small_run(data, save_every=4), tmp_path / "b", resume=True, progress=False).train()
    assert resumed.losses == straight.losses[4:]
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.equal(x, y), name


def test_loss_falls_and_metrics_are_logged(tmp_path):
    data = DataConfig(path=str(text_file(tmp_path)))
    result = Trainer(small_run(data, steps=30, eval_every=15), tmp_path / "run", progress=False).train()
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert {"step_losses", "mean_exit_step", "exit_entropy", "tokens_per_s", "lr"} <= set(train_records[0])
    evals = [r["eval"] for r in records if "eval" in r]
    assert len(evals) == 2 and len(evals[-1]["loss_by_step"]) == 3


def test_keep_last_checkpoints(tmp_path):
    data = DataConfig(path=str(text_file(tmp_path)))
    Trainer(small_run(data, steps=6, save_every=1, keep_last=2), tmp_path / "run", progress=False).train()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_0000005", "step_0000006"]


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    data = DataConfig(path=str(text_file(tmp_path)))
    Trainer(small_run(data, steps=2), tmp_path / "run", progress=False).train()
    before = (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes()
    with pytest.raises(LoopLMError):
        Trainer(small_run(data, steps=2), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes() == before


def test_task_training_reports_accuracy_per_step(tmp_path):
    data = DataConfig(task="binding", task_options={"hops": 2, "n_chains": 2})
    run = small_run(data, steps=3, eval_every=3, batch_size=8)
    run.model.vocab_size = 259
    result = Trainer(run, tmp_path / "run", progress=False).train()
    assert len(result.last_eval["accuracy_by_step"]) == 3


def test_schedule_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(0.1)
    assert lr_factor(55, config) == pytest.approx(0.55)


def test_empty_and_non_utf8_data_are_user_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    for path in (empty, binary):
        with pytest.raises(LoopLMError) as error:
            Trainer(small_run(DataConfig(path=str(path))), tmp_path / f"run-{path.stem}", progress=False)
        assert "\n" not in str(error.value)


def test_warns_once_when_the_exit_distribution_collapses_onto_step_one(tmp_path):
    """Stage I whose exit gate puts all its mass on step 1 (its bias set far positive) trains the
    deeper steps with a weight of ~0: the trainer says so once, naming the remedy; a healthy gate
    (the default initialisation) and the objective that trains every step say nothing."""
    import warnings

    from looplm.training.objectives import exit_collapse_warning

    data = DataConfig(path=str(text_file(tmp_path)))
    trainer = Trainer(small_run(data, steps=4, warmup_steps=1, entropy_beta=0.05), tmp_path / "collapsed",
                      progress=False)
    with torch.no_grad():
        trainer.model.exit_gate.bias.fill_(30.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(warning.message) for warning in caught if "exit distribution" in str(warning.message)]
    assert len(messages) == 1, messages
    assert "loop step 1" in messages[0] and "train.entropy_beta (now 0.05)" in messages[0]
    assert "train.objective=mean" in messages[0]
    for name, train in (("healthy", {}), ("mean", {"objective": "mean"})):
        trainer = Trainer(small_run(data, steps=4, warmup_steps=1, **train), tmp_path / name, progress=False)
        if name == "mean":
            with torch.no_grad():
                trainer.model.exit_gate.bias.fill_(30.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert not [warning for warning in caught if "exit distribution" in str(warning.message)], name
    # the rule itself: at COLLAPSED_SHARE on step 1 and above, not below; one step has nothing to collapse
    assert exit_collapse_warning(10, [0.989, 0.011], [2.0, 2.5], 0.1) is None
    assert exit_collapse_warning(10, [0.99, 0.01], [2.0, 2.5], 0.1).startswith("at training step 10, 99.0 %")
    assert exit_collapse_warning(10, [1.0], [2.0], 0.1) is None and exit_collapse_warning(10, None, [], 0.1) is None
