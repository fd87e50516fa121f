"""The README's Python example runs as written (paths pointed at a temporary checkpoint)."""

import re
from pathlib import Path

import torch

from looplm import LoopLM, ModelConfig
from looplm.data.tokenizer import byte_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    LoopLM(ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_core_layers=1, loop_steps=2)).save(
        tmp_path / "runs" / "demo" / "run", tokenizer=byte_tokenizer())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
    assert namespace["out"].exit_distribution.shape == (6, 2, 16)
    inference = re.search(r"prefix reuse \(continuing.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(inference, "README.md", "exec"), namespace)
    assert len(namespace["batch"].generations) == 2 and namespace["prefixes"].stats.requests == 1


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README.read_text() and "python -m pytest -q" in ci
