"""BTCV (Beyond the Cranial Vault) abdomen: 30 labelled CT volumes, 13 organs.

Two layouts are read: the Synapse download (``RawData/Training/img/img0001.nii.gz`` with
``RawData/Training/label/label0001.nii.gz``) and MONAI's tutorial layout (``imagesTr/img0001.nii.gz``,
``labelsTr/label0001.nii.gz``, ``dataset_0.json``). ``split``: ``transunet`` (the TransUNet/Synapse test cases,
the usual BTCV comparison), ``json`` (``dataset_0.json``: ``validation`` -> test) or ``random`` (70/15/15).
Validation is carved from the training cases. CT intensities are windowed to [-175, 250] HU (UNETR).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo, inside

ORGANS = [
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_and_splenic_veins",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
]
#: TransUNet's Synapse test volumes (lists/lists_Synapse/test_vol.txt)
TRANSUNET_TEST = ["0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038"]
LAYOUTS = [
    ("imagesTr", "labelsTr"),
    ("RawData/Training/img", "RawData/Training/label"),
    ("Training/img", "Training/label"),
]
INFO = DatasetInfo(
    key="btcv",
    title="BTCV Multi-Atlas Labeling Beyond the Cranial Vault (abdomen)",
    kind="3D CT (NIfTI): 13-organ segmentation",
    layout=(
        "  RawData/Training/img/img0001.nii.gz ... + RawData/Training/label/label0001.nii.gz ...\n"
        "  or imagesTr/img0001.nii.gz + labelsTr/label0001.nii.gz [+ dataset_0.json]"
    ),
    licence="Synapse terms of use (registration; research use), syn3193805",
    url="https://www.synapse.org/#!Synapse:syn3193805/wiki/217789",
    masks=True,
)


class BTCV(AdapterDataModule):
    """BTCV 13-organ segmentation (classes 0..13)."""

    info = INFO
    fixed_dims = 3
    default_intensity = {"type": "window", "min": -175.0, "max": 250.0}
    seg_classes = ORGANS

    def __init__(self, root: str, *, split: str = "transunet", orientation: str | None = "RAS", **kw: Any) -> None:
        if split not in ("transunet", "json", "random"):
            raise ValueError(f"btcv: split must be transunet, json or random, got {split!r}")
        super().__init__(root, task_type="multiclass", class_names=[], orientation=orientation, **kw)
        self.split = split

    def scan(self, root: Path) -> pd.DataFrame:
        if self.split == "json":
            return self._from_json(root)
        img_dir, label_dir = next(((root / i, root / j) for i, j in LAYOUTS if (root / i).is_dir()), (None, None))
        if img_dir is None:
            raise DataError(root, f"no image folder found; expected layout:\n{self.info.layout}")
        records = []
        for p in sorted(img_dir.glob("img*.nii*")):
            m = re.fullmatch(r"img(\d+)\.nii(\.gz)?", p.name)
            if not m:
                continue
            case = m.group(1)
            split = None if self.split == "random" else "test" if case in TRANSUNET_TEST else "trainval"
            mask = str(label_dir / p.name.replace("img", "label", 1))
            records.append({"id": case, "split": split, "path": str(p), "mask_path": mask, "label": np.int64(0)})
        return pd.DataFrame.from_records(records)

    def _from_json(self, root: Path) -> pd.DataFrame:
        meta_file = root / "dataset_0.json"
        if not meta_file.is_file():
            raise DataError(meta_file, "not found (split=json needs MONAI's dataset_0.json)")
        meta = json.loads(meta_file.read_text())
        records = []
        for key, split in (("training", "trainval"), ("validation", "test")):
            for e in meta.get(key, []):
                image = inside(root, e["image"])
                case = re.sub(r"\D", "", image.name.split(".")[0]) or image.name
                records.append(
                    {
                        "id": case,
                        "split": split,
                        "path": str(image),
                        "mask_path": str(inside(root, e["label"])),
                        "label": np.int64(0),
                    }
                )
        return pd.DataFrame.from_records(records)
