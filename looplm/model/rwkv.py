"""RWKV-style token mixer with slot memory (lrnnSMDDS's TimeMix, written from its equations).
Layer kind "R" in ``layer_pattern``.

For the normed input z_t of a layer (d channels, H heads, S slots):

    xs_t   = (σ₁ z_{t−1} + σ₂ z_{t−2} + σ₄ z_{t−4}) / (σ₁ + σ₂ + σ₄)     multi-scale token shift
    x*_t   = μ* z_t + (1 − μ*) xs_t              for * = r, k, v        (μ = σ(time_mix_*))
    r_t    = σ(x^r W_r),  k̃_t = exp(clamp(x^k W_k, ±10)),  v_t = x^v W_v
    a_t    = σ(decay_base + z_t A B) · exp(−m_h)  data-dependent decay, ALiBi-like per head
    u      = exp(clamp(time_first, ±10))          bonus of the current token
    ω_t, ρ_t = softmax(z_t W_write), softmax(z_t W_read)      slot write / read gates
    read:  wkv_t = (ρ_t·N + u k̃_t v_t) / (ρ_t·D + u k̃_t + 1e−6)
    write: N ← a_t N + ω_t ⊗ k̃_t v_t,  D ← a_t D + ω_t ⊗ k̃_t   (N, D ∈ R^{S×d}, start at 0)
    out_t  = (r_t ⊙ wkv_t) W_o

Two forms, held equal by ``tests/test_rwkv.py``: ``wkv_recurrent`` (the loop above, the
reference; decode) and ``wkv_chunked`` (within a chunk, the closed form
wkv_t = [Σ_{τ<t} (ρ_t·ω_τ) P(τ,t) k̃_τ v_τ + …] / […] with P(τ,t) = Π_{τ<j<t} a_j from
cumulative log-decays, plus the state carried between chunks).  lrnnSMDDS's defects are not
reproduced: gradients reach the input through the slot gates (autograd), and the logged loss
is the optimised loss.  lrnnSMDDS's ChannelMix (one-step shift, then SwiGLU) is the FFN kind
``model.ffn=channelmix`` (looplm.model.ffn).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from looplm.config import ModelConfig

SHIFTS = (1, 2, 4)
EPS = 1e-6


def wkv_recurrent(k, v, log_decay, bonus, write, read, state=None):
    """k (k̃ > 0), v, log_decay [B, T, d]; bonus u [d]; write ω, read ρ [B, T, S];
    state (N, D) each [B, S, d] or None.  Returns wkv [B, T, d] and the final (N, D)."""
    batch, length, dim = k.shape
    slots = write.shape[-1]
    numerator = k.new_zeros(batch, slots, dim) if state is None else state[0]
    denominator = k.new_zeros(batch, slots, dim) if state is None else state[1]
    outputs = []
    for t in range(length):
        kv = k[:, t] * v[:, t]
        read_num = torch.einsum("bs,bsd->bd", read[:, t], numerator)
        read_den = torch.einsum("bs,bsd->bd", read[:, t], denominator)
        outputs.append((read_num + bonus * kv) / (read_den + bonus * k[:, t] + EPS))
        decay = log_decay[:, t, None].exp()
        numerator = decay * numerator + write[:, t, :, None] * kv[:, None]
        denominator = decay * denominator + write[:, t, :, None] * k[:, t, None]
    return torch.stack(outputs, dim=1), (numerator, denominator)


def wkv_chunked(k, v, log_decay, bonus, write, read, state=None, chunk: int = 16):
    """The same as ``wkv_recurrent``: closed form inside chunks, the state between them."""
    batch, length, dim = k.shape
    slots = write.shape[-1]
    numerator = k.new_zeros(batch, slots, dim) if state is None else state[0]
    denominator = k.new_zeros(batch, slots, dim) if state is None else state[1]
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril(-1)
    outputs = []
    for begin in range(0, length, chunk):
        end = min(begin + chunk, length)
        size = end - begin
        kc, vc, wc, rc = k[:, begin:end], v[:, begin:end], write[:, begin:end], read[:, begin:end]
        cumulative = torch.cumsum(log_decay[:, begin:end], dim=1)  # L_t = Σ_{j≤t} log a_j (in chunk)
        before = cumulative - log_decay[:, begin:end]  # L_{t−1}
        # P(τ, t) = exp(L_{t−1} − L_τ) for τ < t, [B, t, τ, d].
        mask = strictly_lower[:size, :size, None]
        exponent = (before[:, :, None] - cumulative[:, None]).masked_fill(~mask, float("-inf"))
        weights = torch.einsum("bts,bus->btu", rc, wc)[..., None] * exponent.exp()
        kv = kc * vc
        carried = before.exp()  # Π_{chunk start ≤ j < t} a_j: decay of the state entering the chunk
        num = (torch.einsum("btud,bud->btd", weights, kv)
               + carried * torch.einsum("bts,bsd->btd", rc, numerator) + bonus * kv)
        den = (torch.einsum("btud,bud->btd", weights, kc)
               + carried * torch.einsum("bts,bsd->btd", rc, denominator) + bonus * kc)
        outputs.append(num / (den + EPS))
        to_end = (cumulative[:, -1:] - cumulative).exp()  # Π_{τ<j≤end} a_j
        total = cumulative[:, -1, None].exp()
        numerator = total * numerator + torch.einsum("bus,bud->bsd", wc, to_end * kv)
        denominator = total * denominator + torch.einsum("bus,bud->bsd", wc, to_end * kc)
    return torch.cat(outputs, dim=1), (numerator, denominator)


class RWKVSlotMixer(nn.Module):
    """The token mixer of an "R" layer.  Decode cache: the last 4 inputs z (token shift) and
    the slot banks N, D."""

    chunk_size = 16

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, heads = config.d_model, config.n_heads
        self.dim, self.heads = dim, heads
        self.time_shift = nn.Parameter(torch.empty(len(SHIFTS), dim))
        self.time_mix = nn.Parameter(torch.empty(3, dim))  # r, k, v
        self.decay_down = nn.Linear(dim, config.rwkv_decay_rank, bias=False)
        self.decay_up = nn.Linear(config.rwkv_decay_rank, dim, bias=False)
        self.decay_base = nn.Parameter(torch.empty(dim))
        self.time_first = nn.Parameter(torch.empty(dim))
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.write_gate = nn.Linear(dim, config.rwkv_slots, bias=False)
        self.read_gate = nn.Linear(dim, config.rwkv_slots, bias=False)
        self.register_buffer("head_decay", self._head_decay(), persistent=False)
        self.reset_extra_parameters()

    def _head_decay(self, device=None) -> torch.Tensor:
        """m_h = 2^(−8(h+1)/H) per channel of head h: log a_t gets −m_h (ALiBi-like slopes)."""
        slopes = 2.0 ** (-8.0 * torch.arange(1, self.heads + 1, device=device) / self.heads)
        return slopes.repeat_interleave(self.dim // self.heads)

    def rebuild_buffers(self, device) -> None:
        self.head_decay = self._head_decay(device)

    def reset_extra_parameters(self) -> None:
        """lrnnSMDDS's initial values: shifts favour the last token, mixes at 0.5,
        decay and bonus spread over heads; the gates and decay LoRA start small."""
        with torch.no_grad():
            for row, (low, high) in enumerate(((0.3, 0.7), (0.1, 0.3), (0.0, 0.2))):
                self.time_shift[row].uniform_(low, high)
            self.time_mix.fill_(0.5)
            head = torch.arange(self.dim) // (self.dim // self.heads)
            self.decay_base.copy_(1.5 - 0.2 * head)
            self.time_first.copy_(-3.0 + 0.5 * head)
            for gate in (self.write_gate, self.read_gate, self.decay_down, self.decay_up):
                nn.init.normal_(gate.weight, std=0.01)

    def forward(self, z: torch.Tensor, cos=None, sin=None, state_store=None, start: int = 0,
                carry=None) -> torch.Tensor:
        """z [B, T, d]; state_store: (last 4 inputs, N, D) updated in place, or None.  (``carry``:
        the token mixers' common signature; this mixer reads no earlier loop steps.)"""
        batch, length, dim = z.shape
        history = state_store[0] if state_store is not None else z.new_zeros(batch, max(SHIFTS), dim)
        padded = torch.cat([history, z], dim=1)  # position t of z sits at t + 4
        weights = torch.sigmoid(self.time_shift)
        shifted = sum(weight * padded[:, max(SHIFTS) - shift:max(SHIFTS) - shift + length]
                      for weight, shift in zip(weights, SHIFTS)) / (weights.sum(0) + EPS)
        mix = torch.sigmoid(self.time_mix)
        x_r, x_k, x_v = (m * z + (1 - m) * shifted for m in mix)
        r = torch.sigmoid(self.receptance(x_r))
        k = torch.exp(self.key(x_k).clamp(-10.0, 10.0))
        v = self.value(x_v)
        log_decay = F.logsigmoid(self.decay_base + self.decay_up(self.decay_down(z))) - self.head_decay
        bonus = torch.exp(self.time_first.clamp(-10.0, 10.0))
        write, read = torch.softmax(self.write_gate(z), -1), torch.softmax(self.read_gate(z), -1)
        state = (state_store[1], state_store[2]) if state_store is not None else None
        if length == 1:
            wkv, final = wkv_recurrent(k, v, log_decay, bonus, write, read, state)
        else:
            wkv, final = wkv_chunked(k, v, log_decay, bonus, write, read, state, self.chunk_size)
        if state_store is not None:
            state_store[0].copy_(padded[:, -max(SHIFTS):])
            state_store[1].copy_(final[0])
            state_store[2].copy_(final[1])
        return self.out(r * wkv)
