"""Stage two under torchrun: one process per rank, DistributedDataParallel, rank 0 writes.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is one process. Ranks
read disjoint blocks of the store (BlockStream), average their gradients through DDP
(gloo on the CPU, nccl on CUDA), and take the same number of optimizer steps every epoch:
a rank whose blocks hold fewer batches takes padding steps for the rest that count no row
(in eval mode, so no batch-norm statistics move), because a rank that stopped early would
leave the others waiting in a gradient all-reduce. Each step's loss terms are divided by
their counts over all ranks (pipeline.objective), so a step's gradient is that of the mean
over every row the ranks hold in it. Batch norm keeps per-rank statistics.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0  # the rank's GPU on its node

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        """Rank 0 prints, evaluates and writes checkpoints and history."""
        return self.rank == 0

    def start(self, device_name: str) -> torch.device:
        """This rank's device, with the process group joined when there are several ranks."""
        device = resolve_device(device_name)
        if self.world == 1:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if self.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def agree(self, compute):
        """compute() on rank 0, its result (or its PipelineError, raised on every rank) on all ranks: the
        ranks must train on the same blocks even while an extraction is still adding some."""
        if self.world == 1:
            return compute()
        box = [None]
        if self.main:
            try:
                box[0] = ("value", compute())
            except PipelineError as error:
                box[0] = ("error", str(error))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise PipelineError(value)
        return value

    def first(self, compute):
        """compute() on rank 0, then on the others (rank 0 downloads a data set once, the others read it)."""
        if self.world == 1:
            return compute()
        value, error = None, None
        if self.main:
            try:
                value = compute()
            except PipelineError as failure:
                error = failure
        dist.barrier()  # reached by rank 0 even when it failed, so no rank waits for ever
        if error is not None:
            raise error
        return value if self.main else compute()

    def gather(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world if self.main else None
        dist.gather_object(value, values, dst=0)
        return values

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (a step's loss-term counts), on every rank."""
        if self.world == 1:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """`values` summed over the ranks (each rank's running sums, for one epoch's means)."""
        if self.world == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
