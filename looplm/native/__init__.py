"""Native (C) fast paths, compiled on first use; see ``build.py`` and ``stepper.py``."""

from looplm.native.build import load_kernel, unavailable_reason
from looplm.native.stepper import NativeStepper, native_unsupported

__all__ = ["NativeStepper", "load_kernel", "native_unsupported", "unavailable_reason"]
