"""``RuntimeStepper``: every model family's per-token decode steps through the C runtime
(``csrc/runtime.h``), the same C code the standalone ``looplm-run`` program runs.

The model is described to C as ``looplm-run`` reads it from a GGUF file: the config as JSON, then
every tensor under its GGUF name (``looplm.checkpoint.gguf.gguf_name``), read in place (int8
``Int8Linear`` layers as their Q8_0 values and scales; ternary layers (``model.ternary``) as their
2-bit codes and scale: a packed ``TernaryLinear``'s own, a ``BitLinear``'s from ``ternary_codes``
of its shadow weight, packed once here).  The state's cache slots are the
``KVCache``'s own tensors, so the batched torch prefill, the Python layout rules of the per-step
path and this stepper read and write the same storage.  A ``looplm.steppers.Stepper`` for one row
(tensors [1, D]); ``whole_token`` runs a whole token with its exit rule and every KV layout's rules
in one C call, ``prefill_tokens`` a prompt at full depth.

``NativeStepper`` (the fused plain-loop kernel) still serves Ouro's plain loop; this stepper serves
every other configuration on a float32 CPU model with a batch-1 cache (``steppers.NativeBackend``).
"""

from __future__ import annotations

import ctypes
import json

import torch

from looplm.cache import KV_LAYOUTS, KVCache
from looplm.checkpoint.ternary import pack_ternary
from looplm.errors import LoopLMError
from looplm.kernels.bindings import ERROR_BYTES, Exit
from looplm.kernels.build import load_kernel, unavailable_reason
from looplm.kernels.native_stepper import c_decode_unsupported, decode_threads
from looplm.model.bitlinear import BitLinear, ternary_codes
from looplm.quant import Int8Linear
from looplm.ternary import TernaryLinear

_FLOAT = 4  # bytes
# The exit threshold that never fires: Q-exit stops where the exit CDF reaches q, and a CDF never
# exceeds 1 (the C side reads q > 1 as "no early exit").
NO_EXIT = float("inf")
BIND_F32, BIND_Q8_0, BIND_TERNARY = 0, 1, 2  # LR_BIND_*
# Slot parts (runtime.h LR_PART_*), in looplm.cache.recurrent_state_shapes' order per kind.
KEYS, VALUES = 0, 1
CONV, STATE, SEGMENT_STATES, SEGMENT_KEYS, OPEN_KEY_SUM, LOOP_KEY_SUM = 0, 1, 2, 3, 4, 5
SHIFT, NUMERATOR, DENOMINATOR = 0, 1, 2
FFN_PREVIOUS = 6


def _error() -> ctypes.Array:
    return ctypes.create_string_buffer(ERROR_BYTES)


def _config_json(model) -> bytes:
    return json.dumps(model.config.to_dict()).encode()


def runtime_unsupported(model, cache: KVCache) -> str | None:
    """None when the C runtime can decode this model with this cache, else the reason."""
    if (reason := c_decode_unsupported(model, cache, "the C runtime")) is not None:
        return reason
    if any(isinstance(module, Int8Linear) and module.bias is not None for module in model.modules()):
        return "the C runtime reads int8 layers without a bias"
    if any(isinstance(module, (BitLinear, TernaryLinear)) and module.bias is not None for module in model.modules()):
        return "the C runtime reads ternary layers without a bias"
    if any(isinstance(module, Int8Linear) and module.quantizes_input for module in model.modules()):
        return ("the C runtime multiplies int8 weights by float32 activations, and this model's int8 layers"
                " quantise their inputs (quantize_model(..., activations='float') runs here)")
    from looplm.bf16 import is_bf16

    if is_bf16(model):
        return "the C runtime reads float32 and int8 weights, not bf16 copies"
    kernel = load_kernel()
    if kernel is None:
        return unavailable_reason()
    config, error = _config_json(model), _error()
    handle = kernel.lr_model_new(config, len(config), error)
    if not handle:
        return error.value.decode()
    kernel.lr_model_free(handle)
    return None


