"""Medical Segmentation Decathlon tasks: ``dataset.json`` + ``imagesTr``/``labelsTr`` NIfTI.

With ``dataset.json`` the ``training`` list gives the pairs, ``labels`` the class names and ``modality`` the
channel count (multi-modal tasks store 4D NIfTI, channel last). Without it, image and label files are paired by
name; nnU-Net style channel files (``case_0000.nii.gz``, ``case_0001.nii.gz`` with label ``case.nii.gz``)
are stacked as channels. macOS ``._*`` files (present in the official archives) are ignored. The unlabelled
``imagesTs`` are not used; labelled cases are split 70/15/15 by the hash rule or a committed split file.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo, inside
from ._reader import NIFTI_SUFFIXES

log = logging.getLogger(__name__)
INFO = DatasetInfo(
    key="msd",
    title="Medical Segmentation Decathlon (any task, e.g. Task04_Hippocampus)",
    kind="3D CT/MRI (NIfTI): segmentation",
    layout=(
        "  dataset.json        (optional: training pairs, labels, modality)\n"
        "  imagesTr/<case>.nii.gz   (or <case>_0000.nii.gz, <case>_0001.nii.gz ... per channel)\n"
        "  labelsTr/<case>.nii.gz"
    ),
    licence="CC BY-SA 4.0",
    url="http://medicaldecathlon.com/ (also https://registry.opendata.aws/msd/)",
    masks=True,
)


def nifti_stem(name: str) -> str | None:
    """``case.nii.gz`` -> ``case``; None for non-NIfTI and hidden (``._case.nii.gz``) files."""
    if name.startswith("."):
        return None
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def pair_by_name(images: Path, labels: Path) -> list[dict[str, Any]]:
    """Cases from two folders: same file name, or nnU-Net channel files ``<case>_NNNN`` for label ``<case>``."""
    label_files = {s: p for p in sorted(labels.iterdir()) if (s := nifti_stem(p.name))} if labels.is_dir() else {}
    cases: dict[str, list[str]] = {}
    for p in sorted(images.iterdir()):
        stem = nifti_stem(p.name)
        if stem is None:
            continue
        m = re.fullmatch(r"(.+)_(\d{4})", stem)
        case = m.group(1) if m and m.group(1) in label_files and stem not in label_files else stem
        cases.setdefault(case, []).append(str(p))
    orphans = sorted(set(label_files) - set(cases))
    if orphans:
        log.warning("%s: %d label file(s) without an image, e.g. %s", labels, len(orphans), orphans[0])
    return [
        {"id": c, "path": ps if len(ps) > 1 else ps[0], "mask_path": str(label_files[c]) if c in label_files else None}
        for c, ps in sorted(cases.items())
    ]


class MSD(AdapterDataModule):
    """One MSD task (or any folder of that layout) for 3D segmentation."""

    info = INFO
    fixed_dims = 3
    default_intensity = {"type": "zscore", "nonzero": True}

    def __init__(self, root: str, *, seg_classes: list[str] | None = None, orientation: str | None = "RAS", **kw: Any):
        super().__init__(root, task_type="multiclass", class_names=[], orientation=orientation, **kw)
        self._seg_classes = list(seg_classes) if seg_classes else None

    @property
    def seg_classes(self) -> list[str]:
        if self._seg_classes is None:
            self.manifest  # noqa: B018 - scanning fills the class names from dataset.json or a label file
        return self._seg_classes or []

    def scan(self, root: Path) -> pd.DataFrame:
        meta_file = root / "dataset.json"
        if meta_file.is_file():
            rows = self._from_json(root, meta_file)
        else:
            if not (root / "imagesTr").is_dir():
                raise DataError(root / "imagesTr", f"not found; expected layout:\n{self.info.layout}")
            rows = pair_by_name(root / "imagesTr", root / "labelsTr")
        if self._seg_classes is None:
            self._seg_classes = self._infer_classes(rows)
        return pd.DataFrame.from_records([{**r, "split": None, "label": np.int64(0)} for r in rows])

    def _from_json(self, root: Path, meta_file: Path) -> list[dict[str, Any]]:
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(meta_file, f"not valid JSON: {e}") from None
        if "training" not in meta:
            raise DataError(meta_file, "has no 'training' list")
        n_mod = len(meta.get("modality", {"0": ""}))
        if n_mod != self.in_channels:
            raise DataError(meta_file, f"lists {n_mod} modalities, the config says in_channels={self.in_channels}")
        if self._seg_classes is None and "labels" in meta:
            self._seg_classes = [meta["labels"][k] for k in sorted(meta["labels"], key=int)]
        rows = []
        for entry in meta["training"]:
            if not {"image", "label"} <= set(entry):
                raise DataError(meta_file, f"training entry {entry} lacks 'image' or 'label'")
            image = inside(root, entry["image"])
            rows.append(
                {
                    "id": nifti_stem(image.name) or image.name,
                    "path": str(image),
                    "mask_path": str(inside(root, entry["label"])),
                }
            )
        return rows

    def _infer_classes(self, rows: list[dict[str, Any]]) -> list[str]:
        """No names given: read one label map (header + data) and name classes by value."""
        first = next((r["mask_path"] for r in rows if r.get("mask_path")), None)
        if first is None:
            return []
        try:
            top = int(np.asarray(nib.load(first).dataobj).max())
        except Exception as e:  # noqa: BLE001
            raise DataError(first, f"cannot read label file ({type(e).__name__}: {e})") from None
        names = ["background", *(f"class_{i}" for i in range(1, top + 1))]
        log.warning("%s: no seg_classes in the config or dataset.json; using %s from %s", self.name, names, first)
        return names
