"""Residual connections beyond the plain sum h ← h + F(h): mHC hyper-connections and block
attention residuals.  A layer's two sub-layers (token mixer, FFN) each own one of these; the
sub-layer reads its input from the residual state and writes its output back:

    x = residual.read(state) → (input [B, S, D], context);   state = residual.write(state, F(norm(x)), context)

**mHC** (``model.hyper_connections = n`` ≥ 2; DeepSeek, "mHC: Manifold-Constrained
Hyper-Connections", on Hyper-Connections, Zhu et al. 2024).  The state is n parallel streams
H ∈ R^{n×D} per token.  From x̃ = RMS-normalised vec(H) (n·D values, no weight) each sub-layer
computes its coefficients, per token:

    pre  = σ(α_pre · x̃ φ_pre + b_pre)                     ∈ (0, 1)^n      how much each stream feeds F
    post = 2 σ(α_post · x̃ φ_post + b_post)                ∈ (0, 2)^n      how much of F each stream gets
    mix  = SinkhornKnopp(α_res · mat(x̃ φ_res) + b_res)    n × n, rows and columns sum to 1
    x    = Σ_i pre_i H_i,      H ← mix · H + post ⊗ F(x)

The residual mixing matrix is projected onto the doubly stochastic matrices (the Birkhoff
polytope) by Sinkhorn–Knopp iterations in log space: that keeps the streams' total mass, so
the mixing cannot blow up or vanish across depth the way unconstrained Hyper-Connections can.
φ (one n·D × (2n + n²) projection, ``router``) starts small and random, α at 0.01, b_pre at
−log(n − 1) (pre = 1/n: the input is the streams' mean), b_post at 0 (post = 1) and b_res
with 0.9 of the mass on the diagonal.  The embedding enters as n copies; the readout is the
streams' mean.  With mix = I, pre = 1/n and post = 1 every stream equals the plain residual
(tested), so the n streams generalise it.

**Block attention residuals** (``model.attnres_block_size = s`` > 0; Moonshot AI, "Attention
Residuals", arXiv 2603.15031).  A stack's sub-layers are grouped into blocks of s (the mixer
and the FFN of a layer are two sub-layers).  The state holds the stack's input b₀, the
completed blocks' outputs b₁ … b_m (each the sum of its sub-layers' outputs) and the open
block's partial sum p.  Each sub-layer ℓ has a learned query w_ℓ ∈ R^D (zero at the start) and
reads

    V = [b₀, …, b_m, p],   α = softmax_i( w_ℓ · RMSNorm(V_i) ),   x = Σ_i α_i V_i

instead of the running sum; its output is added to p, and when ℓ ends a block p becomes
b_{m+1}.  The stack's output is the same attention with its own query (``DepthAttention`` in
``LoopLM.stack_outputs``).  Everything is per token: causal, nothing cached across tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.model.norms import RMSNorm

SINKHORN_ITERATIONS = 20
INITIAL_GAIN = 0.01
INITIAL_DIAGONAL = 0.9  # share of the residual mixing that stays in its own stream at the start


def sinkhorn(logits: torch.Tensor, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """[..., n, n] logits → exp(logits) scaled to a doubly stochastic matrix (Sinkhorn–Knopp,
    alternately normalising rows and columns, in log space so large logits cannot overflow)."""
    log = logits.float()
    for _ in range(iterations):
        log = log - torch.logsumexp(log, dim=-1, keepdim=True)
        log = log - torch.logsumexp(log, dim=-2, keepdim=True)
    return log.exp().to(logits.dtype)


class HyperConnection(nn.Module):
    """One sub-layer's mHC coefficients over n residual streams [B, S, n, D] (module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.streams, self.dim, self.eps = config.residual_streams, config.d_model, config.norm_eps
        n = self.streams
        self.router = nn.Linear(n * self.dim, 2 * n + n * n, bias=False)  # φ_pre | φ_post | φ_res
        self.gain = nn.Parameter(torch.empty(3))                          # α_pre, α_post, α_res
        self.pre_bias = nn.Parameter(torch.empty(n))
        self.post_bias = nn.Parameter(torch.empty(n))
        self.mix_bias = nn.Parameter(torch.empty(n, n))
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        n = self.streams
        with torch.no_grad():
            self.gain.fill_(INITIAL_GAIN)
            self.pre_bias.fill_(-math.log(n - 1))
            self.post_bias.zero_()
            # exp(b) with c on the diagonal and 1 elsewhere is already doubly stochastic after
            # scaling: its diagonal share is e^c / (e^c + n − 1).
            off_diagonal = torch.zeros(n, n)
            diagonal = math.log(INITIAL_DIAGONAL * (n - 1) / (1 - INITIAL_DIAGONAL))
            self.mix_bias.copy_(off_diagonal.fill_diagonal_(diagonal))

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, n, D] → pre [B, S, n], post [B, S, n], mix [B, S, n, n]."""
        n = self.streams
        flat = F.rms_norm(streams.flatten(-2), (n * self.dim,), eps=self.eps)
        pre, post, mix = self.router(flat).split([n, n, n * n], dim=-1)
        pre = torch.sigmoid(self.gain[0] * pre + self.pre_bias)
        post = 2 * torch.sigmoid(self.gain[1] * post + self.post_bias)
        mix = sinkhorn(self.gain[2] * mix.unflatten(-1, (n, n)) + self.mix_bias)
        return pre, post, mix

    def read(self, streams: torch.Tensor):
        """The sub-layer's input Σ_i pre_i H_i [B, S, D], and (post, mix) for ``write``."""
        pre, post, mix = self.coefficients(streams)
        return (pre.unsqueeze(-1) * streams).sum(dim=-2), (post, mix)

    @staticmethod
    def write(streams: torch.Tensor, update: torch.Tensor, context) -> torch.Tensor:
        """H ← mix · H + post ⊗ update; update [B, S, D]."""
        post, mix = context
        return mix @ streams + post.unsqueeze(-1) * update.unsqueeze(-2)


