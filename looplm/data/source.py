"""One interface over every kind of training data: prepared shards, raw text, a built-in task.

``open_training_data`` returns a ``TrainingData`` with the tokenizer, a reproducible
``train_batch(batch_size, generator)`` (inputs, targets [B, S], −100 = no loss), fixed
validation batches, and for tasks a held-out exact-match set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from looplm.config import FITTED_TOKENIZERS, DataConfig
from looplm.errors import LoopLMError
from looplm.file_names import META_FILE, TOKENIZER_FILE


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
                        None, f"{len(train):,} training tokens from {data.path}", train.meta.get("corpus_bytes"))


def text_shards(data: DataConfig, work_dir: Path | None, seed: int = 0) -> Path:
    """The shard directory holding ``data.path`` tokenized as ``data`` asks.

    A prepared directory (one with meta.json) is used as it is, after checking that its ids
    come from ``data.tokenizer`` (``check_prepared_tokenizer``).  Anything else (files,
    directories of them, ``hf:`` names) is tokenized once per request into
    ``work_dir/data/<fingerprint>`` (``looplm.data.prepare.prepared_shards``), or under the
    looplm cache (``$LOOPLM_CACHE/prepared-data``) without a ``work_dir``.
    """
    from looplm.cache_dir import cache_path
    from looplm.data.prepare import prepared_shards

    shard_dir = prepared_directory(data)
    if shard_dir is not None:
        check_prepared_tokenizer(shard_dir, data)
        return shard_dir
    root = work_dir / "data" if work_dir is not None else cache_path("prepared-data")
    return prepared_shards(data.path, root, data.tokenizer, data.bpe_vocab_size, data.val_fraction, seed,
                           data.text_field)


def prepared_directory(data: DataConfig) -> Path | None:
    """The directory ``data.path`` names when it is a prepared one (``looplm prepare``: it holds
    meta.json), else None."""
    from looplm.data.hub import HubSpec

    if not data.path or HubSpec.names(data.path):
        return None
    path = Path(data.path)
    return path if path.is_dir() and (path / META_FILE).is_file() else None


def check_prepared_tokenizer(shard_dir: Path, data: DataConfig) -> None:
    """Refuse, in one line, a prepared directory whose ids do not come from ``data.tokenizer``: a
    tokenizer file must be the very tokenizer; bpe, word, char or auto (fitted to the text) must
    be of that kind; "byte", the default, means the directory's own (what training reads; a
    checkpoint to start from is checked against it by the trainer)."""
    from looplm.data.prepare import check_tokenizer
    from looplm.data.tokenizer import Tokenizer, load_tokenizer

    own = f", or use the directory's own with --data.tokenizer {shard_dir / TOKENIZER_FILE}"
    if data.tokenizer == "byte":  # the default: the directory's own tokenizer, as training reads it
        return
    if data.tokenizer not in FITTED_TOKENIZERS:
        check_tokenizer(shard_dir, load_tokenizer(data.tokenizer), data.tokenizer, own)
        return
    found = Tokenizer.from_file(shard_dir)
    if found.kind not in (("char", "word") if data.tokenizer == "auto" else (data.tokenizer,)):
        raise LoopLMError(f"'{shard_dir}' was tokenized with a {found.kind} tokenizer (vocab {found.vocab_size}),"
                          f" not {data.tokenizer}: give the raw text to fit a {data.tokenizer} tokenizer to it{own}")
