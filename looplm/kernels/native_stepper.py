"""``NativeStepper``: one decode row's loop steps through the C kernel (``decode_kernel.c``).

A ``looplm.steppers.Stepper`` for one row (tensors [1, D]), like ``fast_decode.FastStepper``;
``NativeRowsStepper`` runs the rows of a batched cache, each at its own loop step and position,
through a run of layers in one C call (``looplm_rows_layers``);
it reads and writes the same ``KVCache`` storage (prefill, LAST_EXITED copies and the other
steppers interoperate).  Capabilities the scheduler uses: ``whole_token`` (a token's embedding
row, every step, Q-exit, the LAST_EXITED copy, the head and the greedy argmax in one C call;
the plain loop without a prelude, layouts ``whole_token_layouts``) and ``prefill_tokens`` (a
short prompt token by token at full depth).  The weights are the model's own tensors, read in
place (no copies): build the stepper after training, as ``generate`` does for every call.

Supported: a float32 model on the CPU (its layer projections may be int8 ``Int8Linear``,
looplm.quant, or bf16 ``Bf16Linear``, looplm.bf16 — whose head the kernel then reads in bf16
too) and any cache (batch 1: ``NativeStepper``; batched: ``NativeRowsStepper``);
``native_unsupported`` says why not otherwise, and ``auto`` then falls back to the C runtime
(``runtime_stepper``, batch 1) or ``FastStepper``, or for a batched cache the reference stepper.
"""

from __future__ import annotations

import ctypes
import math

import torch

from looplm.bf16 import Bf16Linear
from looplm.cache import KVCache
from looplm.kernels import ops
from looplm.kernels.bindings import Dims, Layer, Projection, RowsRun, TokenLoop
from looplm.kernels.build import load_kernel, simd_paths, unavailable_reason
from looplm.quant import Int8Linear
from looplm.run_ahead import RanAhead, RunAhead

_FLOAT = 4  # bytes
PARALLEL_BYTES = 2**20  # one thread per MiB of layer weights (up to torch's thread count)
# A prompt of at most ``PREFILL_ROWS`` tokens (a batch's or batch 1's) is prefilled through the C
# rows (``NativeStepper.prefill_rows``: one call per stage and loop step) where the kernel has SIMD
# products, for float32 layers or, in other forms, a loop step's core weights of at most
# ``ROWS_PREFILL_BYTES``.  The model's torch forward pays milliseconds of dispatch per prompt and
# wins by its GEMMs only on longer prompts (``benchmarks/prefill_paths.py``).
PREFILL_ROWS = 64
ROWS_PREFILL_BYTES = 4 * 2**20
# Otherwise a batch-1 prompt whose token-by-token pass reads at most this many bytes of core
# weights is prefilled by the kernel token by token (``prefill_tokens``): for a small model that
# beats a batched torch forward, whose fixed cost is milliseconds.
NATIVE_PREFILL_BYTES = 32 * 2**20


