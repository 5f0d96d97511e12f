"""Optional torch.distributed glue for RIPT (spec §5.3, §9.2): one process works without it.

Launched by `torchrun`, each rank owns a slice of the contexts; the early-stop count, metrics and
gradients travel through collectives (gloo on CPU, NCCL on GPU) — never through files in /tmp
(spec §8 B14).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Dist:
    """Rank, world size and the few collectives RIPT needs; no-ops in a single process."""

    def __init__(self):
        self.enabled = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.enabled:
            t = t.to(self._comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Average `.grad` of every tensor over ranks (None grads count as zero)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")
