"""A user's own 2D classification data as ``root/{train,val,test}/<class>/<image>`` (PNG, JPEG or DICOM).

Classes are the sorted union of the class folder names. A missing ``val`` split is carved from ``train``
(``val_fraction``, by a hash of the file's relative path, so it never changes between runs or machines); a
missing ``test`` split is an error, since a benchmark needs a fixed test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo
from ._reader import IMAGE_SUFFIXES

INFO = DatasetInfo(
    key="imagefolder",
    title="Image folder (your own 2D data)",
    kind="2D images (PNG, JPEG, DICOM): multi-class classification",
    layout="  train/<class>/*.png|jpg|jpeg|dcm, [val/<class>/...], test/<class>/...",
    licence="yours",
    url="(your data)",
)
SUFFIXES = (*IMAGE_SUFFIXES, ".dcm")


class ImageFolder(AdapterDataModule):
    """Multi-class classification from folder names."""

    info = INFO

    def __init__(self, root: str, *, class_names: list[str] | None = None, **kw: Any) -> None:
        self._given = list(class_names) if class_names else None
        super().__init__(root, task_type="multiclass", class_names=self._given or [], **kw)

    def scan(self, root: Path) -> pd.DataFrame:
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise DataError(root, f"needs train/ and test/ folders; expected layout:\n{self.info.layout}")
        splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
        found = {
            s: sorted(d.name for d in (root / s).iterdir() if d.is_dir() and not d.name.startswith(".")) for s in splits
        }
        classes = self._given or sorted(set().union(*found.values()))
        extra = set().union(*found.values()) - set(classes)
        if extra:
            raise DataError(root, f"class folders {sorted(extra)} are not in the configured class_names {classes}")
        self.class_names = classes
        records = []
        for split in splits:
            for cls in found[split]:
                for f in sorted((root / split / cls).rglob("*")):
                    if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."):
                        rel = f.relative_to(root).as_posix()
                        carve = split == "train" and "val" not in splits
                        records.append(
                            {
                                "id": rel,
                                "split": "trainval" if carve else split,
                                "path": str(f),
                                "label": np.int64(classes.index(cls)),
                            }
                        )
        return pd.DataFrame.from_records(records)
