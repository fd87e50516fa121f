"""Training: objectives, optimiser and schedule, checkpoints, the training loop.

``looplm.train`` is both this package and the documented function
``looplm.train(run, out_dir, resume=False, progress=True)``: Python binds the attribute
``looplm.train`` to this package as soon as any ``looplm.train.*`` module is imported, so a plain
function of that name in ``looplm/__init__.py`` would be shadowed. Instead the package module itself
is callable (its class is swapped for ``_CallablePackage``) and calling it runs
``looplm.train.trainer.train``; ``looplm.train.trainer``, ``looplm.train.objectives`` … stay submodules.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, run, out_dir, resume: bool = False, progress: bool = True, stop_after: int | None = None):
        """Train the model described by ``run`` into ``out_dir``; returns a ``TrainResult``."""
        from looplm.train.trainer import train as run_training

        return run_training(run, out_dir, resume=resume, progress=progress, stop_after=stop_after)


sys.modules[__name__].__class__ = _CallablePackage
