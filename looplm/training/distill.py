"""Distillation from a teacher checkpoint (nanochat-rs's Stage-1 recipe, docs/MATH.md §6).

    loss = (1 − α) · objective + α · τ² · KL(softmax(z_teacher/τ) ‖ softmax(z_student/τ))
           + λ(step) · E_p[t] / T

The teacher (looped or not, run at its own ``teacher_steps``) is frozen; the student's logits
are those of its last step.  KL is averaged over trained positions.  The loop-scale penalty
charges the expected exit step under the student's exit distribution (compute per token),
with λ annealed linearly from ``distill_loop_penalty`` to 0 over training, so the student
first learns to stop early cheaply and then is left free to use depth where it pays.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from looplm.training.objectives import IGNORE_INDEX


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """τ² · KL(teacher_τ ‖ student_τ) per token, averaged over positions with targets != −100."""
    mask = (targets != IGNORE_INDEX).to(student_logits.dtype)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return temperature ** 2 * (kl * mask).sum() / mask.sum().clamp_min(1.0)


def loop_penalty_weight(initial: float, step: int, total_steps: int) -> float:
    """λ annealed linearly from ``initial`` at step 0 to 0 at the last step."""
    return initial * max(0.0, 1.0 - step / max(total_steps - 1, 1))
