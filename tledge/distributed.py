"""Multi-process `tledge tune` on PyTorch's own distributed engine (torchrun).

`torchrun --nproc-per-node N -m tledge tune ...` sets RANK/WORLD_SIZE/MASTER_ADDR; tledge then:
- scans with each rank decoding its share of the files (no image read twice), results all-gathered;
- extracts features for its share (positions rank, rank+N, ...), writes them to the feature cache as
  shards (readable by any world size) and all-gathers them, so every rank holds the full matrix;
- trains the head on rank 0 only (a linear head on cached features trains in about a second; DDP's
  per-step all-reduce would cost more than the computation) and broadcasts it;
- fine-tunes (--unfreeze) with DistributedDataParallel, a DistributedSampler and all-reduced metrics;
- writes the run directory on rank 0 only.
The backend is NCCL on GPUs and gloo on CPUs; collectives time out after TLEDGE_DIST_TIMEOUT seconds
(default 600), so a dead rank ends the job instead of hanging it, and torchrun stops the other ranks
when one exits with an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tledge.errors import TledgeError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share: positions rank, rank + world, ... (every item exactly once over all ranks)."""
        return items[self.rank::self.world]

    def unshard(self, parts: list[list[Any]]) -> list[Any]:
        """Inverse of ``shard`` applied to the all-gathered per-rank lists."""
        n = sum(len(p) for p in parts)
        out: list[Any] = [None] * n
        for r, part in enumerate(parts):
            out[r::self.world] = part
        return out


def from_env() -> Dist:
    """Join the process group torchrun described in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("TLEDGE_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend, timeout=timeout)
    return Dist(rank, world, local, backend)


def shutdown(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def maybe_inject_fault(d: Dist, stage: str) -> None:
    """Testing aid for the failure path: TLEDGE_FAULT_INJECT=RANK:STAGE makes that rank fail there."""
    spec = os.environ.get("TLEDGE_FAULT_INJECT")
    if spec and spec == f"{d.rank}:{stage}":
        raise TledgeError(f"rank {d.rank}: fault injected at '{stage}' (TLEDGE_FAULT_INJECT={spec}).",
                          "unset TLEDGE_FAULT_INJECT.")
