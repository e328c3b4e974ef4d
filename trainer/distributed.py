"""torchrun integration: one process per GPU (NCCL) or per CPU worker (gloo); every rank reads its own
DALI shard."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return d


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def gather_objects(d: Dist, obj):
    """All ranks' objects on every rank (list by rank)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_finite(d: Dist, value: torch.Tensor) -> bool:
    """True only if the loss is finite on every rank, so all ranks stop together."""
    ok = torch.tensor([float(torch.isfinite(value).all())], device=value.device)
    if d.enabled:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