def c_decode_unsupported(model, cache: KVCache, what: str, batched: bool = False) -> str | None:
    """Why ``what`` (a C decode path) cannot run this model and cache at all — not on the CPU, not
    float32, not batch 1 (unless ``batched``: it runs a batched cache's rows) — or None."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        return f"{what} runs on the CPU; the model is on {parameter.device}"
    if parameter.dtype != torch.float32 or cache.keys.dtype != torch.float32:
        return f"{what} needs float32 weights and cache, got {parameter.dtype}"
    if cache.keys.shape[1] != 1 and not batched:
        return f"{what} decodes batch 1"
    return None


def decode_threads(layer_bytes: int) -> int:
    """Threads for a layer of ``layer_bytes`` bytes of weights: one per MiB, up to torch's count (a
    small model's matvecs finish before a second thread is woken, and a descheduled thread stalls
    the whole region)."""
    return max(1, min(torch.get_num_threads(), layer_bytes // PARALLEL_BYTES))


def native_unsupported(model, cache: KVCache) -> str | None:
    """None when the C kernel can decode this model with this cache, else the reason."""
    if (reason := c_decode_unsupported(model, cache, "the C decode kernel", batched=True)) is not None:
        return reason
    from looplm.fast_decode import fast_unsupported

    if (reason := fast_unsupported(model, allow_reduced=True, cache=cache)) is not None:
        return reason
    if load_kernel() is None:
        return unavailable_reason()
    return None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class NativeStepper:
    """One row's token through prelude, core steps, coda, gate and head in the C kernel; its prompt
    through the C rows (``prefill_rows``: the prompt's positions as rows, as a batch's rows run)."""

    whole_token_layouts = ("last_exited",)
    unsupported = staticmethod(native_unsupported)

    def __init__(self, model, cache: KVCache, compile_steps: bool = False):
        reason = native_unsupported(model, cache)
        if reason is not None:
            raise ValueError(reason)
        self.kernel = load_kernel()
        config = model.config
        self.config, self.cache = config, cache
        self.layer_bytes = _FLOAT * config.d_model * (config.n_heads * config.head_dim * 2 + 2 * config.n_kv_heads
                                                      * config.head_dim + 3 * config.ffn_hidden)
        self.threads = decode_threads(self.layer_bytes)
        self.token_step_bytes = self.layer_bytes * config.n_core_layers  # core weights one loop step reads
        self.dims = Dims(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_hidden,
                         cache.max_len, config.norm_eps)
        self._keep: list[torch.Tensor] = []  # every tensor whose address the kernel holds
        self.float32_layers = True  # every projection of every layer float32 (``_layers`` says)
        self.prelude = [self._layers(model.prelude, "prelude", 0)]
        self.core = [self._layers(model.core, "core", step) for step in range(cache.max_steps)]
        self.coda = [self._layers(model.coda, "coda", step) for step in range(cache.max_steps)]
        self.embedding = self._keep_tensor(model.embed.weight)
        # The head as a projection: bf16 for a bf16-weight model (looplm.bf16 keeps its bf16 copy).
        head_bf16 = getattr(model, "head_bf16", None)
        if head_bf16 is None:
            self.head = self._keep_tensor(model.head_weight)
            self.head_projection = Projection(weights=self.head.data_ptr())
        else:
            self.head = self._keep_tensor(head_bf16)
            self.head_projection = Projection(bf16=self.head.data_ptr())
        self._head_address = ctypes.addressof(self.head_projection)
        self.norm = self._keep_tensor(model.norm.weight)
        self.gate_weight = self._keep_tensor(model.exit_gate.weight) if model.exit_gate is not None else None
        self.gate_bias = float(model.exit_gate.bias.detach()[0]) if model.exit_gate is not None else None
        self.gate_buffer = torch.zeros(1)
        self.cos = self._keep_tensor(model.rope.cos)
        self.sin = self._keep_tensor(model.rope.sin)
        self.hidden = torch.zeros(config.d_model)
        self.readout_buffer = torch.zeros(config.d_model)
        self.logits_buffer = torch.zeros(config.vocab_size)
        self.scratch = torch.zeros(self.kernel.looplm_scratch_floats(ctypes.byref(self.dims)))
        self.row_bytes = config.d_model * _FLOAT
        # Addresses and the per-step C array of packed layers (exit_loop) are built here, once:
        # built on first use they cost a token ~70 µs, as much as its whole loop on a small model.
        self._addresses = (ctypes.byref(self.dims), self.cos.data_ptr(), self.sin.data_ptr(),
                           self.scratch.data_ptr(), self.norm.data_ptr())
        self._logits_address = self.logits_buffer.data_ptr()
        self._embedding_address, self._hidden_address = self.embedding.data_ptr(), self.hidden.data_ptr()
        self._gate_address = self.gate_weight.data_ptr() if self.gate_weight is not None else None
        self.best = ctypes.c_int(0)  # exit_loop's argmax of the logits (with logits=True)
        self._best_address = ctypes.addressof(self.best)
        # ``looplm_rows_layers`` (a prompt's prefill here; every iteration of a batch's rows in
        # NativeRowsStepper): the per-step arrays of each stage's layers and one cache row's floats
        # in a slot's storage [B, Hkv, max_len, hd]
        def steps(packed):
            return (ctypes.POINTER(Layer) * len(packed))(*[ctypes.cast(layers, ctypes.POINTER(Layer))
                                                          for layers in packed]) if packed[0] is not None else None

        self._step_arrays = {"prelude": steps(self.prelude), "core": steps(self.core), "coda": steps(self.coda)}
        self._steps = self._step_arrays["core"]  # exit_loop's
        self._counts = {"prelude": config.n_prelude_layers, "core": config.n_core_layers,
                        "coda": config.n_coda_layers}
        self.slot_floats = cache.store("core" if model.core else "coda", 0, 0)[0].stride(0)
        # a score row per thread, for up to ``scratch_threads`` threads (``threads`` is public: calls
        # take the smaller); the rows' scratch is made for the most rows a call has asked for
        self.scratch_threads = max(64, torch.get_num_threads())
        self.rows_scratch, self._scratch_rows = None, 0
        self.prefill_chunk = PREFILL_ROWS  # a prompt's positions per C call (``prefill_rows``)
        self.simd = simd_paths().get("f32", "scalar") != "scalar"
        self._token_loop = None  # ``whole_token``'s fixed arguments, for the plain loop without a prelude
        self.whole_token = None
        if self.fuses_exit_loop and self.prelude[0] is None:
            self.whole_token = self._whole_token
            self._token_loop = TokenLoop(
                ctypes.addressof(self.dims), ctypes.addressof(self._steps), config.n_core_layers, self.threads,
                config.vocab_size, self._hidden_address, self.cos.data_ptr(), self.sin.data_ptr(),
                self.scratch.data_ptr(), self.norm.data_ptr(), self._gate_address, self.gate_bias or 0.0,
                self._head_address, self._embedding_address, self._logits_address, self._best_address)
            self._token_arguments = ctypes.addressof(self._token_loop)
            self._token_call = self.kernel.looplm_token

    def _keep_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().contiguous()
        self._keep.append(tensor)
        return tensor

    def _layers(self, layers, stage: str, step: int):
        """A C array of ``Layer`` structs for these layers at this loop step's cache slots."""
        if len(layers) == 0:
            return None
        packed = (Layer * len(layers))()
        for index, layer in enumerate(layers):
            self.float32_layers &= not any(isinstance(module, (Int8Linear, Bf16Linear)) for module in
                                           (layer.attn.qkv, layer.attn.out, layer.ffn.gate_up, layer.ffn.down))

            def weight(module):
                return _pointer(self._keep_tensor(module.weight)) if hasattr(module, "weight") else None

            def projection(module):
                if isinstance(module, Int8Linear):  # Q8_0 weights (matvec.h: float or Q8_0 input, as chosen)
                    return Projection(values=_pointer(self._keep_tensor(module.values)),
                                      scales=_pointer(self._keep_tensor(module.scales)),
                                      quantize_input=int(module.quantizes_input))
                if isinstance(module, Bf16Linear):
                    return Projection(bf16=_pointer(self._keep_tensor(module.bf16_weight)))
                return Projection(weights=weight(module))

            keys, values = self.cache.store(stage, index, step)
            packed[index] = Layer(weight(layer.attn_norm), weight(layer.attn_post_norm), weight(layer.ffn_norm),
                                  weight(layer.ffn_post_norm), projection(layer.attn.qkv), projection(layer.attn.out),
                                  projection(layer.ffn.gate_up), projection(layer.ffn.down),
                                  _pointer(keys[0]), _pointer(values[0]))
        return packed

    def _run(self, packed, count: int, buffer: torch.Tensor, position: int, final_norm: bool) -> None:
        dims, cos, sin, scratch, norm = self._addresses
        rope_row = position * self.config.head_dim * _FLOAT
        self.kernel.looplm_layers(dims, packed, count, buffer.data_ptr(), position, cos + rope_row, sin + rope_row,
                                  scratch, norm if final_norm else None, self.threads)

    def _load(self, h: torch.Tensor) -> None:
        if h.data_ptr() != self.hidden.data_ptr():
            self.hidden.copy_(h.view(-1))

    def embed(self, tokens: list[int], rows) -> torch.Tensor:
        ctypes.memmove(self.hidden.data_ptr(), self.embedding.data_ptr() + tokens[0] * self.row_bytes, self.row_bytes)
        if self.prelude[0] is not None:
            self._run(self.prelude[0], self.config.n_prelude_layers, self.hidden, rows.positions[0], False)
        return self.hidden.view(1, -1)

    def initial_state(self, e: torch.Tensor, rows) -> torch.Tensor:
        return e

    def core_step(self, h: torch.Tensor, e: torch.Tensor, rows) -> torch.Tensor:
        self._load(h)
        self._run(self.core[rows.steps[0]], self.config.n_core_layers, self.hidden, rows.positions[0],
                  self.config.step_norm)
        return self.hidden.view(1, -1)

    def readout(self, h: torch.Tensor, rows) -> torch.Tensor:
        self._load(h)
        readout = self.readout_buffer
        if self.coda[rows.steps[0]] is not None:
            ctypes.memmove(readout.data_ptr(), self.hidden.data_ptr(), self.row_bytes)
            self._run(self.coda[rows.steps[0]], self.config.n_coda_layers, readout, rows.positions[0], True)
        elif self.config.step_norm:
            ctypes.memmove(readout.data_ptr(), self.hidden.data_ptr(), self.row_bytes)
        else:
            self.kernel.looplm_rms_norm(self.hidden.data_ptr(), self.norm.data_ptr(), readout.data_ptr(),
                                        self.config.d_model, self.config.norm_eps)
        return readout.view(1, -1)

    @property
    def fuses_exit_loop(self) -> bool:
        """Whether ``exit_loop`` can run a whole token's steps (plain loop: step norm, no coda)."""
        return self.config.step_norm and self.coda[0] is None

    def exit_loop(self, start: int, max_steps: int, min_steps: int, threshold: float | None, fill: bool,
                  logits: bool = False) -> int:
        """Every loop step of the token in ``hidden`` and its Q-exit decision in one C call
        (threshold None: no early exit); with ``fill`` the exited token's K/V are copied into the
        deeper steps, with ``logits`` the head is applied too (into ``logits_buffer``, its argmax
        into ``best``).  Returns the steps run; ``self.hidden`` then holds the readout."""
        dims, cos, sin, scratch, norm = self._addresses
        rope_row = start * self.config.head_dim * _FLOAT
        gate, q = (self._gate_address, threshold) if threshold is not None else (None, math.inf)
        head, buffer, best = (self._head_address, self._logits_address, self._best_address) if logits else (
            None, None, None)
        return self.kernel.looplm_exit_loop(dims, self._steps, self.config.n_core_layers, max_steps, min_steps,
                                            self._hidden_address, start, cos + rope_row, sin + rope_row,
                                            scratch, norm, self.threads, gate, self.gate_bias or 0.0, q, int(fill),
                                            head, buffer, self.config.vocab_size, best)

    def prefill_tokens(self, tokens: list[int], max_steps: int) -> None:
        """Run ``tokens`` at positions 0, 1, … through every step (a prompt's cache, as the batched
        forward fills it; their logits are not needed)."""
        for position, token in enumerate(tokens):
            ctypes.memmove(self.hidden.data_ptr(), self.embedding.data_ptr() + token * self.row_bytes, self.row_bytes)
            self.exit_loop(position, max_steps, max_steps, None, False)

    def prefills_tokens(self, length: int, max_steps: int) -> bool:
        """Whether a prompt of ``length`` tokens is prefilled by ``prefill_tokens`` (for a small
        model that beats a batched forward; see ``NATIVE_PREFILL_BYTES``)."""
        return self.whole_token is not None and length * max_steps * self.token_step_bytes <= NATIVE_PREFILL_BYTES

    def _whole_token(self, token: int, start: int, max_steps: int, min_steps: int, threshold: float | None):
        """``exit_loop`` from a token id with fill and logits, in one five-number C call: the
        embedding row, every step, Q-exit (threshold None: none), the LAST_EXITED copy, the head
        and its argmax.  Returns (steps run, the logits [V] — the kernel's buffer, which the next
        call overwrites — and their argmax)."""
        ran = self._token_call(self._token_arguments, token, start, max_steps, min_steps,
                               math.inf if threshold is None else threshold)
        return ran, self.logits_buffer, self.best.value

    def gate_logits(self, readout: torch.Tensor) -> torch.Tensor:
        """The exit gate's logit [1] (one C dot product)."""
        self.kernel.looplm_matvec(self.gate_weight.data_ptr(), readout.data_ptr(), self.gate_buffer.data_ptr(),
                                  1, self.config.d_model, 1)
        return self.gate_buffer + self.gate_bias

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        self.kernel.looplm_project(ctypes.byref(self.head_projection), readout.data_ptr(),
                                   self.logits_buffer.data_ptr(), self.config.vocab_size, self.config.d_model,
                                   self.threads)
        return self.logits_buffer.clone().view(1, -1)

    def _scratch(self, rows: int) -> torch.Tensor:
        """``looplm_rows_layers``' scratch for ``rows`` rows (made anew when a call needs more)."""
        if rows > self._scratch_rows:
            self.rows_scratch = torch.zeros(self.kernel.looplm_rows_scratch_floats(
                ctypes.byref(self.dims), rows, self.scratch_threads))
            self._scratch_rows = rows
        return self.rows_scratch

    def _run_rows(self, stage: str, h: torch.Tensor, slots: list[int], steps: list[int], positions: list[int],
                  final_norm: bool, threads: int | None = None) -> None:
        """``looplm_rows_layers``: the stage's layers on every row of h [R, D] (in place), row r at
        cache row ``slots[r]``, loop step ``steps[r]`` (the prelude's one slot: step 0) and
        position ``positions[r]``, on ``threads`` threads (default ``self.threads``)."""
        count = len(slots)
        ints = ctypes.c_int * count
        steps = [0] * count if stage == "prelude" else steps
        dims, cos, sin, _, norm = self._addresses
        self.kernel.looplm_rows_layers(dims, self._step_arrays[stage], self._counts[stage], count, h.data_ptr(), None,
                                       ints(*steps), ints(*slots), ints(*positions), self.slot_floats,
                                       cos, sin, self._scratch(count).data_ptr(), norm if final_norm else None,
                                       min(threads or self.threads, self.scratch_threads))

    def prefills_rows(self, length: int) -> bool:
        """Whether ``prefill_rows`` prefills a prompt of ``length`` tokens (see ``PREFILL_ROWS``)."""
        return (self.simd and length <= self.prefill_chunk
                and (self.float32_layers or self.token_step_bytes <= ROWS_PREFILL_BYTES))

    def prefill_rows(self, prompt: list[int], slot: int, steps: int, view) -> list[torch.Tensor]:
        """The model's forward over ``prompt`` into cache row ``slot`` at full depth (``steps``
        steps), its positions as rows of that cache row (``prefill_chunk`` rows per call, in order,
        so a position attends to the keys before it at the same step); ``view`` (the cache's row,
        ``KVCache.row``) applies the layout's rules after each step and at the end, as the forward
        does.  Returns the last position's readout after every step, each [1, D]."""
        count, chunk = len(prompt), self.prefill_chunk
        threads = decode_threads(self.layer_bytes * min(count, chunk))  # a row's work per weight byte read
        positions = list(range(count))

        def run(stage: str, h: torch.Tensor, step: int, final_norm: bool) -> None:
            for start in range(0, count, chunk):
                end = min(start + chunk, count)
                self._run_rows(stage, h[start:end], [slot] * (end - start), [step] * (end - start),
                               positions[start:end], final_norm, threads)

        e = self.embedding.index_select(0, torch.tensor(prompt))
        if self._step_arrays["prelude"] is not None:
            run("prelude", e, 0, False)
        h, readouts = e.clone(), []
        for step in range(steps):
            run("core", h, step, self.config.step_norm)
            if self._step_arrays["coda"] is not None:
                readout = h.clone()
                run("coda", readout, step, True)
                readouts.append(readout[-1:])
            elif self.config.step_norm:
                readouts.append(h[-1:].clone())
            else:
                readouts.append(torch.rms_norm(h[-1:], (self.config.d_model,), self.norm, self.config.norm_eps))
            view.after_step(step, 0, count)
        view.finish(0, count, steps)
        return readouts

    def q_exit_replay(self, readouts: torch.Tensor, min_steps: int, threshold: float) -> int:
        """The step a prefilled prompt's last token exits at by Q-exit, from its readouts after
        every step [S, D] (``looplm_q_exit_replay``: the decision ``exit_step`` makes); S where no
        earlier step exits."""
        readouts = readouts.contiguous()
        return self.kernel.looplm_q_exit_replay(readouts.data_ptr(), readouts.shape[0], self.config.d_model,
                                                self._gate_address, self.gate_bias, min_steps, threshold)


