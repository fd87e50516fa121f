"""Batched generation with per-token early exit that skips the work of exited rows.

Several prompts of different lengths decode together.  Each prompt is prefilled on its own
(at full depth, as the batch-1 decoder does) and placed **right-aligned** in one batched cache:
row b's L_b prompt positions sit at cache indices [P − L_b, P) for the longest prompt P, so every
row writes its next token at the same index.  Per row, RoPE uses the true position (index − pad)
and attention masks the pad keys; recurrent states need no alignment.

Every decode step runs only the rows still generating, and inside the loop only the rows that
have not exited: their hidden states, RoPE tables and masks are gathered (compaction), so an
exited row costs no matmuls.  Attention reads and writes those rows of the cache in place
(``CacheRows``, the C kernel) where it can, else their cache rows are gathered and the new
entries scattered back; recurrent states (and ChannelMix's token shift) are gathered and
scattered; a ``LoopCarry`` (loop-axis memory, global gates) keeps the running rows; noise
starts and memory-caching segments read each row's own position.  Every model family batches.
``BatchResult.layer_applications`` counts the core and coda layer applications actually run
per decoded token (the compute the exit saved is the gap to ``full_depth_applications``).
The cache layout rules (``KVCache.after_step``/``finish``) apply per row.

Batched output equals per-prompt ``generate`` with the same settings (tested): the same math
on the same numbers, up to float rounding of batched matmuls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch

from looplm.bf16 import bf16_weights
from looplm.cache import KVCache
from looplm.errors import LoopLMError
from looplm.exit_policy import ACTExit, ExitPolicy, ExitRule, default_exit_policy, refuse_act_over_mixing
from looplm.generate import Decoder, Generation, Sampling, record_token, sample_next
from looplm.model.carry import LoopCarry
from looplm.kernels import ops
from looplm.model.row_attention import CacheRows, SharedKV
from looplm.precision import decode_precision


@dataclass
class BatchResult:
    """Per-prompt generations and what the batch computed while decoding (prefill excluded)."""

    generations: list[Generation]
    layer_applications: int = 0          # core + coda layer applications run for decoded tokens
    full_depth_applications: int = 0     # the same tokens at full depth (no early exit)
    decoded_tokens: int = 0              # tokens that ran the loop (one per row per decode step)
    cache_bytes: int = 0
    cache_bytes_per_token: int = 0
    per_row_steps: list[list[int]] = field(default_factory=list)
    per_row_applications: list[int] = field(default_factory=list)        # layer applications per prompt
    per_row_full_applications: list[int] = field(default_factory=list)

    @property
    def saved_fraction(self) -> float:
        """Share of the full-depth layer applications that early exit skipped."""
        return 1.0 - self.layer_applications / self.full_depth_applications if self.full_depth_applications else 0.0


class ActHalting:
    """ACT (docs/MATH.md §5) over a batch of rows, one loop step at a time, as the batch-1 decoder
    does it for one token: a row's weight is its halting probability p_t = σ(z_t) until the
    running total would reach ``threshold`` (or the last step), then the remainder 1 − Σ p, then
    0.  ``state`` [R, D] is Σ_t w_t r_t; ``halting`` [R] the 1-based halting steps (0 = not yet).
    The total is kept in float64, as the batch-1 decoder's Python floats are."""

    def __init__(self, rows: int, threshold: float, device=None):
        self.threshold = threshold
        self.total = torch.zeros(rows, dtype=torch.float64, device=device)
        self.halting = torch.zeros(rows, dtype=torch.long, device=device)
        self.state: torch.Tensor | None = None

    def add(self, step: int, readout: torch.Tensor, gate_logit: torch.Tensor, last: bool) -> None:
        going = self.halting == 0
        probability = torch.sigmoid(gate_logit.reshape(-1).to(torch.float64))
        halts = going & ((self.total + probability >= self.threshold) | last)
        weight = torch.where(halts, 1.0 - self.total, torch.where(going, probability, 0.0))
        self.total = torch.where(going & ~halts, self.total + probability, self.total)
        self.halting[halts] = step + 1
        part = weight.to(readout.dtype).unsqueeze(-1) * readout
        self.state = part if self.state is None else self.state + part


