"""Every user mistake gets one line ``looplm: error: …`` on stderr and exit status 2: never a
traceback, never a silent wrong result, and the user's files untouched.

The table below runs each bad input through the command line in this process (``main``); add a
row for every mistake a user reports.  Each row builds what it needs from the ``files`` fixture
(a tiny checkpoint, its GGUF export, a text corpus, prepared shards) and names the words the
error must contain."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from looplm.cli import main
from looplm.data.tokenizer import byte_tokenizer
from looplm.model import LoopLM

from conftest import one_line_error, tiny_config, write_gguf

TINY_TRAIN = ["--model.d_model", "32", "--model.n_heads", "4", "--model.n_core_layers", "1",
              "--model.loop_steps", "2", "--model.max_seq_len", "64", "--train.batch_size", "4",
              "--train.seq_len", "32", "--train.eval_every", "0",
              "--train.warmup_steps", "1", "--train.steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-errors")
    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=259, max_seq_len=64)).eval()
    model.save(root / "ckpt", byte_tokenizer())
    corpus = root / "corpus.txt"
    corpus.write_text("the loop runs again and again. " * 200)
    assert main(["export", "gguf", str(root / "ckpt"), str(root / "model.gguf")]) == 0
    assert main(["prepare", str(corpus), "--out", str(root / "shards")]) == 0
    return root


def copy_of(files, tmp_path, name="ckpt"):
    target = tmp_path / name
    shutil.copytree(files / name, target)
    return target


def rewrite_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def case_config_is_a_list(files, tmp_path):
    ckpt = copy_of(files, tmp_path)
    (ckpt / "config.json").write_text("[1, 2]")
    return ["generate", ckpt, "--prompt", "x"], "config.json"


def case_config_is_null(files, tmp_path):
    ckpt = copy_of(files, tmp_path)
    (ckpt / "config.json").write_text("null")
    return ["eval", ckpt, "--data", files / "corpus.txt"], "config.json"


def case_int64_weights(files, tmp_path):
    ckpt = copy_of(files, tmp_path)
    weights = load_file(ckpt / "model.safetensors")
    weights = {name: tensor.to(torch.int64) for name, tensor in weights.items()}
    save_file(weights, ckpt / "model.safetensors")
    return ["generate", ckpt, "--prompt", "x"], "not floating point"


def rewrite_gguf(source, target, config_change=None, tokenizer_json=None, first_tensor_type=None):
    """A copy of a looplm GGUF file's config and tensors, damaged as asked."""
    import gguf

    reader = gguf.GGUFReader(source)
    config = json.loads(reader.fields["looplm.config"].contents())
    writer = gguf.GGUFWriter(str(target), "looplm")
    writer.add_uint32("looplm.format_version", reader.fields["looplm.format_version"].contents())
    writer.add_string("looplm.config", json.dumps(config_change(config) if config_change else config))
    if tokenizer_json is not None:
        writer.add_string("tokenizer.huggingface.json", tokenizer_json)
    for index, tensor in enumerate(reader.tensors):
        data = np.array(tensor.data)
        writer.add_tensor(tensor.name, data.astype(first_tensor_type) if index == 0 and first_tensor_type else data)
    return write_gguf(writer, target)


def case_gguf_with_a_bad_tokenizer(files, tmp_path):
    bad = rewrite_gguf(files / "model.gguf", tmp_path / "bad.gguf", tokenizer_json="{not json")
    return ["generate", bad, "--prompt", "x"], "tokenizer"


def case_gguf_with_an_int32_tensor(files, tmp_path):
    bad = rewrite_gguf(files / "model.gguf", tmp_path / "int.gguf", first_tensor_type=np.int32)
    return ["generate", bad, "--prompt", "x"], "I32"


def case_gguf_with_an_absurd_context(files, tmp_path):
    bad = rewrite_gguf(files / "model.gguf", tmp_path / "huge.gguf", lambda config: {**config, "max_seq_len": 10**12})
    return ["generate", bad, "--prompt", "x"], "max_seq_len"


