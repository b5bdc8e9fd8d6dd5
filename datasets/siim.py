"""SIIM-ACR Pneumothorax: DICOMs in study/series folders plus an RLE mask CSV.

``train-rle.csv`` has the header ``ImageId, EncodedPixels`` (with the space) and one row per pneumothorax
region; ``-1`` marks an image without pneumothorax. The competition's RLE is *relative* (each start counts
from the end of the previous run) and column-major; the later ``stage_2_train.csv`` uses absolute 1-based
starts (``rle: absolute``). Label: pneumothorax present. Split: random 70/15/15 of images (MGCA's protocol).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DatasetInfo, inside, read_table
from ._reader import FileReader

INFO = DatasetInfo(
    key="siim",
    title="SIIM-ACR Pneumothorax Segmentation",
    kind="2D chest X-ray (DICOM): pneumothorax segmentation (RLE masks) and binary classification",
    layout=(
        "  train-rle.csv     ImageId, EncodedPixels   (relative RLE, -1 = none, one row per region)\n"
        "  dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm"
    ),
    licence="SIIM/ACR Kaggle competition data terms (non-commercial research); images from NIH ChestX-ray14",
    url="https://www.kaggle.com/competitions/siim-acr-pneumothorax-segmentation",
    masks=True,
)


class SIIMPneumothorax(AdapterDataModule):
    """SIIM-ACR pneumothorax; ``target: mask`` decodes the RLE rows of each image into one binary mask."""

    info = INFO

    def __init__(
        self,
        root: str,
        *,
        rle_csv: str = "train-rle.csv",
        images_dir: str = "dicom-images-train",
        rle: str = "relative",
        **kw: Any,
    ) -> None:
        if rle not in ("relative", "absolute"):
            raise ValueError(f"siim: rle must be relative or absolute, got {rle!r}")
        super().__init__(root, task_type="binary", class_names=["pneumothorax"], **kw)
        self.rle_csv, self.images_dir, self.rle = rle_csv, images_dir, rle
        self.seg_classes = ["background", "pneumothorax"]

    def scan(self, root: Path) -> pd.DataFrame:
        table = read_table(root / self.rle_csv, ["ImageId", "EncodedPixels"], skipinitialspace=True, dtype=str)
        images = inside(root, self.images_dir)
        found = {}
        for folder, _, files in os.walk(images):
            for f in files:
                if f.lower().endswith(".dcm"):
                    found[f[:-4]] = os.path.join(folder, f)
        records = []
        for image_id, rows in table.groupby("ImageId", sort=True):
            rles = [r.strip() for r in rows["EncodedPixels"].fillna("-1")]
            positive = any(r != "-1" for r in rles)
            records.append(
                {
                    "id": image_id,
                    "split": None,
                    "label": np.float32(positive),
                    # a missing image is reported by the manifest check under its expected name
                    "path": found.get(image_id, str(images / f"{image_id}.dcm")),
                    "rle": [r for r in rles if r != "-1"],
                }
            )
        return pd.DataFrame.from_records(records)

    def reader(self) -> FileReader:
        r = super().reader()
        r.rle_relative = self.rle == "relative"
        return r
