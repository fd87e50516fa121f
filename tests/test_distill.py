"""Distillation: the KL term is zero when teacher = student at τ = 1, positive otherwise and
equal to a hand computation; the loop penalty anneals to zero; a run trains from a teacher."""

import pytest
import torch

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.training.distill import distillation_kl, loop_penalty_weight
from looplm.training.trainer import Trainer

from conftest import tiny_config


def test_kl_is_zero_for_teacher_equal_to_student_and_matches_by_hand():
    torch.manual_seed(0)
    model = LoopLM(tiny_config())
    ids = torch.randint(0, 64, (2, 7))
    logits = model(ids).logits()
    assert distillation_kl(logits, logits.detach(), ids, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn_like(logits)
    temperature = 2.0
    p = torch.softmax(other / temperature, -1)
    expected = temperature ** 2 * (p * (p.log() - torch.log_softmax(logits / temperature, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_kl(logits, other, ids, temperature), expected)
    masked = ids.clone()
    masked[0] = -100
    kl = distillation_kl(logits, other, masked, temperature)
    expected_masked = temperature ** 2 * (p * (p.log() - torch.log_softmax(logits / temperature, -1))).sum(-1)[1].mean()
    torch.testing.assert_close(kl, expected_masked)


def test_loop_penalty_anneals_linearly_to_zero():
    assert loop_penalty_weight(0.4, 0, 11) == pytest.approx(0.4)
    assert loop_penalty_weight(0.4, 5, 11) == pytest.approx(0.2)
    assert loop_penalty_weight(0.4, 10, 11) == 0.0


def test_training_from_a_teacher(tmp_path):
    data = DataConfig(task="binding", task_options={"refs": "offsets", "cells": 6, "hops": 3})
    teacher_model = ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_core_layers=2, loop_steps=2, max_seq_len=32)
    Trainer(RunConfig(teacher_model, TrainConfig(steps=20, batch_size=8, eval_every=0, threads=1), data),
            tmp_path / "teacher", progress=False).train()
    student_model = ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_core_layers=1, loop_steps=3, max_seq_len=32)
    train = TrainConfig(steps=20, batch_size=8, eval_every=0, threads=1, distill_teacher=str(tmp_path / "teacher"),
                        distill_temperature=2.0, distill_alpha=0.7, distill_loop_penalty=0.5)
    trainer = Trainer(RunConfig(student_model, train, data), tmp_path / "student", progress=False)
    losses = trainer.train().losses
    assert trainer.teacher is not None and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert losses[-1] < losses[0]
    with pytest.raises(LoopLMError, match="train.distill_alpha must be in"):
        TrainConfig(distill_alpha=1.5)
