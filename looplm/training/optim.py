"""Optimisers for ``train.optimizer``: AdamW alone, or Muon for the hidden matrices plus AdamW.

``adamw``: AdamW (β1, β2 from the config), weight decay on matrices (dim ≥ 2) only.

``muon`` (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training"): the weight
W of every ``nn.Linear`` inside the prelude / core / coda layers (attention and FFN
projections) is updated by ``torch.optim.Muon``,

    B ← μ B + G,   O = NewtonSchulz₅(G + μ B),   W ← W − lr·wd·W − lr·0.2·√max(A, B)·O

(Nesterov momentum, orthogonalised update, ``adjust_lr_fn="match_rms_adamw"`` so the update's
RMS matches AdamW's and AdamW's lr and weight decay carry over).  Everything else — embedding,
untied head, norms, biases, exit gate, injection, depth LoRA, the 3-D MoE expert tensors and
the mixers' non-linear 2-D tables (token-shift mixes) — stays on AdamW as above.

The two are held by one ``OptimizerGroup`` so the trainer sees a single optimiser: one
``step``/``zero_grad``, one ``state_dict`` holding both, and ``param_groups`` listing AdamW's
groups then Muon's, so the learning-rate scheduler scales both (each group keeps its own base
lr: ``train.lr`` for AdamW, ``train.muon_lr`` — default ``train.lr`` — for Muon).
"""

from __future__ import annotations

import torch
from torch import nn

from looplm.errors import LoopLMError

LAYER_STACKS = ("prelude", "core", "coda")


def muon_parameter_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters Muon updates: nn.Linear weights inside prelude/core/coda layers."""
    names = set()
    for stack in LAYER_STACKS:
        for module_name, module in getattr(model, stack).named_modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                names.add(f"{stack}.{module_name}.weight")
    return names


def adamw(parameters: list[tuple[str, nn.Parameter]], config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim ≥ 2) only; norms, biases and the gate bias are exempt."""
    decay = [p for _, p in parameters if p.dim() >= 2]
    no_decay = [p for _, p in parameters if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over every tensor) also takes ``found_inf``, so a step with a
    # non-finite gradient norm is skipped on the device without the host waiting (skips_on_device).
    # Sharded (FSDP) parameters keep the default implementation.
    fused = config.parallel != "fsdp" and all(p.device.type in ("cpu", "cuda") for _, p in parameters)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``optimizer.found_inf`` (a 0-d float tensor, non-zero =
    skip this step), as the fused AdamW does; otherwise the trainer decides on the host."""
    return isinstance(optimizer, torch.optim.AdamW) and all(group.get("fused") for group in optimizer.param_groups)


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After loading a saved state: the implementation choices (fused, foreach) stay this run's.
    ``load_state_dict`` restores a group's every key, and a state saved by a sharded (FSDP) run
    says "not fused", which would silently turn off the on-device skip."""
    for member in getattr(optimizer, "optimizers", [optimizer]):
        for group in member.param_groups:
            for key in ("fused", "foreach"):
                if key in member.defaults:
                    group[key] = member.defaults[key]


def check_optimizer_state(optimizer: torch.optim.Optimizer, where: str) -> None:
    """After loading a saved state: each parameter's per-element state (AdamW's moments, Muon's
    momentum) has the parameter's shape and a floating dtype.  ``load_state_dict`` does not check,
    and a step over a mis-shaped moment writes past its memory (a crash, not an error)."""
    for member in getattr(optimizer, "optimizers", [optimizer]):
        for parameter, state in member.state.items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or (value.dim() == 0 and key == "step"):
                    continue
                if value.shape != parameter.shape or not value.is_floating_point():
                    raise LoopLMError(f"the optimiser state in {where!r} holds {key} of shape {tuple(value.shape)}"
                                      f" ({str(value.dtype).removeprefix('torch.')}) for a parameter of shape"
                                      f" {tuple(parameter.shape)}: it is damaged; resume from an older checkpoint")


class OptimizerGroup(torch.optim.Optimizer):
    """Several optimisers over disjoint parameters, driven as one (step, zero_grad, state_dict).

    ``param_groups`` is the concatenation of the members' group dicts (the same objects), so a
    scheduler writing ``group["lr"]`` reaches every member."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        super().__init__([group for optimizer in self.optimizers for group in optimizer.param_groups], {})
        self._share_groups()

    def _share_groups(self) -> None:
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise LoopLMError("OptimizerGroup.step takes no closure")
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
                "kinds": [type(optimizer).__name__ for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        kinds = [type(optimizer).__name__ for optimizer in self.optimizers]
        if state_dict.get("kinds") != kinds:
            raise LoopLMError(f"the saved optimiser state holds {state_dict.get('kinds')} but this run uses {kinds}:"
                              " resume with the same train.optimizer")
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"]):
            optimizer.load_state_dict(state)
        self._share_groups()  # load_state_dict replaces each member's group dicts


def make_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optimizer`` over the model's trainable parameters."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return adamw(trainable, config)
    muon_class = getattr(torch.optim, "Muon", None)
    if muon_class is None:
        raise LoopLMError(f"train.optimizer=muon needs torch.optim.Muon (torch 2.9 or newer), this is torch"
                          f" {torch.__version__}: upgrade torch or use --train.optimizer adamw")
    hidden = muon_parameter_names(model)
    optimizers = [adamw([(n, p) for n, p in trainable if n not in hidden], config)]
    matrices = [p for n, p in trainable if n in hidden]
    if matrices:  # none when only the exit gate trains (Stage II)
        optimizers.append(muon_class(matrices, lr=config.muon_lr or config.lr, weight_decay=config.weight_decay,
                                     momentum=config.muon_momentum, adjust_lr_fn="match_rms_adamw"))
    return OptimizerGroup(optimizers)
