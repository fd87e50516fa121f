import pytest
import torch

from looplm.config import ModelConfig
from looplm.model import LoopLM


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=64, d_model=32, n_heads=4, n_core_layers=2, loop_steps=3, max_seq_len=48)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def tiny_model() -> LoopLM:
    torch.manual_seed(0)
    model = LoopLM(tiny_config())
    # Non-zero gate weights so exit probabilities vary per token and per step.
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="session")
def looplm_run(tmp_path_factory):
    """The standalone program looplm-run, built once per test session (skips without a C compiler)."""
    from looplm.kernels import build, program

    if build._compiler() is None:
        pytest.skip("no C compiler")
    return program.build(tmp_path_factory.mktemp("bin") / "looplm-run")
