"""Which float precision runs: float32, or bfloat16 where the hardware multiplies it natively.

bf16 keeps float32's exponent range with 8 significant bits (unit roundoff u = 2⁻⁸), so it
halves the bytes of every weight and activation.  CPUs with bf16 dot-product instructions
(x86 ``avx512_bf16``'s ``vdpbf16ps``, AMX ``amx_bf16``; the ``bf16`` feature on Arm) run a bf16
matmul several times faster than an fp32 one.  Elsewhere torch emulates bf16 arithmetic and a
bf16 matmul crawls (about 1 GFLOP/s on a Zen 1 host against 36 for fp32), so the choice is
made per host, at run time, from the CPU's feature flags (``/proc/cpuinfo``):

- training (``train.precision``): ``bf16`` is ``torch.autocast`` — the matmuls run in bf16 with
  float32 accumulation, while parameters, gradients, optimizer state, the loss, the norms'
  statistics and the exit distribution stay float32 (``without_autocast`` below);
- decoding (``generate(..., dtype=...)``): ``bf16`` is bf16 copies of the weights in the C kernel
  (``looplm.kernels``), chosen when the kernel was compiled with the native bf16 dot product.

``auto`` picks bf16 on CUDA and on CPUs with a native bf16 flag (for training, on models at least
``CPU_BF16_MIN_WIDTH`` wide), float32 elsewhere; every choice carries its reason, which the
trainer logs (``bf16 (auto: avx512_bf16)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from looplm import cpu
from looplm.errors import LoopLMError

PRECISIONS = ("auto", "fp32", "bf16")
# CPU feature flags that make bf16 matmuls native: x86 (/proc/cpuinfo "flags"), Arm ("Features").
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# Below this width CPU bf16 autocast loses: its casts cost more than its smaller matmuls save
# (fp32 / bf16 step time, one thread on an AMX Xeon: 0.83–0.90 at d_model 64, 0.96 at 128,
# 1.08 at 192, 1.4–2.3 at 256).
CPU_BF16_MIN_WIDTH = 256
def native_bf16_flag(flags: frozenset[str] | None = None) -> str | None:
    """The flag that gives this CPU native bf16 matmuls (the first of ``NATIVE_BF16_FLAGS``), or None."""
    flags = cpu.cpu_flags() if flags is None else flags
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


@dataclass(frozen=True)
class Precision:
    """A chosen precision (``fp32`` or ``bf16``) and why it was chosen."""

    name: str
    reason: str

    @property
    def label(self) -> str:
        """e.g. ``bf16 (auto: avx512_bf16)``: what the logs print."""
        return f"{self.name} ({self.reason})"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device_type: str):
        """The context the forward pass runs in: bf16 autocast, or nothing for fp32."""
        if self.name == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def check_precision(requested: str, where: str) -> None:
    if requested not in PRECISIONS:
        raise LoopLMError(f"{where} must be one of {', '.join(PRECISIONS)}, got {requested!r}")


def choose(requested: str, native: str | None, where: str, lacking: str) -> Precision:
    """``requested`` (auto, fp32, bf16) resolved: auto is bf16 when ``native`` (the feature that
    makes bf16 pay here) is not None.  ``lacking`` says why not when it is None."""
    check_precision(requested, where)
    if requested != "auto":
        slow = requested == "bf16" and native is None
        return Precision(requested, f"asked, though {lacking}" if slow else "asked")
    return Precision("bf16", f"auto: {native}") if native else Precision("fp32", f"auto: {lacking}")


def training_precision(requested: str, device: torch.device | str, d_model: int | None = None) -> Precision:
    """``train.precision`` on ``device``: auto is bf16 autocast on CUDA, and on CPUs with a
    native bf16 flag for models of width ``d_model`` ≥ ``CPU_BF16_MIN_WIDTH`` (None: any
    width); float32 elsewhere."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return choose(requested, "CUDA", "train.precision", "")
    if device_type != "cpu":
        return choose(requested, None, "train.precision", f"no bf16 autocast chosen for {device_type}")
    flag = native_bf16_flag()
    if flag is None:
        return choose(requested, None, "train.precision", "this CPU has no " + "/".join(NATIVE_BF16_FLAGS[:2]))
    if d_model is not None and d_model < CPU_BF16_MIN_WIDTH:
        return choose(requested, None, "train.precision", f"d_model {d_model} < {CPU_BF16_MIN_WIDTH}, too narrow"
                      " for bf16 autocast to pay on a CPU")
    return choose(requested, flag, "train.precision", "")


def without_autocast(function, x: torch.Tensor, dtype: torch.dtype):
    """``function(x)``; under autocast, ``function(x.to(dtype))`` with autocast switched off.

    For the parts of a bf16-autocast forward that stay float32: RMSNorm (mean(x²) over
    thousands of bf16 values, and an output that feeds the residual stream) and the exit gate
    (its logits feed the exit distribution's log-space arithmetic and the exit decision)."""
    if not torch.is_autocast_enabled(x.device.type):
        return function(x)
    with torch.autocast(x.device.type, enabled=False):
        return function(x.to(dtype))


def decode_precision(requested: str, batched: bool = False) -> Precision:
    """The weights' precision for decoding (``generate(..., dtype=...)``, ``generate_batch``):
    bf16 means bf16 copies of the projections (``looplm.bf16``).  auto is bf16 where its dot
    products are native: batch-1 decode runs them in the C kernel, so auto asks whether the
    kernel was compiled with ``vdpbf16ps`` (``looplm.kernels.build.simd_paths``); batched decode
    runs in the C kernel's rows where they serve the model and through torch's matmuls elsewhere,
    so auto asks the CPU's flags, as training does (a CPU with them has both)."""
    check_precision(requested, "dtype")
    if requested != "auto":
        return Precision(requested, "asked")
    if batched:
        return choose(requested, native_bf16_flag(), "dtype", "this CPU has no " + "/".join(NATIVE_BF16_FLAGS[:2]))
    from looplm.kernels.build import simd_paths

    path = simd_paths().get("bf16")
    native = "avx512_bf16 in the C kernel" if path == "avx512_bf16" else None
    return choose(requested, native, "dtype", f"the C kernel's bf16 dot product is {path or 'not built'} here")