class NativeRowsStepper(NativeStepper):
    """The rows of a batched cache through the same C layers: each core, prelude or coda run of
    every row in one ``looplm_rows_layers`` call, whatever loop step and position each row is at
    (its step picks the K/V slots, its cache row and position where it writes and what it
    attends); the projections read each weight block once for all rows.  Embedding, the final
    norm, the gate and the head are one torch op each over the rows.  No ``whole_token``: the
    scheduler steps every row, so rows leaving early free their place in the next step."""

    def __init__(self, model, cache: KVCache, compile_steps: bool = False):
        super().__init__(model, cache, compile_steps)
        config = self.config
        self.threads = decode_threads(self.layer_bytes * cache.batch_size)  # a row's work per weight byte read
        self.whole_token = None
        self._scratch(cache.batch_size)
        self.gate_projection = Projection(weights=self.gate_weight.data_ptr()) if self.gate_weight is not None else None
        # ``exit_step``: a whole iteration of Q-exit / fixed-depth rows in one C call (no coda: the
        # readout is the step's state, normed), for the layouts in ``exit_step_layouts``.
        self.exit_step = self._exit_step if self._step_arrays["coda"] is None else None
        self.exit_step_embeds = self._step_arrays["prelude"] is None  # entering rows' h = e = their embedding
        self.readout_rows = torch.zeros(cache.batch_size, config.d_model)
        # The float32 head packed in panels of 64 outputs (ops.panels): a batch of rows' logits as
        # broadcast products, no horizontal sums (the kernel reads it where the CPU has AVX-512).
        self.head_panels = self._keep_tensor(ops.panels(self.head)) if self.head.dtype == torch.float32 else None
        self._panels_address = self.head_panels.data_ptr() if self.head_panels is not None else None
        self._exit_run = self._exit_run_arguments(cache.batch_size) if self.exit_step is not None else None
        self._exit_run_address = ctypes.addressof(self._exit_run) if self._exit_run is not None else None

    exit_step_layouts = ("last_exited",)

    def _exit_run_arguments(self, rows: int) -> RowsRun:
        """``looplm_rows_run``'s fixed arguments, and its per-row arrays for up to ``rows`` rows, set
        up once: a call then converts ten arguments, not forty."""
        ints, config = ctypes.c_int * rows, self.config
        arrays = {name: ints() for name in ("step", "slot", "pos", "max_steps", "min_steps", "tokens", "left", "final",
                                            "done", "best", "fed_count", "fed_offset", "at", "applied", "ended")}
        arrays.update(q=(ctypes.c_double * rows)(), top=(ctypes.c_float * rows)(), stop_ids=ints())
        arrays.update({name: (ctypes.c_int * 0)() for name in self._FED})  # grown to what a call may feed back
        self._arrays = arrays
        _, cos, sin, _, norm = self._addresses

        def addresses(*names):
            return (ctypes.addressof(arrays[name]) for name in names)

        return RowsRun(ctypes.addressof(self.dims), ctypes.addressof(self._step_arrays["core"]), config.n_core_layers,
                       self.cache.max_steps, self.threads, config.vocab_size, self.slot_floats, cos, sin,
                       norm if config.step_norm else None, norm, self._gate_address, self.gate_bias or 0.0,
                       self._head_address, self._panels_address, self._embedding_address,
                       self.readout_rows.data_ptr(), *addresses("step", "slot", "pos", "max_steps", "min_steps",
                                                                "tokens", "left", "final", "q", "done", "best", "top",
                                                                "stop_ids"),
                       0, 0, *addresses(*self._FED, "fed_count", "fed_offset", "at", "applied", "ended"))

    _FED = ("fed_tokens", "fed_steps", "fed_order")  # RowsRun's arrays of the tokens fed back, one int a token

    def _exit_step(self, states: torch.Tensor, rows, max_steps: list[int], min_steps: list[int],
                   thresholds: list[float], survival: torch.Tensor, tokens: list[int],
                   inputs: torch.Tensor, ahead: RunAhead | None = None):
        """``looplm_rows_run``: every row's core step on its state in ``states`` [B, D] (by cache
        row, in place), its readout and exit decision (Q-exit where its threshold is at most 1,
        reading and updating ``survival`` [B] float64 by cache row; else at ``max_steps``), the
        LAST_EXITED copies, logits and argmax of the rows that are done.  A row whose ``tokens``
        entry is a token id (not -1) enters first (``exit_step_embeds``: no prelude, so its state
        and its row of ``inputs`` [B, D] are the token's embedding row).  With ``ahead``, further
        iterations run in the same call while every done row may take its greedy token at once
        (``RunAhead``; its last ``standby`` rows wait for the places of rows whose requests end, and
        with ``leave`` a row whose request ends there may go with none to take its place).
        Returns (the steps each done row of the last iteration ran (0: runs on), by place, those
        rows' logits [done, V], their argmax and the largest logit, which greedy sampling checks is
        finite, and a ``RanAhead``)."""
        run, arrays, count = self._exit_run, self._arrays, len(rows.slots)
        running = count - (ahead.standby if ahead else 0)
        arrays["step"][:count], arrays["slot"][:count], arrays["pos"][:count] = rows.steps, rows.slots, rows.positions
        arrays["max_steps"][:count], arrays["min_steps"][:count] = max_steps, min_steps
        arrays["q"][:count], arrays["tokens"][:count] = thresholds, tokens
        if ahead is None:
            arrays["left"][:count] = arrays["final"][:count] = [0] * count
        else:
            arrays["left"][:count], arrays["final"][:count] = ahead.left, ahead.final
            room = sum(ahead.left) + sum(ahead.final)  # a fed token takes one of a row's ``left``, or its final
            if room > len(arrays["fed_order"]):
                for name in self._FED:
                    arrays[name] = (ctypes.c_int * room)()
                    setattr(run, name, ctypes.addressof(arrays[name]))
            if len(ahead.stop_ids) > len(arrays["stop_ids"]):
                arrays["stop_ids"] = (ctypes.c_int * len(ahead.stop_ids))()
                run.stop_ids = ctypes.addressof(arrays["stop_ids"])
            arrays["stop_ids"][:len(ahead.stop_ids)] = ahead.stop_ids
        run.n_stop, run.leave = (0, 0) if ahead is None else (len(ahead.stop_ids), ahead.leave)
        run.threads = min(self.threads, self.scratch_threads)
        logits = torch.empty(running, self.config.vocab_size)
        finished = self.kernel.looplm_rows_run(
            self._exit_run_address, running, count - running, states.data_ptr(), survival.data_ptr(), inputs.data_ptr(),
            self.rows_scratch.data_ptr(), logits.data_ptr(), ahead.iterations if ahead else 1,
            ahead.seconds if ahead else 0.0)
        iterations, mixed, recorded, places = run.counts  # places: the rows in the batch at the end
        fed, order, ended = [], [], []
        if recorded:
            tokens, steps = arrays["fed_tokens"], arrays["fed_steps"]
            fed = [(index, tokens[offset:offset + taken], steps[offset:offset + taken]) for index, (taken, offset)
                   in enumerate(zip(arrays["fed_count"][:count], arrays["fed_offset"][:count])) if taken]
            order = arrays["fed_order"][:recorded]
            ended = [index for index, flag in enumerate(arrays["ended"][:count]) if flag]
        ran = RanAhead(fed, order, ended, iterations, mixed, arrays["applied"][:count], arrays["at"][:places],
                       arrays["step"][:places], arrays["pos"][:places])
        return arrays["done"][:places], logits[:finished], arrays["best"][:finished], arrays["top"][:finished], ran

    def embed(self, tokens: list[int], rows) -> torch.Tensor:
        e = self.embedding.index_select(0, torch.tensor(tokens))
        if self._step_arrays["prelude"] is not None:
            self._run_rows("prelude", e, rows.slots, rows.steps, rows.positions, False)
        return e

    def initial_state(self, e: torch.Tensor, rows) -> torch.Tensor:
        return e.clone()

    def core_step(self, h: torch.Tensor, e: torch.Tensor, rows) -> torch.Tensor:
        h = h.contiguous().clone()  # the scheduler's tensor stays as it was
        self._run_rows("core", h, rows.slots, rows.steps, rows.positions, self.config.step_norm)
        return h

    def readout(self, h: torch.Tensor, rows) -> torch.Tensor:
        if self._step_arrays["coda"] is not None:
            readout = h.contiguous().clone()
            self._run_rows("coda", readout, rows.slots, rows.steps, rows.positions, True)
            return readout
        if self.config.step_norm:
            return h
        return torch.rms_norm(h, (self.config.d_model,), self.norm, self.config.norm_eps)

    def gate_logits(self, readout: torch.Tensor) -> torch.Tensor:
        """The exit gate's logits [R] (one C call: torch's linear to one output costs ~40 µs)."""
        readout = readout.contiguous()
        out = torch.empty(readout.shape[0])
        self.kernel.looplm_rows_head(ctypes.byref(self.gate_projection), None, readout.data_ptr(), readout.shape[0],
                                     out.data_ptr(), 1, self.config.d_model, None, None, 1)
        return out.add_(self.gate_bias)

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        return self.logits_argmax(readout)[0]

    def logits_argmax(self, readout: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The head's logits [R, V] of the rows and each row's argmax, in one C call."""
        readout = readout.contiguous()
        count, vocab = readout.shape[0], self.config.vocab_size
        logits = torch.empty(count, vocab)
        best = (ctypes.c_int * count)()
        self.kernel.looplm_rows_head(ctypes.byref(self.head_projection), self._panels_address, readout.data_ptr(),
                                     count, logits.data_ptr(), vocab, self.config.d_model, best, None, self.threads)
        return logits, list(best)
