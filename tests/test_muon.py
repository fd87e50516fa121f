"""train.optimizer=muon: Muon takes exactly the layers' linear weights, AdamW the rest; both follow
the lr schedule; a run trains and resumes exactly with both optimisers' state in the checkpoint."""

import pytest
import torch

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.loading import load_model
from looplm.training.optim import OptimizerGroup, make_optimizer
from looplm.training.state import read_train_state
from looplm.training.trainer import Trainer, lr_factor


def test_hidden_matrices_go_to_muon_and_everything_else_to_adamw():
    model = LoopLM(ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_prelude_layers=1, n_core_layers=1,
                               n_coda_layers=1, injection="concat", depth_lora_rank=4, tie_embeddings=False))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.02))
    adamw, muon = optimizer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    adamw_names = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    expected = {f"{stack}.0.{matrix}.weight" for stack in ("prelude", "core", "coda")
                for matrix in ("attn.qkv", "attn.out", "ffn.gate_up", "ffn.down")}
    assert muon_names == expected
    assert adamw_names == set(names.values()) - expected
    assert {"embed.weight", "head.weight", "exit_gate.weight", "injection.adapter.weight", "depth_lora.scale",
            "core.0.attn_norm.weight"} <= adamw_names
    assert [group["lr"] for group in optimizer.param_groups] == [3e-3, 3e-3, 0.02]  # AdamW groups, then Muon
    # Stage II trains the gate only: no matrix for Muon, AdamW alone inside the group.
    model.requires_grad_(False)
    model.exit_gate.requires_grad_(True)
    assert len(make_optimizer(model, TrainConfig(optimizer="muon")).optimizers) == 1


def test_missing_muon_is_a_one_line_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(LoopLMError, match="train.optimizer=muon needs torch.optim.Muon"):
        make_optimizer(LoopLM(ModelConfig(vocab_size=64, d_model=32, n_heads=4)), TrainConfig(optimizer="muon"))


def run_config(tmp_path, **train) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the looped model reads the same layers again and again. " * 40 + "\n") * 3)
    values = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1,
                  eval_batches=1, seed=3, threads=1, optimizer="muon", muon_lr=0.01)
    values.update(train)
    model = ModelConfig(d_model=32, n_heads=4, n_core_layers=1, loop_steps=2, max_seq_len=64)
    return RunConfig(model, TrainConfig(**values), DataConfig(path=str(corpus)))


def test_muon_trains_and_the_schedule_drives_both_optimisers(tmp_path):
    trainer = Trainer(run_config(tmp_path, steps=25, warmup_steps=3), tmp_path / "run", progress=False)
    assert isinstance(trainer.optimizer, OptimizerGroup)
    before = trainer.model.core[0].attn.qkv.weight.detach().clone()
    losses = trainer.train().losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert not torch.equal(before, trainer.model.core[0].attn.qkv.weight)
    factor = lr_factor(25, trainer.train_config)
    adamw, muon = trainer.optimizer.optimizers
    assert adamw.param_groups[0]["lr"] == pytest.approx(3e-3 * factor)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01 * factor)
    assert muon.state[muon.param_groups[0]["params"][0]]["momentum_buffer"].abs().sum() > 0


def test_muon_resumes_exactly(tmp_path):
    straight = Trainer(run_config(tmp_path, save_every=4), tmp_path / "a", progress=False).train()
    Trainer(run_config(tmp_path, save_every=4), tmp_path / "b", progress=False).train(stop_after=4)
    state = read_train_state(tmp_path / "b" / "checkpoints" / "step_0000004" / "train_state.pt", "cpu")
    assert state["optimizer"]["kinds"] == ["AdamW", "Muon"]
    resumed = Trainer(run_config(tmp_path, save_every=4), tmp_path / "b", resume=True, progress=False).train()
    assert resumed.losses == straight.losses[4:]
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.equal(x, y), name
    with pytest.raises(LoopLMError, match="resume with the same train.optimizer"):
        Trainer(run_config(tmp_path, save_every=4, optimizer="adamw"), tmp_path / "b", resume=True, progress=False)
