"""Mistakes in how a run is configured: config files, seeds, and starting from a checkpoint
(``--init``/``--upcycle``) with data or a model it does not fit.  Each is one line
``looplm: error: …`` and exit status 2, before any work, with the user's files untouched; the
right way round trains with the checkpoint's own tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from looplm.cli import main
from looplm.config import assemble_run_config
from looplm.data.prepare import prepare_corpus
from looplm.data.provenance import tokenizer_digest
from looplm.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from looplm.model import LoopLM

from conftest import one_line_error, tiny_config

TEXT = "the loop runs again and again. " * 200
QUICK = ["--train.batch_size", "2", "--train.seq_len", "16", "--train.eval_every", "0", "--train.steps", "1",
         "--train.warmup_steps", "0", "--no-progress"]
TINY = ["--model.d_model", "32", "--model.n_heads", "4", "--model.n_core_layers", "1", "--model.loop_steps", "2",
        "--model.max_seq_len", "64", *QUICK]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A byte-level and a BPE checkpoint, a text corpus, and that corpus prepared with a char tokenizer."""
    root = tmp_path_factory.mktemp("config-mistakes")
    (root / "corpus.txt").write_text(TEXT)
    torch.manual_seed(0)
    LoopLM(tiny_config(vocab_size=259, max_seq_len=64)).save(root / "byte-ckpt", byte_tokenizer())
    bpe = train_bpe([TEXT], 300)
    LoopLM(tiny_config(vocab_size=bpe.vocab_size, max_seq_len=64)).save(root / "bpe-ckpt", bpe)
    prepare_corpus([str(root / "corpus.txt")], root / "prep-char", tokenizer="char")
    return root


def run_main(argv, capsys) -> tuple[int, str]:
    """``looplm ARGV`` in this process: its exit status and what it wrote to stderr."""
    capsys.readouterr()
    status = main([str(arg) for arg in argv])
    return status, capsys.readouterr().err


def case_init_with_data_prepared_by_another_tokenizer(files, tmp_path):
    return (["train", "--data", files / "prep-char", "--init", files / "byte-ckpt", "--out", tmp_path / "run", *QUICK],
            ["prep-char was prepared with a tokenizer (char", "trained with another tokenizer (byte"])


def case_init_with_an_explicit_tokenizer_of_another_kind(files, tmp_path):
    return (["train", "--data", files / "corpus.txt", "--data.tokenizer", "byte", "--init", files / "bpe-ckpt",
             "--out", tmp_path / "run", *QUICK],
            ["tokenized with 'byte' (byte", "trained with another tokenizer (bpe", "leave out --data.tokenizer"])


def case_upcycle_with_an_explicit_tokenizer_of_another_kind(files, tmp_path):
    return (["train", "--data", files / "corpus.txt", "--data.tokenizer", "byte", "--upcycle", files / "bpe-ckpt",
             "--model.loop_steps", "4", "--out", tmp_path / "run", *QUICK],
            ["tokenized with 'byte' (byte", "trained with another tokenizer (bpe"])


def case_init_from_a_byte_checkpoint_with_data_prepared_by_another(files, tmp_path):
    return (["train", "--data", files / "prep-char", "--data.tokenizer", "byte", "--init", files / "byte-ckpt",
             "--out", tmp_path / "run", *QUICK], ["char"])


def case_init_with_a_preset(files, tmp_path):
    return (["train", "--data", files / "corpus.txt", "--init", files / "byte-ckpt", "--preset", "small", "--out",
             tmp_path / "run", *QUICK],
            ["--preset small asks for another", "d_model 512 instead of 32", "--upcycle"])


