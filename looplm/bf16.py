"""bf16 weights for inference: a model whose projections hold bfloat16 copies of their weights.

Decoding reads every weight once per loop step, so at small batches its speed is the bytes it
reads; bf16 halves them.  ``bf16_weights(model)`` returns a copy of ``model`` that shares every
tensor with it except its ``nn.Linear`` layers, which become ``Bf16Linear``:

    y = bf16(x) · bf16(W)ᵀ + bias      (the products of bf16 values, summed in float32)

Kept float32, as in ``looplm.quant``: the embedding (a row lookup), the exit gate and MoE routers
(their outputs are decisions), norms, biases and every non-Linear tensor — and the head here:
``LoopLM.logits`` reads it as a matrix, so the C kernel (``looplm.kernels``), which reads it
once per token, takes its own bf16 copy (``head_bf16``).  Activations, the KV cache and the
residual stream stay float32.

torch runs ``Bf16Linear`` as a bf16 matmul (oneDNN's bf16 dot products where the CPU has them;
its output is rounded to bf16), the C kernel as ``vdpbf16ps`` or a float32 widening
(``csrc/matvec.h``; its sums stay float32).  The copy is made once per model and reused until
any of the model's parameters changes (training, ``load_state_dict``).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from torch.nn import functional as F

KEPT_FLOAT = ("head", "exit_gate", "router")
_copies: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


class Bf16Linear(nn.Module):
    """y = bf16(x) · Wᵀ + bias with W stored as bfloat16 [N, K]; y in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("bf16_weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.out_features, self.in_features = weight.shape

    @property
    def weight(self) -> torch.Tensor:
        """The bf16 weight widened to float32 [N, K] (computed on each access, for code that reads it)."""
        return self.bf16_weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.bf16_weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bf16"


def converts(name: str, module: nn.Module) -> bool:
    """An ``nn.Linear`` that ``bf16_weights`` stores in bf16 (see the module docstring)."""
    return isinstance(module, nn.Linear) and not any(part in KEPT_FLOAT for part in name.split("."))


def is_bf16(model: nn.Module) -> bool:
    """True when any layer of ``model`` holds bf16 weights."""
    return any(isinstance(module, Bf16Linear) for module in model.modules())


def _signature(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place."""
    return tuple((id(parameter), parameter._version) for parameter in model.parameters())


def bf16_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with bf16 projections, sharing every other tensor with it,
    plus ``head_bf16`` (the head matrix in bf16, for the C kernel).  Cached per model."""
    if is_bf16(model):
        return model
    signature = _signature(model)
    cached = _copies.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared).eval()  # the modules copied, the tensors shared
    for name, module in [(name, module) for name, module in clone.named_modules() if converts(name, module)]:
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent), child, Bf16Linear(module.weight, module.bias))
    if hasattr(clone, "head_weight"):
        clone.register_buffer("head_bf16", clone.head_weight.detach().to(torch.bfloat16).contiguous(),
                              persistent=False)
    _copies[model] = (signature, clone)
    return clone