def bound_tensors(model):
    """(GGUF name, LR_BIND_* kind, data, scales, shape) for every tensor the runtime reads: the state
    dict's under their GGUF names (an ``Int8Linear`` as Q8_0 values and scales, a ternary layer as
    its 2-bit codes and 1-element scale, each under its weight's name and shape) and the derived
    ones (the eval noise table)."""
    from looplm.checkpoint.gguf import gguf_name
    from looplm.model.loading import derived_tensors

    int8, ternary = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            int8[name] = module
        elif isinstance(module, (BitLinear, TernaryLinear)):
            ternary[name] = module
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in int8:
            if leaf == "values":
                values = int8[owner].values
                yield gguf_name(f"{owner}.weight"), BIND_Q8_0, values, int8[owner].scales, tuple(values.shape)
            continue
        if owner in ternary:
            module = ternary[owner]
            if isinstance(module, TernaryLinear) and leaf == "packed":
                yield (gguf_name(f"{owner}.weight"), BIND_TERNARY, module.packed, module.scale.reshape(1),
                       (module.out_features, module.in_features))
            elif isinstance(module, BitLinear) and leaf == "weight":
                codes, scale = ternary_codes(module.weight.detach().float())
                yield (gguf_name(name), BIND_TERNARY, pack_ternary(codes.to(torch.int8)), scale.reshape(1),
                       tuple(codes.shape))
            continue
        yield gguf_name(name), BIND_F32, tensor, None, tuple(tensor.shape)
    for name, tensor in derived_tensors(model).items():
        yield name, BIND_F32, tensor, None, tuple(tensor.shape)


def _slot_parts(cache: KVCache, slot: int) -> list[tuple[int, torch.Tensor]]:
    """(part, batch row 0 of its storage) of one cache slot, in the runtime's numbering."""
    kind, index, config = cache.kinds[slot], cache.index[slot], cache.config
    if kind == "A":
        parts = [(KEYS, cache.keys[index][0]), (VALUES, cache.values[index][0])]
    else:
        if kind == "G":
            numbers = [CONV, STATE] + ([SEGMENT_STATES, SEGMENT_KEYS, OPEN_KEY_SUM] if config.mc_segment_size else [])
            numbers += [LOOP_KEY_SUM] if config.loop_mc else []
        else:
            numbers = [SHIFT, NUMERATOR, DENOMINATOR]
        parts = [(number, tensor[index][0]) for number, tensor in zip(numbers, cache.states[kind])]
    return parts + [(FFN_PREVIOUS, tensor[slot][0]) for tensor in cache.states["F"]]