@dataclass(frozen=True)
class DepthSources:
    """A stack's depth memory for block attention residuals: the stack input and the completed
    blocks' outputs (``blocks``, each [B, S, D]) and the open block's partial sum (or None)."""

    blocks: tuple[torch.Tensor, ...]
    partial: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        """V [N, B, S, D]: the blocks, then the partial sum when the open block has one."""
        return torch.stack(self.blocks + (() if self.partial is None else (self.partial,)))

    def add(self, update: torch.Tensor, closes_block: bool) -> "DepthSources":
        partial = update if self.partial is None else self.partial + update
        return DepthSources(self.blocks + (partial,), None) if closes_block else DepthSources(self.blocks, partial)


class DepthAttention(nn.Module):
    """A learned query over a ``DepthSources`` (one per sub-layer, and one per stack's output)."""

    def __init__(self, config: ModelConfig, closes_block: bool = False):
        super().__init__()
        self.closes_block = closes_block
        self.query = nn.Parameter(torch.zeros(config.d_model))
        self.key_norm = RMSNorm(config.d_model, config.norm_eps, config.zero_centered_norm)

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            self.query.zero_()  # uniform weights over the sources at the start

    def read(self, sources: DepthSources):
        """x = Σ_i softmax_i(w · RMSNorm(V_i)) V_i [B, S, D] (no context for ``write``)."""
        values = sources.values()
        if values.shape[0] == 1:
            return values[0], None
        weights = torch.softmax((self.key_norm(values) * self.query).sum(-1), dim=0)
        return (weights.unsqueeze(-1) * values).sum(dim=0), None

    def write(self, sources: DepthSources, update: torch.Tensor, context=None) -> DepthSources:
        return sources.add(update, self.closes_block)


def sublayer_residuals(config: ModelConfig, index: int) -> tuple[nn.Module | None, nn.Module | None]:
    """The residuals of layer ``index``'s mixer and FFN (sub-layers 2·index and 2·index + 1 of
    its stack), or (None, None) for the plain sum."""
    if config.residual_streams > 1:
        return HyperConnection(config), HyperConnection(config)
    if config.attnres_block_size:
        size = config.attnres_block_size
        return tuple(DepthAttention(config, closes_block=(sublayer + 1) % size == 0)
                     for sublayer in (2 * index, 2 * index + 1))
    return None, None
