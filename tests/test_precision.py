"""Training precision (``train.precision``, looplm.precision): auto chooses from the CPU's flags
and says why; under bf16 autocast the matmuls run in bf16 while the loss, the norms, the exit
distribution, the parameters and the optimizer state stay float32; a bf16 run learns and logs
its precision."""

import json
import sys

import pytest
import torch
from torch.nn import functional as F

from looplm import cpu, precision
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.norms import RMSNorm
from looplm.training.objectives import compute_loss
from looplm.training.trainer import Trainer

from conftest import tiny_config

BF16_AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma", "avx512f"}, "fp32 (auto: this CPU has no amx_bf16/avx512_bf16)"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16 (auto: avx512_bf16)"),
    ({"avx512_bf16", "amx_bf16", "amx_tile"}, "bf16 (auto: amx_bf16)"),
    ({"fp", "asimd", "bf16"}, "bf16 (auto: bf16)"),  # Arm's Features line
    (set(), "fp32 (auto: this CPU has no amx_bf16/avx512_bf16)"),  # no /proc/cpuinfo
])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert precision.training_precision("auto", "cpu").label == expected
    assert precision.training_precision("auto", "cpu", d_model=256).label == expected


def test_auto_keeps_narrow_models_in_fp32_on_a_cpu(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert precision.training_precision("auto", "cpu", d_model=128).label == \
        "fp32 (auto: d_model 128 < 256, too narrow for bf16 autocast to pay on a CPU)"
    assert precision.training_precision("auto", "cpu", d_model=512).name == "bf16"
    assert precision.training_precision("auto", "cuda", d_model=64).name == "bf16"  # a GPU: as before


def test_explicit_choices_cuda_and_bad_values(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert precision.training_precision("fp32", "cpu").label == "fp32 (asked)"
    slow = precision.training_precision("bf16", "cpu")
    assert slow.label == "bf16 (asked, though this CPU has no amx_bf16/avx512_bf16)"
    assert precision.training_precision("auto", "cuda").label == "bf16 (auto: CUDA)"
    assert precision.training_precision("fp32", "cuda").autocast("cuda").__class__.__name__ == "nullcontext"
    with pytest.raises(LoopLMError, match="train.precision must be one of auto, fp32, bf16, got 'half'"):
        TrainConfig(precision="half")


def test_the_real_cpu_flags_are_read():
    flags = cpu.cpu_flags()
    label = precision.training_precision("auto", "cpu").label
    assert label.startswith("bf16" if precision.native_bf16_flag(flags) else "fp32"), (sorted(flags), label)


def test_norms_and_exit_gate_stay_float32_under_autocast():
    torch.manual_seed(0)
    norm = RMSNorm(48)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(3, 48) * 10
    with torch.autocast(**BF16_AUTOCAST):
        inside = norm(x.bfloat16())
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, norm(x.bfloat16().float()), rtol=0, atol=0)  # the fp32 norm of its input

    model = LoopLM(tiny_config())
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    ids = torch.randint(0, 64, (2, 9))
    with torch.autocast(**BF16_AUTOCAST):
        output = model(ids)
        result = compute_loss(output, ids, "stage1", 0.1)
        head_logits = output.logits()
    assert head_logits.dtype == torch.bfloat16  # the matmuls do run in bf16
    assert output.gate_logits.dtype == output.log_exit_distribution.dtype == torch.float32
    assert all(state.dtype == torch.float32 for state in output.hidden_states)
    assert result.loss.dtype == result.step_losses.dtype == torch.float32
    reference = compute_loss(model(ids), ids, "stage1", 0.1)
    # bf16 matmuls move the loss by about bf16's rounding, not more.
    assert abs(result.loss.item() - reference.loss.item()) < 0.02 * reference.loss.item()


# One variant per module with its own norms or float arithmetic (q/k norms, MLA's latent norm,
# Gated DeltaNet, RWKV slots, MoE routing, channel mixing, LTI injection); the slow test runs all.
AUTOCAST_VARIANTS = ("ouro", "lti", "moe", "gated-attention", "mla", "gdn-hybrid", "rwkv-slots", "channelmix")


def test_these_architectures_train_a_step_under_bf16_autocast():
    assert_trains_a_step_under_autocast(AUTOCAST_VARIANTS)


@pytest.mark.slow
def test_every_architecture_trains_a_step_under_bf16_autocast():
    from test_architectures import VARIANTS

    assert_trains_a_step_under_autocast(VARIANTS)


def assert_trains_a_step_under_autocast(names):
    from test_architectures import VARIANTS

    for name in names:
        overrides = VARIANTS[name]
        torch.manual_seed(0)
        model = LoopLM(tiny_config(**overrides))
        ids = torch.randint(0, 64, (2, 12))
        with torch.autocast(**BF16_AUTOCAST):
            result = compute_loss(model(ids[:, :-1]), ids[:, 1:], "stage1", 0.1)
        result.loss.backward()
        assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss), name
        for parameter_name, parameter in model.named_parameters():
            assert parameter.dtype == torch.float32, (name, parameter_name)
            assert parameter.grad is None or torch.isfinite(parameter.grad).all(), (name, parameter_name)


def test_a_bf16_run_learns_the_binding_task_and_logs_its_precision(tmp_path):
    data = DataConfig(task="binding", task_options={"hops": 1, "n_chains": 2})
    run = RunConfig(ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_core_layers=1, loop_steps=2, max_seq_len=64),
                    TrainConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=5, eval_every=0, log_every=10,
                                eval_batches=1, seed=1, precision="bf16"), data)
    trainer = Trainer(run, tmp_path / "run", progress=False)
    assert trainer.precision.name == "bf16"
    result = trainer.train()
    assert sum(result.losses[-10:]) / 10 < 0.7 * sum(result.losses[:5]) / 5, result.losses
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["precision"].startswith("bf16 (asked")
    # fp32 master state: parameters and AdamW's moments
    assert all(parameter.dtype == torch.float32 for parameter in trainer.model.parameters())
    moments = [value for state in trainer.optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor) and value.dim() > 0]
    assert moments and all(value.dtype == torch.float32 for value in moments)


def test_cli_train_line_names_the_precision(tmp_path, capsys, monkeypatch):
    from looplm.cli import main

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(sys, "argv", ["looplm"])
    assert main(["train", "--task", "binding", "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress",
                 "--train.steps", "1", "--train.batch_size", "2", "--train.eval_every", "0",
                 "--model.d_model", "16", "--model.n_core_layers", "1"]) == 0
    assert "precision fp32 (auto: this CPU has no amx_bf16/avx512_bf16)" in capsys.readouterr().err


def test_fused_loss_under_autocast_equals_autocast_reference():
    torch.manual_seed(0)
    from looplm.training.fused_ce import linear_cross_entropy

    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 23, (10,))
    scale = torch.rand(10)
    with torch.autocast(**BF16_AUTOCAST):
        fused = linear_cross_entropy(hidden, weight, targets, torch.bfloat16)
    (fused * scale).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast(**BF16_AUTOCAST):
        reference = F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")
    (reference * scale).sum().backward()
    assert fused.dtype == reference.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)  # the same bf16 logits, fp32 softmax
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-2, atol=1e-2)  # bf16-rounded products
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-2, atol=1e-2)
