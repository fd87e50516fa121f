"""Gated DeltaNet (Yang et al. 2024; Qwen3-Next), a linear-attention token mixer (docs/MATH.md §6).

Per head, with the state kept as M = Sᵀ ∈ R^{d_k×d_v}:

    M_t = α_t M_{t−1} + k_t w_tᵀ,   w_t = β_t (v_t − α_t M_{t−1}ᵀ k_t),   o_t = M_tᵀ q_t
    α_t = exp(g_t),  g_t = −exp(A_log) · softplus(a_t + dt_bias),  β_t = σ(b_t)

q and k are L2-normalised (q also scaled by d_k^−½) after a short causal depthwise
convolution (kernel 4) and SiLU on q, k, v; the output is RMSNorm(o) ⊙ SiLU(z) per head,
then projected back.

Two forms of the recurrence:
- ``delta_rule_recurrent``: the loop over positions above (the reference; decode uses it);
- ``delta_rule_chunked``: the WY form over chunks of C positions.  Inside a chunk, with
  γ_i = Σ_{j≤i} g_j, Γ_i = exp(γ_i) and M₀ the state entering the chunk, unrolling gives
  M_i = Γ_i M₀ + Σ_{j≤i} (Γ_i/Γ_j) k_j w_jᵀ, and the w_j solve one unit-lower-triangular
  system (I + A) W = B V − (B Γ K) M₀ with A_ij = β_i (Γ_i/Γ_j) k_iᵀk_j for j < i, so
  outputs are O = (Γ Q) M₀ + (Q Kᵀ ⊙ D) W with D_ij = Γ_i/Γ_j for j ≤ i, and the state
  leaving the chunk is Γ_C M₀ + (K ⊙ Γ_C/Γ)ᵀ W.  All matmuls; one triangular solve per chunk.
``tests/test_gdn.py`` holds the two equal (values and gradients, fp32 1e-4).

On CUDA with flash-linear-attention installed (``pip install flash-linear-attention``), its
Triton kernel ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` replaces the chunked form
for sequences (``delta_rule_fla``: the same recurrence, fla's [B, S, H, ·] layout, our q
already scaled); it is never required, and ``LOOPLM_FLA=0`` turns it off.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.errors import LoopLMError
from looplm.model.norms import RMSNorm

CONV_KERNEL = 4


def delta_rule_recurrent(q, k, v, g, beta, state=None):
    """q, k [B, H, S, d_k], v [B, H, S, d_v], g, beta [B, H, S]; state M [B, H, d_k, d_v] or None.
    Returns outputs [B, H, S, d_v] and the final state."""
    batch, heads, length, key_dim = k.shape
    state = k.new_zeros(batch, heads, key_dim, v.shape[-1]) if state is None else state
    outputs = []
    for t in range(length):
        state = state * g[:, :, t, None, None].exp()
        update = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, :, t]))
        state = state + k[:, :, t, :, None] * update[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, :, t]))
    return torch.stack(outputs, dim=2), state


def delta_rule_chunked(q, k, v, g, beta, state=None, chunk: int = 64):
    """The same as ``delta_rule_recurrent`` in the chunked WY form (see the module doc)."""
    batch, heads, length, key_dim = k.shape
    value_dim = v.shape[-1]
    state = k.new_zeros(batch, heads, key_dim, value_dim) if state is None else state
    pad = (-length) % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))  # padding: no decay, no write
    chunks = q.shape[2] // chunk

    def split(x):
        return x.reshape(batch, heads, chunks, chunk, *x.shape[3:])

    q, k, v, g, beta = split(q), split(k), split(v), split(g), split(beta)
    log_decay = torch.cumsum(g, dim=-1)  # γ_i within each chunk
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # D_ij = Γ_i/Γ_j for j ≤ i (masked before exp so j > i never overflows).
    ratio = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    strictly = ratio.masked_fill(torch.eye(chunk, dtype=torch.bool, device=q.device), 0.0)
    system = torch.eye(chunk, dtype=q.dtype, device=q.device) + beta[..., None] * strictly * (k @ k.transpose(-1, -2))
    solve = torch.linalg.solve_triangular
    values = solve(system, beta[..., None] * v, upper=False, unitriangular=True)
    keys = solve(system, (beta * log_decay.exp())[..., None] * k, upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * ratio
    to_end = (log_decay[..., -1:] - log_decay).exp()  # Γ_C / Γ_j
    outputs = []
    for index in range(chunks):
        w = values[:, :, index] - keys[:, :, index] @ state
        outputs.append((q[:, :, index] * log_decay[:, :, index, :, None].exp()) @ state + scores[:, :, index] @ w)
        state = (state * log_decay[:, :, index, -1, None, None].exp()
                 + (k[:, :, index] * to_end[:, :, index, :, None]).transpose(-1, -2) @ w)
    return torch.cat(outputs, dim=2)[:, :, :length], state


def fla_kernel():
    """flash-linear-attention's chunked gated-delta-rule kernel, or None when it is not
    installed or ``LOOPLM_FLA=0``."""
    return None if os.environ.get("LOOPLM_FLA", "1") == "0" else _import_fla()


@functools.cache
def _import_fla():
    """The import tried once per process (a failed import is not cached by Python, and this
    runs for every GDN layer of every forward on CUDA)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule


