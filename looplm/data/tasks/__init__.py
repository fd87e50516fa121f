"""Synthetic reasoning tasks generated from a seed: multi-hop binding and modular arithmetic.

``make_task("binding", hops=6)`` builds a task by name; ``TaskBatches`` turns one into
reproducible training batches and held-out evaluation sets.
"""

from looplm.data.tasks.base import TASKS, Example, Task, make_task, split_of
from looplm.data.tasks.batches import IGNORE_INDEX, EvalSet, TaskBatches, encode_example
from looplm.data.tasks.binding import BindingTask
from looplm.data.tasks.modarith import ModArithTask, evaluate

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "BindingTask",
    "EvalSet",
    "Example",
    "ModArithTask",
    "Task",
    "TaskBatches",
    "encode_example",
    "evaluate",
    "make_task",
    "split_of",
]
