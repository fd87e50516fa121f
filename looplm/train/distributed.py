"""Data-parallel training under torchrun: DDP, torch's engine (FSDP2 is not wired in yet).

    torchrun --nproc_per_node 2 -m looplm train --data book.txt --out runs/x --parallel ddp

Every rank draws the same global batch from the same seeded generator and trains on its own
rows (``batch_size`` is the global batch and must divide by the world size), so a run on N
processes follows the single-process loss curve.  Data-dependent choices (the sampled depth)
are seeded by the step, never the rank.  Rank 0 alone writes metrics, checkpoints and the
progress bar; the logged loss is the mean over ranks.  Backend: gloo on CPU, NCCL on CUDA.
Multi-node: ``torchrun --nnodes N --node_rank R --rdzv_endpoint HOST:PORT --nproc_per_node G``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from looplm.errors import LoopLMError


class Distributed:
    """This process's place in the job (world 1, rank 0 when not distributed)."""

    def __init__(self, parallel: str, device: torch.device):
        self.parallel = parallel
        self.world, self.rank, self.local_rank = 1, 0, 0
        if parallel == "none":
            return
        if "WORLD_SIZE" not in os.environ:
            raise LoopLMError(f"--parallel {parallel} runs under torchrun: torchrun --nproc_per_node N -m looplm train …")
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

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward through: DDP around the model (the model itself otherwise)."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
            return DistributedDataParallel(model, device_ids=device_ids)
        return model
