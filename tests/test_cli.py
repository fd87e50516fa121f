"""The looplm command end to end, through a real subprocess."""

import argparse
import json
import subprocess
import sys

import pytest

from looplm.cli import build_parser, main

TINY = ["--model.d_model", "32", "--model.n_heads", "4", "--model.n_core_layers", "1", "--model.loop_steps", "2",
        "--model.max_seq_len", "64", "--train.batch_size", "4", "--train.seq_len", "32", "--train.eval_every", "0",
        "--train.warmup_steps", "1", "--no-progress"]


def looplm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "looplm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text("hello looped world. " * 300)
    result = looplm("train", "--data", corpus, "--out", root / "run", "--train.steps", "4", *TINY)
    assert result.returncode == 0, result.stderr
    (root / "train.stdout").write_text(result.stdout)
    (root / "train.stderr").write_text(result.stderr)
    return root


COMMANDS = ("demo", "train", "generate", "eval", "prepare", "export", "bench", "convert", "lm-eval")


def command_paths(parser, prefix=()):
    """Every (sub)command path of the parser, e.g. ("convert", "ouro"), found by walking its subparsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name)
                yield from command_paths(child, (*prefix, name))


def test_top_level_help_lists_every_command():
    result = looplm("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed
    assert set(COMMANDS) <= {path[0] for path in command_paths(build_parser())}


def test_help_for_every_command(capsys):
    paths = list(command_paths(build_parser()))
    assert ("convert", "ouro") in paths and len(paths) > len(COMMANDS)
    for path in paths:
        with pytest.raises(SystemExit) as exited:
            main([*path, "--help"])
        assert exited.value.code == 0, path
        assert "usage: looplm " + " ".join(path) in capsys.readouterr().out, path


def test_train_then_generate(trained):
    result = looplm("generate", trained / "run", "--prompt", "hello", "--max-new-tokens", "5", "--show-steps",
                    "--q", "0.5")
    assert result.returncode == 0, result.stderr
    assert "steps per token" in result.stderr
    assert (trained / "run" / "checkpoints" / "step_0000004" / "tokenizer.json").is_file()


def test_train_prints_a_readable_line_and_a_json_summary(trained):
    summary = json.loads((trained / "train.stdout").read_text())  # stdout: JSON for scripts
    assert summary["steps"] == 4 and summary["checkpoint"].endswith("step_0000004")
    done = [line for line in (trained / "train.stderr").read_text().splitlines() if "done:" in line]
    assert done == [f"looplm train: done: 4 steps, last train loss {summary['final_loss']:.4f}; checkpoint "
                    f"{summary['checkpoint']}"]


def test_train_summary_line_names_per_step_figures():
    from looplm.cli import _train_summary_line

    line = _train_summary_line({"steps": 9, "final_loss": 0.5, "checkpoint": "c", "eval": {
        "loss_by_step": [0.7, 0.6], "accuracy_by_step": [0.25, 1.0], "mean_exit_step": 1.5}})
    assert line == ("looplm train: done: 9 steps, last train loss 0.5000, val loss by loop step 0.700 0.600,"
                    " accuracy by loop step 0.250 1.000, mean exit step 1.50; checkpoint c")


def test_generate_backends_give_the_same_text(trained):
    outputs = {backend: looplm("generate", trained / "run", "--prompt", "hello", "--max-new-tokens", "8",
                               "--backend", backend, "--no-stream", "--dtype", "fp32")
               for backend in ("native", "torch", "reference")}
    assert all(result.returncode == 0 for result in outputs.values()), outputs
    assert len({result.stdout for result in outputs.values()}) == 1


def test_generate_several_prompts_batches_them_in_c_like_the_reference(trained, capsys):
    """Two prompts are one batch: ``--backend native`` runs its rows in C, ``reference`` through the
    model's modules; the same text."""
    printed = {}
    for backend in ("native", "reference"):
        assert main(["generate", str(trained / "run"), "--prompt", "hello", "--prompt", "looped w",
                     "--max-new-tokens", "6", "--backend", backend, "--dtype", "fp32"]) == 0
        printed[backend] = capsys.readouterr().out
    assert printed["native"] == printed["reference"] and "[1]" in printed["native"]
    # the flag reaches the batch: the torch backend decodes one row and says so in one line
    assert main(["generate", str(trained / "run"), "--prompt", "hello", "--prompt", "looped w",
                 "--max-new-tokens", "6", "--backend", "torch", "--dtype", "fp32"]) == 2
    assert "the torch backend cannot run here" in capsys.readouterr().err


def test_prepare_then_train_on_shards_and_resume(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(30)))
    assert looplm("prepare", corpus, "--out", tmp_path / "shards").returncode == 0
    first = looplm("train", "--data", tmp_path / "shards", "--out", tmp_path / "run", "--train.steps", "2", *TINY)
    assert first.returncode == 0, first.stderr
    again = looplm("train", "--out", tmp_path / "run", "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr


def test_eval_on_a_task(tmp_path):
    run = tmp_path / "run"
    result = looplm("train", "--task", "binding", "--data.task_options", '{"hops": 2}', "--out", run,
                    "--train.steps", "2", *TINY)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "report.json"
    result = looplm("eval", run, "--task", "binding", "--task-options", '{"hops": 2}', "--examples", "32",
                    "--json", report)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(report.read_text())["accuracy_by_step"]) == 4


def _assert_user_error(result):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("looplm: error:"), result.stderr


def test_bad_inputs_exit_2_with_one_line(trained, tmp_path):
    """Through a real ``python -m looplm``: nothing else reaches stderr (no warning, no traceback)
    and the checkpoint is untouched; tests/test_user_errors.py's table runs every other mistake
    in this process."""
    run = trained / "run"
    checkpoint = run / "checkpoints" / "step_0000004"
    snapshot = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    _assert_user_error(looplm("generate", run, "--prompt", "x", "--q", "1.5"))
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == snapshot


def test_corrupt_and_truncated_checkpoints_exit_2(trained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained / "run" / "checkpoints" / "step_0000004", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    _assert_user_error(looplm("generate", copy, "--prompt", "x"))
    (copy / "config.json").write_text("{broken")
    _assert_user_error(looplm("generate", copy, "--prompt", "x"))


def test_generate_compile_compiles_the_torch_step_and_keeps_the_text(trained, monkeypatch, capsys):
    """--compile reaches the torch backend's step through torch.compile (recorded here instead of
    compiled, to keep the test fast; the slow-marked test in test_fast_decode compiles for real)."""
    import torch

    compiled = []

    def record(function, **options):
        compiled.append(options)
        return function

    arguments = ["generate", str(trained / "run"), "--prompt", "hello", "--max-new-tokens", "6", "--backend", "torch",
                 "--no-stream"]
    assert main(arguments) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr(torch, "compile", record)
    assert main([*arguments, "--compile"]) == 0
    assert capsys.readouterr().out == plain
    assert compiled == [{"fullgraph": True, "dynamic": False, "mode": None}]
