"""Prepared data remembers where it came from: no shard directory is reused for other inputs,
another tokenizer or other options; eval tokenizes into the looplm cache, never the checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch

from looplm import train
from looplm.cli import main
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.data import prepare as prepare_module
from looplm.data.prepare import prepare_corpus, prepared_shards
from looplm.data.provenance import file_digest, tokenizer_digest
from looplm.data.shards import read_meta
from looplm.data.source import open_training_data
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError


def opened_text(data: DataConfig, work_dir) -> str:
    """Everything in the training and validation splits that open_training_data gives, as text."""
    opened = open_training_data(data, 4, 8, 2, work_dir)
    generator = torch.Generator().manual_seed(0)
    inputs, _ = opened.train_batch(16, generator)
    rows = [*inputs.tolist(), *[row for batch, _ in opened.validation for row in batch.tolist()]]
    return "".join(opened.tokenizer.decode(row) for row in rows)


@pytest.fixture
def corpora(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("aaaa " * 400)
    b.write_text("bbbb " * 400)
    return a, b


def test_run_directory_never_reuses_data_prepared_from_other_inputs(corpora, tmp_path):
    a, b = corpora
    run = tmp_path / "run"
    assert "a" in opened_text(DataConfig(path=str(a)), run)
    text = opened_text(DataConfig(path=str(b)), run)  # a rerun (say after a failed run) with other data
    assert "b" in text and "a" not in text


def test_a_rewritten_file_is_tokenized_again(corpora, tmp_path):
    a, _ = corpora
    run = tmp_path / "run"
    opened_text(DataConfig(path=str(a)), run)
    stat = a.stat()
    a.write_text("cccc " * 400)  # same size, and the same mtime as far as the check could know
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    text = opened_text(DataConfig(path=str(a)), run)
    assert "c" in text and "a" not in text


def test_another_tokenizer_or_options_give_another_directory(corpora, tmp_path):
    a, _ = corpora
    run = tmp_path / "run"
    byte = open_training_data(DataConfig(path=str(a)), 4, 8, 1, run)
    bpe = open_training_data(DataConfig(path=str(a), tokenizer="bpe", bpe_vocab_size=300), 4, 8, 1, run)
    assert (byte.tokenizer.kind, bpe.tokenizer.kind) == ("byte", "bpe")
    directories = {path.name for path in (run / "data").iterdir()}
    prepared_shards(str(a), run / "data", val_fraction=0.2)
    prepared_shards(str(a), run / "data", text_field="body")
    assert len({path.name for path in (run / "data").iterdir()} - directories) == 2


def test_the_same_request_reuses_its_directory_even_after_a_touch(corpora, tmp_path, monkeypatch):
    a, _ = corpora
    first = prepared_shards(str(a), tmp_path / "root")
    os.utime(a, ns=(1, 1))
    monkeypatch.setattr(prepare_module, "write_shards", lambda *args, **kwargs: pytest.fail("tokenized again"))
    assert prepared_shards(str(a), tmp_path / "root") == first


def test_a_damaged_prepared_directory_is_rebuilt(corpora, tmp_path):
    a, _ = corpora
    directory = prepared_shards(str(a), tmp_path / "root")
    (directory / "meta.json").write_text("{broken")
    assert prepared_shards(str(a), tmp_path / "root") == directory
    assert read_meta(directory)["provenance"]["source"]["inputs"][0]["path"] == str(a.resolve())


def test_meta_records_source_tokenizer_and_options(corpora, tmp_path):
    a, _ = corpora
    meta = prepare_corpus([str(a)], tmp_path / "shards", val_fraction=0.1, seed=3)
    provenance = meta["provenance"]
    (entry,) = provenance["source"]["inputs"]
    assert entry == {"kind": "file", "path": str(a.resolve()), "bytes": a.stat().st_size,
                     "mtime_ns": a.stat().st_mtime_ns, "sha256": file_digest(a)}
    assert provenance["source"]["text_field"] == "text"
    assert provenance["tokenizer"] == {"spec": "byte"}
    assert provenance["options"] == {"val_fraction": 0.1, "seed": 3}
    assert len(provenance["fingerprint"]) == 64
    assert meta["tokenizer_sha256"] == tokenizer_digest(byte_tokenizer())
    assert read_meta(tmp_path / "shards") == meta


def test_an_old_prepared_directory_still_loads_as_data(corpora, tmp_path):
    a, _ = corpora
    prepare_corpus([str(a)], tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    del meta["provenance"], meta["tokenizer_sha256"]
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    assert "a" in opened_text(DataConfig(path=str(tmp_path / "old")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_prepared_data_from_another_tokenizer_is_refused_in_one_line(corpora, tmp_path):
    a, _ = corpora
    prepare_corpus([str(a)], tmp_path / "bpe-shards", tokenizer="bpe", bpe_vocab_size=300)
    byte_tokenizer().save(tmp_path / "checkpoint")
    data = DataConfig(path=str(tmp_path / "bpe-shards"), tokenizer=str(tmp_path / "checkpoint"))
    with pytest.raises(LoopLMError) as error:
        open_training_data(data, 4, 8, 1)
    assert "another tokenizer (bpe" in str(error.value) and "\n" not in str(error.value)


def test_prepare_refuses_an_output_that_overlaps_an_input(corpora, tmp_path):
    a, _ = corpora
    before = a.read_bytes()
    for inputs, out in (([str(tmp_path)], tmp_path), ([str(tmp_path)], tmp_path / "inside"),
                        ([str(a)], tmp_path)):
        with pytest.raises(LoopLMError, match="overlaps the input"):
            prepare_corpus(inputs, out, overwrite=True)
    assert a.read_bytes() == before


@pytest.fixture
def checkpoint(tmp_path):
    corpus = tmp_path / "train.txt"
    corpus.write_text("hello looped world. " * 300)
    run = RunConfig(ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_core_layers=1, loop_steps=2, max_seq_len=64),
                    TrainConfig(steps=3, batch_size=4, seq_len=32, eval_every=0, warmup_steps=1),
                    DataConfig(path=str(corpus)))
    train(run, tmp_path / "run", progress=False)
    return sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]


def eval_loss(checkpoint, data, report):
    assert main(["eval", str(checkpoint), "--data", str(data), "--json", str(report), "--no-progress"]) == 0
    return json.loads(report.read_text())["loss_by_step"]


def test_eval_reports_each_datas_own_loss_and_leaves_the_checkpoint_alone(checkpoint, tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello looped world. " * 100)
    b.write_text("zyxwvutsrq 0987654321 " * 100)
    before = sorted((path.relative_to(checkpoint), path.stat().st_mtime_ns) for path in checkpoint.rglob("*"))
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path / "cache-1"))
    loss_b_alone = eval_loss(checkpoint, b, tmp_path / "b-alone.json")
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path / "cache-2"))
    loss_a = eval_loss(checkpoint, a, tmp_path / "a.json")
    loss_b = eval_loss(checkpoint, b, tmp_path / "b.json")
    assert loss_b == loss_b_alone and loss_b != loss_a
    assert sorted((path.relative_to(checkpoint), path.stat().st_mtime_ns) for path in checkpoint.rglob("*")) == before
    assert len(list((tmp_path / "cache-2" / "prepared-data").iterdir())) == 2


def test_a_failed_run_leaves_no_data_that_a_rerun_with_other_data_trains_on(corpora, tmp_path):
    a, b = corpora
    b.write_text("bbbb " * 900)  # another size, so the token count tells which data was used
    tiny = ["--model.d_model", "32", "--model.n_heads", "4", "--model.n_core_layers", "1", "--model.loop_steps", "2",
            "--model.max_seq_len", "64", "--train.batch_size", "4", "--train.seq_len", "32", "--train.steps", "1",
            "--train.eval_every", "0", "--train.warmup_steps", "1", "--no-progress"]

    def looplm(*args):
        return subprocess.run([sys.executable, "-m", "looplm", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    failed = looplm("train", "--data", a, "--out", tmp_path / "run", *tiny, "--model.vocab_size", "16")
    assert failed.returncode == 2 and "model.vocab_size" in failed.stderr  # failed after tokenizing a
    rerun = looplm("train", "--data", b, "--out", tmp_path / "run", *tiny)
    assert rerun.returncode == 0, rerun.stderr
    train_tokens = read_meta(prepared_shards(str(b), tmp_path / "elsewhere"))["train_tokens"]
    assert f"{train_tokens:,} training tokens from {b}" in rerun.stderr


def test_a_fresh_run_refuses_the_metrics_of_a_run_killed_before_its_first_save(corpora, tmp_path):
    from looplm.training.trainer import Trainer

    a, b = corpora
    run_dir = tmp_path / "run"
    config = RunConfig(ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_core_layers=1, loop_steps=2,
                                   max_seq_len=64),
                       TrainConfig(steps=2, batch_size=4, seq_len=32, eval_every=0, warmup_steps=1, log_every=1),
                       DataConfig(path=str(a)))
    trainer = Trainer(config, run_dir, progress=False)
    trainer.save = lambda: (_ for _ in ()).throw(KeyboardInterrupt)  # killed before the checkpoint lands
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert metrics and not (run_dir / "checkpoints").exists()
    config.data = DataConfig(path=str(b))
    with pytest.raises(LoopLMError, match="holds the start of a run that saved no checkpoint: pass --overwrite"):
        Trainer(config, run_dir, progress=False)
    assert (run_dir / "metrics.jsonl").read_text() == metrics
