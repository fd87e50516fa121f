"""Loop-step curriculum: the depth T grows during training (``train.loop_curriculum_*``).

With start T₀ = ``loop_curriculum_start`` (0 = off), n = ``loop_curriculum_steps`` and the
model's trained T, the depth cap at optimiser step s (0-based) is

    cap(s) = T₀ + ⌊(T − T₀) · s / n⌋   for s < n,      no cap for s ≥ n,

a straight line from T₀ towards T rounded down: each depth T₀, …, T − 1 gets n / (T − T₀)
steps and from step n on the run trains at full depth.  The trainer runs
``min(sampled depth, cap(s))`` loop steps: with ``depth_sampling=fixed`` the sampled depth is
T, so the curriculum alone sets the depth (T₀ … T − 1, then T); with ``uniform`` / ``poisson``
the curriculum caps each draw (also below ``depth_min``), and after step n draws run uncapped
(up to ``depth_max``, which may exceed T).  The depth is a pure function of the step, so
distributed ranks agree and a resumed run repeats it exactly.
"""

from __future__ import annotations

from looplm.errors import LoopLMError


def loop_curriculum_depth(config, trained_steps: int, step: int, depth: int) -> int:
    """The loop steps to run at optimiser ``step``: the sampled ``depth`` capped by cap(step) above
    (``config`` a TrainConfig, ``trained_steps`` the model's T); ``depth`` itself when off or past n."""
    start = config.loop_curriculum_start
    if not start:
        return depth
    if start > trained_steps:
        raise LoopLMError(f"train.loop_curriculum_start={start} exceeds model.loop_steps={trained_steps}: the"
                          " curriculum starts shallower than the trained depth")
    if step >= config.loop_curriculum_steps:
        return depth
    return min(depth, start + (trained_steps - start) * step // config.loop_curriculum_steps)
