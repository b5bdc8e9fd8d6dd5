"""Functions run in spawned gloo processes by test_distributed.py (importable by name in the children)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from medvlp_bench import losses


def init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def make_problem(
    n: int, d_in: int = 6, d: int = 4, seed: int = 0
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A two-tower toy model and a fixed global batch, identical on every process."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.ModuleDict({"img": torch.nn.Linear(d_in, d), "txt": torch.nn.Linear(d_in, d)})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g)


def loss_of(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, local: bool) -> torch.Tensor:
    a, b = model["img"](x), model["txt"](y)
    if kind == "clip":
        return losses.clip_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), 5.0, local_loss=local)
    if kind == "info_nce":
        return losses.info_nce(a, b, 0.5)
    if kind == "barlow":
        return losses.barlow_twins(a, b)
    raise ValueError(kind)


VARIANTS = (("clip", True), ("clip", False), ("info_nce", True), ("barlow", True))


def loss_worker(rank: int, world: int, port: int, out: str) -> None:
    """For every loss variant: each rank takes its slice of the global batch, gradients are averaged across
    ranks as DDP does, and rank 0 saves every rank's loss and the averaged gradients."""
    init(rank, world, port)
    results = {}
    for kind, local in VARIANTS:
        model, x, y = make_problem(8)
        sl = slice(rank * 8 // world, (rank + 1) * 8 // world)
        loss = loss_of(kind, model, x[sl], y[sl], local)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        losses_all = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses_all, loss.detach())
        results[f"{kind}-{local}"] = {
            "losses": torch.stack(losses_all),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        }
    if rank == 0:
        torch.save(results, Path(out))
    dist.destroy_process_group()


# ---- every method's own loss under 2 processes ---------------------------------------------------------------
def build_method(overrides: list[str]) -> torch.nn.Module:
    from medvlp_bench.config import compose, instantiate

    torch.manual_seed(0)
    return instantiate(compose("run", overrides).method.model)


def slice_batch(batch: dict, sl: slice) -> dict:
    """Rows ``sl`` of every tensor, list and nested dict (the tokenised text) of a collated batch."""
    out = {}
    for k, v in batch.items():
        out[k] = slice_batch(v, sl) if isinstance(v, dict) else v[sl]
    return out


def method_step(overrides: list[str], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one ``pretrain_step`` in eval mode (no dropout, BatchNorm on running stats, so the
    per-sample computation does not depend on how the batch is split)."""
    m = build_method(overrides).eval()
    loss = m.pretrain_step(batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def method_worker(rank: int, world: int, port: int, spec: str, out: str) -> None:
    """Each rank takes its half of every method's batch; rank 0 saves the rank losses and averaged gradients."""
    init(rank, world, port)
    cases = torch.load(spec, weights_only=True)
    results = {}
    for name, case in cases.items():
        n = len(case["batch"]["id"])
        sl = slice(rank * n // world, (rank + 1) * n // world)
        loss, grads = method_step(case["overrides"], slice_batch(case["batch"], sl))
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        losses_all = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses_all, loss)
        results[name] = {"losses": torch.stack(losses_all), "grads": grads}
    if rank == 0:
        torch.save(results, Path(out))
    dist.destroy_process_group()