def case_shard_ids_beyond_the_vocabulary(files, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(files / "shards", shards)
    tokens = np.memmap(shards / "train.bin", dtype=np.uint16, mode="r+")
    tokens[5] = 300  # the byte tokenizer has 259 ids
    tokens.flush()
    return ["train", "--data", shards, "--out", tmp_path / "run", *TINY_TRAIN], "vocabulary"


def _trained_run(files, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(files / "corpus.txt"), "--out", str(run), *TINY_TRAIN]) == 0
    return run


def case_train_state_missing_keys(files, tmp_path):
    run = _trained_run(files, tmp_path)
    state = run / "checkpoints" / "step_0000002" / "train_state.pt"
    torch.save({"step": 2}, state)
    return ["train", "--out", run, "--resume", "--no-progress"], "train_state.pt"


def case_train_state_wrong_types(files, tmp_path):
    run = _trained_run(files, tmp_path)
    state_path = run / "checkpoints" / "step_0000002" / "train_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["step"] = "two"
    torch.save(state, state_path)
    return ["train", "--out", run, "--resume", "--no-progress"], "train_state.pt"


def case_invalid_run_config(files, tmp_path):
    run = _trained_run(files, tmp_path)
    (run / "run_config.json").write_text('{"model": {"d_model": "wide"}}')
    return ["train", "--out", run, "--resume", "--no-progress"], "run_config.json"


def case_device_tpu(files, tmp_path):
    return ["train", "--data", files / "corpus.txt", "--out", tmp_path / "run", *TINY_TRAIN,
            "--train.device", "tpu"], "train.device"


def case_beta1_above_one(files, tmp_path):
    return ["train", "--data", files / "corpus.txt", "--out", tmp_path / "run", *TINY_TRAIN,
            "--train.beta1", "2"], "train.beta1"


def case_weight_decay_nan(files, tmp_path):
    return ["train", "--data", files / "corpus.txt", "--out", tmp_path / "run", *TINY_TRAIN,
            "--train.weight_decay", "nan"], "train.weight_decay"


def case_out_is_a_file(files, tmp_path):
    (tmp_path / "taken").write_text("mine")
    return ["train", "--data", files / "corpus.txt", "--out", tmp_path / "taken", *TINY_TRAIN], "is a file"


def case_absurd_model_size(files, tmp_path):
    return ["train", "--data", files / "corpus.txt", "--out", tmp_path / "run", *TINY_TRAIN,
            "--model.d_model", "4000000", "--model.n_heads", "4"], "parameters"


