"""A pre-training corpus made of several datamodules, e.g. 2D X-rays + 3D CT for UniMedI (``phantom_cxr_ct``).

2D and 3D images cannot be stacked, so every batch stays whole and comes from one part; the parts' batches
are interleaved, evenly spread over the epoch (``mode="alternate"``), and each epoch shows every training
batch of every part once. The schedule depends only on the parts' batch counts, so under DDP every rank
takes a batch of the same part at the same step, as gathered contrastive losses need. Each batch carries
``source`` (the part's name), which picks that part's on-device augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from medvlp_bench.data import MedDataModule
from medvlp_bench.text import Tokenizer

MODES = ("alternate",)


def interleave(counts: Mapping[str, int]) -> list[str]:
    """Part names in step order: part i's j-th batch sits at (j + 0.5) / n_i of the epoch (ties by name)."""
    slots = [((j + 0.5) / n, name) for name, n in counts.items() for j in range(n)]
    return [name for _, name in sorted(slots)]


def shard(loader: DataLoader, world_size: int, rank: int, seed: int = 0) -> DataLoader:
    """The same training loader restricted to one rank's shuffled share (equal batch counts on all ranks)."""
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.num_workers > 0,
        collate_fn=loader.collate_fn,
    )


class AlternatingLoader:
    """Iterates several loaders as one, batches interleaved by :func:`interleave`, tagged with ``source``."""

    def __init__(self, loaders: Mapping[str, DataLoader]) -> None:
        self.loaders = dict(loaders)
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(dl) for dl in self.loaders.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for dl in self.loaders.values():  # reshuffle the distributed shares every epoch
            if isinstance(dl.sampler, DistributedSampler):
                dl.sampler.set_epoch(self.epoch)
        self.epoch += 1
        iters = {name: iter(dl) for name, dl in self.loaders.items()}
        for name in interleave({name: len(dl) for name, dl in self.loaders.items()}):
            batch = next(iters[name])
            batch["source"] = name
            yield batch


class MixedDataModule(L.LightningDataModule):
    """Pre-training corpus over named parts (training split for fitting, validation split for val loss).

    Args:
        parts: name -> datamodule (Hydra instantiates the part configs first).
        mode: ``alternate`` (whole batches of one part, interleaved); see docs/methods/unimedi.md for why
            batches are not mixed across parts.
        batch_scale: per-part factor on ``batch_size`` (default 1 for every part).
        spatial_dims, in_channels, size: what ``configs/pretrain.yaml`` reads as ``input.*``; they describe the
            highest-dimensional part. Encoders built from them alone cannot take the other parts, so this
            corpus is meant for methods whose encoder takes 2D and 3D (UniMedI).
        batch_size, tokenizer, rng_seed: as for a single corpus (``MedDataModule``); ``run.pretrain`` gives them.
    """

    def __init__(
        self,
        parts: Mapping[str, MedDataModule],
        *,
        mode: str = "alternate",
        name: str = "mixed",
        batch_scale: Mapping[str, float] | None = None,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        size: int | None = None,
        batch_size: int | None = None,
        tokenizer: Tokenizer | None = None,
        rng_seed: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
        if not parts:
            raise ValueError(f"{name}: 'parts' is empty; give at least one name -> datamodule")
        for key, part in parts.items():
            if not isinstance(part, MedDataModule):
                raise TypeError(f"{name}: parts.{key} must be a MedDataModule config, got {type(part).__name__}")
        unknown = set(batch_scale or {}) - set(parts)
        if unknown:
            raise ValueError(f"{name}: batch_scale names unknown parts {sorted(unknown)}; parts are {sorted(parts)}")
        self.parts, self.mode, self.name = dict(parts), mode, name
        self.batch_scale = {k: float((batch_scale or {}).get(k, 1.0)) for k in self.parts}
        channels = {int(p.in_channels) for p in self.parts.values()}
        if in_channels is not None and channels != {int(in_channels)}:
            raise ValueError(f"{name}: in_channels={in_channels} but the parts have {sorted(channels)}")
        self.spatial_dims = int(spatial_dims or max(int(p.spatial_dims) for p in self.parts.values()))
        self.in_channels = int(in_channels or next(iter(channels)))
        self.size = size
        self._batch_size = max(p.batch_size for p in self.parts.values())
        if batch_size is not None:
            self.batch_size = batch_size  # scaled per part (batch_scale)
        if tokenizer is not None:
            self.tokenizer = tokenizer  # to every part
        #: accepted like any corpus's, and kept for the record: the alternating loader shuffles with Lightning's
        #: seeded samplers (PL_GLOBAL_SEED), not with this seed
        self.rng_seed = rng_seed

    # the batch size and tokenizer reach the parts' loaders
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = int(value)
        for key, part in self.parts.items():
            part.batch_size = max(1, round(self._batch_size * self.batch_scale[key]))

    @property
    def tokenizer(self) -> Tokenizer | None:
        return next(iter(self.parts.values())).tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Tokenizer | None) -> None:
        for part in self.parts.values():
            part.tokenizer = value

    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> AlternatingLoader:
        world, rank = self._ranks()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        loaders = {}
        for key, part in self.parts.items():
            dl = part.loader("train", train=True)
            loaders[key] = shard(dl, world, rank, seed) if world > 1 else dl
        return AlternatingLoader(loaders)

    def val_dataloader(self) -> AlternatingLoader:
        """Every rank sees the whole (ordered) validation split of each part; it is small."""
        return AlternatingLoader({key: part.loader("val") for key, part in self.parts.items()})

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches get their own part's on-device augmentation (2D or 3D)."""
        trainer = getattr(self, "trainer", None)
        part = self.parts.get(batch.get("source")) if isinstance(batch, dict) else None
        if part is not None and part.batch_augment is not None and trainer is not None and trainer.training:
            return part.batch_augment(batch)
        return batch
