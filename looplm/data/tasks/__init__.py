"""Synthetic reasoning tasks generated from a seed.

Depth-bound tasks: multi-hop binding, p-hop induction, multi-digit addition, modular arithmetic
on expression trees (``modarith``, and ``mano`` with the Ouro paper's settings); a knowledge
capacity probe, ``capo``.  ``make_task("binding", hops=6)`` builds a task by name;
``TaskBatches`` turns one into reproducible training batches and held-out evaluation sets.
"""

from looplm.data.tasks.addition import AdditionTask
from looplm.data.tasks.base import TASKS, Example, Task, make_task, split_of
from looplm.data.tasks.batches import IGNORE_INDEX, EvalSet, TaskBatches, encode_example
from looplm.data.tasks.binding import BindingTask
from looplm.data.tasks.capo import CapoTask
from looplm.data.tasks.mano import ManoTask
from looplm.data.tasks.modarith import ModArithTask, evaluate
from looplm.data.tasks.phop import PHopTask

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "AdditionTask",
    "BindingTask",
    "CapoTask",
    "EvalSet",
    "Example",
    "ManoTask",
    "ModArithTask",
    "PHopTask",
    "Task",
    "TaskBatches",
    "encode_example",
    "evaluate",
    "make_task",
    "split_of",
]
