"""Automatic model size from the corpus size (model.auto_size, lrnnSMDDS's tiers): the tier edges
for char and word corpora, what the trainer builds and saves, and the one-line refusals."""

import json

import pytest

from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.training.auto_size import apply_auto_size, auto_sizes
from looplm.training.trainer import Trainer


@pytest.mark.parametrize("corpus_bytes, kind, layers, width, heads, hidden, context, rank, slots", [
    (4_999, "char", 2, 64, 2, 96, 64, 4, 2),
    (5_000, "char", 4, 128, 4, 256, 128, 8, 4),
    (24_999, "word", 2, 64, 2, 96, 64, 4, 2),      # 4,999.8 effective bytes
    (25_000, "word", 4, 128, 4, 256, 128, 8, 4),
    (499_999, "byte", 6, 256, 8, 640, 256, 16, 4),
    (2_499_999, "word", 6, 256, 8, 640, 256, 16, 4),
    (2_500_000, "word", 8, 384, 12, 1152, 512, 32, 8),
])
def test_tiers(corpus_bytes, kind, layers, width, heads, hidden, context, rank, slots):
    assert auto_sizes(corpus_bytes, kind) == dict(n_core_layers=layers, d_model=width, n_heads=heads,
                                                   ffn_hidden=hidden, rwkv_decay_rank=rank, rwkv_slots=slots,
                                                   max_seq_len=context)


def test_apply_keeps_the_family_and_derives_the_rest_again():
    config = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, layer_pattern="R", ffn="channelmix", loop_steps=1,
                         auto_size=True, exit_gate=False)
    sized = apply_auto_size(config, 30_000, "char", seq_len=200)
    assert ((sized.d_model, sized.n_heads, sized.n_kv_heads, sized.n_core_layers, sized.ffn_hidden)
            == (128, 4, 4, 4, 256))
    assert (sized.layer_pattern, sized.ffn.kind, sized.loop_steps, sized.auto_size) == ("R", "channelmix", 1, False)
    assert sized.max_seq_len == 200  # the trained windows must fit: longer than the tier's 128
    with pytest.raises(LoopLMError, match="needs text data"):
        apply_auto_size(config, None, "byte", 16)


def test_trainer_builds_and_saves_the_automatic_size(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a looped model reads the same layers again. " * 80)  # 3,600 bytes: the first tier
    run = RunConfig(ModelConfig(d_model=32, n_heads=4, loop_steps=1, exit_gate=False, auto_size=True),
                    TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=0, log_every=1, eval_batches=1),
                    DataConfig(path=str(corpus), tokenizer="auto"))
    trainer = Trainer(run, tmp_path / "run", progress=False, fit_vocab=True)
    config = trainer.model.config
    assert (config.d_model, config.n_core_layers, config.n_heads, config.max_seq_len) == (64, 2, 2, 64)
    assert trainer.tokenizer.kind == "char" and config.vocab_size == trainer.tokenizer.vocab_size
    trainer.train()
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())["model"]
    assert saved["d_model"] == 64 and saved["auto_size"] is False


def test_auto_size_refuses_task_data(tmp_path):
    run = RunConfig(ModelConfig(auto_size=True), TrainConfig(steps=1, batch_size=2, eval_every=0),
                    DataConfig(task="binding"))
    with pytest.raises(LoopLMError, match="model.auto_size sizes the model from the corpus"):
        Trainer(run, tmp_path / "run", progress=False)


def test_lrnn_recipe_from_the_command_line(tmp_path, capsys):
    """lrnnSMDDS's own recipe: the faithful preset, the auto tokenizer and the automatic size."""
    from looplm.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the slot memory reads before it writes, and the decay forgets. " * 400)  # 25,600 bytes
    assert main(["train", "--data", str(corpus), "--preset", "lrnn", "--out", str(tmp_path / "run"),
                 "--data.tokenizer", "auto", "--model.auto_size", "true", "--train.steps", "2",
                 "--train.batch_size", "2", "--train.seq_len", "16", "--train.eval_every", "0",
                 "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())["model"]
    # word tokenizer: 25,600 / 5 = 5,120 effective bytes, the second tier; the family stays lrnn's
    assert (saved["d_model"], saved["n_core_layers"], saved["norm_type"], saved["loop_steps"]) == (128, 4, "layer", 1)
