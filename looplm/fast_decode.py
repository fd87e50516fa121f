"""Batch-1 decode fast path: the same math as ``LoopLM``'s layers, laid out for one token.

At batch 1 every matmul is a matrix-vector product whose cost is reading the weights: weights are
kept transposed and contiguous ([in, out], the layout BLAS reads fastest for x @ W), and each
layer is a short run of whole-vector ops on [D] tensors attending over the whole preallocated
cache with a position mask, so shapes never change and ``torch.compile`` can compile the step.
``FastStepper`` reads and writes the same ``KVCache`` storage as the reference stepper, so
prefill and LAST_EXITED copies interoperate; it is a ``looplm.steppers.Stepper`` for one row
(tensors [1, D]).  ``tests/test_fast_decode.py`` holds it equal to the reference.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from looplm.cache import KVCache


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of a vector [D] (same formula as ``F.rms_norm``)."""
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed if weight is None else normed * weight


class _PackedLayer:
    """One ``Layer``'s weights, transposed for x @ W, and its norm weights (None = no norm)."""

    def __init__(self, layer):
        def transposed(linear):
            return linear.weight.detach().t().contiguous()

        def norm_weight(norm):
            return norm.weight.detach() if hasattr(norm, "weight") else None

        self.qkv = transposed(layer.attn.qkv)
        self.out = transposed(layer.attn.out)
        self.gate_up = transposed(layer.ffn.gate_up)
        self.down = transposed(layer.ffn.down)
        self.attn_norm = norm_weight(layer.attn_norm)
        self.attn_post_norm = norm_weight(layer.attn_post_norm)
        self.ffn_norm = norm_weight(layer.ffn_norm)
        self.ffn_post_norm = norm_weight(layer.ffn_post_norm)
        self.sandwich = self.attn_post_norm is not None
        self.hidden = layer.ffn.hidden


def fast_unsupported(model, allow_reduced: bool = False, cache: KVCache | None = None) -> str | None:
    """None when ``FastStepper`` can decode this model, else the reason (it covers Ouro's plain
    loop: no injection, loop-index signal, depth LoRA or noise initial state).  ``allow_reduced``:
    the caller (the C kernel) also runs int8 (looplm.quant) and bf16 (looplm.bf16) projections.
    ``cache``: the cache it would decode into (the append_first layout's shared slots are the
    reference path's)."""
    from looplm.bf16 import is_bf16
    from looplm.quant import is_quantized

    config = model.config
    if cache is not None and cache.layout == "append_first":
        return ("the fast decode paths write every step's K/V; the append_first layout decodes with the C runtime"
                " or backend 'reference'")
    if not allow_reduced and (is_quantized(model) or is_bf16(model)):
        kind = "an int8 model (looplm.quant)" if is_quantized(model) else "a bf16-weight model (looplm.bf16)"
        return f"the torch decode path reads float32 weights; {kind} decodes with backend 'native' or 'reference'"
    if not config.plain_loop:
        return "the fast decode paths cover the plain loop (injection=identity, initial_state=prelude, no" \
               " loop_index_embedding, depth_lora_rank or global_gates)"
    if config.ffn.kind != "dense":
        return "the fast decode paths cover the dense SwiGLU FFN, not model.ffn=" + config.ffn.kind
    if (config.attention.kind != "mha" or config.rope_fraction != 1.0 or config.zero_centered_norm
            or set(config.layer_pattern) - {"A"}):
        return "the fast decode paths cover attention=mha layers with full RoPE and standard norms"
    if config.norm_type != "rms" or config.embed_norm or config.act_mixing:
        return "the fast decode paths cover RMSNorm, no embedding norm and the exit gate on the readout (not" \
               " model.norm_type=layer, embed_norm or act_mixing)"
    return None