class _RowSubset:
    """The cache as seen by a subset of rows.  ``in_place``: attention slots are handed out as
    ``CacheRows`` (the storage and the row indices; the attention writes and reads the rows
    where they lie), the rest as below.  Otherwise ``store`` hands out gathered copies of those
    rows' storage and ``flush`` scatters back what the layers wrote (attention: the one new
    position; recurrent layers: the whole state).  With ``everyone`` (every slot active) it
    hands out views (no copies)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, position: int, everyone: bool, in_place: bool):
        self.cache, self.rows, self.position = cache, rows, position
        self.everyone, self.in_place = everyone, in_place
        self.starts = cache.offsets[rows] if in_place else None
        self.written: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], bool]] = []

    def store(self, stage: str, layer: int, step: int = 0) -> tuple | CacheRows | SharedKV:
        full = self.cache.slot_storage(stage, layer, step)
        attention = self.cache.kinds[self.cache.slot(stage, layer, step)] == "A"
        shared = self.cache.reads_first_step(stage, layer, step)  # append_first: read, never written
        # With ffn=channelmix the slot ends with the FFN's previous input [B, D]: a per-row state.
        count = len(full) - len(self.cache.states["F"])
        mixer, shift = full[:count], full[count:]
        if self.in_place and attention:
            rows = CacheRows(mixer[0], mixer[1], self.rows, self.starts, shared)
            return (rows,) + self._rows_of(shift, False) if shift else rows
        if self.everyone:
            return self.cache.store(stage, layer, step)
        if attention:  # only the filled positions: attention reads no further
            mixer = tuple(tensor[:, :, :self.position + 1] for tensor in mixer)
        if not shared:
            return self._rows_of(mixer, attention) + self._rows_of(shift, False)
        keys_values = SharedKV(*(tensor.index_select(0, self.rows) for tensor in mixer))
        return (keys_values,) + self._rows_of(shift, False) if shift else keys_values

    def _rows_of(self, tensors: tuple[torch.Tensor, ...], attention: bool) -> tuple[torch.Tensor, ...]:
        """These rows of ``tensors`` (views when every row runs), remembered for ``flush``."""
        if self.everyone or not tensors:
            return tensors
        gathered = tuple(tensor.index_select(0, self.rows) for tensor in tensors)
        self.written.append((tensors, gathered, attention))
        return gathered

    def flush(self) -> None:
        position = self.position
        for full, gathered, attention in self.written:
            for target, source in zip(full, gathered):
                if attention:
                    target[self.rows, :, position] = source[:, :, position]
                else:
                    target[self.rows] = source
        self.written.clear()


class BatchDecoder:
    """Decodes a batch of right-aligned rows one token at a time; rows finish independently.

    ``rows`` cache rows (slots) of ``max_len`` positions each.  ``begin(length)`` sets the write
    index; ``prefill(row, ids)`` places a prompt so that it ends there (right-aligned), which a
    free slot can do at any later decode step too (continuous batching: ``BatchSession``)."""

    def __init__(self, model, exit_policy: ExitPolicy, rows: int, max_len: int,
                 layout: str = "last_exited", modulo_slots: int = 2):
        self.act_threshold = None
        if isinstance(exit_policy, ACTExit):
            if model.exit_gate is None:
                raise LoopLMError("ACT needs a model with an exit gate: use fixed steps")
            refuse_act_over_mixing(model)
            self.act_threshold = exit_policy.threshold or model.config.act_threshold
        self.model, self.policy = model, exit_policy
        config = model.config
        self.max_steps = exit_policy.max_steps(config.loop_steps)
        parameter = next(model.parameters())
        self.device = parameter.device
        self.cache = KVCache(config, rows, max_len, self.max_steps, device=self.device, dtype=parameter.dtype,
                             layout=layout, modulo_slots=modulo_slots)
        self.cache.offsets.fill_(max_len)  # an empty slot: every key masked
        # Attention reads the running rows of the cache in place (no gathered copies) where
        # the kernel for it exists; MLA's latent cache has its own attention.
        self.in_place = config.attention != "mla" and ops.serves(self.cache.keys)
        self.layout, self.modulo_slots = layout, modulo_slots
        self.dense_readout = bool(model.coda) and layout in ("first", "avg")
        self.applications = 0
        self.full_applications = 0
        # per cache row, since its prompt was prefilled (``prefill`` resets the row's counts)
        self.row_applications = [0] * rows
        self.row_full_applications = [0] * rows

    def begin(self, length: int) -> None:
        """Start (or restart, with every slot free) at write index ``length``: prompts of up to
        ``length`` tokens can be prefilled."""
        if length > self.cache.max_len:
            raise LoopLMError(f"the batch cache holds {self.cache.max_len} positions; {length} needed")
        self.cache.length = length

    def prefill(self, row: int, ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Prefill one prompt at full depth (a batch-1 ``Decoder``) into slot ``row``, ending at
        the write index (its earlier positions are masked for this row from now on)."""
        length = self.cache.length
        if len(ids) > length:
            raise LoopLMError(f"a prompt of {len(ids)} tokens cannot join a batch at position {length}")
        single = Decoder(self.model, self.policy, len(ids), backend="reference", layout=self.layout,
                         modulo_slots=self.modulo_slots)
        logits, steps = single.prefill(torch.tensor([list(ids)], device=self.device))
        source, target = single.cache, self.cache
        begin = length - len(ids)
        target.keys[:, row, :, begin:length] = source.keys[:, 0, :, :len(ids)]
        target.values[:, row, :, begin:length] = source.values[:, 0, :, :len(ids)]
        for kind, states in source.states.items():
            for mine, theirs in zip(target.states[kind], states):
                if mine.shape[2:] == theirs.shape[2:]:
                    mine[:, row] = theirs[:, 0]
                else:  # segment memories: the prompt's own cache holds fewer segments
                    mine[:, row] = 0
                    mine[:, row, :theirs.shape[2]] = theirs[:, 0]
        target.offsets[row] = begin
        self.row_applications[row] = self.row_full_applications[row] = 0
        return logits, steps

    def _tables(self, rows: torch.Tensor, index: int):
        """Per-row RoPE tables [R, 1, 1, r] at each row's true position, the key mask
        [R, 1, 1, index+1] hiding the pad keys of the right-aligned rows, and the positions [R]."""
        offsets = self.cache.offsets[rows]
        positions = index - offsets
        rope = self.model.rope
        cos, sin = rope.cos[positions].view(len(rows), 1, 1, -1), rope.sin[positions].view(len(rows), 1, 1, -1)
        mask = (torch.arange(index + 1, device=self.device).unsqueeze(0) >= offsets.unsqueeze(1)).view(
            len(rows), 1, 1, index + 1)
        return (cos, sin), mask, positions

    def step(self, tokens: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for each of ``rows`` (tokens [R]); return logits [R, V] and the loop
        steps each row's token used [R]."""
        model, cache = self.model, self.cache
        index = cache.length
        everyone = len(rows) == cache.offsets.shape[0]
        tables, mask, positions = self._tables(rows, index)
        view = _RowSubset(cache, rows, index, everyone, self.in_place)
        e = model.embed_input(tokens.view(-1, 1), index, view, tables, mask)
        view.flush()
        h = model.initial_state(e, index, positions)  # each row's own position
        rule = ExitRule(self.policy, len(rows), model.config.loop_steps, self.device)
        act = None if self.act_threshold is None else ActHalting(len(rows), self.act_threshold, self.device)
        carry = LoopCarry() if model.needs_carry else None  # loop_mc, global gates, ACT mixing: earlier steps' values
        running = torch.arange(len(rows), device=self.device)  # positions within ``rows``
        ran = torch.full((len(rows),), self.max_steps, dtype=torch.long, device=self.device)
        chosen = torch.zeros(len(rows), model.config.d_model, device=self.device, dtype=e.dtype)
        exited = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        per_step = model.config.n_core_layers + model.config.n_coda_layers
        self.full_applications += len(rows) * self.max_steps * per_step
        applied = torch.zeros(len(rows), dtype=torch.long)
        for step in range(self.max_steps):
            subset = rows[running]
            view = _RowSubset(cache, subset, index, everyone and len(running) == len(rows), self.in_place)
            part_tables = tuple(table[running] for table in tables)
            h = model.core_step(h, step, index, view, e, part_tables, mask[running], carry)
            last = step + 1 == self.max_steps
            need_readout = last or rule.active or self.dense_readout or act is not None
            if need_readout:
                readout = model.readout(h, step, index, view, part_tables, mask[running], carry)
            view.flush()
            cache.after_step(step, index, index + 1, None if everyone and len(running) == len(rows) else subset)
            cost = model.config.n_core_layers + (model.config.n_coda_layers if need_readout else 0)
            self.applications += len(running) * cost
            applied[running.cpu()] += cost
            flat = readout[:, -1] if need_readout else None
            if act is not None:  # every row runs every step; the answer mixes the steps' readouts
                act.add(step, flat, model.gate_logits(flat, carry), last)
                if last:
                    break
                continue
            if last:
                keep = ~exited[running]
                chosen[running[keep]] = flat[keep]
                break
            if not rule.active:
                continue
            exits = rule.decide(step, running, flat, lambda: model.gate_logits(flat, carry), lambda: model.logits(flat))
            exits &= ~exited[running]
            if bool(exits.any()):
                newly = running[exits]
                chosen[newly], ran[newly] = flat[exits], step + 1
                exited[newly] = True
                if cache.skips:
                    keep = ~exits
                    running, h, e = running[keep], h[keep], e[keep]
                    if carry is not None:
                        carry.select(keep)
                    if len(running) == 0:
                        break
        if act is not None:
            chosen, ran = act.state, act.halting
        steps_run = torch.full((cache.offsets.shape[0],), self.max_steps, dtype=torch.long, device=self.device)
        steps_run[rows] = ran if cache.skips and act is None else self.max_steps
        cache.finish(index, index + 1, steps_run)
        cache.advance(1)
        for row, count in zip(rows.tolist(), applied.tolist()):
            self.row_applications[row] += count
            self.row_full_applications[row] += self.max_steps * per_step
        return model.logits(chosen), ran


@dataclass(eq=False)
class BatchRow:
    """One prompt decoding in a ``BatchSession``: its generation so far and its limits."""

    generation: Generation
    budget: int                     # tokens it may emit (its limit, cut by the context)
    limit: int                      # the limit asked for
    on_token: Callable[[int, int, str], None] | None = None   # (id, steps, text) per emitted token
    emitted_text: str = ""
    logits: torch.Tensor | None = None
    steps: int = 0
    layer_applications: int = 0     # core + coda applications run for its decoded tokens
    full_depth_applications: int = 0
    cancelled: bool = False         # set by the caller: the row leaves at the next step


class BatchSession:
    """Continuous batching: prompts join and leave a running batch between decode steps.

    A session owns a ``BatchDecoder`` with ``rows`` slots of ``max_len`` positions and one
    sampling generator.  ``admit`` prefills prompts into free slots, right-aligned at the current
    write index (a prompt joins only when it is no longer than that index and its budget fits
    before ``max_len``: ``fits``); ``step`` emits one token for every row (stop ids, stop strings,
    budget) and decodes the next token of the rows still going.  A finished row's slot is free
    for the next prompt: its old keys lie before the new prompt's start and stay masked.
    When every row has finished the write index restarts at the next admission.

    The rows of a session share its exit policy, layout, sampling and stop strings; each row's
    tokens equal per-prompt ``generate`` with the same settings (greedy; tested).

    ``dtype`` (fp32, bf16, auto): the projections' weights; bf16 runs them as torch bf16 matmuls
    on bf16 copies (``looplm.bf16``), auto does so where the CPU has native bf16 (as training's
    ``train.precision`` decides); ``self.precision`` says what was chosen and why."""

    def __init__(self, model, rows: int, max_len: int, sampling: Sampling = Sampling(),
                 exit_policy: ExitPolicy | None = None, tokenizer=None, stop_strings: Sequence[str] = (),
                 stop_ids: Sequence[int] | None = None, layout: str = "last_exited", modulo_slots: int = 2,
                 dtype: str = "fp32"):
        self.precision = decode_precision(dtype, batched=True)
        if self.precision.name == "bf16":  # bf16 projections: torch's bf16 matmuls (looplm.bf16)
            model = bf16_weights(model)
        self.model, self.sampling, self.tokenizer = model, sampling, tokenizer
        self.stop_strings = tuple(stop_strings)
        self.stop_ids = set(tokenizer.stop_ids if stop_ids is None and tokenizer is not None else (stop_ids or []))
        self.context = model.config.max_seq_len
        self.generator = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.seed is not None else None
        with torch.inference_mode():
            self.decoder = BatchDecoder(model, exit_policy or default_exit_policy(model.config), rows, max_len,
                                        layout, modulo_slots)
        self.rows: dict[int, BatchRow] = {}   # slot → row decoding there
        self.joined_late = 0                  # rows admitted while others were decoding

    @property
    def active(self) -> bool:
        return bool(self.rows)

    @property
    def free_slots(self) -> int:
        return self.decoder.cache.offsets.shape[0] - len(self.rows)

    def budget(self, prompt: Sequence[int], limit: int) -> int:
        return min(limit, self.context - len(prompt))

    def fits(self, prompt: Sequence[int], limit: int, start: int | None = None) -> bool:
        """Whether ``prompt`` can join now (or at write index ``start`` for an idle session)."""
        if self.free_slots == 0 or not prompt or len(prompt) > self.context:
            return False
        index = self.decoder.cache.length if self.rows else (start if start is not None else len(prompt))
        return len(prompt) <= index and index + max(self.budget(prompt, limit), 1) <= self.decoder.cache.max_len

    def admit(self, prompts: Sequence[Sequence[int]], limits: Sequence[int],
              on_tokens: Sequence[Callable[[int, int, str], None] | None] | None = None) -> list[BatchRow]:
        """Prefill ``prompts`` into free slots (an idle session restarts at the longest of them)."""
        on_tokens = on_tokens or [None] * len(prompts)
        start = max(len(prompt) for prompt in prompts)
        for prompt, limit in zip(prompts, limits):
            if not self.fits(prompt, limit, start):
                raise LoopLMError(f"a prompt of {len(prompt)} tokens with {limit} new tokens does not fit the batch")
        late = bool(self.rows)
        admitted = []
        with torch.inference_mode(), _eval_mode(self.model):
            if not self.rows:
                self.decoder.begin(start)
            for prompt, limit, on_token in zip(prompts, limits, on_tokens):
                slot = min(set(range(self.decoder.cache.offsets.shape[0])) - set(self.rows))
                row = BatchRow(Generation(prompt_tokens=len(prompt)), self.budget(prompt, limit),
                               limit, on_token)
                row.logits, row.steps = self.decoder.prefill(slot, prompt)
                self.rows[slot] = row
                admitted.append(row)
        self.joined_late += len(admitted) if late else 0
        return admitted

    def step(self) -> list[BatchRow]:
        """Emit a token for every row and decode the next one for those going on; return the
        rows that finished (their slots are free again)."""
        with torch.inference_mode(), _eval_mode(self.model):
            return self._step()

    def _step(self) -> list[BatchRow]:
        finished, going, tokens = [], [], []
        for slot, row in sorted(self.rows.items()):
            token = None if row.cancelled else self._emit(row)
            if token is None:
                finished.append(slot)
            else:
                going.append(slot)
                tokens.append(token)
        if going:
            decoder = self.decoder
            logits, steps = decoder.step(torch.tensor(tokens, device=decoder.device),
                                         torch.tensor(going, device=decoder.device))
            for position, slot in enumerate(going):
                row = self.rows[slot]
                row.logits, row.steps = logits[position], int(steps[position])
                row.layer_applications = decoder.row_applications[slot]
                row.full_depth_applications = decoder.row_full_applications[slot]
        done = []
        for slot in finished:
            row = self.rows.pop(slot)
            result = row.generation
            if result.stop_reason not in ("stop_token", "stop_string"):
                result.stop_reason = "length" if row.budget == row.limit else "context"
            if self.tokenizer is not None and result.stop_reason != "stop_string":
                result.text = self.tokenizer.decode(result.ids)
            done.append(row)
        return done

    def _emit(self, row: BatchRow) -> int | None:
        """Sample the row's next token and record it; None when the row is finished (the
        token is not decoded further when it ends the row)."""
        result = row.generation
        if len(result.ids) >= row.budget:
            return None
        token = sample_next(row.logits.cpu() if self.generator is not None else row.logits, self.sampling,
                            self.generator)
        if token in self.stop_ids:
            result.stop_reason, result.stop_token_steps = "stop_token", row.steps
            return None
        piece, row.emitted_text = record_token(result, token, row.steps, self.tokenizer, self.stop_strings,
                                               row.emitted_text)
        if result.stop_reason == "stop_string":
            if row.on_token is not None and piece:
                row.on_token(token, row.steps, piece)
            return None
        if row.on_token is not None:
            row.on_token(token, row.steps, piece)
        if len(result.ids) >= row.budget:
            return None
        return token


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                   sampling: Sampling = Sampling(), exit_policy: ExitPolicy | None = None, tokenizer=None,
                   stop_strings: Sequence[str] = (), stop_ids: Sequence[int] | None = None,
                   layout: str = "last_exited", modulo_slots: int = 2,
                   on_token: Callable[[int, int, int, str], None] | None = None,
                   dtype: str = "fp32") -> BatchResult:
    """Generate for several prompts at once; each row stops on its own (stop id, stop string,
    length, context).  Same arguments as ``generate`` (``max_new_tokens`` may give one limit
    per prompt); ``on_token(row, id, steps, text)`` is called for every emitted token
    (streaming); ``dtype``: the weights (fp32, bf16, auto; see ``BatchSession``).  Sampling draws
    from one generator over the batch, so with temperature > 0 the draws differ from per-prompt
    runs (greedy is identical)."""
    context = model.config.max_seq_len
    if not prompts:
        raise LoopLMError("no prompts given")
    for number, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise LoopLMError(f"prompt {number} is empty: give at least one token")
        if len(prompt) > context:
            raise LoopLMError(f"prompt {number} has {len(prompt)} tokens, longer than the context of {context}:"
                              " shorten it or use a model with a larger max_seq_len")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise LoopLMError(f"{len(limits)} max_new_tokens limits for {len(prompts)} prompts: give one per prompt")
    if min(limits) < 0:
        raise LoopLMError(f"max_new_tokens must be >= 0, got {min(limits)}")
    longest = max(len(prompt) for prompt in prompts)
    budgets = [min(limit, context - len(prompt)) for limit, prompt in zip(limits, prompts)]
    session = BatchSession(model, len(prompts), longest + max(max(budgets), 1), sampling, exit_policy, tokenizer,
                           stop_strings, stop_ids, layout, modulo_slots, dtype)
    callbacks = [None if on_token is None else partial(on_token, row) for row in range(len(prompts))]
    rows = session.admit(prompts, limits, callbacks)
    while session.active:
        session.step()
    decoder = session.decoder
    cache = decoder.cache
    return BatchResult([row.generation for row in rows], decoder.applications, decoder.full_applications,
                       sum(len(row.generation.steps) for row in rows), cache.nbytes, cache.bytes_per_token,
                       [row.generation.steps for row in rows],
                       [row.layer_applications for row in rows], [row.full_depth_applications for row in rows])
