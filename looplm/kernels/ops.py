"""The C kernel's row and block operations, each beside the plain torch version it is held to.

These are the only doors from the rest of looplm into native code (with ``NativeStepper`` for
whole decode steps): the cache's row storage and the int8 layers call these functions
and never touch ctypes or addresses themselves.  Every fast function falls back to its
reference where the kernel does not serve the inputs (not CPU float32, not built), and tests
hold each pair equal (tests/test_row_attention.py, tests/test_quant.py, tests/test_train_kernel.py).
A training step's row passes are here too: the loss's (``softmax_cross_entropy``,
``cross_entropy_grad``, called by ``looplm.training.fused_ce`` on each chunk of the head's logits)
RMSNorm's (``rms_norm_rows``, ``rms_norm_grad_rows``, called by ``looplm.model.norms``) and
SwiGLU's (``swiglu_rows``, ``swiglu_grad_rows``, called by ``looplm.model.ffn``) and RoPE's
(``rope``, called by ``looplm.model.rope``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from looplm.kernels.bindings import Projection
from looplm.kernels.build import load_kernel


def serves(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether the kernel serves storage like ``tensors``: on the CPU, contiguous, each of one of
    ``dtypes`` (float32 unless said), the kernel built.  Elsewhere the torch references run."""
    return (all(tensor.device.type == "cpu" and tensor.dtype in dtypes and tensor.is_contiguous() for tensor in tensors)
            and load_kernel() is not None)


def _address(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def rows_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                   ends: torch.Tensor) -> torch.Tensor:
    """Decode attention of rows of a cache, each at its own position, read in place.

    q [R, H, 1, hd] (RoPE applied); keys, values: rows of storage [N, H_kv, max_len, hd] (a
    cache's [slots, B, ...] viewed as slots·B rows); query i attends row ``rows[i]``'s keys
    [0, ends[i]).  Returns softmax(q·kᵀ/√hd)·v over those keys, [R, H, 1, hd]."""
    if not (serves(keys) and serves(values)):
        return rows_attention_reference(q, keys, values, rows, ends)
    count, heads, _, head_dim = q.shape
    query = q.contiguous()
    out = torch.empty_like(query)
    rows, ends = rows.to(torch.int64).contiguous(), ends.to(torch.int64).contiguous()
    load_kernel().looplm_rows_attention(_address(query), _address(keys), _address(values), _address(rows),
                                        _address(ends), count, heads, keys.shape[1], keys.shape[2], head_dim,
                                        _address(out), torch.get_num_threads())
    return out


def rows_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                             ends: torch.Tensor) -> torch.Tensor:
    """``rows_attention`` with torch ops: gather the rows, mask keys from each row's end on, SDPA."""
    keys, values, mask = gather_rows(keys, values, rows, ends)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != q.shape[1])


def gather_rows(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor):
    """Copies of ``rows`` of keys, values [N, H_kv, max_len, w] up to the longest end, and the
    mask [R, 1, 1, L] of the keys each row may see (positions before its end)."""
    length = int(ends.max())
    mask = (torch.arange(length, device=keys.device) < ends.unsqueeze(1)).view(len(rows), 1, 1, length)
    return keys[:, :, :length].index_select(0, rows), values[:, :, :length].index_select(0, rows), mask


def copy_positions(storages: Sequence[torch.Tensor], source: Sequence[int], target: Sequence[int],
                   rows: Sequence[int], positions: Sequence[int]) -> None:
    """Each storage [G, B, H, L, w] (the keys and the values): ``storage[source[i], rows[i], :,
    positions[i]]`` is copied to group ``target[i]`` for every i (int lists of one length), in place —
    the K/V a token that left the loop early gives the steps it skipped.  One C call where the
    kernel serves the storages (the index lists go to C as they are: a small tensor costs more to
    build than the copies), else ``copy_positions_reference``."""
    if not all(serves(storage) and storage.dim() == 5 for storage in storages) or len(storages) > 2:
        copy_positions_reference(storages, source, target, rows, positions)
        return
    count = len(source)
    index = [(ctypes.c_int64 * count)(*values) for values in (source, target, rows, positions)]
    # one call for two storages of one shape (keys and values); each its own where they differ (MLA)
    calls = [storages] if len({storage.shape for storage in storages}) == 1 else [[storage] for storage in storages]
    for call in calls:
        _, batch, heads, length, width = call[0].shape
        load_kernel().looplm_copy_positions(_address(call[0]), _address(call[1]) if len(call) > 1 else None,
                                            *index, count, batch, heads, length, width)


