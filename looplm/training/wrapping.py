"""The one place that wraps a model for training, from outside it, in this order:

1. **activation checkpointing** (``train.activation_checkpointing``): every loop step
   (``LoopLM.core_step``: the core layers with what enters them) and every coda layer keeps only
   its inputs in the forward and recomputes its activations in backward — memory for compute,
   the same gradients (a looped layer runs T times per forward, so this is where activations
   pile up).  A whole step is the unit because it sets the step a ``LoopCarry`` reads;
2. **compilation** (``train.compile``): ``torch.compile`` of the model's forward, in place
   (``nn.Module.compile``: parameter names and the checkpoint format are unchanged);
3. **data parallelism** (``train.parallel``): DDP around the model, or FSDP2 sharding each layer
   and then the model (``looplm.training.distributed``).

The model itself knows nothing of any of them: ``LoopLM.forward`` is the plain loop.  Build the
optimiser after wrapping (under FSDP it holds the shards).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_layers(model) -> None:
    """Recompute each loop step and each coda layer in backward (when gradients are on; a plain
    call otherwise, as in decoding)."""
    model.core_step = functools.partial(_checkpointed, type(model).core_step.__get__(model))
    for layer in model.coda:
        layer.forward = functools.partial(_checkpointed, type(layer).forward.__get__(layer))


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def wrap_for_training(model, config, dist) -> torch.nn.Module:
    """``model`` wrapped as ``config`` (a ``TrainConfig``) asks, in the documented order; returns
    the module to run forward through (the model itself unless DDP wraps it)."""
    if config.activation_checkpointing:
        checkpoint_layers(model)
    if config.compile:
        model.compile()
    return dist.wrap(model)
