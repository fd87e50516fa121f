"""The documented Python API: ``looplm.train(run, out_dir)``, a plain function beside the ``looplm.training.*``
submodules, whatever was imported first."""

import subprocess
import sys
from pathlib import Path

import pytest

import looplm
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.model.loading import load_model

# Each import order runs in a fresh interpreter (in this process looplm is already imported); the
# order's imports come first, then this file supplies the tiny run.
ORDERS = {
    "submodule first": "import looplm.training.trainer\nimport looplm.training.objectives\nimport looplm\n",
    "package first": "import looplm\nimport looplm.training.trainer\n",
}

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_api import tiny_run
result = looplm.train(tiny_run(), {out!r}, progress=False)
assert result.steps_done == 2 and len(result.losses) == 2, result
import types
assert isinstance(looplm.train, types.FunctionType) and callable(looplm.training.objectives.compute_loss)
print("ok")
"""


def tiny_run() -> RunConfig:
    model = ModelConfig(d_model=32, n_heads=4, n_core_layers=1, loop_steps=2, max_seq_len=64, vocab_size=259)
    train = TrainConfig(steps=2, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0, log_every=1)
    return RunConfig(model, train, DataConfig(task="binding", task_options={"hops": 2, "n_chains": 2}))


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_train_is_callable_in_every_import_order(order, tmp_path):
    script = ORDERS[order] + SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").is_file()


def test_train_in_process_after_importing_the_trainer(tmp_path):
    import looplm.training.trainer as trainer

    result = looplm.train(tiny_run(), tmp_path / "run", progress=False)
    assert isinstance(result, trainer.TrainResult) and result.steps_done == 2
    assert looplm.training.trainer is trainer
    assert load_model(tmp_path / "run").config.loop_steps == 2
