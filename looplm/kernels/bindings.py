"""ctypes declarations of the C library's entry points: the plain-loop kernel
(``csrc/decode_kernel.c``), a training step's row passes (``csrc/train_kernel.c``) and the
runtime for every model family (``csrc/runtime.h``).

The structures mirror the C structs field for field; ``declare`` gives every function its
argument and return types, and ``SYMBOLS`` lists what a loaded library must export for
``looplm.kernels.build`` to accept it.  The runtime's model and state are opaque pointers.
"""

from __future__ import annotations

import ctypes


class Dims(ctypes.Structure):
    _fields_ = [("d_model", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("hidden", ctypes.c_int), ("max_len", ctypes.c_int),
                ("eps", ctypes.c_float)]


class Projection(ctypes.Structure):
    """float32 ``weights``, or Q8_0 int8 ``values`` + float32 ``scales`` (looplm.quant; with
    ``quantize_input`` the input is quantised too: int8 × int8 dot products), or ``bf16`` weights,
    or ``ternary`` 2-bit codes (looplm.checkpoint.ternary's layout) + one ``ternary_scale``."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("weights", "values", "scales", "bf16")] + [
        ("quantize_input", ctypes.c_int), ("ternary", ctypes.c_void_p), ("ternary_scale", ctypes.c_float)]


class Layer(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm")]
                + [(name, Projection) for name in ("qkv", "out", "gate_up", "down")]
                + [(name, ctypes.c_void_p) for name in ("keys", "values")])


class TokenLoop(ctypes.Structure):
    """``looplm_token``'s fixed arguments (see decode_kernel.c)."""
    _fields_ = [("dims", ctypes.c_void_p), ("steps", ctypes.c_void_p), ("count", ctypes.c_int),
                ("threads", ctypes.c_int), ("vocab", ctypes.c_int), ("h", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("scratch", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("gate_w", ctypes.c_void_p), ("gate_b", ctypes.c_float),
                ("head", ctypes.c_void_p), ("embedding", ctypes.c_void_p), ("logits", ctypes.c_void_p),
                ("best", ctypes.c_void_p)]


class RowsRun(ctypes.Structure):
    """``looplm_rows_run``'s fixed arguments and per-row arrays (see decode_kernel.c)."""
    _fields_ = ([("dims", ctypes.c_void_p), ("steps", ctypes.c_void_p)]
                + [(name, ctypes.c_int) for name in ("count", "cache_steps", "threads", "vocab")]
                + [("slot_floats", ctypes.c_long)]
                + [(name, ctypes.c_void_p) for name in ("cos", "sin", "step_norm", "norm", "gate_w")]
                + [("gate_b", ctypes.c_float)]
                + [(name, ctypes.c_void_p) for name in ("head", "head_panels", "embedding", "readout", "step", "slot",
                                                        "pos", "max_steps", "min_steps", "tokens", "left", "final",
                                                        "q", "done", "best", "top", "stop_ids")]
                + [("n_stop", ctypes.c_int), ("leave", ctypes.c_int)]
                + [(name, ctypes.c_void_p) for name in ("fed_tokens", "fed_steps", "fed_order", "fed_count",
                                                        "fed_offset", "at", "applied", "ended")]
                + [("counts", ctypes.c_int * 4)])


class Exit(ctypes.Structure):
    """``LrExit`` (runtime.h): a token's most and fewest loop steps, its Q-exit threshold (> 1: none)
    and the per-step logits callback (unused here: NULL)."""
    _fields_ = [("max_steps", ctypes.c_int), ("min_steps", ctypes.c_int), ("q", ctypes.c_double),
                ("dump", ctypes.c_void_p), ("dump_context", ctypes.c_void_p)]


_POINTER, _INT = ctypes.c_void_p, ctypes.c_int
_SIZE, _FLOAT = ctypes.c_size_t, ctypes.c_float

# name → (argument types, return type)
SIGNATURES = {
    "looplm_layers": ([ctypes.POINTER(Dims), ctypes.POINTER(Layer), _INT, _POINTER, _INT, _POINTER, _POINTER,
                       _POINTER, _POINTER, _INT], None),
    "looplm_matvec": ([_POINTER, _POINTER, _POINTER, _INT, _INT, _INT], None),
    "looplm_rms_norm": ([_POINTER, _POINTER, _POINTER, _INT, ctypes.c_float], None),
    "looplm_q8_matmul": ([_POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _INT, _INT, _INT, _INT, _INT], None),
    "looplm_project": ([ctypes.POINTER(Projection), _POINTER, _POINTER, _INT, _INT, _INT], None),
    "looplm_simd_paths": ([], ctypes.c_char_p),
    "looplm_exit_loop": ([ctypes.POINTER(Dims), ctypes.POINTER(ctypes.POINTER(Layer)), _INT, _INT, _INT, _POINTER,
                          _INT, _POINTER, _POINTER, _POINTER, _POINTER, _INT, _POINTER, ctypes.c_float,
                          ctypes.c_double, _INT, _POINTER, _POINTER, _INT, _POINTER], _INT),
    "looplm_token": ([_POINTER, _INT, _INT, _INT, _INT, ctypes.c_double], _INT),
    "looplm_rows_attention": ([_POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _INT, _INT, _INT, _INT, _INT,
                               _POINTER, _INT], None),
    "looplm_scratch_floats": ([ctypes.POINTER(Dims)], ctypes.c_long),
    "looplm_rows_layers": ([ctypes.POINTER(Dims), ctypes.POINTER(ctypes.POINTER(Layer)), _INT, _INT, _POINTER,
                            _POINTER, _POINTER, _POINTER, _POINTER, ctypes.c_long, _POINTER, _POINTER, _POINTER,
                            _POINTER, _INT], None),
    "looplm_rows_scratch_floats": ([ctypes.POINTER(Dims), _INT, _INT], ctypes.c_long),
    "looplm_rows_run": ([_POINTER, _INT, _INT, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _INT,
                         ctypes.c_double], _INT),
    "looplm_q_exit_replay": ([_POINTER, _INT, _INT, _POINTER, ctypes.c_float, _INT, ctypes.c_double], _INT),
    "looplm_rows_head": ([ctypes.POINTER(Projection), _POINTER, _POINTER, _INT, _POINTER, _INT, _INT, _POINTER,
                          _POINTER, _INT], None),
    "looplm_copy_positions": ([_POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _INT, _INT, _INT, _INT,
                               _INT], None),
    "looplm_softmax_xent": ([_POINTER, _INT, _POINTER, _POINTER, _POINTER, ctypes.c_long, ctypes.c_long, _INT],
                            ctypes.c_long),
    "looplm_softmax_xent_grad": ([_POINTER, _POINTER, _POINTER, _POINTER, _INT, ctypes.c_long, ctypes.c_long, _INT],
                                 None),
    "looplm_rms_norm_rows": ([_POINTER, _POINTER, ctypes.c_float, _POINTER, _POINTER, _POINTER, _INT, ctypes.c_long,
                              ctypes.c_long, _INT], None),
    "looplm_rms_norm_grad_rows": ([_POINTER, _INT, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, ctypes.c_long,
                                   ctypes.c_long, _INT], None),
    "looplm_swiglu_rows": ([_POINTER, _POINTER, _INT, ctypes.c_long, ctypes.c_long, _INT], None),
    "looplm_swiglu_grad_rows": ([_POINTER, _POINTER, _POINTER, _INT, ctypes.c_long, ctypes.c_long, _INT], None),
    "looplm_rope": ([_POINTER] + [ctypes.c_long] * 3 + [_POINTER] + [ctypes.c_long] * 8
                    + [_POINTER, _POINTER, ctypes.c_float, _INT, _INT], None),
    # the runtime (runtime.h); every `char *error` argument is a buffer of ERROR_BYTES
    "lr_model_new": ([ctypes.c_char_p, _SIZE, ctypes.c_char_p], _POINTER),
    "lr_model_bind": ([_POINTER, ctypes.c_char_p, _INT, _POINTER, _POINTER, _INT, ctypes.POINTER(ctypes.c_int64),
                       ctypes.c_char_p], _INT),
    "lr_model_finish": ([_POINTER, ctypes.c_char_p], _INT),
    "lr_model_free": ([_POINTER], None),
    "lr_state_new": ([_POINTER, _INT, _INT, _INT, _INT, _INT, ctypes.c_char_p], _POINTER),
    "lr_state_bind": ([_POINTER, _INT, _INT, _POINTER, ctypes.c_char_p], _INT),
    "lr_state_ready": ([_POINTER, ctypes.c_char_p], _INT),
    "lr_state_set_threads": ([_POINTER, _INT], None),
    "lr_state_free": ([_POINTER], None),
    "lr_embed": ([_POINTER, _INT, _INT, _POINTER], None),
    "lr_initial_state": ([_POINTER, _POINTER, _INT, _POINTER], None),
    "lr_core_step": ([_POINTER, _POINTER, _INT, _INT, _POINTER], None),
    "lr_readout": ([_POINTER, _POINTER, _INT, _INT, _POINTER], None),
    "lr_gate_logit": ([_POINTER, _POINTER], _FLOAT),
    "lr_logits": ([_POINTER, _POINTER, _POINTER], None),
    "lr_argmax": ([_POINTER, _INT], _INT),
    "lr_token": ([_POINTER, _INT, _INT, ctypes.POINTER(Exit), _POINTER, ctypes.POINTER(ctypes.c_int)], _INT),
    "lr_prefill": ([_POINTER, ctypes.POINTER(ctypes.c_int), _INT, _INT, ctypes.POINTER(Exit), _POINTER,
                    ctypes.POINTER(ctypes.c_int)], _INT),
    "lr_simd": ([], ctypes.c_char_p),
}
ERROR_BYTES = 512  # LR_ERROR_BYTES
SYMBOLS = tuple(SIGNATURES)


def missing_symbols(library: ctypes.CDLL) -> list[str]:
    """The entry points ``library`` lacks (a stale or foreign library)."""
    return [name for name in SYMBOLS if not hasattr(library, name)]


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Set every entry point's argument and return types; returns ``library``."""
    for name, (arguments, result) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library
