"""Figures for language modelling on text: bits per byte, and the depth an exit policy saves.

Bits per byte compare models with different tokenizers (a byte tokenizer, BPE):

    bits/byte = Σ_tokens loss (nats) / (ln 2 · Σ_tokens bytes of the target token)
              = mean loss / ln 2 · tokens / bytes,

over the scored targets of the validation batches (special tokens such as the ``<eos>``
between documents count 0 bytes; ``Tokenizer.token_byte_lengths``).

A model with P prelude, C core and D coda layers applies P + C·e + D layers to a token that
exits at loop step e, so an exit policy with mean exit step ē over T trained steps saves the
share 1 − (P + C·ē + D) / (P + C·T + D) of layer applications.  ``saving_within`` finds, on a
policy's compute-quality curve (``looplm.eval.curves``), the largest such saving whose loss
stays within a relative tolerance of the full-depth loss (static exit at T).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from looplm.eval.curves import IGNORE_INDEX, CurvePoint


def scored_tokens_and_bytes(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                            byte_lengths: list[int]) -> tuple[int, int]:
    """(scored target tokens, the bytes of text they stand for) over (inputs, targets [B, S]) batches."""
    lengths = torch.tensor(byte_lengths, dtype=torch.long)
    tokens = text_bytes = 0
    for _, targets in batches:
        scored = targets[targets != IGNORE_INDEX]
        tokens += scored.numel()
        text_bytes += int(lengths[scored].sum())
    return tokens, text_bytes


def bits_per_byte(mean_loss: float, tokens: int, text_bytes: int) -> float:
    """Mean loss in nats per token turned into bits per byte of text."""
    return mean_loss / math.log(2) * tokens / max(text_bytes, 1)


def layer_applications(config, mean_steps: float) -> float:
    """Layers applied to a token that exits after ``mean_steps`` loop steps (on average)."""
    return config.n_prelude_layers + config.n_core_layers * mean_steps + config.n_coda_layers


def saved_share(config, mean_steps: float) -> float:
    """The share of the full depth's layer applications that exiting at ``mean_steps`` skips."""
    return 1 - layer_applications(config, mean_steps) / layer_applications(config, config.loop_steps)


def saving_within(points: list[CurvePoint], config, tolerance: float = 0.01) -> dict[str, dict]:
    """Per policy, the curve point with the largest saving whose loss is at most (1 + tolerance) × the
    static-T loss: ``{"setting", "mean_steps", "loss", "loss_increase", "saved"}`` (saved 0 when none)."""
    full = next(point.loss for point in points if point.policy == "static" and point.setting == config.loop_steps)
    best: dict[str, dict] = {}
    for point in points:
        if point.loss > full * (1 + tolerance):
            continue
        candidate = {"setting": point.setting, "mean_steps": point.mean_steps, "loss": point.loss,
                     "loss_increase": point.loss / full - 1, "saved": saved_share(config, point.mean_steps)}
        if point.policy not in best or candidate["saved"] > best[point.policy]["saved"]:
            best[point.policy] = candidate
    for policy in dict.fromkeys(point.policy for point in points):
        best.setdefault(policy, {"setting": None, "mean_steps": float(config.loop_steps), "loss": full,
                                 "loss_increase": 0.0, "saved": 0.0})
    return best
