"""MedMNIST v2 / MedMNIST+ ``.npz`` files, 2D or 3D, every size variant (28, 64, 128, 224).

``<root>/<flag>.npz`` (28) or ``<flag>_<size>.npz`` with ``train_images, train_labels, val_images, ...``; 2D images
are (N, H, W) or (N, H, W, 3), 3D ones (N, D, H, W); labels (N, 1) or (N, K) for ChestMNIST's multi-label. The
official splits are used. Task type and class names come from the ``medmnist`` package's ``INFO`` when it is
installed, else from the labels (config ``task_type``/``class_names`` override both). Arrays are streamed out
of the zip once into memory-mapped ``.npy`` files under ``cache_dir`` (a 224 variant does not fit in RAM).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from ._common import AdapterDataModule, DataError, DatasetInfo, require_root
from ._reader import Preprocess, to_channels

log = logging.getLogger(__name__)
INFO = DatasetInfo(
    key="medmnist",
    title="MedMNIST v2 / MedMNIST+ (any 2D or 3D subset, e.g. AdrenalMNIST3D)",
    kind="2D/3D small images (npz): binary, multi-class or multi-label classification",
    layout=(
        "  <flag>.npz (28) or <flag>_<size>.npz (64, 128, 224)\n"
        "      keys train_images, train_labels, val_images, val_labels, test_images, test_labels"
    ),
    licence="CC BY 4.0 (most subsets; see each subset's source licence)",
    url="https://medmnist.com/ (Zenodo 10.5281/zenodo.10519652; pip install medmnist)",
)
TASKS = {"binary-class": "binary", "multi-class": "multiclass", "ordinal-regression": "multiclass"}
SPLITS = ("train", "val", "test")


def _header(npz: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with zipfile.ZipFile(npz) as zf, zf.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def extract(npz: Path, key: str, out: Path, chunk: int = 1 << 24) -> Path:
    """Stream one array of an npz into an ``.npy`` file (memory-mappable) without loading it whole."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file():
            return out
        tmp = out.with_suffix(".tmp.npy")
        with zipfile.ZipFile(npz) as zf, zf.open(f"{key}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            arr = np.lib.format.open_memmap(tmp, "w+", dtype, shape, fortran_order=fortran)
            flat, pos = arr.reshape(-1, order="A"), 0
            while pos < flat.size:
                buf = f.read(min(chunk, (flat.size - pos) * dtype.itemsize))
                if not buf:
                    raise EOFError(f"{key}.npy ends after {pos} of {flat.size} values")
                vals = np.frombuffer(buf, dtype)
                flat[pos : pos + len(vals)] = vals
                pos += len(vals)
            arr.flush()
            del arr, flat
        os.replace(tmp, out)
    return out


class NpzReader:
    """Picklable row -> sample over the extracted arrays (each worker maps its own view)."""

    def __init__(self, npz: Path, folder: Path, prep: Preprocess) -> None:
        self.npz, self.folder, self.prep = npz, folder, prep
        self._images: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": {}}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        split = row["split_src"]
        if split not in self._images:
            try:
                path = extract(self.npz, f"{split}_images", self.folder / f"{split}_images.npy")
            except (zipfile.BadZipFile, KeyError, EOFError, ValueError, OSError) as e:
                raise DataError(self.npz, f"cannot read {split}_images (truncated or corrupt npz?): {e}") from None
            self._images[split] = np.load(path, mmap_mode="r")
        x = np.asarray(self._images[split][int(row["row"])], dtype=np.float32)
        x = np.moveaxis(x, -1, 0) if x.ndim == self.prep.spatial_dims + 1 else x[None]
        x = to_channels(x, self.prep.channels)
        if tuple(x.shape[1:]) != self.prep.shape:
            x = np.asarray(self.prep.transforms(["image"])({"image": x})["image"], dtype=np.float32)
        return {"image": x, "label": row["label"]}


class MedMNIST(AdapterDataModule):
    """One MedMNIST subset at one size; ``flag`` is the lower-case subset name (``adrenalmnist3d``)."""

    info = INFO
    fixed_dims = None
    default_spatial = "pad_crop"
    default_intensity = {"type": "divide", "value": 255.0}

    def __init__(
        self,
        root: str,
        *,
        flag: str,
        npz_size: int = 28,
        task_type: str | None = None,
        class_names: list[str] | None = None,
        **kw: Any,
    ) -> None:
        self.flag, self.npz_size = flag.lower(), int(npz_size)
        self.npz = Path(root) / (f"{self.flag}.npz" if self.npz_size == 28 else f"{self.flag}_{self.npz_size}.npz")
        meta = self._meta()
        super().__init__(
            root, task_type=task_type or meta["task_type"], class_names=class_names or meta["class_names"], **kw
        )

    def _meta(self) -> dict[str, Any]:
        """Task type and class names: the medmnist package's INFO, else the label array (when the file exists)."""
        try:
            import medmnist  # type: ignore[import-not-found]

            info = medmnist.INFO[self.flag]
            labels = [info["label"][k] for k in sorted(info["label"], key=int)]
            multilabel = info["task"].startswith("multi-label")
            task = "multilabel" if multilabel else TASKS.get(info["task"], "multiclass")
            return {"task_type": task, "class_names": labels[1:] if task == "binary" else labels}
        except (ImportError, KeyError):
            pass
        if not self.npz.is_file():
            return {"task_type": "multiclass", "class_names": []}  # the missing file is reported by scan
        y = self._labels("train")
        if y.shape[1] > 1:
            return {"task_type": "multilabel", "class_names": [f"label_{i}" for i in range(y.shape[1])]}
        k = int(y.max()) + 1
        if k == 2:
            return {"task_type": "binary", "class_names": ["class_1"]}
        return {"task_type": "multiclass", "class_names": [f"class_{i}" for i in range(k)]}

    def _labels(self, split: str) -> np.ndarray:
        try:
            with np.load(self.npz) as z:
                y = np.asarray(z[f"{split}_labels"])
        except KeyError:
            raise DataError(
                self.npz, f"has no {split}_labels array; keys must be train_images, train_labels, ..."
            ) from None
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
            raise DataError(self.npz, f"not a readable npz (truncated or corrupt?): {type(e).__name__}: {e}") from None
        return y.reshape(len(y), -1)

    def scan(self, root: Path) -> pd.DataFrame:
        require_root(self.npz.parent, self.info)
        if not self.npz.is_file():
            present = sorted(p.name for p in self.npz.parent.glob("*.npz"))
            raise DataError(self.npz, f"not found; files here: {present}; {self.info.how_to_get()}")
        frames = []
        for split in SPLITS:
            try:
                shape, _ = _header(self.npz, f"{split}_images")
            except (zipfile.BadZipFile, KeyError, EOFError, ValueError, OSError) as e:
                raise DataError(self.npz, f"cannot read {split}_images (truncated or corrupt npz?): {e}") from None
            dims = len(shape) - 1 - (shape[-1] == 3 and len(shape) == 4 and self.spatial_dims == 2)
            if dims != self.spatial_dims:
                raise DataError(
                    self.npz, f"holds {dims}D images {shape[1:]}, the config says spatial_dims={self.spatial_dims}"
                )
            y = self._labels(split)
            if len(y) != shape[0]:
                raise DataError(self.npz, f"{split}: {shape[0]} images but {len(y)} labels")
            frames.append(pd.DataFrame({"row": np.arange(len(y)), "split": split, "label": list(self._cast(y))}))
        df = pd.concat(frames, ignore_index=True)
        df["split_src"] = df["split"]
        df["id"] = [f"{s}-{r:06d}" for s, r in zip(df["split"], df["row"])]
        df["path"] = str(self.npz)
        return df

    def _cast(self, y: np.ndarray) -> np.ndarray:
        if self.task_type == "multilabel":
            return y.astype(np.float32)
        return y[:, 0].astype(np.float32 if self.task_type == "binary" else np.int64)

    def reader(self) -> NpzReader:
        stat = self.npz.stat()
        key = f"{self.npz.stem}-{stat.st_size}-{stat.st_mtime_ns}"
        # the data folder may be read-only: without a cache_dir the extracted arrays go to the temp folder
        folder = Path(self.cache_dir or tempfile.gettempdir()) / "data" / "medmnist" / key
        return NpzReader(self.npz, folder, self.prep)
