"""Weight-only int8 quantisation (Q8_0 blocks) for CPU inference.

Format (GGUF's Q8_0 layout): a weight W [N, K] (``nn.Linear``: N outputs, K inputs) is cut
into blocks of 32 along K.  Per block b of row n

    s[n, b] = max_i |W[n, 32b + i]| / 127,     q[n, 32b + i] = round(W[n, 32b + i] / s[n, b]) ∈ [−127, 127]

and W ≈ s·q, so every element is off by at most s/2 (half a quantisation step).  Values are
int8 [N, K], scales float32 [N, K/32]: 8.5 bits per weight instead of 32.  GGUF stores s as
float16; a Q8_0 tensor read from a .gguf file keeps its exact int8 values and scales here.

``Int8Linear`` computes y = x Wᵀ + bias two ways:
- ``reference_forward``: dequantise W to float32, then ``F.linear`` (the definition);
- ``forward``: for up to ``KERNEL_MAX_ROWS`` rows of x on the CPU (batch-1 decode) the C kernel
  (``looplm.kernels.ops.q8_matmul``), reading a quarter of the bytes a float32 matvec reads;
  more rows (prefill) are compute-bound and go through the reference (one dequantisation, then
  BLAS).  The kernel's input is chosen by ``activations``:
  - ``float``: the int8 weights are widened to float32 in registers (the reference's products
    summed in another order);
  - ``int8``: each row of x is quantised to Q8_0 too (per block of 32, d = max|x_b|/127, as the
    weights are) and the block sums are int8 × int8 dot products — VNNI ``vpdpbusd`` where the
    CPU has it, llama.cpp's Q8_0 × Q8_0 scheme.  Rounding x adds at most
    |Δy_n| ≤ Σ_b (d_b/2)·Σ_{i∈b} |W_ni| (docs/INTEROP.md);
  - ``auto`` (the default): ``int8`` where the kernel's int8 path uses VNNI (avx512_vnni,
    avx_vnni), else ``float``.
The ``native`` decode backend runs int8 layer projections inside its fused layer kernel too,
with the same choice.
torch's own int8 CPU ops (``torch._weight_int8pack_mm``, ``torch._int_mm``) measured 5–9×
slower than a float32 matvec on this project's AVX2 CPU, hence the kernel.

``quantize_model`` swaps the model's ``nn.Linear`` layers for ``Int8Linear`` in place.  Kept
in float32: the embedding (a row lookup), the LM head (read once per token, not once per loop
step; tied to the embedding by default), the exit gate and MoE routers (their outputs are
decisions: a flipped exit or expert choice costs more than the memory saved), MoE expert
tensors, norms, biases, and any Linear whose input width is not a multiple of 32.  Ternary
layers (``model.ternary``) are left to ``looplm.ternary.pack_model``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from looplm.errors import LoopLMError
from looplm.kernels import ops
from looplm.model.swap import swap_modules

BLOCK = 32
KERNEL_MAX_ROWS = 4
KEPT_FLOAT = ("head", "exit_gate", "router")
ACTIVATIONS = ("auto", "int8", "float")
VNNI_PATHS = ("avx512_vnni", "avx_vnni")


def check_activations(activations: str) -> str:
    if activations not in ACTIVATIONS:
        raise LoopLMError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    return activations


def int8_activations(activations: str) -> bool:
    """Whether ``activations`` (auto, int8, float) means quantising the input to Q8_0: auto does
    where the kernel's Q8_0 × Q8_0 dot products were compiled to VNNI instructions."""
    if check_activations(activations) == "auto":
        from looplm.kernels.build import simd_paths

        return simd_paths().get("q8_int8") in VNNI_PATHS
    return activations == "int8"


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., K] (K a multiple of 32) → int8 values [..., K] and float32 scales [..., K/32]."""
    if weight.shape[-1] % BLOCK:
        raise LoopLMError(f"Q8_0 needs rows whose length is a multiple of {BLOCK}, got {weight.shape[-1]}")
    blocks = weight.detach().float().reshape(*weight.shape[:-1], -1, BLOCK)
    scales = blocks.abs().amax(dim=-1) / 127.0
    inverse = torch.where(scales == 0, torch.zeros_like(scales), 1.0 / scales)
    values = torch.round(blocks * inverse.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return values.reshape(weight.shape), scales


def dequantize_q8_0(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 values [..., K] and scales [..., K/32] → float32 W [..., K] = s·q."""
    blocks = values.float().reshape(*values.shape[:-1], -1, BLOCK)
    return (blocks * scales.unsqueeze(-1)).reshape(values.shape)


