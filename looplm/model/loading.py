"""Models from checkpoints: build a ``LoopLM`` from what a format stored (``LoopLM.save`` writes one).

The formats themselves (directory, GGUF) live in ``looplm.checkpoint`` and deal in configs and
tensors; here the stored tensors are checked against the model their config builds (names and
shapes, one line per mismatch), assigned without copying, Q8_0 weights optionally kept as
``Int8Linear`` layers, and packed ternary weights kept as ``TernaryLinear`` layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from looplm.checkpoint.formats import read_model, read_tokenizer
from looplm.checkpoint.stored import StoredModel, first_missing_layer, meta_model, warn_non_finite
from looplm.errors import LoopLMError
from looplm.model.lm import LoopLM
from looplm.model.swap import swap_modules

KEPT_FLOAT = ("exit_gate", "router")  # decisions, not projections: never rounded
NOISE_TABLE = "noise.table"


def matrix_names(model: nn.Module) -> set[str]:
    """Embedding and Linear weights (exit gate and routers excepted): what int8 formats quantise."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding)) and not set(name.split(".")) & set(KEPT_FLOAT)}


def derived_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors a runtime needs that the state dict leaves out because looplm rebuilds them: the
    eval-time noise table of ``initial_state=noise`` (drawn from torch's seeded generator, which
    other runtimes cannot replay; the C runtime reads it).  GGUF files carry them in float32;
    ``build_model`` skips them, since the model rebuilds its own."""
    noise = getattr(model, "noise", None)
    return {NOISE_TABLE: noise.table} if noise is not None else {}


def build_model(stored: StoredModel, device: str | torch.device = "cpu", int8: bool = False) -> LoopLM:
    """The ``LoopLM`` of ``stored``: its config's model with the stored tensors assigned.

    Every name the model needs must be stored and nothing else, each with the model's shape.
    Non-finite weights load, with a warning.  ``int8``: Linear layers become
    ``looplm.quant.Int8Linear``, from the stored Q8_0 blocks where there are some."""
    source = str(stored.source)
    config = stored.config
    for stack, count in (("prelude", config.n_prelude_layers), ("core", config.n_core_layers),
                         ("coda", config.n_coda_layers)):
        index = first_missing_layer(stored.weights, f"{stack}.", count)
        if index is not None:
            raise LoopLMError(f"{source!r} holds no tensors of layer {stack}.{index}, which its config's"
                              f" n_{stack}_layers={count} needs: the file is incomplete or does not match its config")
    model = meta_model(lambda: LoopLM(config), repr(source))
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    derived = set(derived_tensors(model))
    weights = {name: tensor for name, tensor in stored.weights.items() if name not in derived}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing:
        raise LoopLMError(f"{source!r} lacks tensor {stored.stored_name(missing[0])!r} ({missing[0]}): the file is"
                          " incomplete or does not match its config")
    if unexpected:
        raise LoopLMError(f"{source!r} has tensor {stored.stored_name(unexpected[0])!r}, which its config does not use")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != expected[name]:
            raise LoopLMError(f"{source!r}: tensor {stored.stored_name(name)!r} has shape {tuple(tensor.shape)}, the"
                              f" config needs {expected[name]}")
    warn_non_finite(weights, f"{source!r} holds non-finite weights", stored.stored_name)
    model.load_state_dict(weights, assign=True)
    model.rebuild_derived_buffers(device)
    model.eval()
    if stored.ternary:
        _ternary_layers(model, stored.ternary)
    if int8:
        _int8_layers(model, stored.int8)
    return model


def _int8_layers(model: LoopLM, blocks: dict) -> None:
    """Swap quantizable Linears for Int8Linear, from the stored Q8_0 blocks where there are some."""
    from looplm.quant import Int8Linear, quantizable

    def build(name: str, module: nn.Module) -> nn.Module:
        stored = blocks.get(f"{name}.weight")
        return Int8Linear(*stored, module.bias) if stored is not None else Int8Linear.from_linear(module)

    swap_modules(model, quantizable, build)


def _ternary_layers(model: LoopLM, codes: dict) -> None:
    """Swap the layers stored as packed ternary codes for ``TernaryLinear`` with those exact codes."""
    from looplm.ternary import TernaryLinear

    swap_modules(model, lambda name, module: f"{name}.weight" in codes,
                 lambda name, module: TernaryLinear.from_codes(*codes[f"{name}.weight"], module.bias))


def load_model(path: str | Path, device: str | torch.device = "cpu", int8: bool = False) -> LoopLM:
    """Rebuild a LoopLM from a checkpoint directory, a run directory (its newest checkpoint) or a
    .gguf file written by ``looplm export gguf``; one-line errors for every broken file (an Ouro
    checkpoint's names the conversion: ``looplm.config.assemble.model_config_from_json``)."""
    return build_model(read_model(path, device), device, int8)


def load_checkpoint_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint (or inside a .gguf file), or None."""
    return read_tokenizer(path)
