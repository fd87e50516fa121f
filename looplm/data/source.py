"""One interface over every kind of training data: prepared shards, raw text, a built-in task.

``open_training_data`` returns a ``TrainingData`` with the tokenizer, a reproducible
``train_batch(batch_size, generator)`` (inputs, targets [B, S], −100 = no loss), fixed
validation batches, and for tasks a held-out exact-match set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from looplm.config import DataConfig
from looplm.errors import LoopLMError


@dataclass
class TrainingData:
    tokenizer: object
    seq_len: int
    train_batch: object
    validation: list[tuple[torch.Tensor, torch.Tensor]]
    eval_set: object | None = None
    description: str = ""
    corpus_bytes: int | None = None  # UTF-8 size of the text the shards came from (model.auto_size)


def open_training_data(data: DataConfig, batch_size: int, seq_len: int, eval_batches: int,
                       work_dir: Path | None = None, seed: int = 0) -> TrainingData:
    if data.task:
        return _task_data(data, batch_size, eval_batches, seed)
    if data.path:
        return _text_data(data, batch_size, seq_len, eval_batches, work_dir, seed)
    raise LoopLMError("no training data: give --data FILE (text, jsonl or a prepared shard directory) or --task NAME")


def _task_data(data: DataConfig, batch_size: int, eval_batches: int, seed: int) -> TrainingData:
    from looplm.data.tasks import TaskBatches, make_task
    from looplm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data.tokenizer)
    task = make_task(data.task, **data.task_options)
    batches = TaskBatches(task, tokenizer, split="train", seed=seed)
    validation_stream = TaskBatches(task, tokenizer, split="test", seed=seed + 1)
    generator = torch.Generator().manual_seed(seed + 12345)
    validation = [validation_stream.batch(batch_size, generator) for _ in range(max(eval_batches, 1))]
    eval_set = batches.eval_set(max(eval_batches, 1) * batch_size, seed=seed + 2)
    return TrainingData(tokenizer, batches.seq_len, batches.batch, validation, eval_set,
                        f"task {data.task} {data.task_options or ''}".strip())


def _text_data(data: DataConfig, batch_size: int, seq_len: int, eval_batches: int,
               work_dir: Path | None, seed: int) -> TrainingData:
    from looplm.data.shards import TokenShards

    path = Path(data.path)
    prepared = (work_dir or Path(".")) / "data"
    if path.is_dir() and (path / "meta.json").is_file():
        shard_dir = path
    elif (prepared / "meta.json").is_file():
        shard_dir = prepared  # this run's tokenized copy, made on its first start (resume, other ranks)
    else:
        shard_dir = prepare_shards(data, prepared, seed)
    from looplm.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(shard_dir)
    train = TokenShards(shard_dir, "train")
    validation_split = TokenShards(shard_dir, "val")
    window = min(seq_len, len(validation_split) - 1)
    if window < 1:
        raise LoopLMError(f"the validation split of {str(shard_dir)!r} is too small: give more text")
    validation = list(validation_split.sequential_batches(batch_size, window))[:max(eval_batches, 1)]
    return TrainingData(tokenizer, seq_len, lambda b, g: train.random_batch(b, seq_len, g), validation,
                        None, f"{len(train):,} training tokens from {data.path}", train.meta.get("corpus_bytes"))


def prepare_shards(data: DataConfig, out_dir: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Tokenize data.path (text/jsonl files or a directory) into shards in out_dir, with the
    tokenizer ``build_tokenizer`` makes of ``data.tokenizer``.  An existing shard directory from
    an earlier run is reused.
    """
    from looplm.data.shards import read_documents, read_meta, write_shards

    out_dir = Path(out_dir)
    if (out_dir / "meta.json").is_file() and not overwrite:
        read_meta(out_dir)
        return out_dir
    tokenizer = build_tokenizer(data.tokenizer, lambda: read_documents([data.path]), data.bpe_vocab_size)
    write_shards(read_documents([data.path]), tokenizer, out_dir, val_fraction=data.val_fraction,
                 seed=seed, overwrite=overwrite)
    return out_dir


def build_tokenizer(spec: str, documents: Callable[[], Iterable[str]], bpe_vocab_size: int = 4096):
    """The tokenizer ``spec`` names: "byte", "bpe" (trained on ``documents()``, ``bpe_vocab_size``),
    "word", "char" or "auto" (fitted to ``documents()``: ``looplm.data.word_char``), or a
    tokenizer.json path.  ``documents`` is called only when the corpus is needed."""
    from looplm.data.tokenizer import load_tokenizer, train_bpe
    from looplm.data.word_char import KINDS, fit_tokenizer

    if spec == "bpe":
        return train_bpe(documents(), bpe_vocab_size)
    if spec in KINDS:
        return fit_tokenizer(spec, documents())[0]
    return load_tokenizer(spec)
