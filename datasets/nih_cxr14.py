"""NIH ChestX-ray14: ``Data_Entry_2017.csv`` (or ``_v2020``), the official split lists and the PNG folders.

Labels are the 14 findings of ``Finding Labels`` (``|``-separated; ``No Finding`` = all zero). ``test_list.txt``
is the test split; validation is carved from ``train_val_list.txt`` by patient (no patient in two splits).
Images may sit in ``images/`` or in the archive folders ``images_001/images/`` ... ``images_012/images/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo, first_existing, inside, read_table

log = logging.getLogger(__name__)
FINDINGS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
INFO = DatasetInfo(
    key="nih_cxr14",
    title="NIH ChestX-ray14",
    kind="2D chest X-ray (PNG): 14-finding multi-label classification, official test list",
    layout=(
        "  Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv)\n"
        "      Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,...\n"
        "  train_val_list.txt, test_list.txt   (one image file name per line)\n"
        "  images/*.png  or  images_001/images/*.png ... images_012/images/*.png"
    ),
    licence="CC0 1.0 (NIH Clinical Center); cite Wang et al., CVPR 2017",
    url="https://nihcc.app.box.com/v/ChestXray-NIHCC",
)


class NIHChestXray14(AdapterDataModule):
    """ChestX-ray14 multi-label classification over the 14 findings."""

    info = INFO

    def __init__(self, root: str, **kw: Any) -> None:
        super().__init__(root, task_type="multilabel", class_names=FINDINGS, **kw)

    def scan(self, root: Path) -> pd.DataFrame:
        csv = first_existing(root, "Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
        table = read_table(csv, ["Image Index", "Finding Labels", "Patient ID"], dtype={"Image Index": str})
        split = {}
        for name, value in (("train_val_list.txt", "trainval"), ("test_list.txt", "test")):
            listed = first_existing(root, name).read_text().split()
            split.update(dict.fromkeys(listed, value))
        unknown = set(table["Finding Labels"].str.split("|").explode()) - {*FINDINGS, "No Finding"}
        if unknown:
            raise DataError(csv, f"unknown finding names {sorted(unknown)}; expected {FINDINGS} or 'No Finding'")
        paths = self._image_paths(root)
        table = table[table["Image Index"].isin(split.keys())]
        n_unlisted = len(split) - len(table)
        if n_unlisted:
            log.warning("nih_cxr14: %d image(s) in the split lists are not in %s", n_unlisted, csv.name)
        labels = [np.asarray([f in s.split("|") for f in FINDINGS], np.float32) for s in table["Finding Labels"]]
        return pd.DataFrame(
            {
                "id": table["Image Index"].to_numpy(),
                "split": table["Image Index"].map(split).to_numpy(),
                "group": table["Patient ID"].astype(str).to_numpy(),
                "label": labels,
                "path": [paths.get(n, str(inside(root / "images", n))) for n in table["Image Index"]],
            }
        )

    @staticmethod
    def _image_paths(root: Path) -> dict[str, str]:
        """File name -> path over ``images/`` and ``images_NNN/images/`` (one directory listing each)."""
        folders = [root / "images", *sorted(root.glob("images_*/images"))]
        out: dict[str, str] = {}
        for folder in folders:
            if folder.is_dir():
                with os.scandir(folder) as it:
                    out.update({e.name: e.path for e in it if e.name.lower().endswith(".png")})
        return out
