"""Rank helpers and all-gather with gradients, the piece every contrastive loss depends on under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the autograd graph.

    ``torch.distributed.nn`` all_gather's backward sums the incoming gradients across ranks, so a
    loss computed on the gathered batch on every rank yields, after DDP's gradient averaging, exactly
    the gradient of the single-process loss on the concatenated batch (checked in
    tests/test_distributed.py). Identity on one process. All ranks must pass the same shape.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather without gradients (labels, ids, teacher outputs)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
