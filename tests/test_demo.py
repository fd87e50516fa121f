"""The demo's machinery end to end on a very short run (its accuracy targets need the full run)."""

import json

import pytest

from looplm.demo import run_demo
from looplm.errors import LoopLMError


def test_short_demo_writes_results_and_plot(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", train_steps=6, progress=False, eval_examples=64, generated_examples=8)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {"accuracy_by_steps", "trained_steps", "mean_exit_steps", "plot"} <= set(saved)
    trained = saved["trained_steps"]
    assert sorted(map(int, saved["accuracy_by_steps"])) == list(range(1, trained + 3))
    assert 1 <= saved["mean_exit_steps"] <= trained
    assert (tmp_path / "demo" / "accuracy_by_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert results["samples"] and all(len(s["steps_per_token"]) >= 1 for s in results["samples"])
    printed = capsys.readouterr().out
    assert "steps 1:" in printed and "Q-exit" in printed


def test_demo_refuses_bad_q_before_training(tmp_path):
    with pytest.raises(LoopLMError):
        run_demo(tmp_path / "demo", train_steps=2, q=1.5, progress=False)
    assert not (tmp_path / "demo").exists()


def test_demo_never_writes_over_a_users_files(tmp_path, capsys):
    """The demo writes results.json and plots into --out: a directory already holding anything is
    refused before training, and the user's files are as they were."""
    from looplm.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"my": 1}')
    assert main(["demo", "--out", str(out), "--train-steps", "2", "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert "holds results.json" in line and "new or empty directory" in line and "\n" not in line
    assert (out / "results.json").read_text() == '{"my": 1}'
    assert sorted(path.name for path in out.iterdir()) == ["results.json"]