def sequence_kernel(q: torch.Tensor):
    """The fast kernel for a sequence on q's device: fla's on CUDA when installed, else None
    (then ``delta_rule_chunked`` runs)."""
    return fla_kernel() if q.is_cuda else None


def delta_rule_fla(kernel, q, k, v, g, beta, state=None):
    """``delta_rule_chunked`` through fla's kernel: it takes q, k [B, S, H, d_k], v [B, S, H, d_v],
    g, beta [B, S, H] and the state [B, H, d_k, d_v] (our M), scales q by ``scale`` (1: ours is
    scaled already) and returns the outputs [B, S, H, d_v] and the final state."""
    def sequence_first(x):
        return x.transpose(1, 2).contiguous()

    outputs, final = kernel(sequence_first(q), sequence_first(k), sequence_first(v), sequence_first(g),
                            sequence_first(beta), scale=1.0, initial_state=state, output_final_state=True)
    return outputs.transpose(1, 2), final


def select_and_blend(online, scores, candidates, online_bias, top_k: int):
    """SSC aggregation: online [B, H, n, d_v]; scores [B, H, n, j] of j candidate memories
    whose outputs are candidates [B, H, n, j, d_v]; keep each token's top-k, softmax their
    scores with the online output's per-head logit ``online_bias`` [H], mix."""
    bias = online_bias.view(1, -1, 1, 1).expand(*online.shape[:3], 1)
    chosen_scores, chosen = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    weights = torch.softmax(torch.cat([bias, chosen_scores], dim=-1), dim=-1)
    picked = candidates.gather(3, chosen[..., None].expand(*chosen.shape, candidates.shape[-1]))
    return weights[..., :1] * online + (weights[..., 1:, None] * picked).sum(dim=3)


