"""The depth scheduler: the one exit loop of every decode path, over rows at their own loop steps.

Each slot of a ``KVCache`` holds one sequence (a ``Row``), left-aligned (positions from 0, its
own length).  ``admit`` prefills a prompt at full depth into its slot (every depth's cache must
hold it); ``feed`` queues its next token.  One ``iterate`` applies the core once to every running
row, each at its OWN loop step, position and cache slot: fed rows enter at step 1; the rows whose
policy reads every step (or at their last step) are read out and each policy decides for its rows
(``looplm.exit_policy``; ACT accumulates); a row whose exit fires leaves at once — the layout
fills the steps it skipped, its logits are computed — and its next token enters step 1 in the
next iteration beside rows still deep in theirs.  Under the ``full`` layout (and for a prompt's
last token) a row runs every step and the exit only picks the readout.  So every weight read
serves every running row and a skipped step is wall time saved.  A stepper that runs a whole
token in one call (``whole_token``) takes the rows it can (batch 1, static or Q-exit, its
layouts); one that runs a whole iteration in one call (``exit_step``) takes the iterations whose
rows all exit by Q-exit or at a fixed depth, and, given ``RunAhead`` (``looplm.run_ahead``), runs
on through the next iterations while every row done with a token takes its greedy token at once.
The rows' loop states and prelude outputs live in per-slot tables (``h``, ``e`` [B, D]) like the
decision state.  ``layer_applications`` counts the core and coda layers each row ran for its
decoded tokens (prefill excluded).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from looplm.cache import KVCache
from looplm.errors import LoopLMError
from looplm.exit_policy import (
    ACTExit,
    ExitPolicy,
    Signal,
    act_accumulate,
    check_depth,
    readout_perplexity,
    refuse_act_over_mixing,
)
from looplm.model.exit import hidden_change, readout_kl
from looplm.run_ahead import RunAhead
from looplm.steppers import Rows, make_stepper


def check_token_ids(ids, vocab_size: int, name: str = "the prompt") -> list[int]:
    """``ids`` as a list of ints, each a token id of the vocabulary [0, vocab_size), or one line
    saying what is wrong (an id past the embedding would be read out of bounds by the C paths)."""
    try:
        values = [operator.index(token) for token in ids]
    except TypeError:
        raise LoopLMError(f"{name} must be a sequence of token ids (ints), got {type(ids).__name__} holding"
                          f" {type(next(iter(ids), None)).__name__}: encode text with the tokenizer first") from None
    if values and not (0 <= min(values) and max(values) < vocab_size):
        bad = next(token for token in values if not 0 <= token < vocab_size)
        raise LoopLMError(f"{name} holds the token id {bad}, outside the model's vocabulary [0, {vocab_size}): use"
                          " the tokenizer the model was trained with")
    return values


RUN_AHEAD_ITERATIONS = 1 << 16  # the most iterations one exit_step call may run on by itself (else its seconds)
RUN_AHEAD_TOKENS = 1024  # the most tokens a row takes in one call (more than its seconds allow: it bounds the buffer)


@dataclass(eq=False)
class Row:
    """One sequence in a scheduler slot and its current token."""

    slot: int
    policy: ExitPolicy
    max_steps: int
    act_threshold: float | None
    position: int                       # the position of the token fed next
    whole_token: bool = False           # the stepper may run its tokens in one call
    threshold: float | None = None      # its Q-exit threshold (None: no gate read)
    plain_exit: bool = False            # Q-exit or fixed depth: a fused iteration may run it
    min_steps: int = 1                  # its policy's (the fused iteration reads it per row)
    new: bool = True                    # admitted, not yet in the batch (it waits for a place)
    token: int | None = None            # fed, waiting to enter
    step: int = 0                       # loop steps its token has run
    exit_step: int | None = None        # the step its exit fired (a full-depth token runs on)
    full_depth: bool = False            # this token runs every step
    logit_rows: torch.Tensor | None = None  # the logits its last finished token came with ([V], or [n, V]:
    logit_place: int | None = None          # its row is logit_place, read when ``logits`` is asked for)
    greedy: int | None = None           # their argmax
    greedy_logit: float | None = None   # the logit there, where the stepper gave it (greedy sampling checks
                                        # it is finite without reading the logits)
    steps: int = 0                      # the loop steps that token's decision used
    layer_applications: int = 0         # core + coda layers run for its decoded tokens
    full_depth_applications: int = 0    # the same tokens at full depth

    @property
    def logits(self) -> torch.Tensor | None:
        """[V] of its last finished token."""
        return self.logit_rows if self.logit_place is None else self.logit_rows[self.logit_place]

    @logits.setter
    def logits(self, value: torch.Tensor | None) -> None:
        self.logit_rows, self.logit_place, self.greedy_logit = value, None, None


class Scheduler:
    """Rows of one cache (``rows`` slots of ``max_len`` positions, ``max_steps`` loop steps deep,
    one ``layout``) decoding together through one stepper (``looplm.steppers``), at most ``width``
    of them in an iteration (default all): the others wait, prefilled, for a place."""

    def __init__(self, model, rows: int, max_len: int, max_steps: int, layout: str = "last_exited",
                 modulo_slots: int = 2, backend: str = "reference", compile_steps: bool = False, dtype: str = "fp32",
                 width: int | None = None):
        self.width = width or rows
        parameter = next(model.parameters())
        self.model, self.device = model, parameter.device
        config = model.config
        self.cache = KVCache(config, rows, max_len, max_steps, device=self.device, dtype=parameter.dtype,
                             layout=layout, modulo_slots=modulo_slots)
        # dtype: the weights (``make_stepper``); self.model is then the model the stepper reads (bf16: a copy).
        self.stepper, self.backend, self.model, self.precision = make_stepper(backend, model, self.cache,
                                                                              compile_steps, dtype)
        self.whole_tokens = (self.stepper.whole_token is not None
                             and layout in getattr(self.stepper, "whole_token_layouts", ()))
        # A stepper may give the logits and their argmax in one call (``logits_argmax``), and run a
        # whole iteration of Q-exit / fixed-depth rows in one call (``exit_step``, its layouts).
        self.logits_argmax = getattr(self.stepper, "logits_argmax", None)
        self.exit_step = (self.stepper.exit_step if getattr(self.stepper, "exit_step", None) is not None
                          and self.cache.layout in self.stepper.exit_step_layouts else None)
        # ... which also enters the fed rows (their embedding rows) where the stepper says so.
        self.embeds_in_exit_step = self.exit_step is not None and getattr(self.stepper, "exit_step_embeds", False)
        self.dense_readout = bool(model.coda) and layout in ("first", "avg")  # the coda's K/V of every step
        self.core_layers, self.per_step = config.n_core_layers, config.n_core_layers + config.n_coda_layers
        self.free = list(range(rows))
        self.running: list[Row] = []
        self.pending: list[Row] = []
        self.h = self.e = None           # every slot's loop state and prelude output [B, D] (by cache row)
        self.tables: dict[str, torch.Tensor] = {}  # per-slot decision state
        self.iterations = self.mixed_depth_iterations = self.exit_step_iterations = 0
        # the tokens the last iterate fed back itself (RunAhead): (row, its tokens, their steps), the
        # row of each token in the order taken, and the rows whose requests those tokens ended
        self.fed: list[tuple[Row, list[int], list[int]]] = []
        self.fed_order: list[Row] = []
        self.ended: list[Row] = []

    @property
    def active(self) -> bool:
        return bool(self.running or self.pending)

    def admit(self, prompt: list[int], policy: ExitPolicy, prefix_cache=None) -> Row:
        """Prefill ``prompt`` at full depth into a free slot; the returned row holds the prompt's
        last logits and exit steps, ready to be fed its next token."""
        config = self.model.config
        prompt = check_token_ids(prompt, config.vocab_size)
        check_depth(policy, config.loop_steps)
        max_steps = policy.max_steps(config.loop_steps)
        self.cache.check_steps(max_steps)
        if policy.needs_gate and self.model.exit_gate is None:
            raise LoopLMError("Q-exit and ACT need a model with an exit gate: use fixed steps")
        if not 0 < len(prompt) <= self.cache.max_len or not self.free:
            raise LoopLMError(f"a prompt of {len(prompt)} tokens does not fit: {len(self.free)} free rows of"
                              f" {self.cache.max_len} positions")
        if isinstance(policy, ACTExit):
            refuse_act_over_mixing(self.model)
        act = (policy.threshold or config.act_threshold) if isinstance(policy, ACTExit) else None
        plain = policy.signal in (Signal.NONE, Signal.GATE) and act is None
        row = Row(self.free.pop(0), policy, max_steps, act, len(prompt), self.whole_tokens and plain,
                  policy.threshold if policy.signal is Signal.GATE else None, plain_exit=plain,
                  min_steps=getattr(policy, "min_steps", 1))
        try:
            if prefix_cache is None and getattr(self.stepper, "prefill_rows", None) is not None \
                    and self.stepper.prefills_rows(len(prompt)):  # the stepper's own forward (C rows)
                readouts = self.stepper.prefill_rows(list(prompt), row.slot, max_steps, self.cache.row(row.slot))
                self._replay(row, readouts, head=self.stepper)
                return row
            if prefix_cache is None and row.whole_token and self.stepper.prefills_tokens(len(prompt), max_steps):
                self.stepper.prefill_tokens(prompt[:-1], max_steps)  # the last token decides on its way
                row.position = len(prompt) - 1
                self.feed(row, prompt[-1], full_depth=True)
                self.finish_token(row)
                row.layer_applications = row.full_depth_applications = 0
                return row
            view = self.cache.row(row.slot)
            ids = torch.tensor([list(prompt)], device=self.device)
            with torch.no_grad():
                output = (prefix_cache.prefill(self.model, list(prompt), view, max_steps) if prefix_cache is not None
                          else self.model(ids, steps=max_steps, cache=view))
            # act_mixing: the gate read the loop state, not the readout; its logits per step
            gates = [gate[0, -1:] for gate in output.gate_logits] if config.act_mixing else None
            self._replay(row, [readout[0, -1:] for readout in output.hidden_states], gates)
        except BaseException:
            self.free.append(row.slot)
            raise
        return row

    def _replay(self, row: Row, readouts: list[torch.Tensor], gates: list[torch.Tensor] | None = None,
                head=None) -> None:
        """The prompt's exit decision from its last position's readouts at every step (the same
        ``_decide`` as decoding); ``gates``: the gate logits per step where the gate did not read
        the readout (model.act_mixing); ``head``: what gives gate logits and logits (the model, or
        the stepper whose forward ran the prompt)."""
        head = head or self.model
        chosen = readouts[-1]
        if row.threshold is not None and gates is None and getattr(head, "q_exit_replay", None) is not None:
            # Q-exit in the stepper's one call, where it decides Q-exit rows itself (exit_step, held
            # equal to decide by tests); the next token starts from no survival
            ran = head.q_exit_replay(torch.cat(readouts), row.min_steps, row.threshold)
            if ran < len(readouts):
                row.exit_step, chosen = ran, readouts[ran - 1]
        else:
            self._reset([row])
            for step, readout in enumerate(readouts):
                row.step = step
                if gates is not None:
                    self._table("mixing_gate")[row.slot] = gates[step]
                if self._decide([row], readout, head)[0]:
                    row.exit_step, chosen = step + 1, readout
                    break
        if row.act_threshold is not None:
            chosen = self.tables["act_state"][row.slot:row.slot + 1]
            row.exit_step = int(self.tables["halting"][row.slot])
        if getattr(head, "logits_argmax", None) is not None:  # one call
            logits, greedy = head.logits_argmax(chosen)
            row.logits, row.greedy = logits[0], greedy[0]
        else:
            row.logits = head.logits(chosen)[0]
            row.greedy = int(row.logits.argmax())
        row.steps = row.exit_step or row.max_steps

    def feed(self, row: Row, token: int, full_depth: bool = False) -> None:
        """Queue ``token`` as the row's next token (it enters at the next ``iterate``); the caller
        has checked it (a sampled id is in the vocabulary; ``Decoder.step`` checks what it is
        given) and that the row has room for it (``position < cache.max_len``)."""
        row.token, row.full_depth = token, full_depth
        self.pending.append(row)

    def release(self, row: Row) -> None:
        """Free the row's slot, even in the middle of a token."""
        if row in self.pending:
            self.pending.remove(row)
        if row in self.running:
            self.running = [other for other in self.running if other is not row]
        self.free.append(row.slot)

    def finish_token(self, row: Row) -> None:
        """Iterate until ``row``'s fed token is decoded (batch 1: nothing else runs)."""
        while row.token is not None or row in self.running:
            self.iterate()

    def iterate(self, feeds: Callable[[list[Row]], list[int]] | None = None, stop_ids: Collection[int] = (),
                seconds: float = 0.0, admitting: bool = True) -> list[Row]:
        """One core step of every running row (entering the fed ones first), or several when it runs
        ahead; returns the rows whose token finished, with their ``logits``, ``greedy`` and ``steps``
        (a row that took its next token in the call is pending with it instead).  ``feeds``: how many
        tokens each of the rows may still take without its caller, the one that ends its request
        included (a greedy row: its remaining budget; 0: none): where the stepper runs whole
        iterations (``exit_step``), it runs on for up to ``seconds`` while every row done with a
        token may take its greedy token, not one of ``stop_ids`` (``RunAhead``).  The tokens it took
        so, before the finished rows returned, are in ``fed`` as (row, its tokens, their steps), and
        ``fed_order`` gives the row of each in the order taken.  Rows beyond the width wait; such a
        call brings them in where a request ends with a token it took, those rows in ``ended``; with
        no row waiting the ended row leaves and the call runs on, if no request waited for a slot
        when it began (a slot was free, or the caller is no longer ``admitting``)."""
        finished: list[Row] = []
        self.fed, self.fed_order, self.ended = [], [], []
        if self.pending:
            entering, self.pending = self._entering()
            if self.whole_tokens:
                finished = [row for row in entering if row.whole_token and not row.full_depth]
                for row in finished:
                    self._whole_token(row)
                if finished:
                    entering = [row for row in entering if row not in finished]
            if entering and self.embeds_in_exit_step and self._one_call(self.running + entering):
                for row in entering:  # embedded by exit_step, this iteration (row.token goes with it)
                    row.step, row.exit_step = 0, None
                self._tables(self.model.config.d_model)
                self.running = self.running + entering
            elif entering:
                self._enter(entering)
        if not self.running:
            return finished
        running = self.running
        if self.exit_step is not None and self._one_call(running):
            ahead, waiting = None, []
            if feeds is not None and seconds > 0 and self.embeds_in_exit_step:
                # A free slot means no request waited for one when this call began: a row whose
                # request ends in it may then leave (the call runs on) where no waiting row takes its place.
                waiting, leave = self._waiting(), bool(self.free) or not admitting
                remaining = feeds(running + waiting)
                left = [min(max(tokens - 1, 0), RUN_AHEAD_TOKENS) for tokens in remaining]
                final = [(leave or bool(waiting)) and 0 < tokens <= RUN_AHEAD_TOKENS + 1 for tokens in remaining]
                ahead = RunAhead(left, final, len(waiting), leave, list(stop_ids), RUN_AHEAD_ITERATIONS, seconds)
            return finished + self._exit_iteration(running, waiting, ahead)
        rows = Rows([row.slot for row in running], [row.step for row in running], [row.position for row in running])
        self.iterations += 1
        self.mixed_depth_iterations += len(set(rows.steps)) > 1
        slots = rows.tensor("slots", self.device)
        h = self.stepper.core_step(self.h.index_select(0, slots), self.e.index_select(0, slots), rows)
        self.h.index_copy_(0, slots, h)
        reading = [index for index, row in enumerate(running)
                   if row.step + 1 == row.max_steps or row.policy.reads_every_step or self.dense_readout]
        readout = None
        if reading:
            everyone = len(reading) == len(running)
            part = h if everyone else h[torch.tensor(reading, device=self.device)]
            read_rows = rows if everyone else rows.subset(reading)
            readout = self.stepper.readout(part, read_rows)
            if self.model.config.act_mixing:  # the gate read the loop state in core_step (model.act_mixing)
                self._table("mixing_gate")[read_rows.tensor("slots", self.device)] = \
                    self.stepper.mixing_gates(read_rows).to(self._table("mixing_gate").dtype)
        if self.cache.layout in ("first", "avg"):
            self.cache.after_rows_step(rows.tensor("steps", self.device), rows.tensor("slots", self.device)[:, None],
                                       rows.tensor("positions", self.device)[:, None])
        for row in running:
            row.layer_applications += self.core_layers
        leaving = []
        exits = self._decide([running[index] for index in reading], readout, self.stepper) if reading else []
        for place, (index, exited) in enumerate(zip(reading, exits)):
            row = running[index]
            row.layer_applications += self.per_step - self.core_layers
            runs_on = row.full_depth or not self.cache.skips
            if exited and row.exit_step is None:
                row.exit_step = row.step + 1
                if runs_on:
                    self._table("chosen", readout.shape[-1])[row.slot] = readout[place]
            if row.step + 1 == row.max_steps or (exited and not runs_on):
                leaving.append((row, place))
        if leaving:
            finished += self._leave(leaving, readout)
        for row in self.running:
            row.step += 1
        return finished

    def _entering(self) -> tuple[list[Row], list[Row]]:
        """The fed rows that enter now and those that wait: rows in the middle of a request (they
        hold a place) first, then new ones in the order admitted, up to the width."""
        entering, waiting = self.pending, []
        if len(self.running) + len(self.pending) > self.width:
            rows = [row for row in self.pending if not row.new] + [row for row in self.pending if row.new]
            room = self.width - len(self.running)
            entering, waiting = rows[:room], rows[room:]
        for row in entering:
            row.new = False
        return entering, waiting

    def _waiting(self) -> list[Row]:
        """The waiting rows an ``exit_step`` call may bring in where requests end: those first in
        line that exit by Q-exit or at a fixed depth."""
        waiting = []
        for row in self.pending:
            if not (row.new and self._one_call([row])):
                break
            waiting.append(row)
        return waiting

    @staticmethod
    def _one_call(rows: list[Row]) -> bool:
        """Whether an iteration of ``rows`` can run in the stepper's ``exit_step``: every row exits
        by Q-exit or at a fixed depth, and none is a full-depth token (the exit only picks its readout)."""
        return all(row.plain_exit and not row.full_depth for row in rows)

    def _exit_iteration(self, running: list[Row], waiting: list[Row], ahead: RunAhead | None = None) -> list[Row]:
        """``iterate``'s work for rows that all exit by Q-exit or at a fixed depth, in the stepper's
        one call (``exit_step``: the same decisions and copies, held equal by tests; with ``ahead``,
        the iterations it ran on as well, ``waiting`` rows taking the places of rows whose requests
        ended there); the rows' bookkeeping is ``iterate``'s and ``_leave``'s."""
        entries = running + waiting
        rows = Rows([row.slot for row in entries], [row.step for row in running] + [0] * len(waiting),
                    [row.position for row in entries])
        ran, logits, greedy, top, run = self.exit_step(
            self.h, rows, [row.max_steps for row in entries], [row.min_steps for row in entries],
            [math.inf if row.threshold is None else row.threshold for row in entries],
            self._table("survival", dtype=torch.float64), [-1 if row.token is None else row.token for row in entries],
            self.e, ahead)
        self.iterations += run.iterations
        self.exit_step_iterations += run.iterations
        self.mixed_depth_iterations += run.mixed
        per_step = self.per_step  # no coda on this path: the core's layers
        for row, applied in zip(entries, run.applied):
            row.layer_applications += per_step * applied
        if run.fed:  # greedy tokens the stepper fed back itself (RunAhead)
            self.fed = [(entries[index], tokens, steps) for index, tokens, steps in run.fed]
            self.fed_order = [entries[index] for index in run.order]
            for row, tokens, _ in self.fed:
                row.full_depth_applications += len(tokens) * row.max_steps * per_step
        placed = running
        if run.ended or waiting:  # the waiting rows that came in are the batch's now; ended rows left it
            placed, self.ended = [entries[index] for index in run.at], [entries[index] for index in run.ended]
            came = set(placed + self.ended) - set(running)
            self.pending = [row for row in self.pending if row not in came]
            for row in waiting:
                row.new = row not in came
        if run.iterations > 1:  # every row of the call ran each of its iterations
            for row, step, position in zip(placed, run.steps, run.positions):
                row.step, row.position = step, position
        ended = set(self.ended)
        finished: list[Row] = []
        place = 0  # the done rows' logits stay rows of the batch's until asked for
        for row, steps in zip(placed, ran):
            row.token = None
            if not steps:
                row.step += 1
                continue
            if row in ended:  # its request ended with the last token it took in the call
                pass
            elif steps < 0:  # done, and its next token (its argmax) taken in the call: it enters next
                row.position += 1
                self.feed(row, greedy[place])
            else:
                row.logit_rows, row.logit_place, row.greedy, row.greedy_logit = logits, place, greedy[place], top[place]
                row.steps, row.exit_step = steps, steps if steps < row.max_steps else None
                row.full_depth_applications += row.max_steps * per_step
                row.position += 1
                finished.append(row)
            place += 1
        self.running = [row for row, steps in zip(placed, ran) if not steps]
        return finished

    def _enter(self, entering: list[Row]) -> None:
        rows = Rows([row.slot for row in entering], [0] * len(entering), [row.position for row in entering])
        e = self.stepper.embed([row.token for row in entering], rows)
        h = self.stepper.initial_state(e, rows)
        for row in entering:
            row.step, row.exit_step, row.token = 0, None, None
        self._reset(entering)
        self._tables(h.shape[-1], e.shape[-1], h.dtype, e.dtype)
        slots = rows.tensor("slots", self.device)
        self.h.index_copy_(0, slots, h)
        self.e.index_copy_(0, slots, e)
        self.running = self.running + entering

    def _tables(self, width: int, input_width: int | None = None, dtype=torch.float32,
                input_dtype=torch.float32) -> None:
        """The per-slot tables of loop states and prelude outputs, made when first needed."""
        if self.h is None:
            self.h = torch.zeros(self.cache.batch_size, width, dtype=dtype, device=self.device)
            self.e = torch.zeros(self.cache.batch_size, input_width or width, dtype=input_dtype,
                                 device=self.device)

    def _whole_token(self, row: Row) -> None:
        """The stepper's one-call token (its readout is the last step's, Q-exit in the kernel)."""
        ran, logits, row.greedy = self.stepper.whole_token(row.token, row.position, row.max_steps,
                                                           row.policy.min_steps, row.threshold)
        row.logits, row.steps, row.token = logits, ran, None
        # Counted as iterate counts: a layout that keeps every step's K/V runs on past the exit, and
        # the coda runs at every step a policy reads.
        run = ran if self.cache.skips else row.max_steps
        readouts = run if row.policy.reads_every_step or self.dense_readout else 1
        row.layer_applications += run * self.core_layers + readouts * (self.per_step - self.core_layers)
        row.full_depth_applications += row.max_steps * self.per_step
        row.position += 1

    def _leave(self, leaving: list[tuple[Row, int]], readout: torch.Tensor) -> list[Row]:
        """Rows whose token is done: fill the steps they skipped, their logits, out of the core."""
        if all(row.act_threshold is None and (row.exit_step is None or row.exit_step > row.step)
               for row, _ in leaving):  # every row's readout is this step's
            places = [place for _, place in leaving]
            readouts = readout if len(places) == len(readout) else readout[torch.tensor(places, device=self.device)]
        else:
            finals = []
            for row, place in leaving:
                if row.act_threshold is not None:
                    finals.append(self.tables["act_state"][row.slot])
                    row.exit_step = int(self.tables["halting"][row.slot])
                elif row.exit_step is not None and row.exit_step <= row.step:  # exited earlier, ran on
                    finals.append(self.tables["chosen"][row.slot])
                else:
                    finals.append(readout[place])
            readouts = torch.stack(finals)
        ran = [row.step + 1 for row, _ in leaving]
        if self.cache.layout in ("first", "avg") or any(steps < row.max_steps for steps, (row, _) in zip(ran, leaving)):
            self.cache.finish_rows(ran, [row.slot for row, _ in leaving], [row.position for row, _ in leaving])
        if self.logits_argmax is not None:
            logits, greedy = self.logits_argmax(readouts)
        else:
            logits = self.stepper.logits(readouts)
            greedy = logits.argmax(-1).tolist()
        for index, (row, _) in enumerate(leaving):
            row.logits, row.greedy, row.steps = logits[index], greedy[index], row.exit_step or row.step + 1
            row.full_depth_applications += row.max_steps * self.per_step
            row.position += 1
            row.full_depth = False
        gone = {id(row) for row, _ in leaving}
        self.running = [row for row in self.running if id(row) not in gone]
        return [row for row, _ in leaving]

    def _table(self, name: str, width: int | None = None, dtype=None) -> torch.Tensor:
        """Per-slot decision state (zeros when first asked for)."""
        if name not in self.tables:
            shape = (self.cache.batch_size,) + ((width,) if width else ())
            self.tables[name] = torch.zeros(shape, dtype=dtype or self.cache.keys.dtype, device=self.device)
        return self.tables[name]

    def _reset(self, rows: list[Row]) -> None:
        """A new token: no survival, no ACT weight yet."""
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        for name in ("survival", "act_total", "halting", "act_state"):
            if name in self.tables:
                self.tables[name][slots] = 0

    def _decide(self, rows: list[Row], readout: torch.Tensor, head) -> list[bool]:
        """Which of ``rows`` (read out as ``readout`` [R, D] at their current steps) exit now;
        ACT rows accumulate instead.  ``head`` gives gate logits and logits (the stepper, or the
        model when replaying a prefill)."""
        exits = [False] * len(rows)
        groups: dict[type, list[int]] = {}
        for index, row in enumerate(rows):
            if row.act_threshold is not None:
                groups.setdefault(ACTExit, []).append(index)
            elif row.exit_step is None and row.policy.reads_every_step and row.step + 1 < row.max_steps:
                groups.setdefault(type(row.policy), []).append(index)
        for kind, members in groups.items():
            group = [rows[index] for index in members]
            part = readout if len(members) == len(rows) else readout[torch.tensor(members, device=self.device)]
            slots, steps = torch.tensor([[row.slot for row in group], [row.step for row in group]], device=self.device)
            if kind is ACTExit:
                self._act(group, slots, steps, part, head)
                continue
            values = self._signal(group[0].policy.signal, slots, part, head)
            survival = self._table("survival", dtype=torch.float64)
            decided, survival[slots] = kind.decide([row.policy for row in group], steps, values, survival[slots])
            for index, row, exited in zip(members, group, decided.tolist()):
                exits[index] = exited and row.step + 1 >= row.policy.min_steps
        return exits

    def _signal(self, signal: Signal, slots: torch.Tensor, readout: torch.Tensor, head) -> torch.Tensor:
        """This step's ``signal`` for the rows in ``slots`` (changes against their previous step)."""
        if signal is Signal.GATE:
            if self.model.config.act_mixing:
                return self._table("mixing_gate")[slots]
            return head.gate_logits(readout).reshape(-1)
        if signal is Signal.PERPLEXITY:
            return readout_perplexity(head.logits(readout))
        current = readout.float() if signal is Signal.READOUT_CHANGE else head.logits(readout)
        previous = self._table(signal.value, current.shape[-1], current.dtype)
        change = (hidden_change if signal is Signal.READOUT_CHANGE else readout_kl)(previous[slots], current)
        previous[slots] = current
        return change

    def _act(self, rows: list[Row], slots: torch.Tensor, steps: torch.Tensor, readout: torch.Tensor, head) -> None:
        thresholds = torch.tensor([row.act_threshold for row in rows], dtype=torch.float64, device=self.device)
        last = torch.tensor([row.step + 1 == row.max_steps for row in rows], device=self.device)
        total, halting = self._table("act_total", dtype=torch.float64), self._table("halting", dtype=torch.long)
        state = self._table("act_state", readout.shape[-1], readout.dtype)
        total[slots], halting[slots], state[slots] = act_accumulate(
            thresholds, steps, last, head.gate_logits(readout), readout, total[slots], halting[slots], state[slots])