class FastStepper:
    """One row's token through prelude, core steps, coda, gate and head, with vector-shaped ops."""

    whole_token = None

    @staticmethod
    def unsupported(model, cache: KVCache) -> str | None:
        return "the torch decode path decodes one row" if cache.batch_size != 1 else fast_unsupported(model,
                                                                                                 cache=cache)

    def __init__(self, model, cache: KVCache, compile_steps: bool = False):
        config = model.config
        self.model = model
        self.config = config
        self.cache = cache
        self.eps = config.norm_eps
        self.heads, self.kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.prelude = [_PackedLayer(layer) for layer in model.prelude]
        self.core = [_PackedLayer(layer) for layer in model.core]
        self.coda = [_PackedLayer(layer) for layer in model.coda]
        self.norm = model.norm.weight.detach()
        self.head = model.head_weight.detach().t().contiguous()
        self.gate_weight = model.exit_gate.weight.detach()[0] if model.exit_gate is not None else None
        self.gate_bias = model.exit_gate.bias.detach()[0] if model.exit_gate is not None else None
        self.positions = torch.arange(cache.max_len, device=cache.keys.device)
        self.cos, self.sin = model.rope.cos, model.rope.sin
        self._core_step = self._core_step_at
        if compile_steps:
            # Static shapes (the whole cache, a position mask): on CUDA "reduce-overhead" records
            # the compiled step as a CUDA graph and replays it per token.
            mode = "reduce-overhead" if cache.keys.is_cuda else None
            self._core_step = torch.compile(self._core_step_at, fullgraph=True, dynamic=False, mode=mode)

    def _layer(self, layer: _PackedLayer, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h [D]; keys/values: this slot's storage [H_kv, max_len, hd]; position: [1] long."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv = (_rms(h, layer.attn_norm, self.eps) @ layer.qkv).view(heads + 2 * kv_heads, head_dim)
        half = head_dim // 2
        rotated = torch.cat([-qkv[:heads + kv_heads, half:], qkv[:heads + kv_heads, :half]], dim=-1)
        query_key = qkv[:heads + kv_heads] * cos + rotated * sin
        keys.index_copy_(1, position, query_key[heads:].unsqueeze(1))
        values.index_copy_(1, position, qkv[heads + kv_heads:].unsqueeze(1))
        # Queries grouped by their shared K/V head: [H_kv, H/H_kv, hd] @ [H_kv, hd, L].
        query = query_key[:heads].view(kv_heads, heads // kv_heads, head_dim)
        scores = torch.matmul(query, keys.transpose(1, 2)) * head_dim ** -0.5 + mask
        attended = torch.matmul(torch.softmax(scores, dim=-1), values).reshape(-1)
        update = attended @ layer.out
        h = h + (_rms(update, layer.attn_post_norm, self.eps) if layer.sandwich else update)
        gate, up = (_rms(h, layer.ffn_norm, self.eps) @ layer.gate_up).split(layer.hidden)
        update = (F.silu(gate) * up) @ layer.down
        return h + (_rms(update, layer.ffn_post_norm, self.eps) if layer.sandwich else update)

    def _tables(self, position: torch.Tensor):
        cos = self.cos.index_select(0, position)
        sin = self.sin.index_select(0, position)
        # In the cache's dtype: a float32 mask would promote bf16 scores and break the matmul with V.
        mask = torch.where(self.positions <= position, 0.0, float("-inf")).to(self.cache.keys.dtype)
        return cos, sin, mask

    def _run(self, layers, h, stage: str, step: int, position: torch.Tensor) -> torch.Tensor:
        cos, sin, mask = self._tables(position)
        for index, layer in enumerate(layers):
            slot = self.cache.slot(stage, index, step)
            h = self._layer(layer, h, self.cache.keys[slot, 0], self.cache.values[slot, 0], position, cos, sin, mask)
        return h

    def embed(self, tokens: list[int], rows) -> torch.Tensor:
        h = self.model.embed.weight[tokens[0]]
        position = self.positions[rows.positions[0]:rows.positions[0] + 1]
        return (self._run(self.prelude, h, "prelude", 0, position) if self.prelude else h).view(1, -1)

    def initial_state(self, e: torch.Tensor, rows) -> torch.Tensor:
        return e

    def core_step(self, h: torch.Tensor, e: torch.Tensor, rows) -> torch.Tensor:
        position = rows.positions[0]
        return self._core_step(h.view(-1), rows.steps[0], self.positions[position:position + 1]).view(1, -1)

    def _core_step_at(self, h: torch.Tensor, step: int, position: torch.Tensor) -> torch.Tensor:
        h = self._run(self.core, h, "core", step, position)
        return _rms(h, self.norm, self.eps) if self.config.step_norm else h

    def readout(self, h: torch.Tensor, rows) -> torch.Tensor:
        if not self.coda:
            return h if self.config.step_norm else _rms(h, self.norm, self.eps)
        position = self.positions[rows.positions[0]:rows.positions[0] + 1]
        return _rms(self._run(self.coda, h.view(-1), "coda", rows.steps[0], position), self.norm, self.eps).view(1, -1)

    def gate_logits(self, readout: torch.Tensor) -> torch.Tensor:
        return readout @ self.gate_weight + self.gate_bias

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        return readout @ self.head
