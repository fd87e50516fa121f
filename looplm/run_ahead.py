"""Running ahead: the iterations a stepper's ``exit_step`` call may run by itself, and what it ran.

Where a whole iteration of decode rows is one C call (``looplm.kernels.native_stepper``), the call
can go on to the next iteration as long as every row done with a token may take its greedy token
at once; ``looplm.scheduler.Scheduler.iterate`` says how far (``RunAhead``) and books what ran
(``RanAhead``), and ``looplm.generate.BatchSession`` emits the tokens taken so.  Rows waiting for a
place in the batch (their first token fed) may come along: a row whose request ends in the call
(its last token greedy, taken there) hands its place to the next of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunAhead:
    """How far an ``exit_step`` call may run on by itself: while every row done with a token can
    take its greedy token at once, the stepper feeds it back and runs the next iteration.  Per row
    of the call: ``left``, the tokens it may still take so (0: none, e.g. a sampled row; a row's
    budget less the token that ends it), and ``final``, whether the token after those ends its
    request (so the row may take it too where a waiting row takes its place, or with ``leave``
    without one: its place closes); ``standby``: the last rows of the call wait (each enters, with
    its fed token, in the place of a row whose request ended); ``stop_ids``: tokens that end a row
    (left to the caller); at most ``iterations`` iterations and about ``seconds``."""

    left: list[int]
    final: list[bool]
    standby: int
    leave: bool
    stop_ids: list[int]
    iterations: int
    seconds: float


@dataclass
class RanAhead:
    """What an ``exit_step`` call ran: the tokens it fed back, for each row of the call that took
    any, as (row of the call, its tokens, the steps each one's decision used) in order, and the
    row of each token in the order they were taken; the rows whose requests ended (their last
    token among those fed back); its iterations, those with rows at different steps; how many
    iterations each row ran; the row at each place of the batch after the call, and the loop step
    and position there as the last iteration read them."""

    fed: list[tuple[int, list[int], list[int]]]
    order: list[int]
    ended: list[int]
    iterations: int
    mixed: int
    applied: list[int]
    at: list[int]
    steps: list[int]
    positions: list[int]
