"""COVIDx CXR: split list files (``patient_id filename class source``) and one image folder per split.

``version`` picks the list files: ``9A``/``8A`` (``train_COVIDx9A.txt``, ``test_COVIDx9A.txt``; classes normal,
pneumonia, COVID-19), ``9B``/``8B`` (positive/negative), ``cxr2`` (``train.txt``, ``test.txt``; binary),
``cxr3``/``cxr4`` (``train.txt``, ``val.txt``, ``test.txt``; binary). The official test list is the test split;
without a validation list, validation is carved from training by patient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo, inside

THREE = ["normal", "pneumonia", "COVID-19"]
BINARY = ["negative", "positive"]
VERSIONS: dict[str, tuple[dict[str, str], list[str]]] = {
    **{v: ({"train": f"train_COVIDx{v}.txt", "test": f"test_COVIDx{v}.txt"}, THREE) for v in ("8A", "9A")},
    **{v: ({"train": f"train_COVIDx{v}.txt", "test": f"test_COVIDx{v}.txt"}, BINARY) for v in ("8B", "9B")},
    "cxr2": ({"train": "train.txt", "test": "test.txt"}, BINARY),
    **{v: ({"train": "train.txt", "val": "val.txt", "test": "test.txt"}, BINARY) for v in ("cxr3", "cxr4")},
}
INFO = DatasetInfo(
    key="covidx",
    title="COVIDx CXR (COVID-Net)",
    kind="2D chest X-ray (PNG/JPEG): COVID-19 classification (3-class A versions, binary B/CXR-2+ versions)",
    layout=(
        "  train_COVIDx9A.txt, test_COVIDx9A.txt  (or train.txt/[val.txt]/test.txt for CXR-2/3/4)\n"
        "      lines: <patient_id> <filename> <class> <source>\n"
        "  train/<filename>, test/<filename>, [val/<filename>]"
    ),
    licence="mixed, per source dataset (see the COVID-Net licences page); research use",
    url="https://github.com/lindawangg/COVID-Net/blob/master/docs/COVIDx.md",
)


class COVIDx(AdapterDataModule):
    """COVIDx classification: multiclass for the A versions, binary (label 1 = positive) otherwise."""

    info = INFO

    def __init__(self, root: str, *, version: str = "9A", **kw: Any) -> None:
        if str(version) not in VERSIONS:
            raise ValueError(f"covidx: unknown version {version!r}; choose one of {sorted(VERSIONS)}")
        self.files, classes = VERSIONS[str(version)]
        binary = classes == BINARY
        super().__init__(
            root, task_type="binary" if binary else "multiclass", class_names=["positive"] if binary else classes, **kw
        )
        self.version, self.classes = str(version), classes

    def scan(self, root: Path) -> pd.DataFrame:
        has_val = "val" in self.files and (root / self.files["val"]).exists()
        frames = []
        for split, name in self.files.items():
            if split == "val" and not has_val:
                continue  # a release without a val list: validation is carved from training by patient
            rows = self._parse(root / name, root / split)
            rows["split"] = "trainval" if split == "train" and not has_val else split
            frames.append(rows)
        df = pd.concat(frames, ignore_index=True)
        dup = df["id"].duplicated()
        if dup.any():
            raise DataError(root, f"image {df['id'][dup].iloc[0]} is listed twice across the split files")
        return df

    def _parse(self, txt: Path, folder: Path) -> pd.DataFrame:
        if not txt.is_file():
            raise DataError(
                txt, f"split list not found (COVIDx version {self.version} expects {list(self.files.values())})"
            )
        records = []
        for n, line in enumerate(txt.read_text().splitlines(), 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 3:
                raise DataError(txt, f"line {n}: expected 'patient_id filename class [source]', got {line!r}")
            # filenames may contain spaces: the class is the last token (3 columns) or the one before the source
            cls_at = len(tokens) - 1 if tokens[-1] in self.classes else len(tokens) - 2
            cls, filename = tokens[cls_at], " ".join(tokens[1:cls_at])
            if cls not in self.classes:
                raise DataError(txt, f"line {n}: class {cls!r} is not one of {self.classes} (version {self.version})")
            index = self.classes.index(cls)
            label = np.float32(index) if self.task_type == "binary" else np.int64(index)
            path = str(inside(folder, filename))
            records.append({"id": f"{folder.name}/{filename}", "group": tokens[0], "path": path, "label": label})
        return pd.DataFrame.from_records(records)
