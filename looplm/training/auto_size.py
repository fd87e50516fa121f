"""Automatic model size from the corpus size (``model.auto_size``; lrnnSMDDS's rule).

The effective size is the corpus's UTF-8 bytes, divided by 5 for the word tokenizer (about
five bytes per word); it picks a tier:

| effective bytes | layers | d_model | context T | decay rank | FFN × d | slots |
|---|---|---|---|---|---|---|
| < 5,000 | 2 | 64 | 64 | 4 | 1.5 | 2 |
| < 50,000 | 4 | 128 | 128 | 8 | 2.0 | 4 |
| < 500,000 | 6 | 256 | 256 | 16 | 2.5 | 4 |
| otherwise | 8 | 384 | 512 | 32 | 3.0 | 8 |

with n_heads = max(2, d_model / 32).  The tier sets ``n_core_layers``, ``d_model``,
``n_heads``, ``ffn_hidden`` (⌊d · multiple⌋), ``rwkv_decay_rank``, ``rwkv_slots`` and
``max_seq_len`` (T, or ``train.seq_len`` when that is longer: the trained windows must fit);
the sizes derived from them (``n_kv_heads``, ``expert_hidden``, …) are derived again.  Every
other key (the family, loop steps, vocabulary) stays as configured.
"""

from __future__ import annotations

from looplm.config import DERIVED_SIZES, ModelConfig
from looplm.errors import LoopLMError

# (effective bytes below, layers, d_model, context, decay rank, FFN multiple, slots)
TIERS = ((5_000, 2, 64, 64, 4, 1.5, 2), (50_000, 4, 128, 128, 8, 2.0, 4), (500_000, 6, 256, 256, 16, 2.5, 4),
         (None, 8, 384, 512, 32, 3.0, 8))
WORD_BYTES = 5


def auto_sizes(corpus_bytes: int, tokenizer_kind: str) -> dict:
    """The ModelConfig sizes the tier of a corpus of ``corpus_bytes`` chooses (``max_seq_len`` = T)."""
    effective = corpus_bytes / (WORD_BYTES if tokenizer_kind == "word" else 1)
    for below, layers, width, context, rank, multiple, slots in TIERS:
        if below is None or effective < below:
            return dict(n_core_layers=layers, d_model=width, n_heads=max(2, width // 32),
                        ffn_hidden=int(width * multiple), rwkv_decay_rank=rank, rwkv_slots=slots, max_seq_len=context)
    raise AssertionError("the last tier has no bound")


def apply_auto_size(config: ModelConfig, corpus_bytes: int | None, tokenizer_kind: str, seq_len: int) -> ModelConfig:
    """``config`` with the automatic sizes (see the module docstring) and ``auto_size`` off, so
    the saved config states the sizes chosen."""
    if corpus_bytes is None:
        raise LoopLMError("model.auto_size sizes the model from the corpus: it needs text data prepared by this"
                          " looplm (shards record their corpus size); give --data FILE or prepare the shards again")
    sizes = auto_sizes(corpus_bytes, tokenizer_kind)
    sizes["max_seq_len"] = max(sizes["max_seq_len"], seq_len)
    values = {key: value for key, value in config.to_dict().items() if key not in DERIVED_SIZES}
    values.update(sizes, auto_size=False)
    return ModelConfig(**values)