def copy_positions_reference(storages: Sequence[torch.Tensor], source: Sequence[int], target: Sequence[int],
                             rows: Sequence[int], positions: Sequence[int]) -> None:
    """``copy_positions`` by advanced indexing."""
    for storage in storages:
        source_, target_, rows_, positions_ = (torch.tensor(values, device=storage.device)
                                               for values in (source, target, rows, positions))
        storage[target_, rows_, :, positions_] = storage[source_, rows_, :, positions_]


PANEL = 64  # outputs per panel of ``panels`` (matvec.h panel_rows)


def panels(weight: torch.Tensor) -> torch.Tensor:
    """A float32 W [N, K] packed for the kernel's batched head (``looplm_rows_head``): panels of 64
    outputs, each [K, 64] in order, the last zero-padded — [ceil(N/64), K, 64]."""
    rows, columns = weight.shape
    padded = torch.zeros(-(-rows // PANEL) * PANEL, columns, dtype=torch.float32)
    padded[:rows] = weight.detach()
    return padded.view(-1, PANEL, columns).transpose(1, 2).contiguous()


def q8_matmul(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
              quantize_input: bool = False) -> torch.Tensor:
    """y = x Wᵀ + bias with W stored as Q8_0 blocks (int8 ``values`` [N, K], float32 ``scales``
    [N, K/32]); x [R, K] float32 on the CPU, where ``serves(x)``.  The kernel reads a quarter of
    the bytes a float32 matvec reads.  It widens the int8 weights in registers (the reference's
    products, summed in another order), or with ``quantize_input`` quantises each x row to Q8_0
    and sums int8 × int8 products (``looplm.quant.q8_matmul_reference``).  The reference of the float form
    (dequantise, then ``F.linear``) is ``looplm.quant.Int8Linear.reference_forward``."""
    rows, columns = x.shape
    out = torch.empty(rows, values.shape[0])
    load_kernel().looplm_q8_matmul(values.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(),
                                   x.data_ptr(), out.data_ptr(), rows, values.shape[0], columns, int(quantize_input),
                                   torch.get_num_threads())
    return out


def bf16_matvec(weight: torch.Tensor, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """y = W x [N] for a bf16 W [N, K] and a float32 x [K], through the kernel's bf16 projection
    (the decode layers' and the head's): x is rounded to bf16 and the exact products summed in
    float32 — ``vdpbf16ps`` where the kernel has it, else widened to float32
    (``bf16_matvec_reference``)."""
    weight, x = weight.contiguous(), x.float().contiguous()
    out = torch.empty(weight.shape[0])
    projection = Projection(bf16=weight.data_ptr())
    load_kernel().looplm_project(ctypes.byref(projection), x.data_ptr(), out.data_ptr(), weight.shape[0],
                                 weight.shape[1], threads)
    return out


def bf16_matvec_reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``bf16_matvec`` in float64 [N]: the bf16 weights times x rounded to bf16 (torch's rounding,
    to nearest even), summed exactly."""
    return weight.double() @ x.to(torch.bfloat16).double()


def ternary_matvec(packed: torch.Tensor, scale: torch.Tensor | float, x: torch.Tensor, in_features: int,
                   threads: int = 1) -> torch.Tensor:
    """y = W x [N] for a ternary W (2-bit codes ``packed`` [N, ceil(K/4)] in looplm's layout and one
    float32 ``scale``, as ``looplm.ternary.TernaryLinear`` holds them) and a float32 x [K], through
    the runtime's ternary projection (matvec.h): x quantised per token to int8 levels as
    ``BitLinear`` does, the integer dot products with the codes exact, then times scale / factor —
    ``TernaryLinear.forward``'s arithmetic, step for step."""
    packed, x = packed.contiguous(), x.float().contiguous()
    out = torch.empty(packed.shape[0])
    projection = Projection(ternary=packed.data_ptr(), ternary_scale=float(scale))
    load_kernel().looplm_project(ctypes.byref(projection), x.data_ptr(), out.data_ptr(), packed.shape[0],
                                 in_features, threads)
    return out


_WIDTHS = (torch.float32, torch.bfloat16)  # the training passes' float32 or bf16 rows


def trains_on_cpu(tensor: torch.Tensor) -> bool:
    """Whether a model module's pass over ``tensor`` is a training step's on the CPU that the C
    passes below may take (gradients on, outside torch.compile, which traces the references and
    would break its graph at a C call)."""
    return tensor.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of rows: fills ``probs`` [R, V] (float32) with softmax(logits) and
    returns the losses [R] (float32), log Σ_j exp(l_j − m) + m − l_target with m the row's max.

    logits [R, V]: float32 (may be ``probs`` itself: done in place) or bf16; targets [R] int64 in
    [0, V).  One pass over each row in C (``csrc/train_kernel.c``); its exponential and sums differ
    from the reference's in float32 rounding only."""
    if not (serves(probs) and serves(logits, dtypes=_WIDTHS) and serves(targets, dtypes=(torch.int64,))):
        return softmax_cross_entropy_reference(logits, targets, probs)
    losses = torch.empty(logits.shape[0], dtype=torch.float32)
    bad = load_kernel().looplm_softmax_xent(_address(logits), int(logits.dtype == torch.bfloat16), _address(targets),
                                            _address(probs), _address(losses), logits.shape[0], logits.shape[1],
                                            torch.get_num_threads())
    if bad:
        raise IndexError(f"{bad} target id(s) outside the vocabulary [0, {logits.shape[1]})")
    return losses


def softmax_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``softmax_cross_entropy`` with torch ops, in place on ``probs``: widen, max, subtract, exp,
    sum, divide."""
    if logits.data_ptr() != probs.data_ptr():
        probs.copy_(logits)
    chosen = probs.gather(1, targets[:, None]).squeeze(1)
    top = probs.amax(dim=1, keepdim=True)
    total = probs.sub_(top).exp_().sum(dim=1, keepdim=True)
    probs.div_(total)
    return (total.log() + top).squeeze(1) - chosen


def cross_entropy_grad(probs: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> None:
    """dL/dlogits of ``softmax_cross_entropy``'s rows into ``out`` [R, V] (float32, or bf16:
    rounded to nearest even as torch rounds): (p − onehot(target))·g, the product p·g rounded to
    float32 before g is taken from it at the target (as the reference's multiply, then
    scatter-add).  probs [R, V] float32, grad [R] float32, targets [R] int64 (checked by the
    forward)."""
    if not (serves(probs, grad) and serves(out, dtypes=_WIDTHS) and serves(targets, dtypes=(torch.int64,))):
        return cross_entropy_grad_reference(probs, grad, targets, out)
    load_kernel().looplm_softmax_xent_grad(_address(probs), _address(grad), _address(targets), _address(out),
                                           int(out.dtype == torch.bfloat16), probs.shape[0], probs.shape[1],
                                           torch.get_num_threads())


def cross_entropy_grad_reference(probs: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor,
                                 out: torch.Tensor) -> None:
    """``cross_entropy_grad`` with torch ops: multiply, scatter-add, round into ``out``."""
    scale = grad[:, None]
    product = probs * scale
    product.scatter_add_(1, targets[:, None], -scale)
    out.copy_(product)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """RMSNorm of the rows of x [..., D] (float32) for training: returns (out, normed,
    inverse_rms) with inverse_rms [..., 1] = 1/sqrt(mean(x²) + eps), normed = x·inverse_rms (what
    backward needs) and out = normed·weight in ``out_dtype`` (float32, or bf16: the float32 value
    rounded to nearest even, as a cast would).  One pass per row in C (``csrc/train_kernel.c``),
    equal to the reference up to float32 rounding of the sum of squares."""
    if not serves(x, weight) or out_dtype not in _WIDTHS:
        return rms_norm_rows_reference(x, weight, eps, out_dtype)
    dim = x.shape[-1]
    normed, out = torch.empty_like(x), torch.empty_like(x, dtype=out_dtype)
    inverse_rms = torch.empty(*x.shape[:-1], 1, dtype=x.dtype)
    load_kernel().looplm_rms_norm_rows(_address(x), _address(weight), eps, _address(normed), _address(inverse_rms),
                                       _address(out), int(out_dtype == torch.bfloat16), x.numel() // dim, dim,
                                       torch.get_num_threads())
    return out, normed, inverse_rms


def rms_norm_rows_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                            out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """``rms_norm_rows`` with torch ops."""
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
    inverse_rms = torch.rsqrt(mean_square.add_(eps))
    normed = x * inverse_rms
    out = normed * weight
    return (out if out_dtype in (None, out.dtype) else out.to(out_dtype)), normed, inverse_rms


def rms_norm_grad_rows(grad: torch.Tensor, normed: torch.Tensor, inverse_rms: torch.Tensor, weight: torch.Tensor,
                       need_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm's backward from ``rms_norm_rows``'s saved tensors: (grad_x, grad_weight or None),
    grad_x = (g·w − normed·mean(g·w·normed))·inverse_rms, grad_weight = Σ_rows g·normed, in
    float32; the incoming gradient g float32 or bf16 (widened)."""
    if not (serves(normed, inverse_rms, weight) and serves(grad, dtypes=_WIDTHS)):
        return rms_norm_grad_rows_reference(grad, normed, inverse_rms, weight, need_weight)
    dim = normed.shape[-1]
    grad_x = torch.empty_like(normed)
    grad_weight = torch.empty_like(weight) if need_weight else None
    load_kernel().looplm_rms_norm_grad_rows(_address(grad), int(grad.dtype == torch.bfloat16), _address(normed),
                                            _address(inverse_rms), _address(weight), _address(grad_x),
                                            _address(grad_weight) if need_weight else None,
                                            normed.numel() // dim, dim, torch.get_num_threads())
    return grad_x, grad_weight


def rms_norm_grad_rows_reference(grad: torch.Tensor, normed: torch.Tensor, inverse_rms: torch.Tensor,
                                 weight: torch.Tensor, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_grad_rows`` with torch ops."""
    grad = grad.to(normed.dtype)
    grad_normed = grad * weight
    projection = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1).div_(normed.shape[-1])
    grad_x = torch.addcmul(grad_normed, normed, projection, value=-1).mul_(inverse_rms)
    grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0) if need_weight else None
    return grad_x, grad_weight


def swiglu_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product silu(gate)·up of gate_up [..., 2F] (the gate's half first) → [..., F], in
    gate_up's dtype (float32 or bf16).  One pass in C (``csrc/train_kernel.c``): float32 math,
    one rounding to bf16 where the reference rounds silu's output and the product each."""
    if not serves(gate_up, dtypes=_WIDTHS):
        return swiglu_rows_reference(gate_up)
    hidden = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], hidden, dtype=gate_up.dtype)
    load_kernel().looplm_swiglu_rows(_address(gate_up), _address(out), int(gate_up.dtype == torch.bfloat16),
                                     gate_up.numel() // (2 * hidden), hidden, torch.get_num_threads())
    return out


def swiglu_rows_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``swiglu_rows`` with torch ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_grad_rows(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``swiglu_rows`` for gate_up: [..., 2F] from grad [..., F]; with s = σ(gate),
    d_gate = grad·up·s·(1 + gate·(1 − s)), d_up = grad·gate·s (float32 math, stored in the dtype)."""
    if not (serves(gate_up, grad, dtypes=_WIDTHS) and grad.dtype == gate_up.dtype):
        return swiglu_grad_rows_reference(gate_up, grad)
    hidden = gate_up.shape[-1] // 2
    out = torch.empty_like(gate_up)
    load_kernel().looplm_swiglu_grad_rows(_address(gate_up), _address(grad), _address(out),
                                          int(gate_up.dtype == torch.bfloat16), gate_up.numel() // (2 * hidden),
                                          hidden, torch.get_num_threads())
    return out


def swiglu_grad_rows_reference(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``swiglu_grad_rows`` with torch ops, in float32 (or the inputs' wider dtype)."""
    compute = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(compute).chunk(2, dim=-1)
    grad = grad.to(compute)
    sigmoid = torch.sigmoid(gate)
    grad_gate, grad_up = grad * up * sigmoid * (1 + gate * (1 - sigmoid)), grad * gate * sigmoid
    return torch.cat([grad_gate, grad_up], dim=-1).to(gate_up.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate-half RoPE of x [B, H, L, hd] (any strides, the last dimension contiguous; float32 or
    bf16) by the tables cos, sin [L, r] (float32, each half of a row the same angles): the first r
    dims rotated, the rest copied, into a new contiguous tensor of x's dtype; ``inverse`` rotates
    back (RoPE's backward).  One pass in C (``csrc/train_kernel.c``); in float32 the same products
    and sums as the reference, in bf16 rounded once."""
    served = (x.device.type == "cpu" and x.dim() == 4 and x.stride(-1) == 1
              and x.dtype in _WIDTHS and serves(cos, sin) and cos.shape == sin.shape == (x.shape[2], cos.shape[-1]))
    if not served:
        return rope_reference(x, cos, -sin if inverse else sin)
    out = torch.empty(x.shape, dtype=x.dtype)
    batch, heads, length, head_dim = x.shape
    load_kernel().looplm_rope(_address(x), *x.stride()[:3], _address(out), *out.stride()[:3], batch, heads, length,
                              head_dim, cos.shape[-1], _address(cos), _address(sin), -1.0 if inverse else 1.0,
                              int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rope`` with torch ops (x·cos + rotate_half(x)·sin on the first r dims), in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([rope_reference(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
