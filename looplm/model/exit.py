"""Exit gate math (Ouro §3.2, docs/MATH.md §2).

λ_t = σ(z_t) is the probability of exiting at step t given step t was reached.
Survival S_t = Π_{j≤t}(1 − λ_j), S_0 = 1.
Exit distribution p(t) = λ_t · S_{t−1} for t < T, p(T) = S_{T−1}; Σ_t p(t) = 1.
Everything is computed from the gate logits z in log space (log σ(z), log σ(−z)) so that
λ near 0 or 1 never produces log(0).
"""

import torch
from torch.nn import functional as F


def log_exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """log p(t) for gate logits z [T, ...] → [T, ...]; the last step takes the leftover mass."""
    steps = gate_logits.shape[0]
    log_continue = F.logsigmoid(-gate_logits)
    # log S_{t−1}: exclusive cumulative sum of log(1 − λ_j), starting at log S_0 = 0.
    log_survival_before = torch.cumsum(log_continue, dim=0) - log_continue
    log_exit = F.logsigmoid(gate_logits) + log_survival_before
    if steps == 1:
        return torch.zeros_like(gate_logits)
    return torch.cat([log_exit[:-1], log_survival_before[-1:]], dim=0)


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """p(t) [T, ...] from gate logits [T, ...]."""
    return log_exit_distribution(gate_logits).exp()


def exit_cdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """CDF(n) = 1 − Π_{j≤n}(1 − λ_j) for n = 1..T, with CDF(T) forced to 1 (Q-exit)."""
    cdf = -torch.expm1(torch.cumsum(F.logsigmoid(-gate_logits), dim=0))
    cdf[-1] = 1.0
    return cdf


def q_exit_steps(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per token, the first step n (1-based) with CDF(n) ≥ q; q ≥ 1 always runs all T steps (the
    vectorised formula; decoders decide through ``looplm.exit_policy``, which tests hold to it)."""
    steps = gate_logits.shape[0]
    if threshold >= 1.0:
        return torch.full(gate_logits.shape[1:], steps, dtype=torch.long, device=gate_logits.device)
    reached = exit_cdf(gate_logits) >= threshold
    return reached.long().argmax(dim=0) + 1


def act_weights(gate_logits: torch.Tensor, threshold: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """ACT (Graves 2016) over halting probabilities p_t = σ(z_t), vectorised over steps.

    A position halts at the first step n with Σ_{t≤n} p_t ≥ threshold (or at the last step).
    Its weights are p_t before n, the remainder 1 − Σ_{t<n} p_t at n, and 0 after: each
    position's weights sum to 1 and a halted position contributes exactly once.  Returns the
    weights [T, ...] and the halting steps n (1-based) [...].
    """
    steps = gate_logits.shape[0]
    halt = torch.sigmoid(gate_logits)
    before = torch.cumsum(halt, dim=0) - halt  # Σ_{t<n} p_t
    halted_before = before >= threshold
    last = torch.zeros_like(halted_before)
    last[-1] = True
    halts_here = ~halted_before & ((before + halt >= threshold) | last)
    weights = torch.where(halted_before, torch.zeros_like(halt), torch.where(halts_here, 1.0 - before, halt))
    halting_steps = halts_here.long().argmax(dim=0) + 1
    return weights, halting_steps.clamp_max(steps)


def act_mixing_step(state: tuple | None, h: torch.Tensor, halt_logits: torch.Tensor,
                    threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One loop step of OpenMythos's ACT over the loop states (``model.act_mixing``).

    state: (cumulative c, halted, mixture m) after the previous step, or None before step 1;
    h [..., D] the step's state, halt_logits z [...].  With p = σ(z) and r = max(1 − c, 0):

        w = r where c + p ≥ threshold, else p;   w = 0 where already halted
        m ← m + w·h;   c ← c + p (not halted);   halted ← halted or c ≥ threshold

    Returns the new (c, halted, m).  Unlike ``act_weights``, the last step run does not take the
    remainder: a position that never halts keeps weights summing below 1, as the source does.
    """
    p = torch.sigmoid(halt_logits)
    if state is None:
        cumulative, halted, mixture = torch.zeros_like(p), torch.zeros_like(p, dtype=torch.bool), torch.zeros_like(h)
    else:
        cumulative, halted, mixture = state
    running = (~halted).to(p.dtype)
    weight = torch.where(cumulative + p >= threshold, (1.0 - cumulative).clamp_min(0.0), p) * running
    mixture = mixture + weight.unsqueeze(-1) * h
    cumulative = cumulative + p * running
    return cumulative, halted | (cumulative >= threshold), mixture


def act_weights_reference(gate_logits: torch.Tensor, threshold: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ACT weights by a plain loop over positions and steps (the test reference)."""
    flat = torch.sigmoid(gate_logits).reshape(gate_logits.shape[0], -1)
    weights = torch.zeros_like(flat)
    halting = torch.zeros(flat.shape[1], dtype=torch.long)
    for position in range(flat.shape[1]):
        total = 0.0
        for step in range(flat.shape[0]):
            p = float(flat[step, position])
            if total + p >= threshold or step == flat.shape[0] - 1:
                weights[step, position] = 1.0 - total
                halting[position] = step + 1
                break
            weights[step, position] = p
            total += p
    return weights.view_as(gate_logits), halting.view(gate_logits.shape[1:])


def hidden_change(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Relative change of the readout state between successive steps, ‖r_t − r_{t−1}‖ / ‖r_t‖,
    over the last dim [..., D] → [...] (the hidden-state-difference exit criterion)."""
    return (current - previous).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)


def readout_kl(previous_logits: torch.Tensor, current_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_t ‖ p_{t−1}) between the softmax readouts of successive steps [..., V] → [...]
    (the KL exit criterion: the prediction has stopped moving)."""
    current = F.log_softmax(current_logits.float(), dim=-1)
    previous = F.log_softmax(previous_logits.float(), dim=-1)
    return (current.exp() * (current - previous)).sum(-1)
