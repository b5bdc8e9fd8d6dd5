"""RSNA Pneumonia Detection Challenge, stage 2: DICOMs plus ``stage_2_train_labels.csv``.

One row per box (``patientId,x,y,width,height,Target``; negatives have one row with empty box columns). The
image label is ``Target`` (binary pneumonia). For segmentation the boxes are filled into a mask, as MGCA does
for its RSNA segmentation task. Only the stage-2 training images are labelled, so the reference split is a
random 70/15/15 split of patients (seed 0, see ``_common.carve``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo, inside, read_table

INFO = DatasetInfo(
    key="rsna",
    title="RSNA Pneumonia Detection Challenge (stage 2)",
    kind="2D chest X-ray (DICOM): binary pneumonia classification; boxes -> masks for segmentation",
    layout=(
        "  stage_2_train_labels.csv        patientId,x,y,width,height,Target (one row per box)\n"
        "  stage_2_train_images/<patientId>.dcm"
    ),
    licence="RSNA/Kaggle competition data terms (non-commercial research and education)",
    url="https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data",
    masks=True,
)
COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]


class RSNAPneumonia(AdapterDataModule):
    """RSNA pneumonia: ``label`` is a float 0/1; with ``target: mask`` the boxes become a binary mask."""

    info = INFO

    def __init__(self, root: str, *, images_dir: str = "stage_2_train_images", **kw: Any) -> None:
        super().__init__(root, task_type="binary", class_names=["pneumonia"], **kw)
        self.images_dir = images_dir
        self.seg_classes = ["background", "pneumonia"]

    def scan(self, root: Path) -> pd.DataFrame:
        csv = root / "stage_2_train_labels.csv"
        table = read_table(csv, COLUMNS, dtype={"patientId": str})
        bad = ~table["Target"].isin([0, 1])
        if bad.any():
            raise DataError(
                csv, f"line {int(bad.idxmax()) + 2}: Target must be 0 or 1, got {table['Target'][bad].iloc[0]}"
            )
        pos = table["Target"] == 1
        missing_box = pos & table[["x", "y", "width", "height"]].isna().any(axis=1)
        if missing_box.any():
            raise DataError(csv, f"line {int(missing_box.idxmax()) + 2}: Target=1 without a complete box")
        images = root / self.images_dir
        records = []
        for pid, rows in table.groupby("patientId", sort=True):
            boxes = rows.loc[rows["Target"] == 1, ["x", "y", "width", "height"]].to_numpy(float).tolist()
            records.append(
                {
                    "id": pid,
                    "split": None,  # random 70/15/15 by patient
                    "label": np.float32(bool(boxes)),
                    "path": str(inside(images, f"{pid}.dcm")),
                    "boxes": boxes,
                }
            )
        return pd.DataFrame.from_records(records)
