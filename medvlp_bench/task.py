"""The ``Task`` base: a downstream protocol that judges a method's encoder, identically for every method.

Concrete kinds live in ``tasks/``. A task receives the method and an :class:`EvalContext` (a trainer factory
from ``run.py``, the seed, a scratch folder), so tasks never build loggers, strategies or devices themselves.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor

from .data import MedDataModule
from .method import Method
from .versions import as_version


@dataclass
class EvalContext:
    make_trainer: Callable[..., L.Trainer]
    seed: int
    work_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "32-true"
    #: identifies the evaluated weights (checkpoint sha or seeded init); enables the frozen-feature cache
    weights_key: str | None = None

    def cached(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Frozen-encoder outputs are the same for every label fraction: compute once per weights and data.

        Only used for frozen protocols; the cache holds a few entries and lives for the process (a bench), so
        it is shared by every task evaluated there. ``name`` must therefore identify the data completely
        (``MedDataModule.cache_key``: every preprocessing setting); precision and device are added here,
        since bf16 features are not fp32 features.
        """
        if self.weights_key is None:
            return compute()
        key = (self.weights_key, f"{name}|{self.precision}|{self.device}")
        if key not in _FEATURE_CACHE:
            while len(_FEATURE_CACHE) >= _FEATURE_CACHE_SIZE:
                _FEATURE_CACHE.pop(next(iter(_FEATURE_CACHE)))
            _FEATURE_CACHE[key] = compute()
        return _FEATURE_CACHE[key]


_FEATURE_CACHE: dict[tuple[str, str], dict[str, Any]] = {}
_FEATURE_CACHE_SIZE = 12


@dataclass
class TaskResult:
    """Metrics plus what is needed to reproduce and re-test them."""

    metrics: dict[str, float]
    n_test: int
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    subset_ids: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: metric names (before any ``/<class>`` suffix) where smaller is better
LOWER_IS_BETTER = frozenset({"hd95", "medr", "loss"})


class Task(abc.ABC):
    """Base class. ``metrics`` are the declared metric names; ``primary`` ranks the leaderboard."""

    kind: ClassVar[str]
    #: protocols of this kind that keep the encoder frozen (features only: probes, retrieval, zero-shot)
    frozen_protocols: ClassVar[frozenset[str]] = frozenset({"linear", "frozen", "zeroshot"})

    def __init__(
        self,
        data: MedDataModule,
        *,
        metrics: list[str],
        primary: str,
        higher_is_better: bool = True,
        version: int | str = 1,
        protocol: str = "linear",
        label_fraction: float = 1.0,
        pretrain_data: str | None = None,
    ) -> None:
        if primary not in metrics:
            raise ValueError(f"primary metric {primary!r} is not among the declared metrics {metrics}")
        self.data, self.metrics, self.primary = data, list(metrics), primary
        self.higher_is_better, self.protocol = higher_is_better, protocol
        #: ``version:`` of the task config (an int; "1" in older configs), bumped when the protocol or data
        #: change; it is part of a result cell's identity (``medvlp_bench.versions``)
        self.version: int = as_version(version, "task")
        self.label_fraction, self.pretrain_data = float(label_fraction), pretrain_data

    def higher_is_better_for(self, metric: str) -> bool:
        """Direction of one metric row: distances (HD95) and ranks (median rank) are lower-is-better
        whatever the task's primary direction."""
        base = metric.split("/")[0]
        if base in LOWER_IS_BETTER or base.endswith("_medr"):
            return False
        return self.higher_is_better

    @property
    def freezes_encoder(self) -> bool:
        """True when the protocol never trains the encoder: a method must then not put untrained weights in
        front of it (``Method.adapt_to_input(..., frozen=True)``), since nothing downstream would fit them."""
        return self.protocol in self.frozen_protocols

    def skip_reason(self, method: Method) -> str | None:
        """Why this task does not apply to ``method`` (e.g. retrieval without a text tower), or None."""
        return None

    @abc.abstractmethod
    def evaluate(self, method: Method, ctx: EvalContext) -> TaskResult:
        """Fit a head if the protocol needs one, test on the held-out split, return the metrics."""


@contextlib.contextmanager
def autocast(ctx: EvalContext) -> Iterator[None]:
    """bf16/fp16 autocast matching the trainer precision (no-op at 32 bits)."""
    if ctx.precision.startswith("bf16"):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            yield
    elif ctx.precision.startswith("16"):
        with torch.autocast(ctx.device.type, dtype=torch.float16):
            yield
    else:
        yield


@torch.inference_mode()
def extract(
    fn: Callable[[dict[str, Any]], Tensor], loader: Any, ctx: EvalContext, keys: tuple[str, ...] = ("label",)
) -> dict[str, Any]:
    """Run ``fn(batch)`` over a loader on one device; return stacked outputs, ids and the requested keys."""
    outs: list[Tensor] = []
    extra: dict[str, list[Any]] = {k: [] for k in keys}
    ids: list[str] = []
    for batch in loader:
        batch = {k: (v.to(ctx.device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        if "text" in batch:
            batch["text"] = {k: v.to(ctx.device) for k, v in batch["text"].items()}
        with autocast(ctx):
            outs.append(fn(batch).float().cpu())
        ids.extend(batch["id"])
        for k in keys:
            v = batch[k]
            extra[k].append(v.cpu() if isinstance(v, Tensor) else v)
    result: dict[str, Any] = {"out": torch.cat(outs), "id": ids}
    for k, vs in extra.items():
        result[k] = torch.cat(vs) if vs and isinstance(vs[0], Tensor) else sum(vs, [])
    return result


def reseed(ctx: EvalContext) -> None:
    """Reset every RNG to the cell's seed right before a head is built and trained.

    Feature extraction draws from the global RNG (each DataLoader iterator takes a base seed), so without
    this a cached and an uncached run of the same cell would train different heads.
    """
    L.seed_everything(ctx.seed, workers=True, verbose=False)


def state_checksum(module: torch.nn.Module) -> float:
    """Cheap fingerprint of all parameters and buffers, to prove a frozen protocol changed nothing."""
    with torch.no_grad():
        return float(sum(t.double().abs().sum().item() for t in module.state_dict().values() if t.is_floating_point()))
