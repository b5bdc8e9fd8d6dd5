"""Phantom datamodules: the embedded default data, generated deterministically and cached on disk.

``PhantomDataModule(kind="cxr"|"ct"|"mri")`` wraps the generators in ``phantom_cxr.py``, ``phantom_ct.py`` and
``phantom_mri.py``: sample ``i`` is a pure function of (i, data_seed, size). The first ``n_test`` indices are
the test split, the next ``n_val`` validation and the rest training, so growing the training set never
changes the test set. Generated arrays are stored once as ``.npy`` (float16 images, uint8 masks) under
``<cache_dir>/phantoms/<key>/`` and memory-mapped by every process and worker afterwards.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock
from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged

from medvlp_bench.data import MedDataModule

log = logging.getLogger(__name__)

#: bump when a generator changes, so stale caches are not reused
GENERATOR_VERSION = "1"

_KINDS: dict[str, dict[str, Any]] = {
    "cxr": {"dims": 2, "channels": 1, "task_type": "multilabel", "classes": "FINDINGS"},
    "ct": {"dims": 3, "channels": 1, "task_type": "multilabel", "classes": "FINDINGS"},
    "mri": {"dims": 3, "channels": 4, "task_type": "multiclass", "classes": "CLASSES"},
}


def generator_module(kind: str) -> Any:
    if kind not in _KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {sorted(_KINDS)}")
    return importlib.import_module(f"medvlp_bench.datasets.phantom_{kind}")


def materialise(kind: str, size: int, n: int, seed: int, folder: Path) -> Path:
    """Generate samples 0..n-1 into ``folder`` once (file-locked, written under a temp name, renamed)."""
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():
            return folder
        gen = generator_module(kind).generate
        t0 = time.time()
        first = gen(0, seed, size)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16, (n, *first.image.shape))
            masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, *first.mask.shape))
            records = []
            for i in range(n):
                s = first if i == 0 else gen(i, seed, size)
                images[i], masks[i] = s.image, s.mask
                records.append({"labels": s.labels.tolist(), "report": s.report, "meta": s.meta})
            images.flush()
            masks.flush()
            del images, masks
            (tmp / "meta.json").write_text(json.dumps({"kind": kind, "size": size, "seed": seed, "records": records}))
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "generated %d %s phantoms (%d^%d) in %.1f s -> %s", n, kind, size, first.mask.ndim, time.time() - t0, folder
        )
    return folder


class PhantomReader:
    """Picklable row -> arrays reader over the memory-mapped cache (each worker maps its own view)."""

    def __init__(self, folder: Path, with_mask: bool) -> None:
        self.folder, self.with_mask = Path(folder), with_mask
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self._arrays is None:
            self._arrays = (
                np.load(self.folder / "images.npy", mmap_mode="r"),
                np.load(self.folder / "masks.npy", mmap_mode="r"),
            )
        images, masks = self._arrays
        i = int(row["row"])
        out = {"image": np.asarray(images[i], dtype=np.float32), "label": row["label"], "report": row["report"]}
        if self.with_mask:
            out["mask"] = np.asarray(masks[i])[None].astype(np.int64)
        return out


class PhantomDataModule(MedDataModule):
    """Structured phantoms with findings, masks and reports (see the generator modules).

    Args:
        kind: ``cxr`` (2D chest X-ray), ``ct`` (3D abdominal CT, HU) or ``mri`` (3D brain, 4 modalities).
        target: ``label`` (classification, retrieval, pre-training) or ``mask`` (segmentation).
        spatial_dims, in_channels: optional, checked against the kind (configs state them for encoders).
    """

    def __init__(
        self,
        kind: str,
        *,
        size: int,
        n_train: int,
        n_val: int,
        n_test: int,
        cache_dir: str,
        data_seed: int = 0,
        target: str = "label",
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        name: str | None = None,
        **kw: Any,
    ) -> None:
        info = _KINDS.get(kind)
        if info is None:
            raise ValueError(f"unknown phantom kind {kind!r}; choose one of {sorted(_KINDS)}")
        mod = generator_module(kind)
        super().__init__(
            name=name or f"phantom_{kind}",
            task_type=info["task_type"],
            class_names=list(getattr(mod, info["classes"])),
            **kw,
        )
        checks = (("spatial_dims", spatial_dims, info["dims"]), ("in_channels", in_channels, info["channels"]))
        for key, given, actual in checks:
            if given is not None and int(given) != actual:
                raise ValueError(f"phantom_{kind} has {key}={actual}, config says {given}")
        if target not in ("label", "mask"):
            raise ValueError(f"target must be 'label' or 'mask', got {target!r}")
        self.kind, self.size, self.data_seed, self.target = kind, int(size), int(data_seed), target
        self.spatial_dims, self.in_channels = info["dims"], info["channels"]
        self.seg_classes = list(mod.SEG_CLASSES)
        self.has_masks = target == "mask"
        self.n = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        key = f"{kind}-{size}-{sum(self.n.values())}-seed{data_seed}-v{GENERATOR_VERSION}"
        self.folder = Path(cache_dir) / "phantoms" / key

    def build_manifest(self) -> pd.DataFrame:
        total = sum(self.n.values())
        materialise(self.kind, self.size, total, self.data_seed, self.folder)
        records = json.loads((self.folder / "meta.json").read_text())["records"]
        splits = ["test"] * self.n["test"] + ["val"] * self.n["val"] + ["train"] * self.n["train"]
        dtype = np.int64 if self.task_type == "multiclass" else np.float32
        return pd.DataFrame(
            {
                "id": [f"{self.kind}-{i:06d}" for i in range(total)],
                "split": splits,
                "row": np.arange(total),
                "label": [np.asarray(r["labels"], dtype=dtype) for r in records],
                "report": [r["report"] for r in records],
                "meta": [r["meta"] for r in records],
            }
        )

    def reader(self) -> PhantomReader:
        self.manifest  # noqa: B018 - makes sure the cache exists before workers start
        return PhantomReader(self.folder, self.has_masks)

    def intensity_transforms(self) -> list[Callable]:
        if self.kind == "ct":  # abdominal soft-tissue window -> [0, 1]
            return [ScaleIntensityRanged(keys="image", a_min=-160.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True)]
        if self.kind == "mri":
            return [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
        return []


if __name__ == "__main__":  # generation speed of every kind: python -m medvlp_bench.datasets.phantoms
    from ._phantom_common import benchmark

    for kind, sizes, n in (("cxr", (128, 256), 50), ("ct", (32, 64, 96), 10), ("mri", (32, 64, 96), 10)):
        for size in sizes:
            ms = benchmark(generator_module(kind).generate, n, size=size) * 1e3
            print(f"{kind} {size}^{_KINDS[kind]['dims']}: {ms:.2f} ms/sample")
