"""Model pieces: norms, RoPE, attention, SwiGLU, layers, exit-gate math and the LoopLM."""

from looplm.model.lm import LoopLM, LoopOutput

__all__ = ["LoopLM", "LoopOutput"]
