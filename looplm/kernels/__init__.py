"""Native code behind one door: the C sources (``csrc/``), their build (``build``), their ctypes
declarations (``bindings``), the row/block operations with their torch references (``ops``) and
the whole-token decode stepper (``native_stepper``).  Nothing outside this package imports
ctypes or calls C."""

from looplm.kernels.build import load_kernel, unavailable_reason

__all__ = ["load_kernel", "unavailable_reason"]