def case_init_with_a_config_file_model_section(files, tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  d_model: 64\n")
    return (["train", "--config", tmp_path / "run.yaml", "--data", files / "corpus.txt", "--init", files / "byte-ckpt",
             "--out", tmp_path / "run", *QUICK],
            ["the model section of", "d_model 64 instead of 32"])


def case_config_section_that_is_not_a_mapping(files, tmp_path):
    (tmp_path / "run.yaml").write_text("model: 3\n")
    return (["train", "--task", "binding", "--config", tmp_path / "run.yaml", "--out", tmp_path / "run"],
            ["section 'model'", "must be a mapping", "got int 3"])


def case_negative_train_seed(files, tmp_path):
    return (["train", "--task", "binding", "--train.seed", "-1", "--out", tmp_path / "run"],
            ["train.seed must be in [0, 2**32 - 1", "got -1"])


def case_seed_beyond_32_bits(files, tmp_path):
    return (["train", "--task", "binding", "--train.seed", str(2**32), "--out", tmp_path / "run"],
            ["train.seed must be in [0, 2**32 - 1"])


def case_negative_demo_seed(files, tmp_path):
    return ["demo", "--seed", "-1", "--out", tmp_path / "demo", "--no-progress"], ["train.seed must be in [0"]


def case_config_file_that_is_a_directory(files, tmp_path):
    (tmp_path / "configs").mkdir()
    return (["train", "--config", tmp_path / "configs", "--task", "binding", "--out", tmp_path / "run"],
            ["is a directory", "YAML or JSON config file"])


def case_config_file_that_is_not_yaml(files, tmp_path):
    (tmp_path / "run.yaml").write_text("model: [1,2\n")
    return (["train", "--config", tmp_path / "run.yaml", "--task", "binding", "--out", tmp_path / "run"],
            ["expected ',' or ']'", "at line 2, column 1", "started at line 1, column 8"])


def case_config_file_with_a_misplaced_colon(files, tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  steps: 3: 4\n")
    return (["train", "--config", tmp_path / "run.yaml", "--task", "binding", "--out", tmp_path / "run"],
            ["mapping values are not allowed here at line 2, column 11"])


def case_training_settings_out_of_range(files, tmp_path):
    bad = ["--train.stage2_k", "-1", "--train.threads", "100000"]  # an inverted gate target; OpenMP crashed
    return ["train", "--task", "binding", "--out", tmp_path / "run", *TINY, *bad], ["train.stage2_k must be > 0"]


def case_too_many_threads(files, tmp_path):
    return ["train", "--task", "binding", "--out", tmp_path / "run", *TINY, "--train.threads", "100000"], \
        ["train.threads must be at most 1024"]


def case_a_negative_final_entropy_weight(files, tmp_path):
    return ["train", "--task", "binding", "--out", tmp_path / "run", *TINY, "--train.entropy_beta_final", "-5"], \
        ["train.entropy_beta_final must be >= 0"]


def case_an_astronomical_batch(files, tmp_path):  # a torch overflow traceback
    return ["train", "--task", "binding", "--out", tmp_path / "run", *TINY, "--train.batch_size", "10" + "0" * 29], \
        ["train.batch_size must be <= 16777216"]


def case_a_bpe_vocabulary_beyond_any_model(files, tmp_path):  # the tokenizer trainer aborted the process
    return ["prepare", files / "corpus.txt", "--out", tmp_path / "p", "--tokenizer", "bpe", "--vocab-size",
            "4294967296"], ["more than a model takes"]


def case_a_zero_bpe_vocabulary(files, tmp_path):  # it had silently become 4096
    return ["prepare", files / "corpus.txt", "--out", tmp_path / "p", "--tokenizer", "bpe", "--vocab-size", "0"], \
        ["BPE vocab_size 0 is too small"]


def case_a_default_exit_out_of_its_range(files, tmp_path):  # trained, exported, then refused at generate
    return ["train", "--task", "binding", "--out", tmp_path / "run", *TINY, "--model.default_exit", "q:2"], \
        ["model.default_exit 'q:2': q must be in [0, 1]"]


def case_more_default_steps_than_a_decoder_runs(files, tmp_path):
    return ["train", "--task", "binding", "--out", tmp_path / "run", *TINY, "--model.max_loop_steps", "100"], \
        ["which is at most 8, got 1, 100"]


def case_rope_tables_beyond_memory(files, tmp_path):  # MLA's own rope dims: 2^20 x 2^16 floats, 256 GiB a table
    return ["train", "--task", "binding", "--out", tmp_path / "run", *TINY, "--model.max_seq_len", "1048576",
            "--model.attention", "mla", "--model.mla_rope_dim", "65536"], \
        ["max_seq_len x RoPE dims = 1048576 x 65536 is more than 2^28", "256 GiB each",
         "lower max_seq_len or mla_rope_dim"]


CASES = {name[len("case_"):]: function for name, function in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_config_mistake_is_one_line_and_exit_2(name, files, tmp_path, capsys):
    argv, words = CASES[name](files, tmp_path)
    before = {path: path.read_bytes() for root in (files, tmp_path) for path in root.rglob("*") if path.is_file()}
    line = one_line_error(argv, capsys)
    for word in words:
        assert word in line, line
    after = {path: path.read_bytes() for root in (files, tmp_path) for path in root.rglob("*") if path.is_file()}
    assert after == before  # nothing written, nothing the user had changed
    assert "drop the --model.*" not in line


def saved_tokenizer(run_dir) -> Tokenizer:
    return Tokenizer.from_file(sorted((run_dir / "checkpoints").glob("step_*"))[-1])


def test_init_tokenizes_text_with_the_checkpoints_tokenizer(files, tmp_path, capsys):
    status, err = run_main(["train", "--data", files / "corpus.txt", "--init", files / "bpe-ckpt", "--out",
                            tmp_path / "run", *QUICK], capsys)
    assert status == 0, err
    expected = Tokenizer.from_file(files / "bpe-ckpt")
    assert tokenizer_digest(saved_tokenizer(tmp_path / "run")) == tokenizer_digest(expected)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["data"]["tokenizer"] == str(files / "bpe-ckpt" / "tokenizer.json")


def test_init_from_a_byte_checkpoint_records_the_byte_tokenizer_by_name(files, tmp_path, capsys):
    status, err = run_main(["train", "--data", files / "corpus.txt", "--init", files / "byte-ckpt", "--out",
                            tmp_path / "run", *QUICK], capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["data"]["tokenizer"] == "byte"


def test_prepared_data_without_a_tokenizer_trains_with_its_own(files, tmp_path, capsys):
    status, err = run_main(["train", "--data", files / "prep-char", "--out", tmp_path / "run", *TINY], capsys)
    assert status == 0, err
    assert saved_tokenizer(tmp_path / "run").kind == "char"
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["data"]["tokenizer"] == str(files / "prep-char" / "tokenizer.json")


def test_a_saved_byte_default_with_prepared_data_resumes_with_the_directorys_tokenizer(files):
    saved = {"model": {}, "train": {}, "data": {"path": str(files / "prep-char"), "tokenizer": "byte"}}
    run, _ = assemble_run_config(saved=saved)
    assert run.data.tokenizer == str(files / "prep-char" / "tokenizer.json")
