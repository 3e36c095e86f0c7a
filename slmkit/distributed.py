"""Data-parallel training under `torchrun`: process-group setup and the few collective calls the loop needs.

Single-process runs never touch torch.distributed, so nothing here costs anything without torchrun.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU)."""
    if world_size() == 1 or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend=backend)


def teardown() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if FLAG is true on any rank: keeps ranks stepping in lockstep (time budgets, Ctrl-C)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_states(state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of STATE (e.g. its sampler RNG), for a checkpoint that resumes each rank exactly."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return [state]
    out = [torch.empty_like(state) for _ in range(world_size())]
    torch.distributed.all_gather_object(out, state)
    return out


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[local_rank()] if device.startswith("cuda") else None)
