"""One interface over every kind of training data: prepared shards, raw text, a built-in task.

``open_training_data`` returns a ``TrainingData`` with the tokenizer, a reproducible
``train_batch(batch_size, generator)`` (inputs, targets [B, S], −100 = no loss), fixed
validation batches, and for tasks a held-out exact-match set.
"""

from __future__ import annotations

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
    from looplm.data.tokenizer import Tokenizer

    shard_dir = text_shards(data, work_dir, seed)
    tokenizer = Tokenizer.from_file(shard_dir)
    train = TokenShards(shard_dir, "train")
    validation_split = TokenShards(shard_dir, "val")
    window = min(seq_len, len(validation_split) - 1)
    if window < 1:
        raise LoopLMError(f"the validation split of {str(shard_dir)!r} is too small: give more text")
    validation = list(validation_split.sequential_batches(batch_size, window))[:max(eval_batches, 1)]
    return TrainingData(tokenizer, seq_len, lambda b, g: train.random_batch(b, seq_len, g), validation,
                        None, f"{len(train):,} training tokens from {data.path}")


def text_shards(data: DataConfig, work_dir: Path | None, seed: int = 0) -> Path:
    """The shard directory holding ``data.path`` tokenized as ``data`` asks.

    A prepared directory (one with meta.json) is used as it is, after checking that its ids
    come from ``data.tokenizer`` when that names a tokenizer file.  Anything else (files,
    directories of them, ``hf:`` names) is tokenized once per request into
    ``work_dir/data/<fingerprint>`` (``looplm.data.prepare.prepared_shards``), or under the
    looplm cache (``$LOOPLM_CACHE/prepared-data``) without a ``work_dir``.
    """
    from looplm.cache_dir import cache_path
    from looplm.data.hub import HubSpec
    from looplm.data.prepare import check_tokenizer, prepared_shards
    from looplm.data.tokenizer import load_tokenizer

    path = Path(data.path)
    if not HubSpec.names(data.path) and path.is_dir() and (path / "meta.json").is_file():
        if data.tokenizer not in ("byte", "bpe"):
            check_tokenizer(path, load_tokenizer(data.tokenizer), data.tokenizer)
        return path
    root = work_dir / "data" if work_dir is not None else cache_path("prepared-data")
    return prepared_shards(data.path, root, data.tokenizer, data.bpe_vocab_size, data.val_fraction, seed,
                           data.text_field)