def q8_matmul_reference(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                        x: torch.Tensor) -> torch.Tensor:
    """``looplm.kernels.ops.q8_matmul(..., quantize_input=True)`` with torch ops, in float64 [R, N]: x quantised to
    Q8_0 as the weights are (``quantize_q8_0``), y = Σ_b s_b·d_b·Σ_i w_i·q_i (+ bias)."""
    q, d = quantize_q8_0(x)
    blocks = values.shape[1] // BLOCK
    dots = torch.einsum("rbi,nbi->rnb", q.double().view(len(x), blocks, BLOCK),
                        values.double().view(len(values), blocks, BLOCK))
    y = (dots * scales.double().unsqueeze(0) * d.double().unsqueeze(1)).sum(-1)
    return y if bias is None else y + bias.double()


class Int8Linear(nn.Module):
    """y = x Wᵀ + bias with W stored as Q8_0 blocks (int8 values + a float32 scale per 32)."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 activations: str = "auto"):
        super().__init__()
        self.activations = check_activations(activations)  # "auto" is resolved on use (``quantizes_input``)
        if values.dtype != torch.int8 or values.dim() != 2 or values.shape[1] % BLOCK:
            raise LoopLMError(f"Int8Linear needs int8 values [N, K] with K a multiple of {BLOCK},"
                              f" got {values.dtype} {tuple(values.shape)}")
        if scales.shape != (values.shape[0], values.shape[1] // BLOCK):
            raise LoopLMError(f"Q8_0 scales must have shape {(values.shape[0], values.shape[1] // BLOCK)},"
                              f" got {tuple(scales.shape)}")
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.out_features, self.in_features = values.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "auto") -> "Int8Linear":
        values, scales = quantize_q8_0(linear.weight)
        return cls(values, scales, linear.bias, activations)

    @property
    def quantizes_input(self) -> bool:
        """Whether the kernel quantises x to Q8_0 (int8 × int8 dot products); see ``activations``."""
        return int8_activations(self.activations)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised float32 weight [N, K] (computed on each access, for code that reads it)."""
        return dequantize_q8_0(self.values, self.scales)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantise, then an ordinary float32 linear: the definition of this layer."""
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > KERNEL_MAX_ROWS or not ops.serves(x) or (torch.is_grad_enabled() and x.requires_grad):
            return self.reference_forward(x)
        flat = x.reshape(rows, self.in_features).contiguous()
        out = ops.q8_matmul(self.values, self.scales, self.bias, flat, self.quantizes_input)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None},"
                f" q8_0, activations={self.activations}")


def quantizable(name: str, module: nn.Module) -> bool:
    """An ``nn.Linear`` that ``quantize_model`` turns into int8 (see the module docstring); a
    ternary ``BitLinear`` keeps its own quantisation (looplm.ternary packs it)."""
    from looplm.model.bitlinear import BitLinear

    return (isinstance(module, nn.Linear) and not isinstance(module, BitLinear) and module.in_features % BLOCK == 0
            and not any(part in KEPT_FLOAT for part in name.split(".")))


def quantize_model(model: nn.Module, activations: str = "auto") -> nn.Module:
    """Replace every quantizable ``nn.Linear`` of ``model`` by an ``Int8Linear`` (with
    ``activations``: auto, int8 or float, see the module docstring), in place; returns the model
    in eval mode (int8 weights are for inference: they have no gradients)."""
    swap_modules(model, quantizable, lambda name, module: Int8Linear.from_linear(module, activations))
    return model.eval()


def set_activations(model: nn.Module, activations: str) -> nn.Module:
    """Choose the input form (auto, int8, float) of every ``Int8Linear`` of ``model``; returns it.
    Lets one process time both kernels on the same weights (benchmarks/precision.py)."""
    check_activations(activations)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.activations = activations
    return model


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` holds int8 weights."""
    return any(isinstance(module, Int8Linear) for module in model.modules())