class GatedDeltaNet(nn.Module):
    """The token mixer of a GDN layer.  Cache (decode): the conv inputs of the last
    ``CONV_KERNEL − 1`` positions and the recurrent state M, per layer and loop step."""

    chunk_size = 64

    def __init__(self, config: ModelConfig, looped: bool = False):
        super().__init__()
        self.heads, self.head_dim = config.n_heads, config.head_dim
        width = self.heads * self.head_dim
        self.in_proj = nn.Linear(config.d_model, 4 * width + 2 * self.heads, bias=False)  # q k v z b a
        self.conv = nn.Conv1d(3 * width, 3 * width, CONV_KERNEL, groups=3 * width, bias=False)
        self.a_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.out_norm = RMSNorm(self.head_dim, config.norm_eps, config.zero_centered_norm)
        self.out = nn.Linear(width, config.d_model, bias=False)
        self.segment_size, self.memory_top_k = config.mc_segment_size, config.mc_top_k
        # cached segment states carry no gradient (LoopCached-Reasoning's default)
        self.memory_detach = config.mc_detach
        if self.segment_size:  # memory caching (SSC): router and the online output's logit
            self.memory_router = nn.Linear(config.d_model, width, bias=False)
            self.memory_online_bias = nn.Parameter(torch.zeros(self.heads))
        # Loop-axis memory caching (core layers only): its own router and online logit.
        self.loop_memory = looped and config.loop_mc
        self.loop_top_k, self.loop_detach = config.loop_mc_top_k, config.loop_mc_detach
        if self.loop_memory:
            self.loop_router = nn.Linear(config.d_model, width, bias=False)
            self.loop_online_bias = nn.Parameter(torch.zeros(self.heads))
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """Decay rates A spread over [1, 16] per head (as Mamba-2 / GDN), Δ bias 0, conv as torch's default."""
        with torch.no_grad():
            self.a_log.copy_(torch.linspace(0.0, math.log(16.0), self.heads))
            self.dt_bias.zero_()
            self.conv.reset_parameters()
            if self.segment_size:
                self.memory_online_bias.zero_()
            if self.loop_memory:
                self.loop_online_bias.zero_()

    def _delta_rule(self, q, k, v, g, beta, state):
        if q.shape[2] == 1:
            return delta_rule_recurrent(q, k, v, g, beta, state)
        if (kernel := sequence_kernel(q)) is not None:
            return delta_rule_fla(kernel, q, k, v, g, beta, state)
        return delta_rule_chunked(q, k, v, g, beta, state, self.chunk_size)

    def _with_memory(self, q, k, v, g, beta, state, x, start, memory):
        """Memory caching with sparse selective caching (SSC, LoopCached-Reasoning): the state is cached at
        every segment end; each token's router picks its top-k *completed* earlier segments
        (never the open one: scoring it would leak later tokens) and softmax-mixes their
        outputs M_jᵀ q with the online output.  ``memory`` is the cache's (segment states,
        segment keys, open key sum), or None without a cache.  Works segment piece by piece."""
        size, length = self.segment_size, q.shape[2]
        batch, heads, dim = q.shape[0], self.heads, self.head_dim
        first = start // size  # segments completed before this call
        if memory is None:
            states, keys = q.new_zeros(batch, 0, heads, dim, dim), q.new_zeros(batch, 0, heads, dim)
            key_sum = q.new_zeros(batch, heads, dim)
        else:
            states, keys, key_sum = memory[0][:, :first], memory[1][:, :first], memory[2]
        route = F.normalize(self.memory_router(x).view(batch, length, heads, dim), dim=-1).transpose(1, 2)
        state = q.new_zeros(batch, heads, dim, v.shape[-1]) if state is None else state
        outputs, begin = [], 0
        while begin < length:
            end = min(length, begin + size - (start + begin) % size)
            piece = slice(begin, end)
            online, state = self._delta_rule(q[:, :, piece], k[:, :, piece], v[:, :, piece], g[:, :, piece],
                                             beta[:, :, piece], state)
            outputs.append(self._mix(online, q[:, :, piece], route[:, :, piece], states, keys))
            key_sum = key_sum + k[:, :, piece].sum(dim=2)
            if (start + end) % size == 0:  # the segment is complete: cache its state and mean key
                cached = state.detach() if self.memory_detach else state
                states = torch.cat([states, cached.unsqueeze(1)], dim=1)
                keys = torch.cat([keys, (key_sum / size).unsqueeze(1)], dim=1)
                key_sum = torch.zeros_like(key_sum)
            begin = end
        if memory is not None:  # the segments completed in this call join the cache
            memory[0][:, first:states.shape[1]] = states[:, first:]
            memory[1][:, first:keys.shape[1]] = keys[:, first:]
            memory[2].copy_(key_sum)
        return torch.cat(outputs, dim=2), state

    def _with_memory_rows(self, q, k, v, g, beta, state, x, positions, memory):
        """``_with_memory`` for one token per row, each row at its own position ``positions``
        [B] (the scheduler's rows): row r reads its segments j < positions[r] // size (the others
        score −∞, so top-k and the softmax ignore them) and closes its open segment when its
        position ends one."""
        size, batch, heads, dim = self.segment_size, q.shape[0], self.heads, self.head_dim
        states, keys, key_sum = memory
        route = F.normalize(self.memory_router(x).view(batch, 1, heads, dim), dim=-1).transpose(1, 2)
        state = q.new_zeros(batch, heads, dim, v.shape[-1]) if state is None else state
        online, state = self._delta_rule(q, k, v, g, beta, state)
        first = torch.div(positions, size, rounding_mode="floor")  # segments each row has completed
        completed = torch.arange(states.shape[1], device=q.device).unsqueeze(0) < first.unsqueeze(1)  # [B, J]
        scores = torch.einsum("bhnk,bjhk->bhnj", route, keys) * self.head_dim ** -0.5
        scores = scores.masked_fill(~completed.view(batch, 1, 1, -1), float("-inf"))
        memories = torch.einsum("bjhkv,bhnk->bhnjv", states, q)
        output = select_and_blend(online, scores, memories, self.memory_online_bias, self.memory_top_k)
        output = torch.where(completed.any(dim=1).view(batch, 1, 1, 1), output, online)  # none yet: online alone
        key_sum = key_sum + k.sum(dim=2)
        closing = torch.nonzero((positions + 1) % size == 0).flatten().tolist()
        for row in closing:  # the row's open segment is complete: cache its state and mean key
            states[row, int(first[row])] = state[row]
            keys[row, int(first[row])] = key_sum[row] / size
            key_sum[row] = 0
        memory[2].copy_(key_sum)
        return output, state

    def _mix(self, online, q, route, states, keys):
        """online [B, H, n, d_v] mixed with the top-k of ``states`` [B, j, H, d_k, d_v]."""
        if states.shape[1] == 0:
            return online  # softmax over the online output alone
        scores = torch.einsum("bhnk,bjhk->bhnj", route, keys) * self.head_dim ** -0.5
        memories = torch.einsum("bjhkv,bhnk->bhnjv", states, q)  # every completed segment's output
        return select_and_blend(online, scores, memories, self.memory_online_bias, self.memory_top_k)

    def _loop_read(self, online, q, k, v, g, beta, x, state_store, carry):
        """Loop-axis memory caching (LoopCached-Reasoning's "Loop-Cached Reasoning", made causal).  Loop s at
        position t reads each earlier loop s' < s of this layer through that loop's state
        *at position t*, M^{s'}_t (it has absorbed tokens ≤ t only), as M^{s'}_tᵀ q^s_t; its
        routing key is the direction of loop s' keys summed over positions ≤ t.  The router (a
        projection of x, L2-normed) keeps the top ``loop_mc_top_k`` earlier loops and
        softmax-mixes their reads with the online output (logit: a learned per-head bias).
        The reads rerun loop s' recurrence from its state entering this call with q^s as the
        query (one batched delta-rule call over all earlier loops); the cache's per-step state
        and key sum carry what the next call needs, so decode equals the full forward, and a
        token's exit-step state standing in for deeper steps applies here too."""
        batch, heads, length, dim = q.shape
        if state_store is not None:
            entry_state, entry_keys = state_store[1].clone(), state_store[-1].clone()
            state_store[-1].copy_(entry_keys + k.sum(dim=2))
        else:
            entry_state, entry_keys = q.new_zeros(batch, heads, dim, v.shape[-1]), q.new_zeros(batch, heads, dim)
        record = (k, v, g, beta, entry_state, entry_keys)
        carry.put(self, tuple(t.detach() for t in record) if self.loop_detach else record)
        earlier = carry.earlier(self)
        if not earlier:
            return online
        loops = len(earlier)
        k_, v_, g_, beta_, states_, keys_ = (torch.cat(parts) for parts in zip(*earlier))  # [loops·B, ...]
        reads, _ = self._delta_rule(q.repeat(loops, 1, 1, 1), k_, v_, g_, beta_, states_)
        reads = reads.view(loops, batch, heads, length, -1).permute(1, 2, 3, 0, 4)  # [B, H, n, loops, d_v]
        summed = keys_.unsqueeze(2) + torch.cumsum(k_, dim=2)  # Σ_{τ≤t} k^{s'}_τ
        loop_keys = F.normalize(summed, dim=-1).view(loops, batch, heads, length, dim)
        route = F.normalize(self.loop_router(x).view(batch, length, heads, dim), dim=-1).transpose(1, 2)
        scores = torch.einsum("bhnk,jbhnk->bhnj", route, loop_keys) * self.head_dim ** -0.5
        valid = carry.valid(loops)  # decode rows at their own steps: loops a row has not run score −∞
        if valid is not None:
            scores = scores.masked_fill(~valid.view(batch, 1, 1, loops), float("-inf"))
        return select_and_blend(online, scores, reads, self.loop_online_bias, self.loop_top_k)

    def forward(self, x: torch.Tensor, cos=None, sin=None, state_store=None, start: int | torch.Tensor = 0,
                carry=None) -> torch.Tensor:
        """x [B, S, D]; state_store: (conv inputs, recurrent state[, segment memory][, loop key
        sum]) updated in place, or None; start: the first position, or [B] per row (one token
        each); carry: the tokens' earlier loop steps (loop_mc)."""
        batch, length, _ = x.shape
        width, heads, head_dim = self.heads * self.head_dim, self.heads, self.head_dim
        qkv, z, b, a = self.in_proj(x).split([3 * width, width, heads, heads], dim=-1)
        qkv = qkv.transpose(1, 2)  # [B, 3·width, S]
        history = state_store[0] if state_store is not None else qkv.new_zeros(batch, 3 * width, CONV_KERNEL - 1)
        padded = torch.cat([history, qkv], dim=-1)
        mixed = F.silu(F.conv1d(padded, self.conv.weight, groups=3 * width))
        q, k, v = mixed.view(batch, 3, heads, head_dim, length).permute(1, 0, 2, 4, 3)
        q = F.normalize(q, dim=-1) / math.sqrt(head_dim)
        k = F.normalize(k, dim=-1)
        g = (-self.a_log.exp() * F.softplus(a + self.dt_bias)).transpose(1, 2)  # [B, H, S]
        beta = torch.sigmoid(b).transpose(1, 2)
        initial = state_store[1] if state_store is not None else None
        if self.segment_size:
            memory = state_store[2:5] if state_store is not None else None
            if isinstance(start, torch.Tensor) and memory is not None:  # rows at their own positions
                o, final = self._with_memory_rows(q, k, v, g, beta, initial, x, start, memory)
            else:
                o, final = self._with_memory(q, k, v, g, beta, initial, x, start, memory)
        else:
            o, final = self._delta_rule(q, k, v, g, beta, initial)
        if self.loop_memory:
            if carry is None:
                raise LoopLMError("model.loop_mc reads earlier loop steps: run the layer through LoopLM.core_step"
                                  " with a LoopCarry")
            o = self._loop_read(o, q, k, v, g, beta, x, state_store, carry)
        if state_store is not None:
            state_store[0].copy_(padded[..., padded.shape[-1] - (CONV_KERNEL - 1):])
            state_store[1].copy_(final)
        o = self.out_norm(o.transpose(1, 2)) * F.silu(z.view(batch, length, heads, head_dim))
        return self.out(o.reshape(batch, length, width))
