"""Mistakes in what a user hands looplm: data files it cannot read, demo options, lm-eval task
paths, a checkpoint in another format, an output that exists.  Each is one line ``looplm:
error: …`` and exit status 2 that says what was wrong and how to fix it, before any work, and
leaves the user's files as they were (see tests/test_user_errors.py for the general table)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from looplm.cli import main
from looplm.data.documents import read_documents
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.model import LoopLM

from conftest import one_line_error, tiny_config

TEXT = "the loop runs again and again. " * 100
LM_EVAL_TASKS = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny byte-tokenizer checkpoint (Ouro-shaped: ``looplm convert to-ouro`` takes it)."""
    directory = tmp_path_factory.mktemp("input-mistakes") / "ckpt"
    torch.manual_seed(0)
    LoopLM(tiny_config(vocab_size=259, max_seq_len=64)).eval().save(directory, byte_tokenizer())
    return directory


def contents(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


# 1. Data files by suffix.

def data_command(command: str, data: Path, checkpoint: Path, tmp_path: Path) -> list:
    return {"prepare": ["prepare", data, "--out", tmp_path / "out"],
            "train": ["train", "--data", data, "--out", tmp_path / "out", "--train.steps", "1", "--no-progress"],
            "eval": ["eval", checkpoint, "--data", data, "--no-progress"]}[command]


@pytest.mark.parametrize("command", ["prepare", "train", "eval"])
def test_a_json_data_file_is_refused_pointing_to_json_lines(command, checkpoint, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"text": f"hello world {index}"} for index in range(50)]))
    before = contents(tmp_path)
    error = one_line_error(data_command(command, data, checkpoint, tmp_path), capsys)
    assert "data.json" in error and "JSON Lines" in error and ".jsonl" in error, error
    assert contents(tmp_path) == before and not (tmp_path / "out").exists()


def compressed(path: Path) -> Path:
    """``path`` with TEXT written through the compressor its suffix names (.zst: the magic bytes only)."""
    data = TEXT.encode()
    writers = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
               ".zst": lambda raw: b"\x28\xb5\x2f\xfd" + raw}
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("notes.txt", TEXT)
    else:
        path.write_bytes(writers[path.suffix](data))
    return path


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst", ".zip"])
def test_a_compressed_data_file_is_refused_with_decompress_it_first(suffix, checkpoint, tmp_path, capsys):
    data = compressed(tmp_path / f"notes.txt{suffix}")
    error = one_line_error(data_command("prepare", data, checkpoint, tmp_path), capsys)
    assert "compressed" in error and "decompress it first" in error and "UTF-8" not in error, error
    with pytest.raises(LoopLMError, match="decompress it first"):
        read_documents(data)  # refused when named, before anything is read


def test_known_binary_suffixes_are_refused_and_other_text_files_are_read(tmp_path, capsys):
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 ascii enough to decode as UTF-8")
    with pytest.raises(LoopLMError, match=r"is a \.pdf file, not text"):
        read_documents(tmp_path / "paper.pdf")
    for name in ("notes.md", "table.csv", "README"):
        (tmp_path / name).write_text(TEXT)
        assert list(read_documents(tmp_path / name)) == [TEXT]


# 2.-4. The demo's options and its interruption.