def case_temperature_nan(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--temperature", "nan"], "temperature"


def case_seed_overflow(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--temperature", "1", "--seed", str(2**70)], "seed"


def case_steps_far_beyond_training(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--steps", "128"], "steps"


def case_eval_json_is_a_directory(files, tmp_path):
    return ["eval", files / "ckpt", "--data", files / "corpus.txt", "--json", tmp_path], "--json"


def case_eval_steps_zero(files, tmp_path):
    return ["eval", files / "ckpt", "--data", files / "corpus.txt", "--steps", "0"], "--steps"


def case_eval_negative_examples(files, tmp_path):
    return ["eval", files / "ckpt", "--task", "binding", "--examples", "-5"], "--examples"


def case_serve_exit_hidden_nan(files, tmp_path):
    return ["serve", files / "ckpt", "--exit", "hidden:nan"], "hidden"


def case_bench_zero_repeats(files, tmp_path):
    return ["bench", "--repeats", "0"], "--repeats"


def case_lm_eval_limit_zero(files, tmp_path):
    return ["lm-eval", files / "ckpt", "--tasks", "x", "--limit", "0"], "--limit"


def case_lm_eval_negative_fewshot(files, tmp_path):
    return ["lm-eval", files / "ckpt", "--tasks", "x", "--num-fewshot", "-2"], "--num-fewshot"


def case_unknown_flag(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--tempreature", "1"], "unrecognized"


def case_missing_required_argument(files, tmp_path):
    return ["generate", files / "ckpt"], "--prompt"


def case_prepare_into_its_own_input(files, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some text " * 100)
    return ["prepare", data, "--out", data, "--overwrite"], "is the input"


def case_convert_into_its_source(files, tmp_path):
    ckpt = copy_of(files, tmp_path)
    return ["convert", "hf", ckpt, ckpt.parent, "--force"], "holds the input"


def case_eval_out_over_the_checkpoint(files, tmp_path):
    ckpt = copy_of(files, tmp_path)
    return ["eval", ckpt, "--data", files / "corpus.txt", "--out", ckpt, "--overwrite"], "is the input"


def case_export_over_its_source(files, tmp_path):
    shutil.copy(files / "model.gguf", tmp_path / "model.gguf")
    return ["export", "gguf", tmp_path / "model.gguf", tmp_path / "model.gguf", "--force"], "is the input"


def case_generate_from_a_missing_checkpoint(files, tmp_path):
    return ["generate", tmp_path / "missing", "--prompt", "x"], "checkpoint"


def case_generate_zero_steps(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--steps", "0"], "steps must be >= 1"


def case_prompt_longer_than_the_context(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x" * 100], "longer than the context"


def case_train_on_an_empty_file(files, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    return ["train", "--data", tmp_path / "empty.txt", "--out", tmp_path / "run", *TINY_TRAIN], "is empty"


def case_train_on_a_binary_file(files, tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"\x80\x81 not utf-8")
    return ["train", "--data", tmp_path / "binary.txt", "--out", tmp_path / "run", *TINY_TRAIN], "not UTF-8"


def case_config_file_with_an_unknown_key(files, tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  loop_stepz: 3\n")
    return ["train", "--config", tmp_path / "bad.yaml", "--data", files / "corpus.txt", "--out", tmp_path / "run"], \
        "unknown config key model.loop_stepz"


def case_train_into_a_directory_holding_a_run(files, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(files / "ckpt", run / "checkpoints" / "step_0000002")
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 5.0}\n')
    return ["train", "--data", files / "corpus.txt", "--out", run, *TINY_TRAIN], "already holds"


def case_train_into_a_checkpoint_directory(files, tmp_path):
    return ["train", "--data", files / "corpus.txt", "--out", copy_of(files, tmp_path), "--overwrite", *TINY_TRAIN], \
        "which no run writes"


def case_eval_json_over_an_existing_file(files, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return ["eval", files / "ckpt", "--task", "binding", "--examples", "4", "--json", tmp_path / "notes.txt"], \
        "pass --overwrite"


def case_bench_json_over_an_existing_file(files, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return ["bench", "--json", tmp_path / "notes.txt"], "pass --overwrite"


def case_bench_negative_threads(files, tmp_path):
    return ["bench", "--threads", "-3"], "--threads"


def case_eval_task_options_not_an_object(files, tmp_path):
    return ["eval", files / "ckpt", "--task", "binding", "--task-options", "[1, 2]"], "JSON object"


def case_export_a_q_exit_threshold_above_one(files, tmp_path):
    return ["export", "gguf", files / "ckpt", tmp_path / "q.gguf", "--exit", "q:2"], "q must be in [0, 1]"


def case_export_more_steps_than_decoders_run(files, tmp_path):
    return ["export", "gguf", files / "ckpt", tmp_path / "m.gguf", "--max-steps", "100"], \
        "--max-steps 100: model.min_loop_steps must be >= 1 and at most model.max_loop_steps"


def case_export_min_steps_beyond_the_depth(files, tmp_path):
    return ["export", "gguf", files / "ckpt", tmp_path / "m.gguf", "--exit", "q:0.5", "--min-steps", "5"], \
        "--exit q:0.5 --min-steps 5: model.min_loop_steps must be >= 1 and at most"


def case_generate_min_steps_beyond_the_depth(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--q", "0.5", "--min-steps", "99"], "min_steps (99) exceeds"


def case_serve_on_a_busy_port(files, tmp_path):
    pytest.importorskip("fastapi")
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    tmp_path.joinpath("port").write_text(str(busy.getsockname()[1]))
    case_serve_on_a_busy_port.held = busy  # held open while the command runs
    return ["serve", files / "ckpt", "--port", busy.getsockname()[1]], "Address already in use"


def case_lm_eval_on_cuda_without_cuda(files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["lm-eval", files / "ckpt", "--tasks", "x", "--device", "cuda"], "CUDA is not available"


def case_serve_an_absurd_batch(files, tmp_path):  # it started, then answered every request with 503
    pytest.importorskip("fastapi")
    return ["serve", files / "ckpt", "--max-batch", "100000000"], "--max-batch must be in [1, 1024]"


def case_serve_a_negative_standby(files, tmp_path):
    pytest.importorskip("fastapi")
    return ["serve", files / "ckpt", "--standby", "-2"], "--standby must be in [0, 1024]"


def case_serve_waiting_for_ever_to_batch(files, tmp_path):  # it started, then no request was ever answered
    pytest.importorskip("fastapi")
    return ["serve", files / "ckpt", "--batch-wait-ms", "1e30"], "--batch-wait-ms must be in [0, 10000]"


def case_serve_context_beyond_the_model(files, tmp_path):
    pytest.importorskip("fastapi")
    return ["serve", files / "ckpt", "--max-context", "100000"], "--max-context must be in [1, 64]"


def case_generate_from_a_runs_checkpoints_folder(files, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(files / "ckpt", run / "checkpoints" / "step_0000002")
    return ["generate", run / "checkpoints", "--prompt", "x"], "give the run directory"


def case_generate_perplexity_exit_infinite(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--exit-ppl", "inf"], "finite number > 0"


def case_prepare_vocab_size_for_a_tokenizer_without_one(files, tmp_path):
    return ["prepare", files / "corpus.txt", "--out", tmp_path / "out", "--tokenizer", "word", "--vocab-size", "5"], \
        "--vocab-size sets the size of a BPE tokenizer"


def case_prepare_the_same_input_twice(files, tmp_path):
    return ["prepare", files / "corpus.txt", files / "corpus.txt", "--out", tmp_path / "out"], "more than once"


def case_eval_json_under_a_file(files, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return ["eval", files / "ckpt", "--task", "binding", "--json", tmp_path / "notes.txt" / "r.json"], "is a file"


def case_bench_json_under_a_file(files, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return ["bench", "--json", tmp_path / "notes.txt" / "b.json"], "is a file"


def case_prepare_into_an_empty_path(files, tmp_path):
    return ["prepare", files / "corpus.txt", "--out", ""], "output path is empty"


def case_an_abbreviated_option(files, tmp_path):
    return ["generate", files / "ckpt", "--prompt", "x", "--max-new", "3"], "unrecognized arguments: --max-new"


def case_eval_steps_far_beyond_training(files, tmp_path):
    return ["eval", files / "ckpt", "--task", "binding", "--steps", "1000"], "steps must be at most"


def case_train_out_under_a_file(files, tmp_path):
    return ["train", "--data", files / "corpus.txt", "--out", files / "corpus.txt" / "run", *TINY_TRAIN], \
        "not a directory"


def case_eval_an_infinite_epsilon_grid(files, tmp_path):  # it had been refused only after the evaluation ran
    return ["eval", files / "ckpt", "--task", "binding", "--epsilon-grid", "0.1,inf"], "finite and >= 0"


def case_eval_astronomically_many_examples(files, tmp_path):  # it ran until killed
    return ["eval", files / "ckpt", "--task", "binding", "--examples", "1" + "0" * 30], "--examples must be in [1"


CASES = {name[len("case_"):]: function for name, function in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_user_mistake_is_one_line_and_exit_2(name, files, tmp_path, capsys):
    argv, words = CASES[name](files, tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    line = one_line_error(argv, capsys)
    assert words.lower() in line.lower(), line
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path in before}
    assert after == before  # nothing the user had was changed or deleted


@pytest.mark.parametrize("writer", ["export", "prepare", "train", "eval-out", "eval-json", "convert"])
def test_a_full_disk_is_one_line_naming_the_path(writer, files, tmp_path, capsys, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    argv = {"export": ["export", "gguf", files / "ckpt", tmp_path / "out.gguf"],
            "prepare": ["prepare", files / "corpus.txt", "--out", tmp_path / "out"],
            "train": ["train", "--data", files / "corpus.txt", "--out", tmp_path / "out", *TINY_TRAIN],
            "eval-out": ["eval", files / "ckpt", "--data", files / "corpus.txt", "--no-progress", "--out",
                         tmp_path / "out"],
            "eval-json": ["eval", files / "ckpt", "--data", files / "corpus.txt", "--no-progress", "--json",
                          tmp_path / "out.json"],
            "convert": ["convert", "hf", files / "ckpt", tmp_path / "out"]}[writer]
    if writer.startswith("eval"):  # tokenize the evaluation data first: the report is the writer under test
        assert main([str(arg) for arg in argv[:5]]) == 0
    monkeypatch.setattr("looplm.checkpoint.atomic.os.fsync", no_space)
    capsys.readouterr()
    status = main([str(arg) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "free some disk space" in err and str(tmp_path / "out") in err
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]  # no staging left behind


def test_no_new_tokens_and_a_prompt_filling_the_context_are_not_mistakes(files, capsys):
    """--max-new-tokens 0, and a prompt that fills the context exactly, generate nothing (they were
    refused as not fitting the batch)."""
    from looplm.data.tokenizer import byte_tokenizer

    full = "x" * (64 - len(byte_tokenizer().encode_prompt("")))
    assert len(byte_tokenizer().encode_prompt(full)) == 64
    for argv in (["--prompt", "ab", "--max-new-tokens", "0"], ["--prompt", full], ["--prompt", full, "--prompt", "ab"]):
        capsys.readouterr()
        assert main(["generate", str(files / "ckpt"), "--no-stream", *argv]) == 0, capsys.readouterr().err
        if argv == ["--prompt", full]:  # said, not silent
            assert "the prompt fills the model's context of 64 tokens" in capsys.readouterr().err


def test_eval_reads_the_tokenizer_a_gguf_file_carries(files, capsys):
    """``looplm eval FILE.gguf`` tokenizes with the tokenizer inside the file (it had read the file
    itself as a tokenizer.json)."""
    for data in (["--task", "binding", "--examples", "8"], ["--data", str(files / "corpus.txt")]):
        capsys.readouterr()
        assert main(["eval", str(files / "model.gguf"), "--no-progress", *data]) == 0, capsys.readouterr().err


def test_options_a_generation_would_not_use_warn_in_one_line(files, capsys):
    """Sampling options at temperature 0, --modulo-slots without the modulo layout and --compile on
    another backend change nothing: each is named in one warning line (not dropped without a word)."""
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("looplm ")
    for options, words in ((["--top-k", "5", "--seed", "1"], "--top-k, --seed only matter when sampling"),
                           (["--modulo-slots", "3"], "--modulo-slots applies to --layout modulo only"),
                           (["--compile", "--backend", "reference"], "--compile compiles the torch backend")):
        capsys.readouterr()
        assert main(["generate", str(files / "ckpt"), "--prompt", "x", "--max-new-tokens", "1", *options]) == 0
        warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("looplm: warning:")]
        assert len(warned) == 1 and words in warned[0], warned
    capsys.readouterr()
    assert main(["eval", str(files / "ckpt"), "--task", "binding", "--examples", "4", "--no-progress",
                 "--kl-grid", "0.1"]) == 0
    assert "looplm: warning: --kl-grid sets the KL sweep, which runs with --kl only" in capsys.readouterr().err


def test_a_file_that_cannot_be_read_or_written_is_one_line(files, tmp_path, capsys, monkeypatch):
    """An OSError on a file the user named (no permission: root reads anything, so it is raised here
    as a non-root user meets it) is one line naming the file; output to a closed pipe ends quietly."""
    from looplm import cli
    from looplm.checkpoint import directory

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(directory, "model_config_from_json", denied)
    line = one_line_error(["generate", files / "ckpt", "--prompt", "x"], capsys)
    assert "Permission denied" in line and "config.json" in line and "check the permissions" in line

    def closed(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setitem(cli.HANDLERS, "generate", closed)
    assert main(["generate", str(files / "ckpt"), "--prompt", "x"]) == 141
    assert capsys.readouterr().err == ""


def test_a_full_disk_under_safetensors_is_one_line(files, tmp_path, capsys, monkeypatch):
    """safetensors reports a failed write as its own error ending "(os error 28)": one line too."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    line = one_line_error(["convert", "hf", files / "ckpt", tmp_path / "out"], capsys)
    assert "No space left on device" in line and "free some disk space" in line
    assert not (tmp_path / "out").exists() and not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]
