"""A user's own 3D segmentation data: an image folder and a mask folder, matched by name.

Images are NIfTI files or DICOM series (one sub-folder of slices per case); masks are NIfTI with the same
case name (``case.nii.gz``, or ``case`` + ``mask_suffix`` such as ``_seg``). Both are read through MONAI and
brought to RAS orientation, so a DICOM series and a NIfTI mask written from it line up. Splits: 70/15/15 by
case name, or a committed ``split_file``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo
from .msd import nifti_stem

log = logging.getLogger(__name__)
INFO = DatasetInfo(
    key="nifti_folder",
    title="NIfTI / DICOM-series folder (your own 3D data)",
    kind="3D volumes (NIfTI or DICOM series) with NIfTI masks: segmentation",
    layout=(
        "  <images_dir>/<case>.nii.gz  or  <images_dir>/<case>/ (DICOM slices of one series)\n"
        "  <masks_dir>/<case>[<mask_suffix>].nii.gz"
    ),
    licence="yours",
    url="(your data)",
    masks=True,
)


class NiftiFolder(AdapterDataModule):
    """3D images with label maps; ``seg_classes`` names the mask values 0..K-1."""

    info = INFO
    fixed_dims = 3
    default_intensity = {"type": "zscore", "nonzero": False}

    def __init__(
        self,
        root: str,
        *,
        seg_classes: list[str],
        images_dir: str = "images",
        masks_dir: str = "masks",
        mask_suffix: str = "",
        orientation: str | None = "RAS",
        **kw: Any,
    ) -> None:
        super().__init__(root, task_type="multiclass", class_names=[], orientation=orientation, **kw)
        self.seg_classes = list(seg_classes)
        self.images_dir, self.masks_dir, self.mask_suffix = images_dir, masks_dir, mask_suffix

    def scan(self, root: Path) -> pd.DataFrame:
        images, masks = root / self.images_dir, root / self.masks_dir
        if not images.is_dir():
            raise DataError(images, f"not found; expected layout:\n{self.info.layout}")
        mask_files = {}
        if masks.is_dir():
            for p in masks.iterdir():
                stem = nifti_stem(p.name)
                if stem is not None and stem.endswith(self.mask_suffix):
                    mask_files[stem[: len(stem) - len(self.mask_suffix)]] = str(p)
        records = []
        for p in sorted(images.iterdir()):
            case = p.name if p.is_dir() else nifti_stem(p.name)
            if case is None or case.startswith("."):
                continue
            records.append(
                {"id": case, "split": None, "path": str(p), "mask_path": mask_files.get(case), "label": np.int64(0)}
            )
        orphans = sorted(set(mask_files) - {r["id"] for r in records})
        if orphans:
            log.warning("%s: %d mask(s) without an image, e.g. %s", masks, len(orphans), orphans[0])
        return pd.DataFrame.from_records(records)