@pytest.fixture
def no_training(monkeypatch):
    """Any demo that gets as far as tokenizing or training fails the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError("the demo started work with a bad option")

    monkeypatch.setattr("looplm.demo.Trainer", refuse)
    monkeypatch.setattr("looplm.demo_text.Trainer", refuse)
    monkeypatch.setattr("looplm.demo_text.prepared_shards", refuse)


@pytest.mark.parametrize("text", [False, True], ids=["demo", "text-demo"])
@pytest.mark.parametrize("steps", ["0", "-5"])
def test_demo_train_steps_below_one_is_refused(text, steps, no_training, tmp_path, capsys):
    corpus = ["--text", "--corpus", tmp_path] if text else []
    error = one_line_error(["demo", *corpus, "--train-steps", steps, "--out", tmp_path / "demo"], capsys)
    assert f"--train-steps must be a positive number of optimiser steps, got {steps}" in error, error
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("text", [False, True], ids=["demo", "text-demo"])
def test_demo_out_that_is_a_file_is_refused_before_training(text, no_training, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT)
    corpus = ["--text", "--corpus", notes] if text else []
    error = one_line_error(["demo", *corpus, "--out", notes, "--train-steps", "2"], capsys)
    assert f"--out '{notes}' is a file, not a directory" in error, error
    error = one_line_error(["demo", *corpus, "--out", notes / "inside", "--train-steps", "2"], capsys)
    assert f"lies under '{notes}', which is a file" in error, error
    assert notes.read_text() == TEXT


def test_an_interrupted_demo_names_a_resume_that_works(tmp_path, capsys, monkeypatch):
    """Ctrl-C after one step: the demo says to finish the run with ``looplm train --resume`` (it
    has no --resume itself), and that command does finish it."""
    from looplm.training.trainer import Trainer

    real_loop = Trainer._loop

    def one_step_then_ctrl_c(self, last, *rest):
        real_loop(self, 1, *rest)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_loop", one_step_then_ctrl_c)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-steps", "3", "--no-progress"]) == 130
    advice = f"looplm train --out {out / 'run'} --resume"
    assert advice in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_loop", real_loop)
    assert main(advice.split()[1:] + ["--no-progress"]) == 0
    assert (out / "run" / "checkpoints" / "step_0000003").is_dir()


# 5. lm-eval task paths.

@pytest.fixture
def task_directory(tmp_path, monkeypatch):
    """The test task YAMLs copied to tmp_path/tasks, run from tmp_path (so their relative data
    paths miss), datasets cached under tmp_path and lm-eval's slow environment report skipped."""
    pytest.importorskip("lm_eval")
    import datasets
    import lm_eval.evaluator

    shutil.copytree(LM_EVAL_TASKS, tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    return Path("tasks")


def test_lm_eval_task_data_relative_to_another_directory_is_one_line(checkpoint, task_directory, capsys):
    error = one_line_error(["lm-eval", checkpoint, "--tasks", "looplm_choice", "--include-path", task_directory,
                            "--device", "cpu", "--limit", "2"], capsys)
    assert "choice.jsonl' does not exist" in error and "relative to the current directory" in error, error
    assert f"'{task_directory / 'choice.jsonl'}' exists" in error, error


def test_lm_eval_include_path_that_is_a_file_is_named(checkpoint, task_directory, capsys):
    yaml = task_directory / "looplm_choice.yaml"
    error = one_line_error(["lm-eval", checkpoint, "--tasks", "looplm_choice", "--include-path", yaml,
                            "--device", "cpu", "--limit", "2"], capsys)
    assert f"include path '{yaml}' is a file, not a directory" in error and f"(here '{task_directory}')" in error


# 6. A Hugging Face checkpoint where a looplm one belongs.

def test_an_ouro_checkpoint_names_the_conversion(checkpoint, tmp_path, capsys):
    ouro = tmp_path / "ouro"
    assert main(["convert", "to-ouro", str(checkpoint), str(ouro)]) == 0
    for argv in (["generate", ouro, "--prompt", "hi"], ["eval", ouro, "--task", "binding", "--no-progress"]):
        error = one_line_error(argv, capsys)
        assert "is an Ouro (Hugging Face) checkpoint: convert it with looplm convert ouro SRC DST first" in error
        assert "valid keys" not in error, error
    assert main(["convert", "ouro", str(ouro), str(tmp_path / "converted")]) == 0  # the advice works
    assert main(["generate", str(tmp_path / "converted"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0


def test_another_hugging_face_checkpoint_is_named_as_such(tmp_path, capsys):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 100}))
    error = one_line_error(["generate", llama, "--prompt", "hi"], capsys)
    assert "Hugging Face checkpoint (model_type 'llama'), not a looplm one" in error, error


# 7. An output directory that holds files.

def test_prepare_into_a_non_empty_directory_names_both_overwrite_forms(tmp_path, capsys):
    notes, out = tmp_path / "notes.txt", tmp_path / "out"
    notes.write_text(TEXT)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    error = one_line_error(["prepare", notes, "--out", out], capsys)
    assert "is not empty" in error and "--overwrite on the command line" in error, error
    assert "overwrite=True in Python" in error, error
    assert [path.name for path in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# 8. A damaged training state or source run config: one line, never a crash.

TINY_RUN = ["--model.d_model", "32", "--model.n_heads", "4", "--model.n_core_layers", "1", "--model.loop_steps", "2",
            "--model.max_seq_len", "64", "--train.batch_size", "4", "--train.seq_len", "32", "--train.eval_every",
            "0", "--train.warmup_steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged-state")
    (root / "corpus.txt").write_text(TEXT)
    assert main(["train", "--data", str(root / "corpus.txt"), "--out", str(root / "run"), "--train.steps", "2",
                 *TINY_RUN]) == 0
    return root / "run"


def _damaged_state(run, tmp_path, change):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = next((copy / "checkpoints").glob("step_*")) / "train_state.pt"
    torch.save(change(torch.load(path, weights_only=True)), path)  # the state is tensors and plain values
    return copy


def _mis_shaped_moments(state):
    """AdamW's moments cut to one element: without a check the step writes past them (a segfault)."""
    moments = {index: {key: value[:1].clone() if key != "step" else value for key, value in entry.items()}
               for index, entry in state["optimizer"]["state"].items()}
    return {**state, "optimizer": {**state["optimizer"], "state": moments}}


@pytest.mark.parametrize("change, message", [
    (_mis_shaped_moments, "holds exp_avg of shape (1, 32) (float32) for a parameter of shape (259, 32)"),
    (lambda state: {**state, "torch_rng": torch.zeros(3, dtype=torch.uint8)}, "random generator states are damaged"),
    (lambda state: {**state, "numpy_rng": [1, 2]}, "random generator states are damaged"),
    (lambda state: {**state, "python_rng": (3, (1, 2), None)}, "random generator states are damaged"),
    (lambda state: {**state, "step": -5}, "'step' is negative"),
])
def test_a_damaged_train_state_is_one_line_on_resume(trained_run, tmp_path, capsys, change, message):
    run = _damaged_state(trained_run, tmp_path, change)
    error = one_line_error(["train", "--resume", "--out", run, "--train.steps", "3", "--no-progress"], capsys)
    assert message in error, error


def test_init_from_a_checkpoint_whose_run_config_is_not_a_mapping(checkpoint, tmp_path, capsys):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoint, source)
    (source / "run_config.json").write_text("[1]")
    error = one_line_error(["train", "--init", source, "--data", source / "tokenizer.json", "--out", tmp_path / "out",
                            "--train.steps", "1", "--no-progress"], capsys)
    assert "run_config.json' holds list, not a run config mapping" in error, error
    (source / "run_config.json").write_text("[" * 100_000 + "]" * 100_000)
    error = one_line_error(["train", "--init", source, "--data", source / "tokenizer.json", "--out", tmp_path / "out",
                            "--train.steps", "1", "--no-progress"], capsys)
    assert "is not valid JSON (RecursionError)" in error, error
