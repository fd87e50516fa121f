"""Data-parallel training under torchrun: DDP, or FSDP2 (``fully_shard``), torch's engines.

    torchrun --nproc_per_node 2 -m looplm train --data book.txt --out runs/x --parallel ddp
    torchrun --nproc_per_node 2 -m looplm train --data book.txt --out runs/x --parallel fsdp

Every rank draws the same global batch from the same seeded generator and trains on its own
rows (``batch_size`` is the global batch and must divide by the world size), so a run on N
processes follows the single-process loss curve.  Data-dependent choices (the sampled depth)
are seeded by the step, never the rank.  Rank 0 alone writes metrics, checkpoints and the
progress bar; the logged loss is the mean over ranks.  Backend: gloo on CPU, NCCL on CUDA.
Multi-node: ``torchrun --nnodes N --node_rank R --rdzv_endpoint HOST:PORT --nproc_per_node G``.

FSDP shards every prelude, core and coda layer, then the root (embedding, norms, gate, head,
loop modules), over a 1-D mesh of all ranks; the optimiser holds the shards (DTensors), so it
is built after ``wrap``.  Core and coda layers run T times per forward, so they stay gathered
from their first use to the backward (``reshard_after_forward=False``: one all-gather per
forward instead of T, for one gathered copy of those layers held through the forward); the
backward still gathers and reduce-scatters them once per step it runs through.  Gradient
clipping uses the global norm, the same number on every rank, so the non-finite and
loss-spike skips agree.  Checkpoints gather the full weights and optimiser state on rank 0 and
keep the single-process format (optimiser state keyed by parameter index), so an FSDP
checkpoint loads anywhere; resuming under FSDP shards the full state again.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from looplm.errors import LoopLMError

FULL_STATE = dict(full_state_dict=True, cpu_offload=True)


class Distributed:
    """This process's place in the job (world 1, rank 0 when not distributed)."""

    def __init__(self, parallel: str, device: torch.device):
        self.parallel = parallel
        self.world, self.rank, self.local_rank = 1, 0, 0
        if parallel == "none":
            return
        if "WORLD_SIZE" not in os.environ:
            raise LoopLMError(f"--parallel {parallel} runs under torchrun:"
                              " torchrun --nproc_per_node N -m looplm train …")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    @property
    def active(self) -> bool:
        return self.world > 1 or self.parallel != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (contiguous rows)."""
        if self.world == 1:
            return batch
        share = batch.shape[0] // self.world
        return batch[self.rank * share:(self.rank + 1) * share]

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward through: DDP around the model, or the model itself (sharded
        in place by FSDP, or untouched).  Build the optimiser after this."""
        device = next(model.parameters()).device
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[self.local_rank] if device.type == "cuda" else None)
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            for layer in model.prelude:
                fully_shard(layer, mesh=mesh)
            for layer in [*model.core, *model.coda]:  # run T times per forward: gathered once
                fully_shard(layer, mesh=mesh, reshard_after_forward=False)
            fully_shard(model, mesh=mesh)
        return model

    def clip_gradients(self, parameters, max_norm: float) -> torch.Tensor:
        """Scale gradients so their global L2 norm is at most max_norm; returns that norm (the
        same on every rank).  Under FSDP the norm of the shards is all-reduced (``full_tensor``)."""
        parameters = list(parameters)
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm

    def reshard(self, model: torch.nn.Module) -> None:
        """After a forward without backward (evaluation): put every FSDP module back to shards
        (the root and the looped layers stay gathered after a forward; a backward reshards them)."""
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def full_model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Under FSDP the unsharded weights on CPU, gathered by every rank, held by rank 0 (other
        ranks get {}); None otherwise (the model's own state dict is complete)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(**FULL_STATE))
        return {name: tensor.contiguous() for name, tensor in state.items()}

    def full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimiser's state dict in the single-process format (keyed by parameter index);
        under FSDP gathered by every rank, held by rank 0."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**FULL_STATE))
        return optimizer_state_by_index(state) if self.main else {}

    def load_model_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load full (unsharded) weights; under FSDP each rank keeps its shards."""
        if not self.sharded:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a single-process-format optimiser state; under FSDP each rank keeps its shards."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(parameter): name for name, parameter in model.named_parameters()}
        groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(state, groups),
                                 options=StateDictOptions(full_state_dict=True))


def optimizer_state_by_index(state: dict) -> dict:
    """Parameter-name keys (torch.distributed.checkpoint) → the indices ``Optimizer.state_dict``
    uses: parameters numbered 0, 1, … through the param groups in order."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict, names: list[list[str]]) -> dict:
    """The inverse of ``optimizer_state_by_index`` given each group's parameter names in order."""
    flat = [name for group in names for name in group]
    groups = [{**group, "params": list(group_names)} for group, group_names in zip(state["param_groups"], names)]
    return {"state": {flat[index]: value for index, value in state["state"].items()}, "param_groups": groups}
