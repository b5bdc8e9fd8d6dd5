"""The datamodule base: manifest, splits, label-fraction subsets, MONAI dict transforms, report tokenisation.

A dataset subclass provides ``build_manifest`` (one row per sample: ``id``, ``split``, ``label``, optional
``report``/``path``/``mask_path``), ``reader`` (row -> arrays) and its intensity transforms. Everything that must
be identical across methods -- which samples are labelled at 1 %, the order of the test set, the
preprocessing -- is decided here, never in a method.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from functools import cached_property
from typing import Any, ClassVar

import lightning as L
import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader
from monai.transforms import Compose, EnsureTyped
from torch import Tensor
from torch.utils.data import Dataset, RandomSampler

from .augment import BatchAugment
from .text import Tokenizer

SPLITS = ("train", "val", "test")


def _seed_from(*parts: object) -> int:
    """Stable 63-bit seed from strings: subsets must not depend on Python's hash randomisation."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16)


def stratify_keys(labels: np.ndarray) -> list[str]:
    """Stratum of each sample: the class (multi-class) or the label combination (multi-label)."""
    if labels.ndim == 1:
        return [str(int(v)) for v in labels]
    return ["".join("1" if v > 0.5 else "0" for v in row) for row in labels]


def label_fraction_subset(
    dataset: str, ids: Sequence[str], labels: np.ndarray, fraction: float, seed: int
) -> list[str]:
    """Deterministic stratified subset of ``ids`` of size ~``fraction * len(ids)``.

    Depends only on (dataset, fraction, seed) and the set of ids/labels, never on their order or on the
    process rank. Each stratum contributes by largest remainder; then, so that a probe can be fitted at
    all, every class with a positive in the pool (and, for multi-label, with a negative) is guaranteed
    one, added in a seeded order. Returned ids are sorted.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    order = np.argsort(np.asarray(ids, dtype=object).astype(str), kind="stable")
    ids = [str(ids[i]) for i in order]
    labels = np.asarray(labels)[order]
    if fraction >= 1:
        return ids
    rng = np.random.default_rng(_seed_from(dataset, f"{fraction:.6g}", seed))
    keys = stratify_keys(labels)
    strata: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        strata.setdefault(k, []).append(i)
    target = max(1, round(fraction * len(ids)))
    names = sorted(strata)
    quotas = np.array([fraction * len(strata[k]) for k in names])
    alloc = np.floor(quotas).astype(int)
    rest = target - alloc.sum()
    if rest > 0:  # largest remainder, ties broken by the seeded permutation
        tiebreak = rng.permutation(len(names))
        order_r = sorted(range(len(names)), key=lambda j: (-(quotas[j] - alloc[j]), tiebreak[j]))
        for j in order_r[:rest]:
            alloc[j] += 1
    chosen: list[int] = []
    shuffled = {k: list(rng.permutation(strata[k])) for k in names}
    for k, n in zip(names, alloc):
        chosen.extend(shuffled[k][:n])
    chosen_set = set(chosen)
    for need in _coverage_needs(labels):
        if not any(need(labels[i]) for i in chosen_set):
            pool = [i for i in rng.permutation(len(ids)) if need(labels[i]) and i not in chosen_set]
            if pool:
                chosen_set.add(int(pool[0]))
    return sorted(ids[i] for i in chosen_set)


def _coverage_needs(labels: np.ndarray) -> list[Callable[[np.ndarray], bool]]:
    if labels.ndim == 1:
        return [lambda y, c=c: int(y) == c for c in sorted(set(int(v) for v in labels))]
    needs: list[Callable[[np.ndarray], bool]] = []
    for c in range(labels.shape[1]):
        needs.append(lambda y, c=c: y[c] > 0.5)
        needs.append(lambda y, c=c: y[c] <= 0.5)
    return needs


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def canonical(value: Any, _depth: int = 0) -> Any:
    """A JSON-ready, order-independent form of a setting: dicts with sorted string keys, sets sorted, tuples as
    lists, paths and enums as strings, arrays and tensors as lists, dataclasses and plain objects as their class
    name plus their (public and private) attributes, functions by qualified name."""
    if _depth > 8:  # deeper than any setting: this object only, so the key can miss but never match wrongly
        return {"__class__": _qualname(type(value)), "id": id(value)}
    d = _depth + 1
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, np.generic | np.ndarray | Tensor):
        return canonical(value.tolist(), d)
    if isinstance(value, os.PathLike | enum.Enum):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v, d) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [canonical(v, d) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((canonical(v, d) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, MedDataModule):  # a mixed corpus holds its parts
        return {"__class__": _qualname(type(value)), "cache_key": value.cache_key()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"__class__": _qualname(type(value)), **canonical(fields, d)}
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__"):
        return _qualname(value)
    if inspect.isfunction(value) or inspect.ismethod(value):
        closure = [canonical(c.cell_contents, d) for c in (getattr(value, "__closure__", None) or ())]
        return {"__function__": _qualname(value), "closure": closure}
    if hasattr(value, "__dict__"):
        return {"__class__": _qualname(type(value)), **canonical(vars(value), d)}
    return {"__class__": _qualname(type(value)), "repr": repr(value)}


def _column_bytes(col: pd.Series) -> bytes:
    """A manifest column as bytes to hash: array-valued cells (labels, multi-file paths) stacked, others as text."""
    vals = col.to_numpy()
    if len(vals) and all(isinstance(v, np.ndarray | list | tuple) for v in vals):
        try:
            arr = np.stack([np.asarray(v) for v in vals])
            return f"{arr.dtype.str}{arr.shape}".encode() + hashlib.sha256(np.ascontiguousarray(arr).tobytes()).digest()
        except ValueError:  # ragged: fall through to text
            pass
    return pd.util.hash_pandas_object(col.astype(str), index=False).to_numpy().tobytes()


def subset_checksum(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


class RecordDataset(Dataset):
    """Rows of a manifest, loaded by ``load`` and passed through a MONAI dict transform."""

    def __init__(self, rows: list[dict[str, Any]], load: Callable[[dict], dict], transform: Callable) -> None:
        self.rows, self.load, self.transform = rows, load, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        sample = self.load(row)
        sample = self.transform(sample)
        sample["id"] = str(row["id"])
        return sample


def collate(samples: list[dict[str, Any]], tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Stack tensors and arrays, keep strings as lists, tokenise reports when a tokenizer is set."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], Tensor):
            out[key] = torch.stack([v.as_tensor() if hasattr(v, "as_tensor") else v for v in vals])
        elif isinstance(vals[0], np.ndarray | np.generic | int | float):
            out[key] = torch.as_tensor(np.stack(vals))
        else:
            out[key] = vals
    if tokenizer is not None and "report" in out:
        out["text"] = tokenizer(out["report"])
    return out


class _Collate:
    """Picklable collate bound to a tokenizer (DataLoader workers pickle it)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.tokenizer)


