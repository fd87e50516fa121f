"""Replacing submodules in place: what int8 quantisation, ternary layers and ternary packing do
to a built model."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def swap_modules(root: nn.Module, pick: Callable[[str, nn.Module], bool],
                 build: Callable[[str, nn.Module], nn.Module]) -> int:
    """Replace every submodule of ``root`` that ``pick(name, module)`` selects by
    ``build(name, module)``, in place; returns how many were replaced."""
    targets = [(name, module) for name, module in root.named_modules() if name and pick(name, module)]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, build(name, module))
    return len(targets)