class RuntimeStepper:
    """One token through prelude, loop steps, coda, gate and head in the C runtime."""

    # ``whole_token``: a token in one call under every layout (the runtime applies the layouts' rules).
    whole_token_layouts = KV_LAYOUTS
    unsupported = staticmethod(runtime_unsupported)

    def __init__(self, model, cache: KVCache, compile_steps: bool = False):
        reason = runtime_unsupported(model, cache)
        if reason is not None:
            raise ValueError(reason)
        self.kernel = kernel = load_kernel()
        config = model.config
        self.config, self.cache = config, cache
        self._keep: list[torch.Tensor] = []  # every tensor whose address C holds
        self.model_handle = self.state = None
        error, text = _error(), _config_json(model)
        self.model_handle = kernel.lr_model_new(text, len(text), error)
        for name, kind, data, scales, logical in bound_tensors(model):
            data = self._keep_tensor(data)
            shape = (ctypes.c_int64 * len(logical))(*logical)
            scale_pointer = self._keep_tensor(scales).data_ptr() if scales is not None else None
            if not kernel.lr_model_bind(self.model_handle, name.encode(), kind, data.data_ptr(), scale_pointer,
                                        len(logical), shape, error):
                raise LoopLMError(f"the C runtime cannot read this model: {error.value.decode()}")
        if not kernel.lr_model_finish(self.model_handle, error):
            raise LoopLMError(f"the C runtime cannot read this model: {error.value.decode()}")
        self.state = kernel.lr_state_new(self.model_handle, cache.max_len, cache.max_steps,
                                         KV_LAYOUTS.index(cache.layout), cache.groups, 0, error)
        if not self.state:
            raise LoopLMError(f"the C runtime cannot decode with this cache: {error.value.decode()}")
        for slot in range(len(cache.kinds)):
            for part, tensor in _slot_parts(cache, slot):
                if not kernel.lr_state_bind(self.state, slot, part, tensor.data_ptr(), error):
                    raise RuntimeError(f"looplm: binding the cache to the C runtime failed: {error.value.decode()}")
        if not kernel.lr_state_ready(self.state, error):
            raise RuntimeError(f"looplm: the C runtime's state is incomplete: {error.value.decode()}")
        layer_bytes = _FLOAT * config.d_model * (4 * config.n_heads * config.head_dim + 3 * config.ffn_hidden)
        self.threads = decode_threads(layer_bytes)
        kernel.lr_state_set_threads(self.state, self.threads)
        self.token_step_bytes = layer_bytes * config.n_core_layers  # core weights one loop step reads
        width = config.d_model * config.residual_streams  # the state: every mHC stream
        self.e, self.hidden = torch.zeros(width), torch.zeros(width)
        self.readout_buffer = torch.zeros(config.d_model)
        self.logits_buffer = torch.zeros(config.vocab_size)
        self._e, self._hidden = self.e.data_ptr(), self.hidden.data_ptr()
        self._readout, self._logits = self.readout_buffer.data_ptr(), self.logits_buffer.data_ptr()
        self.best = ctypes.c_int(0)  # ``token``'s argmax of the logits
        self.exit = Exit(1, 1, 2.0, None, None)
        self.gate_buffer = torch.zeros(1)
        self.whole_token = self._whole_token

    def __del__(self):
        kernel = getattr(self, "kernel", None)
        if kernel is not None:
            if self.state:
                kernel.lr_state_free(self.state)
            if self.model_handle:
                kernel.lr_model_free(self.model_handle)

    def _keep_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().contiguous()
        self._keep.append(tensor)
        return tensor

    @staticmethod
    def _address(vector: torch.Tensor) -> int:
        if not vector.is_contiguous() or vector.dtype != torch.float32:
            raise ValueError("the C runtime reads contiguous float32 vectors")
        return vector.data_ptr()

    def embed(self, tokens: list[int], rows) -> torch.Tensor:
        self.kernel.lr_embed(self.state, tokens[0], rows.positions[0], self._e)
        return self.e.view(1, -1)

    def initial_state(self, e: torch.Tensor, rows) -> torch.Tensor:
        self.kernel.lr_initial_state(self.state, self._address(e.reshape(-1)), rows.positions[0], self._hidden)
        return self.hidden.view(1, -1)

    def core_step(self, h: torch.Tensor, e: torch.Tensor, rows) -> torch.Tensor:
        if h.data_ptr() != self._hidden:
            self.hidden.copy_(h.reshape(-1))
        injected = self._e if e.data_ptr() == self._e else self._address(e.reshape(-1).contiguous())
        self.kernel.lr_core_step(self.state, self._hidden, rows.steps[0], rows.positions[0], injected)
        return self.hidden.view(1, -1)

    def readout(self, h: torch.Tensor, rows) -> torch.Tensor:
        self.kernel.lr_readout(self.state, self._address(h.reshape(-1).contiguous()), rows.steps[0],
                               rows.positions[0], self._readout)
        return self.readout_buffer.view(1, -1)

    def gate_logits(self, readout: torch.Tensor) -> torch.Tensor:
        self.gate_buffer[0] = self.kernel.lr_gate_logit(self.state, self._address(readout.reshape(-1).contiguous()))
        return self.gate_buffer

    def mixing_gates(self, rows) -> torch.Tensor:
        """model.act_mixing: the halting logit [1] the row's ``core_step`` just computed from its state
        (the C state keeps the token's ACT state; ``lr_gate_logit`` returns it without reading a readout)."""
        return torch.tensor([self.kernel.lr_gate_logit(self.state, self._readout)])

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        self.kernel.lr_logits(self.state, self._address(readout.reshape(-1).contiguous()), self._logits)
        return self.logits_buffer.clone().view(1, -1)

    def _set_exit(self, max_steps: int, min_steps: int, q: float) -> None:
        self.exit.max_steps, self.exit.min_steps, self.exit.q = max_steps, min_steps, q

    def _whole_token(self, token: int, start: int, max_steps: int, min_steps: int, threshold: float | None):
        """The whole token in one call: embedding, prelude, every step with its Q-exit (threshold
        None: none), the layout's rules, the head into ``logits_buffer`` (returned: the next call
        overwrites it) and its argmax.  Returns (steps used, logits [V], argmax)."""
        self._set_exit(max_steps, min_steps, NO_EXIT if threshold is None else threshold)
        ran = self.kernel.lr_token(self.state, token, start, ctypes.byref(self.exit), self._logits,
                                   ctypes.byref(self.best))
        return ran, self.logits_buffer, self.best.value

    def prefills_tokens(self, length: int, max_steps: int) -> bool:
        """Whether a prompt of ``length`` tokens is prefilled by ``prefill_tokens`` (a small model;
        ``NATIVE_PREFILL_BYTES``), under the layouts that keep every step's K/V (the prompt's last
        token then reads what the batched forward would give it)."""
        from looplm.kernels.native_stepper import NATIVE_PREFILL_BYTES

        return (self.cache.layout in ("last_exited", "full", "append_first")
                and length * max_steps * self.token_step_bytes <= NATIVE_PREFILL_BYTES)

    def prefill_tokens(self, tokens: list[int], max_steps: int) -> None:
        """``tokens`` at positions 0, 1, … through every step in one call (a prompt's cache, as the
        batched forward fills it; their logits are not needed)."""
        if not tokens:
            return
        self._set_exit(max_steps, max_steps, NO_EXIT)
        ids = (ctypes.c_int * len(tokens))(*tokens)
        if self.kernel.lr_prefill(self.state, ids, len(tokens), 0, ctypes.byref(self.exit), self._logits,
                                  ctypes.byref(self.best)) < 0:
            raise LoopLMError("out of memory for the prompt's per-step K/V: use the last_exited layout")