class EpochRandomSampler(RandomSampler):
    """Shuffles with a permutation drawn from (seed, epoch) alone; Lightning calls ``set_epoch`` before each
    epoch (and swaps in a seeded ``DistributedSampler`` under DDP, as it does for any ``RandomSampler``)."""

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_seed_from(self.seed, "shuffle", self.epoch) % 2**62)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


class MedDataModule(L.LightningDataModule):
    """Base datamodule. Subclasses implement ``build_manifest`` and ``reader``.

    Args:
        name: dataset name; part of the label-subset seed, so subsets are per dataset.
        task_type: ``multilabel``, ``multiclass`` or ``binary`` (what ``label`` holds).
        class_names: label names (multi-label columns or classes, in index order).
        augment: training-time augmentation parameters for :class:`BatchAugment` (``False`` disables it);
            applied batched on the device after transfer, in training only.
        tokenizer: the tokenizer of the method these loaders feed; batches then carry ``text`` (tokenised reports).
        rng_seed: pre-training's seed for the shuffling and augmentation RNG (see ``on_before_batch_transfer``).
    """

    spatial_dims: int = 2
    in_channels: int = 1

    def __init__(
        self,
        *,
        name: str,
        task_type: str = "multilabel",
        class_names: Sequence[str] = (),
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: bool | dict[str, float] = True,
        pin_memory: bool | None = None,
        tokenizer: Tokenizer | None = None,
        rng_seed: int | None = None,
    ) -> None:
        super().__init__()
        if task_type not in ("multilabel", "multiclass", "binary"):
            raise ValueError(f"task_type must be multilabel, multiclass or binary, got {task_type!r}")
        self.name, self.task_type, self.class_names = name, task_type, list(class_names)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        params = augment if isinstance(augment, dict) else {}
        self.batch_augment = BatchAugment(**params) if augment is not False else None
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        #: tokenises reports into ``batch["text"]``: the tokenizer of the method the loaders feed (None: no text)
        self.tokenizer: Tokenizer | None = tokenizer
        # Given by the trainer's owner (pre-training): makes shuffling and augmentation pure functions of
        # (seed, rank, epoch, batch), so a run resumed from a checkpoint replays exactly. None: global RNG.
        self.rng_seed: int | None = rng_seed

    # ---- to implement -------------------------------------------------------------------------
    def build_manifest(self) -> pd.DataFrame:
        raise NotImplementedError

    def reader(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """A picklable callable: manifest row -> ``{"image": float32 [C, *S], "label", "report", "mask"}``.

        Kept apart from the datamodule so DataLoader workers do not copy it (or its trainer).
        """
        raise NotImplementedError

    def intensity_transforms(self) -> list[Callable]:
        """Deterministic intensity preprocessing (windowing, normalisation), applied to ``image``."""
        return []

    # ---- provided ------
    #: attributes that change how samples are batched or loaded, or are runtime state, never what a frozen
    #: encoder sees; everything else a datamodule holds is part of its ``cache_key``
    CACHE_KEY_IGNORES: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "eval_batch_size", "num_workers", "pin_memory", "rng_seed", "tokenizer", "trainer"}
        | {"manifest", "prepare_data_per_node", "allow_zero_length_dataloader_with_multiple_devices"}
        | {"_log_hyperparams", "_batch_size", "_manifest_sha"}
    )

    def cache_key(self) -> str:
        """Identifies the data a frozen encoder sees: the class, every setting the datamodule holds (scalars, and
        the dicts, lists and objects that carry intensity, spatial, ROI and orientation settings, in a canonical
        form) and the manifest. Two datamodules share a key only if they would yield the same samples."""
        settings = {k: v for k, v in vars(self).items() if k not in self.CACHE_KEY_IGNORES}
        blob = json.dumps([_qualname(type(self)), canonical(settings), self._manifest_digest()], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _manifest_digest(self) -> str:
        """sha256 of every manifest column (ids, splits, paths, labels, ...), independent of the index; computed
        once per manifest (a 100k-row manifest takes about a second)."""
        df = self.manifest
        memo = self.__dict__.get("_manifest_sha")
        if memo is None or memo[0] is not df:
            digest = hashlib.sha256()
            for col in sorted(df.columns, key=str):
                digest.update(json.dumps(str(col)).encode() + _column_bytes(df[col]))
            memo = (df, digest.hexdigest())
            self.__dict__["_manifest_sha"] = memo
        return memo[1]

    # ---------------------------------------------------------------------------------------------
    @cached_property
    def manifest(self) -> pd.DataFrame:
        df = self.build_manifest()
        missing = {"id", "split"} - set(df.columns)
        if missing:
            raise ValueError(f"{self.name}: manifest lacks columns {sorted(missing)}")
        bad = set(df["split"]) - set(SPLITS)
        if bad:
            raise ValueError(f"{self.name}: unknown split names {sorted(bad)}; allowed {SPLITS}")
        if df["id"].duplicated().any():
            raise ValueError(f"{self.name}: duplicate sample ids, e.g. {df['id'][df['id'].duplicated()].iloc[0]}")
        return df.reset_index(drop=True)

    def rows(self, split: str, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        df = self.manifest[self.manifest["split"] == split]
        if ids is not None:
            df = df[df["id"].isin(set(ids))]
        return df.to_dict("records")

    def labels(self, split: str) -> np.ndarray:
        vals = self.manifest.loc[self.manifest["split"] == split, "label"].tolist()
        return np.stack([np.asarray(v) for v in vals]) if vals else np.zeros((0,))

    def subset_ids(self, fraction: float, seed: int, split: str = "train") -> list[str]:
        ids = self.manifest.loc[self.manifest["split"] == split, "id"].astype(str).tolist()
        return label_fraction_subset(self.name, ids, self.labels(split), fraction, seed)

    def transform(self) -> Compose:
        """Deterministic per-sample preprocessing; random augmentation happens batched, on the device."""
        keys = ["image", "mask"] if self._has_mask else ["image"]
        return Compose([*self.intensity_transforms(), EnsureTyped(keys=keys, data_type="tensor", track_meta=False)])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches on the device (pre-training through ``trainer.fit(datamodule=...)``)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return batch
        if self.rng_seed is not None:
            # Reseed from the batch's position: augmentation here and dropout/masking in the training step
            # then no longer depend on how the process got to this batch (fresh start or resume).
            progress = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            torch.manual_seed(_seed_from(self.rng_seed, trainer.global_rank, trainer.current_epoch, progress) % 2**62)
        return self.batch_augment(batch) if self.batch_augment is not None else batch

    @property
    def _has_mask(self) -> bool:
        return "mask_path" in self.manifest.columns or getattr(self, "has_masks", False)

    def dataset(self, split: str, ids: Sequence[str] | None = None) -> RecordDataset:
        rows = self.rows(split, ids)
        if not rows:
            raise ValueError(f"{self.name}: split {split!r} is empty")
        return RecordDataset(rows, self.reader(), self.transform())

    def loader(
        self, split: str, *, ids: Sequence[str] | None = None, train: bool = False, batch_size: int | None = None
    ) -> DataLoader:
        """Training loaders shuffle and drop the last partial batch (equal batches on every rank, as
        gathered contrastive losses need); evaluation loaders see every sample exactly once, in order."""
        ds = self.dataset(split, ids)
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        sampler = EpochRandomSampler(ds, self.rng_seed) if train and self.rng_seed is not None else None
        return DataLoader(
            ds,
            batch_size=min(bs, len(ds)) if train else bs,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=_Collate(self.tokenizer),
        )

    # Lightning hooks: pre-training uses every training sample (reports, no labels) and val for val loss.
    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")
