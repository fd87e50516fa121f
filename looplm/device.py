"""Which torch device a user's device name means: ``auto`` (or nothing) is CUDA where present,
else the CPU; any other name is torch's, refused in one line when torch does not know it or when
it names CUDA on a machine without one (rather than failing later, deep in torch)."""

from __future__ import annotations

import logging

import torch

from looplm.errors import LoopLMError

log = logging.getLogger("looplm")


def resolve_device(device, what: str = "device", instead: str = "use the cpu",
                   cuda_falls_back: bool = False) -> torch.device:
    """``device`` (a name, a torch.device, None or "auto") as a torch.device.  ``what``/``instead``
    name the option and the fix in the error line; ``cuda_falls_back``: a CUDA device on a machine
    without one means the CPU, with a warning (lm-eval's own default is cuda:0)."""
    name = "auto" if device in (None, "", "auto") else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except (RuntimeError, TypeError):
        raise LoopLMError(f"unknown {what} {name!r}: use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        if cuda_falls_back:
            log.warning("%s %s asked for but CUDA is not available: running on the CPU", what, name)
            return torch.device("cpu")
        raise LoopLMError(f"{what} {name!r}: CUDA is not available here; {instead}")
    return resolved
