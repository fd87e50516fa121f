"""Exit gate math (Ouro §3.2, REFERENCE §2).

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
    """Per token, the first step n (1-based) with CDF(n) ≥ q; q ≥ 1 always runs all T steps."""
    steps = gate_logits.shape[0]
    if threshold >= 1.0:
        return torch.full(gate_logits.shape[1:], steps, dtype=torch.long, device=gate_logits.device)
    reached = exit_cdf(gate_logits) >= threshold
    return reached.long().argmax(dim=0) + 1
