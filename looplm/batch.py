"""Batched generation with per-token early exit that skips the work of exited rows.

Several prompts of different lengths decode together.  Each prompt is prefilled on its own
(at full depth, as the batch-1 decoder does) and placed **right-aligned** in one batched cache:
row b's L_b prompt positions sit at cache indices [P − L_b, P) for the longest prompt P, so every
row writes its next token at the same index.  Per row, RoPE uses the true position (index − pad)
and attention masks the pad keys; recurrent states need no alignment.

Every decode step runs only the rows still generating, and inside the loop only the rows that
have not exited: their hidden states, RoPE tables, masks and cache rows are gathered
(compaction) and the new cache entries scattered back, so an exited row costs no matmuls.
``BatchResult.layer_applications`` counts the core and coda layer applications actually run
per decoded token (the compute the exit saved is the gap to ``full_depth_applications``).
The cache layout rules (``KVCache.after_step``/``finish``) apply per row.

Batched output equals per-prompt ``generate`` with the same settings (tested): the same math
on the same numbers, up to float rounding of batched matmuls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from looplm.cache import KVCache
from looplm.errors import LoopLMError
from looplm.exit_policy import ACTExit, ExitPolicy, ExitRule, FixedSteps
from looplm.generate import Decoder, Generation, Sampling, _find_stop, sample_next


def batch_unsupported(model) -> str | None:
    """None when the batched engine can run this model, else why (then decode one by one)."""
    config = model.config
    if config.initial_state == "noise":
        return "noise initial states are drawn per position"
    if config.mc_segment_size:
        return "memory caching segments follow absolute positions"
    if model.needs_carry:
        return "model.loop_mc and model.global_gates carry per-token state across loop steps of shrinking row sets"
    if config.ffn == "channelmix":
        return "the ChannelMix token shift's state is not gathered per row"
    return None


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

    @property
    def saved_fraction(self) -> float:
        """Share of the full-depth layer applications that early exit skipped."""
        return 1.0 - self.layer_applications / self.full_depth_applications if self.full_depth_applications else 0.0


class _RowSubset:
    """The cache as seen by a subset of rows: ``store`` hands out gathered copies of those rows'
    storage, ``flush`` scatters back what the layers wrote (attention: the one new position;
    recurrent layers: the whole state).  With every row active it hands out views (no copies)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor | None, position: int):
        self.cache, self.rows, self.position = cache, rows, position
        self.written: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], bool]] = []

    def store(self, stage: str, layer: int, step: int = 0) -> tuple[torch.Tensor, ...]:
        full = self.cache.store(stage, layer, step)
        if self.rows is None:
            return full
        attention = self.cache.kinds[self.cache.slot(stage, layer, step)] == "A"
        if attention:  # only the filled positions: attention reads no further
            full = tuple(tensor[:, :, :self.position + 1] for tensor in full)
        gathered = tuple(tensor.index_select(0, self.rows) for tensor in full)
        self.written.append((full, gathered, attention))
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
    """Decodes a batch of right-aligned rows one token at a time; rows finish independently."""

    def __init__(self, model, exit_policy: ExitPolicy, prompt_lengths: Sequence[int], max_new: int,
                 layout: str = "last_exited", modulo_slots: int = 2):
        if (reason := batch_unsupported(model)) is not None:
            raise LoopLMError(f"the batched engine cannot run this model: {reason}; decode one prompt at a time")
        if isinstance(exit_policy, ACTExit):
            raise LoopLMError("ACT is not batched yet: decode one prompt at a time (looplm.generate)")
        self.model, self.policy = model, exit_policy
        config = model.config
        self.max_steps = exit_policy.max_steps(config.loop_steps)
        parameter = next(model.parameters())
        self.device = parameter.device
        self.longest = max(prompt_lengths)
        self.cache = KVCache(config, len(prompt_lengths), self.longest + max_new, self.max_steps,
                             device=self.device, dtype=parameter.dtype, layout=layout, modulo_slots=modulo_slots)
        self.cache.offsets = torch.tensor([self.longest - length for length in prompt_lengths], device=self.device)
        self.cache.length = self.longest  # rows are prefilled one by one into [offset, longest)
        self.layout, self.modulo_slots = layout, modulo_slots
        self.dense_readout = bool(model.coda) and layout in ("first", "avg")
        self.applications = 0
        self.full_applications = 0

    def prefill(self, row: int, ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Prefill one prompt at full depth (a batch-1 ``Decoder``) into its right-aligned row."""
        single = Decoder(self.model, self.policy, len(ids), backend="reference", layout=self.layout,
                         modulo_slots=self.modulo_slots)
        logits, steps = single.prefill(torch.tensor([list(ids)], device=self.device))
        source, target = single.cache, self.cache
        begin = self.longest - len(ids)
        target.keys[:, row, :, begin:self.longest] = source.keys[:, 0, :, :len(ids)]
        target.values[:, row, :, begin:self.longest] = source.values[:, 0, :, :len(ids)]
        for kind, states in source.states.items():
            for mine, theirs in zip(target.states[kind], states):
                mine[:, row] = theirs[:, 0]
        return logits, steps

    def _tables(self, rows: torch.Tensor, index: int):
        """Per-row RoPE tables [R, 1, 1, r] at each row's true position, and the key mask
        [R, 1, 1, index+1] hiding the pad keys of the right-aligned rows."""
        offsets = self.cache.offsets[rows]
        positions = index - offsets
        rope = self.model.rope
        cos, sin = rope.cos[positions].view(len(rows), 1, 1, -1), rope.sin[positions].view(len(rows), 1, 1, -1)
        mask = (torch.arange(index + 1, device=self.device).unsqueeze(0) >= offsets.unsqueeze(1)).view(
            len(rows), 1, 1, index + 1)
        return (cos, sin), mask

    def step(self, tokens: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for each of ``rows`` (tokens [R]); return logits [R, V] and the loop
        steps each row's token used [R]."""
        model, cache = self.model, self.cache
        index = cache.length
        everyone = len(rows) == cache.offsets.shape[0]
        tables, mask = self._tables(rows, index)
        view = _RowSubset(cache, None if everyone else rows, index)
        e = model.embed_input(tokens.view(-1, 1), index, view, tables, mask)
        view.flush()
        h = model.initial_state(e, index)
        rule = ExitRule(self.policy, len(rows), model.config.loop_steps, self.device)
        running = torch.arange(len(rows), device=self.device)  # positions within ``rows``
        ran = torch.full((len(rows),), self.max_steps, dtype=torch.long, device=self.device)
        chosen = torch.zeros(len(rows), model.config.d_model, device=self.device, dtype=e.dtype)
        exited = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        per_step = model.config.n_core_layers + model.config.n_coda_layers
        self.full_applications += len(rows) * self.max_steps * per_step
        for step in range(self.max_steps):
            subset = rows[running]
            view = _RowSubset(cache, None if everyone and len(running) == len(rows) else subset, index)
            part_tables = tuple(table[running] for table in tables)
            h = model.core_step(h, step, index, view, e, part_tables, mask[running])
            last = step + 1 == self.max_steps
            need_readout = last or rule.active or self.dense_readout
            if need_readout:
                readout = model.readout(h, step, index, view, part_tables, mask[running])
            view.flush()
            cache.after_step(step, index, index + 1, None if everyone and len(running) == len(rows) else subset)
            self.applications += len(running) * (model.config.n_core_layers
                                                 + (model.config.n_coda_layers if need_readout else 0))
            flat = readout[:, -1] if need_readout else None
            if last:
                keep = ~exited[running]
                chosen[running[keep]] = flat[keep]
                break
            if not rule.active:
                continue
            exits = rule.decide(step, running, flat, lambda: model.gate_logits(flat), lambda: model.logits(flat))
            exits &= ~exited[running]
            if bool(exits.any()):
                newly = running[exits]
                chosen[newly], ran[newly] = flat[exits], step + 1
                exited[newly] = True
                if cache.skips:
                    keep = ~exits
                    running, h, e = running[keep], h[keep], e[keep]
                    if len(running) == 0:
                        break
        steps_run = torch.full((cache.offsets.shape[0],), self.max_steps, dtype=torch.long, device=self.device)
        steps_run[rows] = ran if cache.skips else self.max_steps
        cache.finish(index, index + 1, steps_run)
        cache.advance(1)
        return model.logits(chosen), ran


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                   sampling: Sampling = Sampling(), exit_policy: ExitPolicy | None = None, tokenizer=None,
                   stop_strings: Sequence[str] = (), stop_ids: Sequence[int] | None = None,
                   layout: str = "last_exited", modulo_slots: int = 2,
                   on_token: Callable[[int, int, int, str], None] | None = None) -> BatchResult:
    """Generate for several prompts at once; each row stops on its own (stop id, stop string,
    length, context).  Same arguments as ``generate`` (``max_new_tokens`` may give one limit
    per prompt); ``on_token(row, id, steps, text)`` is
    called for every emitted token (streaming).  Sampling draws from one generator over the
    batch, so with temperature > 0 the draws differ from per-prompt runs (greedy is identical)."""
    exit_policy = exit_policy or FixedSteps()
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
    stop_ids = set([tokenizer.eos_id] if stop_ids is None and tokenizer is not None else (stop_ids or []))
    budgets = [min(limit, context - len(prompt)) for limit, prompt in zip(limits, prompts)]
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.seed is not None else None
    results = [Generation(prompt_tokens=len(prompt)) for prompt in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            decoder = BatchDecoder(model, exit_policy, [len(p) for p in prompts], max(max(budgets), 1),
                                   layout, modulo_slots)
            pending = [decoder.prefill(row, prompt) for row, prompt in enumerate(prompts)]
            logits = [item[0] for item in pending]
            steps = [item[1] for item in pending]
            emitted = [""] * len(prompts)
            alive = list(range(len(prompts)))
            for index in range(max(budgets)):
                next_tokens, still = [], []
                for row in alive:
                    if _emit(row, index, logits[row], steps[row], results, budgets, sampling, generator,
                             stop_ids, tokenizer, stop_strings, emitted, on_token, next_tokens):
                        still.append(row)
                alive = still
                if not alive:
                    break
                rows = torch.tensor(alive, device=decoder.device)
                new_logits, new_steps = decoder.step(torch.tensor(next_tokens, device=decoder.device), rows)
                for position, row in enumerate(alive):
                    logits[row], steps[row] = new_logits[position], int(new_steps[position])
            for row, result in enumerate(results):
                if result.stop_reason not in ("stop_token", "stop_string"):
                    result.stop_reason = "length" if budgets[row] == limits[row] else "context"
                if tokenizer is not None and result.stop_reason != "stop_string":
                    result.text = tokenizer.decode(result.ids)
    finally:
        model.train(was_training)
    cache = decoder.cache
    return BatchResult(results, decoder.applications, decoder.full_applications,
                       sum(len(result.steps) for result in results), cache.nbytes, cache.bytes_per_token,
                       [result.steps for result in results])


def _emit(row, index, logits, steps, results, budgets, sampling, generator, stop_ids, tokenizer, stop_strings,
          emitted, on_token, next_tokens) -> bool:
    """Sample row's next token and record it; True when the row goes on decoding."""
    result = results[row]
    if index >= budgets[row]:
        return False
    token = sample_next(logits.cpu() if generator is not None else logits, sampling, generator)
    if token in stop_ids:
        result.stop_reason, result.stop_token_steps = "stop_token", steps
        return False
    result.ids.append(token)
    result.steps.append(steps)
    piece = ""
    if tokenizer is not None:
        text = tokenizer.decode(result.ids)
        stop_at = _find_stop(text, stop_strings, len(emitted[row]))
        if stop_at is not None:
            result.text, result.stop_reason = text[:stop_at], "stop_string"
            if on_token is not None and stop_at > len(emitted[row]):
                on_token(row, token, steps, text[len(emitted[row]):stop_at])
            return False
        if not text.endswith("\ufffd"):
            piece, emitted[row] = text[len(emitted[row]):], text
        result.text = text
    if on_token is not None:
        on_token(row, token, steps, piece)
    if index + 1 >= budgets[row]:
        return False
    next_tokens.append(token)
    return True
